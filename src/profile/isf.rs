//! Volatility 3 ISF (Intermediate Symbol Format) import and export.
//!
//! ISF is JSON: `base_types`, `user_types` (structs/unions, anonymous ones named
//! `unnamed_<hash>` and referenced from fields marked `anonymous`), `enums`, `symbols`
//! (addresses; `linux_banner` carries its bytes base64-encoded in `constant_data`). Field
//! types are inline descriptors (`{"kind": "pointer", "subtype": {...}}`); typedefs are
//! already resolved away, so an imported profile spells types without them.
//!
//! Export writes only the profile's entries (plus opaque stand-ins for referenced types), so
//! Volatility 3 can load it and read the fields pct knows.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use super::build::fill_from_banner;
use super::error::{malformed, Error, RResult, Result};
use super::manifest::Manifest;
use super::model::{Field, Profile};
use super::types::{extract, Kind, Member, Node, TypeId, TypeSource, VOID};

/// Decompressed ISF larger than this is refused.
const MAX_ISF: usize = 1 << 30;

/// ISF types converted into nodes, reachable from the manifest's names.
pub struct IsfTypes {
    nodes: Vec<Node>,
    index: HashMap<(Kind, String), TypeId>,
}

struct Conv<'v> {
    isf: &'v Value,
    nodes: Vec<Node>,
    user: HashMap<String, TypeId>,
    enums: HashMap<String, TypeId>,
    pending: Vec<(TypeId, String)>,
}

fn get<'v>(v: &'v Value, k: &str) -> RResult<&'v Value> {
    v.get(k)
        .ok_or_else(|| malformed(format!("ISF: missing \"{k}\" in {}", short(v))))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(80).map(|c| c.0).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

fn as_u64(v: &Value, what: &str) -> RResult<u64> {
    v.as_u64().ok_or_else(|| {
        malformed(format!(
            "ISF: {what} is not an unsigned integer: {}",
            short(v)
        ))
    })
}

