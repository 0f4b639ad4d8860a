//! A backend-neutral view of C types, and the one resolver every reader shares.
//!
//! BTF, DWARF, Volatility 2 dwarfdump text and Volatility 3 ISF all describe types as a graph
//! of nodes (struct, pointer, typedef, array…). Each reader implements [`TypeSource`]; the
//! functions here flatten anonymous members, follow typedefs, compute sizes and C spellings, and
//! turn manifest entries into profile layouts — so every reader yields the same profile for
//! the same kernel.

use std::collections::BTreeMap;

use super::error::{malformed, RResult};
use super::manifest::Manifest;
use super::model::{Absent, EnumDef, Field, TypeLayout};

/// A reader-specific type identifier (BTF id, DWARF offset, …).
pub type TypeId = u64;
/// The `void` type (no type).
pub const VOID: TypeId = u64::MAX;

/// Bound on typedef/qualifier/nesting chains: kernel types are shallow, garbage is not.
const MAX_DEPTH: usize = 64;

/// What kind of named type to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `struct` or `union`.
    Aggregate,
    /// `enum`.
    Enum,
}

/// One member of a struct or union, as the input describes it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: Option<String>,
    /// Offset in bits from the start of the containing aggregate.
    pub bit_offset: u64,
    /// Width of a bitfield.
    pub bit_size: Option<u32>,
    pub ty: TypeId,
}

/// One type node.
#[derive(Debug, Clone)]
pub enum Node {
    Void,
    Base {
        name: String,
        size: u64,
    },
    Pointer {
        target: TypeId,
    },
    Aggregate {
        union: bool,
        name: Option<String>,
        size: u64,
        members: Vec<Member>,
    },
    /// A declaration without a body (`struct foo;`).
    Forward {
        union: bool,
        name: String,
    },
    Enum {
        name: Option<String>,
        size: u64,
        values: Vec<(String, i64)>,
    },
    Typedef {
        name: String,
        target: TypeId,
    },
    Array {
        elem: TypeId,
        /// `None`: flexible array member.
        count: Option<u64>,
    },
    Qualified {
        qual: &'static str,
        target: TypeId,
    },
    Func,
}

/// A reader of type information.
pub trait TypeSource {
    /// A complete definition of a named struct/union or enum, if the input has one.
    fn find(&self, kind: Kind, name: &str) -> RResult<Option<TypeId>>;
    /// The node for an identifier returned by this source.
    fn node(&self, id: TypeId) -> RResult<Node>;
    /// Size of a pointer in bytes.
    fn pointer_size(&self) -> u64 {
        8
    }
}

/// Follow typedefs and qualifiers to the underlying node.
pub fn strip(src: &dyn TypeSource, mut id: TypeId) -> RResult<(TypeId, Node)> {
    for _ in 0..MAX_DEPTH {
        if id == VOID {
            return Ok((id, Node::Void));
        }
        match src.node(id)? {
            Node::Typedef { target, .. } | Node::Qualified { target, .. } => id = target,
            n => return Ok((id, n)),
        }
    }
    Err(malformed(format!("typedef chain too deep at type {id:#x}")))
}

/// `sizeof` a type.
pub fn size_of(src: &dyn TypeSource, id: TypeId) -> RResult<u64> {
    size_of_depth(src, id, 0)
}

fn size_of_depth(src: &dyn TypeSource, id: TypeId, depth: usize) -> RResult<u64> {
    if depth > MAX_DEPTH {
        return Err(malformed(format!("type nesting too deep at {id:#x}")));
    }
    let (_, node) = strip(src, id)?;
    Ok(match node {
        Node::Void | Node::Func | Node::Forward { .. } => 0,
        Node::Base { size, .. } | Node::Aggregate { size, .. } | Node::Enum { size, .. } => size,
        Node::Pointer { .. } => src.pointer_size(),
        Node::Array { elem, count } => count
            .unwrap_or(0)
            .checked_mul(size_of_depth(src, elem, depth + 1)?)
            .ok_or_else(|| malformed("array size overflows"))?,
        Node::Typedef { .. } | Node::Qualified { .. } => unreachable!("stripped"),
    })
}

