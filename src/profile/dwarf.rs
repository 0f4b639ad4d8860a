//! DWARF reader: finds the manifest's types in `.debug_info` without parsing every DIE.
//!
//! A vmlinux carries ~150 MB of `.debug_info` in thousands of compile units, but the manifest
//! names only a few dozen types. The index pass walks each unit's *top-level* DIEs only,
//! jumping over function bodies with `DW_AT_sibling`, and remembers the first complete
//! definition of every wanted struct/union/enum name (units are split across threads).
//! After that, only the DIEs reachable from those definitions are ever decoded.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use gimli::constants as dw;
use gimli::{
    Abbreviations, AttributeValue, DebugAbbrev, DebugInfo, DebugInfoOffset, DebugLineStr, DebugStr,
    DebugStrOffsets, DebugStrOffsetsBase, EndianSlice, LittleEndian, UnitHeader, UnitOffset,
};

use super::elf::ElfImage;
use super::error::{malformed, Error, Malformed, RResult, Result};
use super::types::{Kind, Member, Node, TypeId, TypeSource, VOID};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// The debug sections of one file (relocated if it is a module).
pub struct DwarfSections<'d> {
    info: Cow<'d, [u8]>,
    abbrev: Cow<'d, [u8]>,
    strs: Cow<'d, [u8]>,
    line_str: Cow<'d, [u8]>,
    str_offsets: Cow<'d, [u8]>,
}

impl<'d> DwarfSections<'d> {
    /// `None` when the file has no `.debug_info`.
    pub fn load(elf: &ElfImage<'d>) -> Result<Option<Self>> {
        let Some(info) = elf.section(".debug_info")? else {
            return Ok(None);
        };
        if info.is_empty() {
            return Ok(None);
        }
        let get = |n: &str| -> Result<Cow<'d, [u8]>> {
            Ok(elf.section(n)?.unwrap_or(Cow::Borrowed(&[][..])))
        };
        Ok(Some(DwarfSections {
            info,
            abbrev: get(".debug_abbrev")?,
            strs: get(".debug_str")?,
            line_str: get(".debug_line_str")?,
            str_offsets: get(".debug_str_offsets")?,
        }))
    }
}

struct Unit<'s> {
    start: u64,
    header: UnitHeader<R<'s>>,
}

/// Types from DWARF, indexed for the names the manifest wants.
pub struct DwarfTypes<'s> {
    s: Sects<'s>,
    units: Vec<Unit<'s>>,
    index: HashMap<(Kind, String), TypeId>,
    abbrev_cache: RefCell<HashMap<u64, Arc<Abbreviations>>>,
    str_base_cache: RefCell<HashMap<u64, Option<DebugStrOffsetsBase<usize>>>>,
}

/// The shared, read-only section readers (safe to use from the index threads).
struct Sects<'s> {
    abbrev: DebugAbbrev<R<'s>>,
    strs: DebugStr<R<'s>>,
    line_str: DebugLineStr<R<'s>>,
    str_offsets: DebugStrOffsets<R<'s>>,
}

/// DWARF ids: the DIE's `.debug_info` offset, with an array dimension in the top bits.
const DIM_SHIFT: u32 = 48;

fn gerr(e: gimli::Error) -> Malformed {
    malformed(e)
}

impl<'s> DwarfTypes<'s> {
    /// Index `secs` for the struct/union/enum names in `wanted`.
    pub fn new(secs: &'s DwarfSections<'_>, wanted: &[String], path: &Path) -> Result<Self> {
        Self::new_inner(secs, wanted).map_err(|m| Error::Dwarf {
            path: path.into(),
            msg: m.0,
        })
    }