impl Conv<'_> {
    fn push(&mut self, n: Node) -> TypeId {
        self.nodes.push(n);
        (self.nodes.len() - 1) as TypeId
    }

    fn user_type(&mut self, name: &str) -> RResult<TypeId> {
        if let Some(&id) = self.user.get(name) {
            return Ok(id);
        }
        let id = self.push(Node::Void); // placeholder, filled by `finish`
        self.user.insert(name.to_owned(), id);
        self.pending.push((id, name.to_owned()));
        Ok(id)
    }

    fn enum_type(&mut self, name: &str) -> RResult<TypeId> {
        if let Some(&id) = self.enums.get(name) {
            return Ok(id);
        }
        let e = self
            .isf
            .get("enums")
            .and_then(|e| e.get(name))
            .ok_or_else(|| malformed(format!("ISF: enum {name} is referenced but not defined")))?;
        let mut values = Vec::new();
        if let Some(c) = get(e, "constants")?.as_object() {
            for (k, v) in c {
                values.push((
                    k.clone(),
                    v.as_i64().ok_or_else(|| {
                        malformed(format!("ISF: enum {name}.{k} is not an integer"))
                    })?,
                ));
            }
        }
        let size = as_u64(get(e, "size")?, "enum size")?;
        let id = self.push(Node::Enum {
            name: Some(name.to_owned()),
            size,
            values,
        });
        self.enums.insert(name.to_owned(), id);
        Ok(id)
    }

    /// Convert a type descriptor.
    fn desc(&mut self, d: &Value, depth: usize) -> RResult<TypeId> {
        if depth > 64 {
            return Err(malformed("ISF: type descriptor nesting too deep"));
        }
        let kind = get(d, "kind")?
            .as_str()
            .ok_or_else(|| malformed("ISF: kind is not a string"))?;
        let name = || -> RResult<&str> {
            get(d, "name")?
                .as_str()
                .ok_or_else(|| malformed("ISF: name is not a string"))
        };
        Ok(match kind {
            "base" => {
                let n = name()?;
                if n == "void" {
                    return Ok(VOID);
                }
                let size = self
                    .isf
                    .get("base_types")
                    .and_then(|b| b.get(n))
                    .and_then(|b| b.get("size"))
                    .and_then(Value::as_u64)
                    .ok_or_else(|| malformed(format!("ISF: base type {n} is not defined")))?;
                self.push(Node::Base {
                    name: n.to_owned(),
                    size,
                })
            }
            "pointer" => {
                let t = self.desc(get(d, "subtype")?, depth + 1)?;
                self.push(Node::Pointer { target: t })
            }
            "array" => {
                let count = as_u64(get(d, "count")?, "array count")?;
                let elem = self.desc(get(d, "subtype")?, depth + 1)?;
                self.push(Node::Array {
                    elem,
                    count: Some(count),
                })
            }
            "struct" | "union" | "class" => {
                let n = name()?.to_owned();
                self.user_type(&n)?
            }
            "enum" => {
                let n = name()?.to_owned();
                self.enum_type(&n)?
            }
            "function" => self.push(Node::Func),
            "bitfield" => self.desc(get(d, "type")?, depth + 1)?,
            other => return Err(malformed(format!("ISF: unknown type kind {other:?}"))),
        })
    }

    /// Fill in every user type reached so far (and those they reach).
    fn finish(&mut self) -> RResult<()> {
        let mut budget = 1_000_000usize;
        while let Some((id, name)) = self.pending.pop() {
            let Some(t) = self.isf.get("user_types").and_then(|u| u.get(&name)) else {
                // Only declared in the kernel (`struct foo;`): dwarf2json references it anyway.
                self.nodes[id as usize] = Node::Forward { union: false, name };
                continue;
            };
            let kind = get(t, "kind")?.as_str().unwrap_or("struct");
            let size = as_u64(get(t, "size")?, "type size")?;
            let mut members = Vec::new();
            if let Some(fields) = get(t, "fields")?.as_object() {
                for (fname, f) in fields {
                    budget = budget
                        .checked_sub(1)
                        .ok_or_else(|| malformed("ISF: too many fields"))?;
                    let off = as_u64(get(f, "offset")?, "field offset")?;
                    let ty = get(f, "type")?;
                    let (bit_offset, bit_size) =
                        if ty.get("kind").and_then(Value::as_str) == Some("bitfield") {
                            let pos = as_u64(get(ty, "bit_position")?, "bit_position")?;
                            let len = as_u64(get(ty, "bit_length")?, "bit_length")?;
                            (off * 8 + pos, Some(len as u32))
                        } else {
                            (
                                off.checked_mul(8)
                                    .ok_or_else(|| malformed("ISF: field offset overflows"))?,
                                None,
                            )
                        };
                    let anonymous = f.get("anonymous").and_then(Value::as_bool) == Some(true);
                    members.push(Member {
                        name: (!anonymous).then(|| fname.clone()),
                        bit_offset,
                        bit_size,
                        ty: self.desc(ty, 0)?,
                    });
                }
            }
            members.sort_by_key(|m| m.bit_offset);
            self.nodes[id as usize] = Node::Aggregate {
                union: kind == "union",
                name: (!name.starts_with("unnamed_")).then_some(name),
                size,
                members,
            };
        }
        Ok(())
    }
}

impl IsfTypes {
    /// Convert the ISF's definitions of the `wanted` names (and what they reference).
    pub fn new(isf: &Value, wanted: &[String]) -> RResult<Self> {
        let mut c = Conv {
            isf,
            nodes: Vec::new(),
            user: HashMap::new(),
            enums: HashMap::new(),
            pending: Vec::new(),
        };
        let mut index = HashMap::new();
        for w in wanted {
            if isf.get("user_types").and_then(|u| u.get(w)).is_some() {
                index.insert((Kind::Aggregate, w.clone()), c.user_type(w)?);
            }
            if isf.get("enums").and_then(|u| u.get(w)).is_some() {
                index.insert((Kind::Enum, w.clone()), c.enum_type(w)?);
            }
        }
        c.finish()?;
        Ok(IsfTypes {
            nodes: c.nodes,
            index,
        })
    }
}

