//! BTF reader (`.BTF` section): the kernel's compact type format, parsed in place.
//!
//! Layout: a header (magic 0xEB9F, version 1, offsets of the type and string sections), a
//! type section of variable-length records (type id N is the N-th record, id 0 is `void`) and
//! a string section of NUL-terminated names. Each record is `name_off`, `info` (vlen in bits
//! 0–15, kind in bits 24–28, kind_flag in bit 31) and `size_or_type`, followed by
//! kind-specific data. With kind_flag set on a struct, a member's offset word holds the
//! bitfield width in its top 8 bits and the bit offset in the low 24.
//! BTF has no symbol addresses: those come from the ELF symbol table.
//!
//! A module's BTF is *split* BTF on top of vmlinux's: its type ids continue after the
//! base's last one and its string offsets after the base's string section, so ids and
//! names below those points are the base's ([`Btf::parse_split`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use super::error::{malformed, Error, RResult, Result};
use super::types::{Kind, Member, Node, TypeId, TypeSource, VOID};

const MAGIC: u16 = 0xEB9F;

const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// A parsed `.BTF` section.
pub struct Btf<'a> {
    data: Cow<'a, [u8]>,
    types: (usize, usize),
    strs: (usize, usize),
    /// Byte offset (inside `data`) of each own type's record: entry k is type id
    /// `first_id + k - 1`; entry 0 is unused (void, or the base's types).
    offs: Vec<usize>,
    index: HashMap<(Kind, String), u32>,
    /// For split BTF: the base it extends.
    base: Option<&'a Btf<'a>>,
    /// The first type id this blob defines (1, or the base's next id).
    first_id: u32,
    /// The first string offset this blob's string section holds (0, or the base's length).
    first_str: u32,
}

/// One decoded record header.
#[derive(Clone, Copy)]
struct Rec {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kflag: bool,
    size_or_type: u32,
    /// Offset of the kind-specific data.
    extra: usize,
}

fn u32_at(d: &[u8], off: usize) -> RResult<u32> {
    d.get(off..off.wrapping_add(4))
        .filter(|_| off.checked_add(4).is_some())
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| malformed(format!("read past end at byte {off}")))
}

impl<'a> Btf<'a> {
    /// Parse and index a BTF blob.
    pub fn parse(data: Cow<'a, [u8]>, path: &Path) -> Result<Self> {
        Self::parse_inner(data, None).map_err(|m| Error::Btf {
            path: path.into(),
            msg: m.0,
        })
    }

    /// Parse and index a module's split BTF on top of `base` (vmlinux's).
    pub fn parse_split(data: Cow<'a, [u8]>, base: &'a Btf<'a>, path: &Path) -> Result<Self> {
        Self::parse_inner(data, Some(base)).map_err(|m| Error::Btf {
            path: path.into(),
            msg: m.0,
        })
    }

    /// Parse, checking only the structure (for callers with no file to name).
    pub fn parse_blob(data: Cow<'a, [u8]>, base: Option<&'a Btf<'a>>) -> RResult<Self> {
        Self::parse_inner(data, base)
    }

    /// The next type id after this blob's last.
    fn next_id(&self) -> u32 {
        self.first_id + self.len() as u32
    }

    /// The string offset just past this blob's string section.
    fn next_str(&self) -> u32 {
        self.first_str + (self.strs.1 - self.strs.0) as u32
    }