/// C spelling of a type, e.g. `struct list_head`, `const char *`, `void *[64]`.
pub fn c_name(src: &dyn TypeSource, id: TypeId) -> RResult<String> {
    c_name_depth(src, id, 0)
}

fn c_name_depth(src: &dyn TypeSource, id: TypeId, depth: usize) -> RResult<String> {
    if depth > MAX_DEPTH {
        return Err(malformed(format!("type nesting too deep at {id:#x}")));
    }
    if id == VOID {
        return Ok("void".into());
    }
    Ok(match src.node(id)? {
        Node::Void => "void".into(),
        Node::Base { name, .. } => name,
        Node::Pointer { target } => {
            let inner = c_name_depth(src, target, depth + 1)?;
            if inner.ends_with('*') {
                format!("{inner}*")
            } else {
                format!("{inner} *")
            }
        }
        Node::Aggregate { union, name, .. } => {
            let kw = if union { "union" } else { "struct" };
            match name {
                Some(n) => format!("{kw} {n}"),
                None => format!("{kw} {{...}}"),
            }
        }
        Node::Forward { union, name } => {
            format!("{} {name}", if union { "union" } else { "struct" })
        }
        Node::Enum { name, .. } => match name {
            Some(n) => format!("enum {n}"),
            None => "enum {...}".into(),
        },
        Node::Typedef { name, .. } => name,
        Node::Array { elem, count } => {
            let inner = c_name_depth(src, elem, depth + 1)?;
            format!(
                "{inner}[{}]",
                count.map(|c| c.to_string()).unwrap_or_default()
            )
        }
        Node::Qualified { qual, target } => {
            format!("{qual} {}", c_name_depth(src, target, depth + 1)?)
        }
        Node::Func => "func".into(),
    })
}

/// A member found by name, with its offset from the outermost aggregate.
#[derive(Debug, Clone)]
pub struct Found {
    pub bit_offset: u64,
    pub bit_size: Option<u32>,
    pub ty: TypeId,
}

/// Find a direct member by name, looking through anonymous structs and unions.
pub fn find_member(src: &dyn TypeSource, agg: TypeId, name: &str) -> RResult<Option<Found>> {
    find_member_depth(src, agg, name, 0, 0)
}

fn find_member_depth(
    src: &dyn TypeSource,
    agg: TypeId,
    name: &str,
    base: u64,
    depth: usize,
) -> RResult<Option<Found>> {
    if depth > MAX_DEPTH {
        return Err(malformed("anonymous member nesting too deep"));
    }
    let members = match strip(src, agg)?.1 {
        Node::Aggregate { members, .. } => members,
        _ => return Ok(None),
    };
    for m in &members {
        let off = base
            .checked_add(m.bit_offset)
            .ok_or_else(|| malformed("member offset overflows"))?;
        match &m.name {
            Some(n) if n == name => {
                return Ok(Some(Found {
                    bit_offset: off,
                    bit_size: m.bit_size,
                    ty: m.ty,
                }))
            }
            Some(_) => {}
            None => {
                if let Some(f) = find_member_depth(src, m.ty, name, off, depth + 1)? {
                    return Ok(Some(f));
                }
            }
        }
    }
    Ok(None)
}

/// Find a dotted member path (`d_u.d_alias`).
pub fn find_path(src: &dyn TypeSource, agg: TypeId, path: &str) -> RResult<Option<Found>> {
    let mut cur: Option<Found> = None;
    for part in path.split('.') {
        let (ty, base) = match &cur {
            None => (agg, 0),
            Some(f) => (f.ty, f.bit_offset),
        };
        match find_member(src, ty, part)? {
            Some(mut f) => {
                f.bit_offset = f
                    .bit_offset
                    .checked_add(base)
                    .ok_or_else(|| malformed("member offset overflows"))?;
                cur = Some(f);
            }
            None => return Ok(None),
        }
    }
    Ok(cur)
}