impl TypeSource for IsfTypes {
    fn find(&self, kind: Kind, name: &str) -> RResult<Option<TypeId>> {
        Ok(self.index.get(&(kind, name.to_owned())).copied())
    }
    fn node(&self, id: TypeId) -> RResult<Node> {
        if id == VOID {
            return Ok(Node::Void);
        }
        self.nodes
            .get(id as usize)
            .cloned()
            .ok_or_else(|| malformed(format!("ISF: type id {id} out of range")))
    }
}

/// A `Write` that refuses to grow past a limit (xz bombs).
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_ISF {
            return Err(std::io::Error::other("decompressed ISF larger than 1 GiB"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Read an ISF file, decompressing `.xz`.
pub fn read_isf(path: &Path) -> Result<Value> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(f);
    let head = {
        use std::io::BufRead;
        r.fill_buf().map_err(|e| Error::io(path, e))?.to_vec()
    };
    let text = if head.starts_with(b"\xfd7zXZ\x00") {
        let mut out = Capped(Vec::new());
        lzma_rs::xz_decompress(&mut r, &mut out).map_err(|e| Error::Import {
            path: path.into(),
            msg: format!("corrupt xz stream: {e}"),
        })?;
        out.0
    } else {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut v).map_err(|e| Error::io(path, e))?;
        v
    };
    serde_json::from_slice(&text).map_err(|e| Error::Import {
        path: path.into(),
        msg: format!("not valid ISF JSON: {e}"),
    })
}

/// Import an ISF file (`.json` or `.json.xz`).
pub fn import_file(path: &Path) -> Result<Profile> {
    let v = read_isf(path)?;
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    import_value(&v, &origin).map_err(|m| Error::Import {
        path: path.into(),
        msg: m.0,
    })
}

/// Import a parsed ISF document.
pub fn import_value(v: &Value, origin: &str) -> RResult<Profile> {
    for k in ["metadata", "base_types", "user_types", "enums", "symbols"] {
        if !v.get(k).is_some_and(Value::is_object) {
            return Err(malformed(format!("not an ISF document: no \"{k}\" object")));
        }
    }
    let manifest = Manifest::builtin();
    let mut p = Profile::new("isf");
    let producer = v["metadata"]
        .get("producer")
        .map(|pr| {
            format!(
                "{} {}",
                pr.get("name").and_then(Value::as_str).unwrap_or("?"),
                pr.get("version").and_then(Value::as_str).unwrap_or("?")
            )
        })
        .unwrap_or_else(|| "unknown producer".into());
    p.source.inputs.push(format!("{origin} ({producer})"));
    let syms = &v["symbols"];
    if let Some(data) = syms
        .get("linux_banner")
        .and_then(|s| s.get("constant_data"))
        .and_then(Value::as_str)
    {
        let bytes = base64_decode(data)
            .ok_or_else(|| malformed("linux_banner constant_data is not base64"))?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let banner = String::from_utf8_lossy(&bytes[..end]).into_owned();
        fill_from_banner(&mut p, &banner);
        p.kernel.banner = Some(banner);
    }
    for s in &manifest.symbols {
        let address = |n: &str| {
            syms.get(n)
                .and_then(|e| e.get("address"))
                .and_then(Value::as_u64)
        };
        p.record_symbol(s, |n| address(n).map(|a| (a, 0)), Some("not in the ISF"));
    }
    let types = IsfTypes::new(v, &manifest.wanted_type_names())?;
    let ex = extract(&manifest, &[&types])?;
    p.types = ex.types;
    p.enums = ex.enums;
    p.absent.extend(ex.absent);
    p.absent.sort();
    Ok(p)
}

// ------------------------------------------------------------------------------------------
// Export

/// x86_64 C base types: (name, size, signed, ISF kind).
const BASE_TYPES: &[(&str, u64, bool, &str)] = &[
    ("char", 1, true, "char"),
    ("signed char", 1, true, "char"),
    ("unsigned char", 1, false, "char"),
    ("_Bool", 1, false, "bool"),
    ("short int", 2, true, "int"),
    ("short unsigned int", 2, false, "int"),
    ("int", 4, true, "int"),
    ("unsigned int", 4, false, "int"),
    ("long int", 8, true, "int"),
    ("long unsigned int", 8, false, "int"),
    ("long long int", 8, true, "int"),
    ("long long unsigned int", 8, false, "int"),
    ("__int128", 16, true, "int"),
    ("__int128 unsigned", 16, false, "int"),
    ("pointer", 8, false, "int"),
    ("void", 0, false, "void"),
];

fn base_for_size(size: u64) -> Option<&'static str> {
    Some(match size {
        1 => "unsigned char",
        2 => "short unsigned int",
        4 => "unsigned int",
        8 => "long unsigned int",
        _ => return None,
    })
}