    fn parse_inner(data: Cow<'a, [u8]>, base: Option<&'a Btf<'a>>) -> RResult<Self> {
        let d: &[u8] = &data;
        if d.len() < 24 {
            return Err(malformed("shorter than the BTF header"));
        }
        let magic = u16::from_le_bytes([d[0], d[1]]);
        if magic != MAGIC {
            if u16::from_be_bytes([d[0], d[1]]) == MAGIC {
                return Err(malformed("big-endian BTF is not supported"));
            }
            return Err(malformed(format!("bad magic {magic:#06x}")));
        }
        if d[2] != 1 {
            return Err(malformed(format!("version {} (expected 1)", d[2])));
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let sect = |off_at: usize| -> RResult<(usize, usize)> {
            let off = u32_at(d, off_at)? as usize;
            let len = u32_at(d, off_at + 4)? as usize;
            let start = hdr_len
                .checked_add(off)
                .ok_or_else(|| malformed("section offset overflows"))?;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= d.len())
                .ok_or_else(|| malformed("section extends past the end of .BTF (truncated?)"))?;
            Ok((start, end))
        };
        let types = sect(8)?;
        let strs = sect(16)?;
        let mut offs = vec![0usize];
        let mut index = HashMap::new();
        let mut me = Btf {
            data: Cow::Borrowed(&[]),
            types,
            strs,
            offs: Vec::new(),
            index: HashMap::new(),
            base,
            first_id: base.map_or(1, |b| b.next_id()),
            first_str: base.map_or(0, |b| b.next_str()),
        };
        let mut pos = types.0;
        while pos < types.1 {
            let rec = Self::rec_at(d, pos, types.1)?;
            let id = me.first_id + offs.len() as u32 - 1;
            offs.push(pos);
            let kind = match rec.kind {
                STRUCT | UNION => Some(Kind::Aggregate),
                ENUM | ENUM64 => Some(Kind::Enum),
                _ => None,
            };
            if let (Some(k), true) = (kind, rec.name_off != 0) {
                let name = me.str_in(d, rec.name_off)?;
                index.entry((k, name.to_owned())).or_insert(id);
            }
            pos = rec.extra + Self::extra_len(&rec)?;
        }
        if pos != types.1 {
            return Err(malformed("type section does not end on a record boundary"));
        }
        me.data = data;
        me.offs = offs;
        me.index = index;
        Ok(me)
    }

    fn extra_len(r: &Rec) -> RResult<usize> {
        Ok(match r.kind {
            INT | VAR | DECL_TAG => 4,
            ARRAY => 12,
            STRUCT | UNION | DATASEC | ENUM64 => 12 * r.vlen,
            ENUM | FUNC_PROTO => 8 * r.vlen,
            PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
            k => return Err(malformed(format!("unknown BTF kind {k}"))),
        })
    }

    fn rec_at(d: &[u8], pos: usize, end: usize) -> RResult<Rec> {
        if pos.checked_add(12).is_none_or(|e| e > end) {
            return Err(malformed(format!("truncated type record at byte {pos}")));
        }
        let info = u32_at(d, pos + 4)?;
        let rec = Rec {
            name_off: u32_at(d, pos)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kflag: info >> 31 != 0,
            size_or_type: u32_at(d, pos + 8)?,
            extra: pos + 12,
        };
        if rec.extra + Self::extra_len(&rec)? > end {
            return Err(malformed(format!("truncated type record at byte {pos}")));
        }
        Ok(rec)
    }