    fn new_inner(secs: &'s DwarfSections<'_>, wanted: &[String]) -> RResult<Self> {
        let info = DebugInfo::new(&secs.info, LittleEndian);
        let mut units = Vec::new();
        let mut iter = info.units();
        while let Some(header) = iter.next().map_err(gerr)? {
            let start = header
                .offset()
                .as_debug_info_offset()
                .map(|o| o.0 as u64)
                .ok_or_else(|| malformed("unit outside .debug_info"))?;
            units.push(Unit { start, header });
        }
        let s = Sects {
            abbrev: DebugAbbrev::new(&secs.abbrev, LittleEndian),
            strs: DebugStr::new(&secs.strs, LittleEndian),
            line_str: DebugLineStr::new(&secs.line_str, LittleEndian),
            str_offsets: DebugStrOffsets::from(EndianSlice::new(&secs.str_offsets, LittleEndian)),
        };
        let index = s.build_index(&units, wanted)?;
        Ok(DwarfTypes {
            s,
            units,
            index,
            abbrev_cache: RefCell::new(HashMap::new()),
            str_base_cache: RefCell::new(HashMap::new()),
        })
    }
}

impl<'s> Sects<'s> {
    fn build_index(
        &self,
        units: &[Unit<'s>],
        wanted: &[String],
    ) -> RResult<HashMap<(Kind, String), TypeId>> {
        let want: HashSet<&[u8]> = wanted.iter().map(|s| s.as_bytes()).collect();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        let n = units.len();
        let chunk = n.div_ceil(threads).max(1);
        let results: Vec<RResult<HashMap<(Kind, String), TypeId>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = units
                .chunks(chunk)
                .map(|units| {
                    let want = &want;
                    sc.spawn(move || {
                        let mut found = HashMap::new();
                        for u in units {
                            self.index_unit(u, want, &mut found)?;
                        }
                        Ok(found)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(malformed("DWARF index thread panicked")))
                })
                .collect()
        });
        let mut index: HashMap<(Kind, String), TypeId> = HashMap::new();
        for r in results {
            for (k, off) in r? {
                index
                    .entry(k)
                    .and_modify(|o| *o = (*o).min(off))
                    .or_insert(off);
            }
        }
        Ok(index)
    }