struct Exporter<'p> {
    p: &'p Profile,
    /// Kernel names of exported user types → profile key.
    exported: HashMap<String, &'p str>,
    /// Referenced types that are not in the profile: opaque stand-ins (name → size).
    opaque: BTreeMap<String, u64>,
}

impl Exporter<'_> {
    /// Descriptor for a C type spelling of `size` bytes.
    fn desc(&mut self, ty: &str, size: u64, count: Option<u64>) -> Value {
        let ty = ty.trim();
        for q in ["const ", "volatile ", "restrict ", "_Atomic "] {
            if let Some(rest) = ty.strip_prefix(q) {
                return self.desc(rest, size, count);
            }
        }
        if let Some(open) = ty.rfind('[').filter(|_| ty.ends_with(']')) {
            let n = count.unwrap_or(0);
            let elem_size = size.checked_div(n).unwrap_or(0);
            let inner_count = ty[..open]
                .rfind('[')
                .and_then(|i| ty[i + 1..open - 1].parse().ok());
            return json!({"kind": "array", "count": n,
                          "subtype": self.desc(&ty[..open], elem_size, inner_count)});
        }
        if let Some(inner) = ty.strip_suffix('*') {
            let inner = inner.trim_end();
            let sub = if inner == "func" {
                json!({"kind": "function"})
            } else {
                self.desc(inner, 0, None)
            };
            return json!({"kind": "pointer", "subtype": sub});
        }
        if ty == "void" {
            return json!({"kind": "base", "name": "void"});
        }
        for kw in ["struct ", "union "] {
            if let Some(name) = ty.strip_prefix(kw) {
                let kind = kw.trim();
                if name.starts_with('{') {
                    // anonymous aggregate reached by a path: opaque bytes
                    let n = format!("pct_anon_{size}");
                    self.opaque.entry(n.clone()).or_insert(size);
                    return json!({"kind": "struct", "name": n});
                }
                if !self.exported.contains_key(name) {
                    let e = self.opaque.entry(name.to_owned()).or_insert(0);
                    *e = (*e).max(size);
                }
                return json!({"kind": kind, "name": name});
            }
        }
        if let Some(name) = ty.strip_prefix("enum ") {
            if self.p.enums.contains_key(name) {
                return json!({"kind": "enum", "name": name});
            }
            return json!({"kind": "base", "name": base_for_size(size).unwrap_or("unsigned int")});
        }
        if BASE_TYPES.iter().any(|b| b.0 == ty) {
            return json!({"kind": "base", "name": ty});
        }
        // A typedef: the profile does not record what it stands for. Scalars by size,
        // anything else as opaque bytes of the right size.
        match base_for_size(size) {
            Some(b) if size > 0 => json!({"kind": "base", "name": b}),
            _ => {
                let e = self.opaque.entry(ty.to_owned()).or_insert(0);
                *e = (*e).max(size);
                json!({"kind": "struct", "name": ty})
            }
        }
    }

    fn field(&mut self, key: &str, f: &Field) -> (String, Value) {
        let name = f
            .name
            .as_deref()
            .unwrap_or(key)
            .rsplit('.')
            .next()
            .unwrap_or(key)
            .to_owned();
        let mut t = self.desc(&f.type_name, f.size, f.count);
        let mut offset = f.offset;
        if let (Some(bit), Some(len)) = (f.bit_offset, f.bit_size) {
            offset = bit / 8;
            t = json!({"kind": "bitfield", "bit_position": bit % 8, "bit_length": len, "type": t});
        }
        (name, json!({"offset": offset, "type": t}))
    }
}