    fn str_in<'d>(&'d self, d: &'d [u8], off: u32) -> RResult<&'d str> {
        if let (Some(base), true) = (self.base, off < self.first_str) {
            return base.str_in(&base.data, off);
        }
        let off = off - self.first_str;
        let start = self
            .strs
            .0
            .checked_add(off as usize)
            .filter(|&s| s < self.strs.1)
            .ok_or_else(|| malformed(format!("string offset {off} out of range")))?;
        let bytes = &d[start..self.strs.1];
        let n = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed("unterminated string"))?;
        std::str::from_utf8(&bytes[..n]).map_err(|_| malformed("string is not UTF-8"))
    }

    fn name(&self, off: u32) -> RResult<Option<String>> {
        if off == 0 {
            return Ok(None);
        }
        Ok(Some(self.str_in(&self.data, off)?.to_owned()))
    }

    /// Number of types (excluding void).
    pub fn len(&self) -> usize {
        self.offs.len().saturating_sub(1)
    }

    /// Whether the section holds no types.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of one of this blob's own types (not the base's).
    fn rec(&self, id: u32) -> RResult<Rec> {
        let pos = *id
            .checked_sub(self.first_id)
            .and_then(|k| self.offs.get(k as usize + 1))
            .ok_or_else(|| malformed(format!("type id {id} out of range")))?;
        Self::rec_at(&self.data, pos, self.types.1)
    }

    /// Whether `id` is the base's (split BTF).
    fn in_base(&self, id: u32) -> Option<&'a Btf<'a>> {
        self.base.filter(|_| id != 0 && id < self.first_id)
    }

    /// The encoding word of an INT type, wherever it is defined.
    fn int_encoding(&self, id: u32) -> Option<(u32, u32)> {
        if let Some(base) = self.in_base(id) {
            return base.int_encoding(id);
        }
        let t = self.rec(id).ok()?;
        (t.kind == INT).then(|| {
            u32_at(&self.data, t.extra)
                .ok()
                .map(|e| (e, t.size_or_type))
        })?
    }

    fn tid(&self, t: u32) -> TypeId {
        if t == 0 {
            VOID
        } else {
            TypeId::from(t)
        }
    }

    fn decode(&self, id: TypeId) -> RResult<Node> {
        let mut id = u32::try_from(id).map_err(|_| malformed("type id out of range"))?;
        // TYPE_TAG is an annotation (`__rcu`, `__user`): look through it.
        for _ in 0..64 {
            if id == 0 {
                return Ok(Node::Void);
            }
            if let Some(base) = self.in_base(id) {
                return base.decode(TypeId::from(id));
            }
            let r = self.rec(id)?;
            if r.kind == TYPE_TAG {
                id = r.size_or_type;
                continue;
            }
            return self.decode_rec(r);
        }
        Err(malformed("TYPE_TAG chain too long"))
    }

    fn decode_rec(&self, r: Rec) -> RResult<Node> {
        let d: &[u8] = &self.data;
        Ok(match r.kind {
            INT | FLOAT => Node::Base {
                name: self.name(r.name_off)?.unwrap_or_default(),
                size: r.size_or_type.into(),
            },
            PTR => Node::Pointer {
                target: self.tid(r.size_or_type),
            },
            ARRAY => Node::Array {
                elem: self.tid(u32_at(d, r.extra)?),
                count: Some(u32_at(d, r.extra + 8)?.into()),
            },
            STRUCT | UNION => {
                let mut members = Vec::with_capacity(r.vlen);
                for i in 0..r.vlen {
                    let m = r.extra + 12 * i;
                    let off = u32_at(d, m + 8)?;
                    let ty = u32_at(d, m + 4)?;
                    let (mut bit_offset, mut bit_size) = if r.kflag {
                        (
                            u64::from(off & 0x00ff_ffff),
                            Some(off >> 24).filter(|&b| b != 0),
                        )
                    } else {
                        (u64::from(off), None)
                    };
                    if !r.kflag {
                        // Old-style bitfield: encoded in the INT member type.
                        if let Some((enc, size)) = self.int_encoding(ty) {
                            let bits = enc & 0xff;
                            let shift = (enc >> 16) & 0xff;
                            if bits != size * 8 || shift != 0 {
                                bit_offset += u64::from(shift);
                                bit_size = Some(bits);
                            }
                        }
                    }
                    members.push(Member {
                        name: self.name(u32_at(d, m)?)?,
                        bit_offset,
                        bit_size,
                        ty: self.tid(ty),
                    });
                }
                Node::Aggregate {
                    union: r.kind == UNION,
                    name: self.name(r.name_off)?,
                    size: r.size_or_type.into(),
                    members,
                }
            }
            ENUM => {
                let mut values = Vec::with_capacity(r.vlen);
                for i in 0..r.vlen {
                    let m = r.extra + 8 * i;
                    let raw = u32_at(d, m + 4)?;
                    let v = if r.kflag {
                        i64::from(raw as i32)
                    } else {
                        i64::from(raw)
                    };
                    values.push((self.name(u32_at(d, m)?)?.unwrap_or_default(), v));
                }
                Node::Enum {
                    name: self.name(r.name_off)?,
                    size: r.size_or_type.into(),
                    values,
                }
            }
            ENUM64 => {
                let mut values = Vec::with_capacity(r.vlen);
                for i in 0..r.vlen {
                    let m = r.extra + 12 * i;
                    let lo = u64::from(u32_at(d, m + 4)?);
                    let hi = u64::from(u32_at(d, m + 8)?);
                    values.push((
                        self.name(u32_at(d, m)?)?.unwrap_or_default(),
                        ((hi << 32) | lo) as i64,
                    ));
                }
                Node::Enum {
                    name: self.name(r.name_off)?,
                    size: r.size_or_type.into(),
                    values,
                }
            }
            FWD => Node::Forward {
                union: r.kflag,
                name: self.name(r.name_off)?.unwrap_or_default(),
            },
            TYPEDEF => Node::Typedef {
                name: self.name(r.name_off)?.unwrap_or_default(),
                target: self.tid(r.size_or_type),
            },
            VOLATILE => Node::Qualified {
                qual: "volatile",
                target: self.tid(r.size_or_type),
            },
            CONST => Node::Qualified {
                qual: "const",
                target: self.tid(r.size_or_type),
            },
            RESTRICT => Node::Qualified {
                qual: "restrict",
                target: self.tid(r.size_or_type),
            },
            FUNC | FUNC_PROTO => Node::Func,
            VAR | DATASEC | DECL_TAG => Node::Base {
                name: format!("<btf kind {}>", r.kind),
                size: 0,
            },
            k => return Err(malformed(format!("unknown BTF kind {k}"))),
        })
    }
}