/// The profile record for a found member.
pub fn field_record(src: &dyn TypeSource, key: &str, path: &str, f: &Found) -> RResult<Field> {
    let size = size_of(src, f.ty)?;
    let count = match strip(src, f.ty)?.1 {
        Node::Array { count, .. } => Some(count.unwrap_or(0)),
        _ => None,
    };
    let offset = match f.bit_size {
        // Bitfields: the offset of the storage unit, as pahole prints it.
        Some(_) if size > 0 => (f.bit_offset / 8 / size) * size,
        _ => f.bit_offset / 8,
    };
    Ok(Field {
        name: (path != key).then(|| path.to_owned()),
        offset,
        size,
        type_name: c_name(src, f.ty)?,
        count,
        bit_offset: f.bit_size.map(|_| f.bit_offset),
        bit_size: f.bit_size,
    })
}

/// What extraction of the manifest's types and enums from one or more sources produced.
#[derive(Debug, Default)]
pub struct Extracted {
    pub types: BTreeMap<String, TypeLayout>,
    pub enums: BTreeMap<String, EnumDef>,
    pub absent: Vec<Absent>,
    /// For each extracted type/enum key, the index of the source it came from.
    pub origin: BTreeMap<String, usize>,
}

fn absent(kind: &str, key: &str, tried: &[&str], required: bool) -> Absent {
    Absent {
        kind: kind.into(),
        key: key.into(),
        tried: tried.iter().map(|s| s.to_string()).collect(),
        required,
        note: None,
    }
}

/// Resolve every manifest type and enum, trying `sources` in order (vmlinux first, then modules).
pub fn extract(manifest: &Manifest, sources: &[&dyn TypeSource]) -> RResult<Extracted> {
    let mut out = Extracted::default();
    for t in &manifest.types {
        let cands = t.candidates();
        let mut hit = None;
        'search: for (si, src) in sources.iter().enumerate() {
            for name in &cands {
                if let Some(id) = src.find(Kind::Aggregate, name)? {
                    hit = Some((si, *src, *name, id));
                    break 'search;
                }
            }
        }
        let Some((si, src, name, id)) = hit else {
            out.absent.push(absent("type", &t.key, &cands, t.required));
            continue;
        };
        let (union, size) = match strip(src, id)?.1 {
            Node::Aggregate { union, size, .. } => (union, size),
            _ => return Err(malformed(format!("{name} is not a struct or union"))),
        };
        let mut fields = BTreeMap::new();
        for f in &t.fields {
            let fc = f.candidates();
            let mut got = None;
            for path in &fc {
                if let Some(found) = find_path(src, id, path)? {
                    got = Some(field_record(src, &f.key, path, &found)?);
                    break;
                }
            }
            match got {
                Some(rec) => {
                    fields.insert(f.key.clone(), rec);
                }
                None => out.absent.push(absent(
                    "field",
                    &format!("{}.{}", t.key, f.key),
                    &fc,
                    f.required,
                )),
            }
        }
        out.origin.insert(t.key.clone(), si);
        out.types.insert(
            t.key.clone(),
            TypeLayout {
                name: (name != t.key).then(|| name.to_owned()),
                kind: if union { "union" } else { "struct" }.into(),
                size,
                fields,
            },
        );
    }
    for e in &manifest.enums {
        let cands = e.candidates();
        let mut hit = None;
        'esearch: for (si, src) in sources.iter().enumerate() {
            for name in &cands {
                if let Some(id) = src.find(Kind::Enum, name)? {
                    hit = Some((si, *src, *name, id));
                    break 'esearch;
                }
            }
        }
        let Some((si, src, name, id)) = hit else {
            out.absent.push(absent("enum", &e.key, &cands, e.required));
            continue;
        };
        let (size, values) = match strip(src, id)?.1 {
            Node::Enum { size, values, .. } => (size, values),
            _ => return Err(malformed(format!("{name} is not an enum"))),
        };
        let values: BTreeMap<String, i64> = values.into_iter().collect();
        for v in &e.values {
            if !values.contains_key(v) {
                out.absent.push(absent(
                    "enumerator",
                    &format!("{}.{}", e.key, v),
                    &[v.as_str()],
                    e.required,
                ));
            }
        }
        out.origin.insert(e.key.clone(), si);
        out.enums.insert(
            e.key.clone(),
            EnumDef {
                name: (name != e.key).then(|| name.to_owned()),
                size,
                values,
            },
        );
    }
    Ok(out)
}