    /// Walk one unit's top-level DIEs and record wanted definitions.
    fn index_unit(
        &self,
        u: &Unit<'s>,
        want: &HashSet<&[u8]>,
        found: &mut HashMap<(Kind, String), TypeId>,
    ) -> RResult<()> {
        let abbrevs = u.header.abbreviations(&self.abbrev).map_err(gerr)?;
        let mut entries = u.header.entries_raw(&abbrevs, None).map_err(gerr)?;
        let Some(root) = entries.read_abbreviation().map_err(gerr)? else {
            return Ok(());
        };
        let mut str_base = None;
        for spec in root.attributes() {
            let attr = entries.read_attribute(*spec).map_err(gerr)?;
            if attr.name() == dw::DW_AT_str_offsets_base {
                if let AttributeValue::DebugStrOffsetsBase(b) = attr.value() {
                    str_base = Some(b);
                }
            }
        }
        if !root.has_children() {
            return Ok(());
        }
        while !entries.is_empty() {
            let die = entries.next_offset();
            let Some(ab) = entries.read_abbreviation().map_err(gerr)? else {
                break; // end of the unit's children
            };
            let kind = match ab.tag() {
                dw::DW_TAG_structure_type | dw::DW_TAG_union_type | dw::DW_TAG_class_type => {
                    Some(Kind::Aggregate)
                }
                dw::DW_TAG_enumeration_type => Some(Kind::Enum),
                _ => None,
            };
            if kind.is_none() && !ab.has_children() {
                entries.skip_attributes(ab.attributes()).map_err(gerr)?;
                continue;
            }
            let (mut name, mut decl, mut sibling) = (None, false, None);
            for spec in ab.attributes() {
                let attr = entries.read_attribute(*spec).map_err(gerr)?;
                match attr.name() {
                    dw::DW_AT_name if kind.is_some() => name = Some(attr.value()),
                    dw::DW_AT_declaration => decl = true,
                    dw::DW_AT_sibling => {
                        if let AttributeValue::UnitRef(o) = attr.value() {
                            sibling = Some(o);
                        }
                    }
                    _ => {}
                }
            }
            if let (Some(kind), Some(name), false) = (kind, name, decl) {
                if let Some(s) = self.string(&u.header, str_base, name) {
                    if want.contains(s) {
                        let off = u.start + die.0 as u64;
                        let key = (kind, String::from_utf8_lossy(s).into_owned());
                        found.entry(key).or_insert(off);
                    }
                }
            }
            if ab.has_children() {
                match sibling {
                    Some(sib) if sib.0 > die.0 => {
                        entries = u.header.entries_raw(&abbrevs, Some(sib)).map_err(gerr)?;
                    }
                    _ => {
                        let mut depth = 1usize;
                        while depth > 0 {
                            match entries.read_abbreviation().map_err(gerr)? {
                                None => depth -= 1,
                                Some(a) => {
                                    entries.skip_attributes(a.attributes()).map_err(gerr)?;
                                    if a.has_children() {
                                        depth += 1;
                                    }
                                }
                            }
                            if entries.is_empty() {
                                break;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn string(
        &self,
        header: &UnitHeader<R<'s>>,
        str_base: Option<DebugStrOffsetsBase<usize>>,
        v: AttributeValue<R<'s>>,
    ) -> Option<&'s [u8]> {
        match v {
            AttributeValue::String(s) => Some(s.slice()),
            AttributeValue::DebugStrRef(o) => self.strs.get_str(o).ok().map(|s| s.slice()),
            AttributeValue::DebugLineStrRef(o) => self.line_str.get_str(o).ok().map(|s| s.slice()),
            AttributeValue::DebugStrOffsetsIndex(i) => {
                let base = str_base.unwrap_or(DebugStrOffsetsBase(0));
                let o = self
                    .str_offsets
                    .get_str_offset(header.format(), base, i)
                    .ok()?;
                self.strs.get_str(o).ok().map(|s| s.slice())
            }
            _ => None,
        }
    }
}

impl<'s> DwarfTypes<'s> {
    fn unit_of(&self, off: u64) -> RResult<&Unit<'s>> {
        let i = self.units.partition_point(|u| u.start <= off);
        let u = i
            .checked_sub(1)
            .and_then(|i| self.units.get(i))
            .ok_or_else(|| malformed(format!("no unit holds DIE {off:#x}")))?;
        Ok(u)
    }

    fn abbrevs(&self, u: &Unit<'s>) -> RResult<Arc<Abbreviations>> {
        if let Some(a) = self.abbrev_cache.borrow().get(&u.start) {
            return Ok(a.clone());
        }
        let a = Arc::new(u.header.abbreviations(&self.s.abbrev).map_err(gerr)?);
        self.abbrev_cache.borrow_mut().insert(u.start, a.clone());
        Ok(a)
    }

    fn str_base(
        &self,
        u: &Unit<'s>,
        abbrevs: &Abbreviations,
    ) -> RResult<Option<DebugStrOffsetsBase<usize>>> {
        if let Some(b) = self.str_base_cache.borrow().get(&u.start) {
            return Ok(*b);
        }
        let mut cur = u.header.entries(abbrevs);
        let mut base = None;
        if let Some((_, root)) = cur.next_dfs().map_err(gerr)? {
            if let Some(AttributeValue::DebugStrOffsetsBase(b)) =
                root.attr_value(dw::DW_AT_str_offsets_base).map_err(gerr)?
            {
                base = Some(b);
            }
        }
        self.str_base_cache.borrow_mut().insert(u.start, base);
        Ok(base)
    }

    fn decode(&self, id: TypeId) -> RResult<Node> {
        let off = id & ((1u64 << DIM_SHIFT) - 1);
        let dim = (id >> DIM_SHIFT) as usize;
        let u = self.unit_of(off)?;
        let abbrevs = self.abbrevs(u)?;
        let str_base = self.str_base(u, &abbrevs)?;
        let uoff = UnitOffset((off - u.start) as usize);
        let mut tree = u.header.entries_tree(&abbrevs, Some(uoff)).map_err(gerr)?;
        let root = tree.root().map_err(gerr)?;
        let e = root.entry();
        let header = &u.header;
        let name = |e: &gimli::DebuggingInformationEntry<R<'s>>| -> RResult<Option<String>> {
            Ok(e.attr_value(dw::DW_AT_name)
                .map_err(gerr)?
                .and_then(|v| self.s.string(header, str_base, v))
                .map(|s| String::from_utf8_lossy(s).into_owned()))
        };
        let target = |e: &gimli::DebuggingInformationEntry<R<'s>>| -> RResult<TypeId> {
            Ok(match e.attr_value(dw::DW_AT_type).map_err(gerr)? {
                None => VOID,
                Some(AttributeValue::UnitRef(o)) => o
                    .to_debug_info_offset(header)
                    .map(|o| o.0 as u64)
                    .ok_or_else(|| malformed("type reference outside its unit"))?,
                Some(AttributeValue::DebugInfoRef(DebugInfoOffset(o))) => o as u64,
                Some(v) => return Err(malformed(format!("unsupported DW_AT_type form {v:?}"))),
            })
        };
        let udata = |e: &gimli::DebuggingInformationEntry<R<'s>>, at| -> RResult<Option<u64>> {
            Ok(e.attr_value(at)
                .map_err(gerr)?
                .and_then(|v| v.udata_value()))
        };
        let tag = e.tag();
        Ok(match tag {
            dw::DW_TAG_base_type | dw::DW_TAG_unspecified_type => Node::Base {
                name: name(e)?.unwrap_or_else(|| "?".into()),
                size: udata(e, dw::DW_AT_byte_size)?.unwrap_or(0),
            },
            dw::DW_TAG_pointer_type | dw::DW_TAG_reference_type => {
                Node::Pointer { target: target(e)? }
            }
            dw::DW_TAG_typedef => Node::Typedef {
                name: name(e)?.unwrap_or_else(|| "?".into()),
                target: target(e)?,
            },
            dw::DW_TAG_const_type => Node::Qualified {
                qual: "const",
                target: target(e)?,
            },
            dw::DW_TAG_volatile_type => Node::Qualified {
                qual: "volatile",
                target: target(e)?,
            },
            dw::DW_TAG_restrict_type => Node::Qualified {
                qual: "restrict",
                target: target(e)?,
            },
            dw::DW_TAG_atomic_type => Node::Qualified {
                qual: "_Atomic",
                target: target(e)?,
            },
            dw::DW_TAG_subroutine_type => Node::Func,
            dw::DW_TAG_structure_type | dw::DW_TAG_union_type | dw::DW_TAG_class_type => {
                let union = tag == dw::DW_TAG_union_type;
                let n = name(e)?;
                if e.attr_value(dw::DW_AT_declaration).map_err(gerr)?.is_some() {
                    return Ok(Node::Forward {
                        union,
                        name: n.unwrap_or_default(),
                    });
                }
                let size = udata(e, dw::DW_AT_byte_size)?.unwrap_or(0);
                let mut members = Vec::new();
                let mut children = root.children();
                while let Some(child) = children.next().map_err(gerr)? {
                    let m = child.entry();
                    if m.tag() != dw::DW_TAG_member {
                        continue;
                    }
                    let loc = match m.attr_value(dw::DW_AT_data_member_location).map_err(gerr)? {
                        None => 0,
                        Some(AttributeValue::Exprloc(ex)) => plus_uconst(ex.0.slice())?,
                        Some(v) => v
                            .udata_value()
                            .ok_or_else(|| malformed("unsupported member location"))?,
                    };
                    let bit_size = udata(m, dw::DW_AT_bit_size)?;
                    let bit_offset = if let Some(b) = udata(m, dw::DW_AT_data_bit_offset)? {
                        b
                    } else if let (Some(bs), Some(bo)) = (bit_size, udata(m, dw::DW_AT_bit_offset)?)
                    {
                        // DWARF 2/3 big-endian-style numbering from the storage unit's MSB.
                        let unit = match udata(m, dw::DW_AT_byte_size)? {
                            Some(s) => s,
                            None => super::types::size_of(self, target(m)?)?,
                        };
                        (loc * 8 + unit * 8)
                            .checked_sub(bo + bs)
                            .ok_or_else(|| malformed("bad DW_AT_bit_offset"))?
                    } else {
                        loc.checked_mul(8)
                            .ok_or_else(|| malformed("member offset overflows"))?
                    };
                    members.push(Member {
                        name: name(m)?,
                        bit_offset,
                        bit_size: bit_size.map(|b| b as u32),
                        ty: target(m)?,
                    });
                }
                Node::Aggregate {
                    union,
                    name: n,
                    size,
                    members,
                }
            }
            dw::DW_TAG_enumeration_type => {
                let ename = name(e)?;
                let esize = udata(e, dw::DW_AT_byte_size)?.unwrap_or(4);
                let mut values = Vec::new();
                let mut children = root.children();
                while let Some(child) = children.next().map_err(gerr)? {
                    let m = child.entry();
                    if m.tag() != dw::DW_TAG_enumerator {
                        continue;
                    }
                    let v = match m.attr_value(dw::DW_AT_const_value).map_err(gerr)? {
                        Some(AttributeValue::Sdata(v)) => v,
                        Some(v) => v.udata_value().map(|u| u as i64).unwrap_or(0),
                        None => 0,
                    };
                    values.push((name(m)?.unwrap_or_default(), v));
                }
                Node::Enum {
                    name: ename,
                    size: esize,
                    values,
                }
            }
            dw::DW_TAG_array_type => {
                let elem = target(e)?;
                let mut dims = Vec::new();
                let mut children = root.children();
                while let Some(child) = children.next().map_err(gerr)? {
                    let m = child.entry();
                    if m.tag() != dw::DW_TAG_subrange_type {
                        continue;
                    }
                    let count = if let Some(c) = udata(m, dw::DW_AT_count)? {
                        Some(c)
                    } else {
                        match m.attr_value(dw::DW_AT_upper_bound).map_err(gerr)? {
                            Some(AttributeValue::Sdata(-1)) => Some(0),
                            Some(v) => v.udata_value().map(|u| u.saturating_add(1)),
                            // Flexible array member: BTF spells it as 0 elements, so do we.
                            None => Some(0),
                        }
                    };
                    dims.push(count);
                }
                if dims.is_empty() {
                    dims.push(Some(0));
                }
                let count = *dims
                    .get(dim)
                    .ok_or_else(|| malformed("array dimension out of range"))?;
                let elem = if dim + 1 < dims.len() {
                    off | (((dim + 1) as u64) << DIM_SHIFT)
                } else {
                    elem
                };
                Node::Array { elem, count }
            }
            other => Node::Base {
                name: format!("<{other}>"),
                size: 0,
            },
        })
    }
}

/// Decode a `DW_OP_plus_uconst N` member location (DWARF 2/3 style).
fn plus_uconst(expr: &[u8]) -> RResult<u64> {
    let (&op, rest) = expr
        .split_first()
        .ok_or_else(|| malformed("empty member location"))?;
    if op != dw::DW_OP_plus_uconst.0 {
        return Err(malformed(format!("unsupported member location op {op:#x}")));
    }
    let mut r = EndianSlice::new(rest, LittleEndian);
    gimli::Reader::read_uleb128(&mut r).map_err(gerr)
}

impl TypeSource for DwarfTypes<'_> {
    fn find(&self, kind: Kind, name: &str) -> RResult<Option<TypeId>> {
        Ok(self.index.get(&(kind, name.to_owned())).copied())
    }
    fn node(&self, id: TypeId) -> RResult<Node> {
        self.decode(id)
    }
}