impl TypeSource for Btf<'_> {
    fn find(&self, kind: Kind, name: &str) -> RResult<Option<TypeId>> {
        Ok(self
            .index
            .get(&(kind, name.to_owned()))
            .map(|&i| TypeId::from(i)))
    }
    fn node(&self, id: TypeId) -> RResult<Node> {
        self.decode(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::types::{find_path, size_of};

    /// A BTF blob from raw type records and a string section.
    fn blob(types: &[u32], strs: &[u8]) -> Vec<u8> {
        let tlen = (types.len() * 4) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, tlen, tlen, strs.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in types {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(strs);
        b
    }

    #[test]
    fn split_btf_continues_the_base_ids_and_strings() {
        // Base: [1] int "int" (4 bytes, 32 bits); [2] ptr -> 1.
        let base_strs = b"\0int\0";
        let base = blob(&[1, INT << 24, 4, 32, 0, PTR << 24, 1], base_strs);
        let base = Btf::parse_blob(Cow::Owned(base), None).expect("base");
        assert_eq!(base.len(), 2);
        // Split: [3] struct "mod_s" (16 bytes) { int a; int *p at 64 bits }; its member
        // "a" names itself with the base's string "int" (offset 1) to cross the boundary.
        let first = base_strs.len() as u32;
        let split_strs = b"\0mod_s\0p\0";
        let split = blob(
            &[first + 1, (STRUCT << 24) | 2, 16, 1, 1, 0, first + 7, 2, 64],
            split_strs,
        );
        let m = Btf::parse_blob(Cow::Owned(split), Some(&base)).expect("split");
        assert_eq!(m.len(), 1);
        let id = m.find(Kind::Aggregate, "mod_s").unwrap().expect("found");
        assert_eq!(id, 3);
        assert_eq!(size_of(&m, id).unwrap(), 16);
        let a = find_path(&m, id, "int")
            .unwrap()
            .expect("member named from the base");
        assert_eq!((a.bit_offset, a.ty), (0, 1));
        let p = find_path(&m, id, "p").unwrap().expect("member p");
        assert_eq!(p.bit_offset, 64);
        assert!(matches!(m.node(p.ty).unwrap(), Node::Pointer { target: 1 }));
        assert!(m.find(Kind::Aggregate, "int").unwrap().is_none());
        // An id past the split's last is an error, not a base type.
        assert!(m.node(4).is_err());
    }
}