/// Export a profile as a Volatility 3 ISF document (JSON text).
pub fn export(p: &Profile) -> String {
    export_value(p).to_string()
}

/// Export a profile as a Volatility 3 ISF document.
pub fn export_value(p: &Profile) -> Value {
    let mut ex = Exporter {
        p,
        exported: p
            .types
            .iter()
            .map(|(k, t)| (t.name.clone().unwrap_or_else(|| k.clone()), k.as_str()))
            .collect(),
        opaque: BTreeMap::new(),
    };
    let mut user = Map::new();
    for (key, t) in &p.types {
        let mut fields = Map::new();
        for (fk, f) in &t.fields {
            let (n, v) = ex.field(fk, f);
            fields.insert(n, v);
        }
        user.insert(
            t.name.clone().unwrap_or_else(|| key.clone()),
            json!({"kind": t.kind, "size": t.size, "fields": fields}),
        );
    }
    for (name, size) in std::mem::take(&mut ex.opaque) {
        user.entry(name)
            .or_insert_with(|| json!({"kind": "struct", "size": size, "fields": {}}));
    }
    let mut enums = Map::new();
    for (key, e) in &p.enums {
        let signed = e.values.values().any(|&v| v < 0);
        let base = match (e.size, signed) {
            (1, _) => "unsigned char",
            (2, _) => "short unsigned int",
            (8, false) => "long unsigned int",
            (8, true) => "long int",
            (_, true) => "int",
            _ => "unsigned int",
        };
        enums.insert(
            e.name.clone().unwrap_or_else(|| key.clone()),
            json!({"size": e.size, "base": base, "constants": e.values}),
        );
    }
    let mut base = Map::new();
    for (n, size, signed, kind) in BASE_TYPES {
        base.insert(
            (*n).to_owned(),
            json!({"size": size, "signed": signed, "kind": kind, "endian": "little"}),
        );
    }
    let mut symbols = Map::new();
    for (key, s) in &p.symbols {
        let name = s.name.clone().unwrap_or_else(|| key.clone());
        let mut v = json!({"address": s.address});
        if key == "linux_banner" {
            if let Some(b) = &p.kernel.banner {
                let mut bytes = b.as_bytes().to_vec();
                bytes.push(0);
                v["constant_data"] = Value::String(base64_encode(&bytes));
                v["type"] = json!({"kind": "array", "count": bytes.len(),
                                   "subtype": {"kind": "base", "name": "char"}});
            }
        }
        symbols.insert(name, v);
    }
    json!({
        "metadata": {
            "format": "6.2.0",
            "producer": {"name": "pct", "version": env!("CARGO_PKG_VERSION")},
        },
        "base_types": base,
        "user_types": user,
        "enums": enums,
        "symbols": symbols,
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for s in [&b""[..], b"a", b"ab", b"abc", b"Linux version 6.1\n\0"] {
            assert_eq!(base64_decode(&base64_encode(s)).unwrap(), s);
        }
    }
}
