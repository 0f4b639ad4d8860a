//! Volatility 2 Linux profile import: a zip of `module.dwarf` (dwarfdump's text dump of the
//! kernel headers' types, compiled into Volatility's `module.c`) and `System.map`.
//!
//! Two dwarfdump dialects occur: decimal offsets and bare names (`<1><45>…DW_AT_name<page>`,
//! 2.6.32) and hex offsets with quoted names (`<1><0x7150>…DW_AT_name<"page">`, 3.2).
//! DIE offsets are relative to their compile unit, so ids are `(unit << 32) | offset`.
//! The dump only holds types `module.c` uses: whatever else the manifest wants is recorded
//! as absent (required or not) — a Volatility 2 profile is reference data, never completed
//! by guessing. The one exception is `enum pageflags`, without which no page can be
//! classified: for the kernel lines in [`super::oldflags`] it is added from that line's
//! header and cited in `source.inputs`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::build::fill_from_banner;
use super::error::{malformed, Error, RResult, Result};
use super::manifest::Manifest;
use super::model::Profile;
use super::types::{extract, size_of, Kind, Member, Node, TypeId, TypeSource, VOID};

/// Largest member we read from a zip (module.dwarf is a few MB; refuse zip bombs).
const MAX_MEMBER: u64 = 256 << 20;

/// One DIE from the text dump.
#[derive(Debug, Default)]
struct Die {
    tag: String,
    attrs: Vec<(String, String)>,
    children: Vec<TypeId>,
}

impl Die {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The parsed `module.dwarf`.
pub struct DwarfDump {
    dies: HashMap<TypeId, Die>,
    index: HashMap<(Kind, String), TypeId>,
}

/// A number as dwarfdump prints it: `45`, `0x2d`, `-1`, `DW_OP_plus_uconst 45`, and for
/// one-byte forms also the signed reading after it: `192 (-64)` (Debian 9's dump) or
/// `255(as signed = -1)` (Debian 6 and 7). This is the first (unsigned) reading.
fn parse_num(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_prefix("DW_OP_plus_uconst").unwrap_or(s).trim();
    let s = s.split(['(', ' ']).next().unwrap_or(s);
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let v = match s.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok()?,
        None => s.parse::<i64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// The signed reading of a value dwarfdump printed both ways (`192 (-64)`,
/// `255(as signed = -1)`), else the plain value: right for `DW_AT_const_value` of a signed
/// enumerator and for `DW_AT_upper_bound` -1 (a zero-length array).
fn parse_signed(s: &str) -> Option<i64> {
    let signed = s.split_once('(').and_then(|(_, r)| {
        let r = r.trim_end().strip_suffix(')')?;
        parse_num(r.strip_prefix("as signed =").unwrap_or(r))
    });
    signed.or_else(|| parse_num(s))
}

/// `<0x1d>` or `<45>` → offset.
fn parse_off(s: &str) -> Option<u64> {
    parse_num(s).and_then(|v| u64::try_from(v).ok())
}

/// Split `DW_AT_x<v> DW_AT_y<<ref>>` into pairs; values may nest `<…>`.
fn parse_attrs(mut s: &str) -> RResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(out);
        }
        let lt = s
            .find('<')
            .ok_or_else(|| malformed(format!("attribute without value: {s:.60}")))?;
        let name = s[..lt].trim().to_owned();
        let bytes = s.as_bytes();
        let mut depth = 0usize;
        let mut end = None;
        for (i, &b) in bytes.iter().enumerate().skip(lt) {
            match b {
                b'<' => depth += 1,
                b'>' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let end = end.ok_or_else(|| malformed(format!("unterminated attribute {name}")))?;
        let mut v = &s[lt + 1..end];
        if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v = &v[1..v.len() - 1];
        }
        out.push((name, v.to_owned()));
        s = &s[end + 1..];
    }
}

impl DwarfDump {
    /// Parse dwarfdump text.
    pub fn parse(text: &str) -> RResult<Self> {
        let mut dies: HashMap<TypeId, Die> = HashMap::new();
        let mut stack: Vec<TypeId> = Vec::new(); // by depth
        let mut unit: u64 = 0;
        let mut seen_unit = false;
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if !line.starts_with('<') {
                continue;
            }
            let bad = || malformed(format!("module.dwarf line {}: cannot parse", lineno + 1));
            // <depth><offset><TAG> attrs
            let mut parts = line.splitn(4, '>');
            let depth = parts
                .next()
                .and_then(|d| d.strip_prefix('<'))
                .and_then(|d| d.parse::<usize>().ok())
                .ok_or_else(bad)?;
            let off = parts
                .next()
                .and_then(|o| o.strip_prefix('<'))
                .ok_or_else(bad)?;
            let tag = parts
                .next()
                .and_then(|t| t.strip_prefix('<'))
                .ok_or_else(bad)?;
            let rest = parts.next().unwrap_or("");
            if depth == 0 {
                if seen_unit {
                    unit += 1;
                }
                seen_unit = true;
                stack.clear();
                continue;
            }
            if depth > 64 {
                return Err(bad());
            }
            let off = parse_off(off).ok_or_else(bad)?;
            let id = (unit << 32) | off;
            let attrs = parse_attrs(rest)
                .map_err(|m| malformed(format!("module.dwarf line {}: {}", lineno + 1, m.0)))?;
            stack.truncate(depth - 1);
            if let Some(&parent) = stack.last() {
                if stack.len() == depth - 1 {
                    if let Some(p) = dies.get_mut(&parent) {
                        p.children.push(id);
                    }
                }
            }
            while stack.len() < depth - 1 {
                stack.push(VOID); // tolerate gaps
            }
            stack.push(id);
            dies.insert(
                id,
                Die {
                    tag: tag.to_owned(),
                    attrs,
                    children: Vec::new(),
                },
            );
        }
        let mut index = HashMap::new();
        let mut ids: Vec<&TypeId> = dies.keys().collect();
        ids.sort();
        for id in ids {
            let d = &dies[id];
            let kind = match d.tag.as_str() {
                "DW_TAG_structure_type" | "DW_TAG_union_type" => Kind::Aggregate,
                "DW_TAG_enumeration_type" => Kind::Enum,
                _ => continue,
            };
            if d.attr("DW_AT_declaration").is_some() {
                continue;
            }
            if let Some(n) = d.attr("DW_AT_name") {
                index.entry((kind, n.to_owned())).or_insert(*id);
            }
        }
        Ok(DwarfDump { dies, index })
    }

    fn die(&self, id: TypeId) -> RResult<&Die> {
        self.dies
            .get(&id)
            .ok_or_else(|| malformed(format!("reference to missing DIE {:#x}", id & 0xffff_ffff)))
    }

    fn target(&self, id: TypeId, d: &Die) -> RResult<TypeId> {
        match d.attr("DW_AT_type") {
            None => Ok(VOID),
            Some(v) => {
                let r = v.trim_start_matches('<').trim_end_matches('>');
                let off = parse_off(r).ok_or_else(|| malformed(format!("bad type ref {v}")))?;
                Ok((id & !0xffff_ffff) | off)
            }
        }
    }

    fn num(d: &Die, a: &str) -> Option<i64> {
        d.attr(a).and_then(parse_num)
    }

    fn signed(d: &Die, a: &str) -> Option<i64> {
        d.attr(a).and_then(parse_signed)
    }

    fn decode(&self, id: TypeId) -> RResult<Node> {
        if id == VOID {
            return Ok(Node::Void);
        }
        let d = self.die(id)?;
        let name = d.attr("DW_AT_name").map(str::to_owned);
        let size = Self::num(d, "DW_AT_byte_size").unwrap_or(0).max(0) as u64;
        Ok(match d.tag.as_str() {
            "DW_TAG_base_type" => Node::Base {
                name: name.unwrap_or_else(|| "?".into()),
                size,
            },
            "DW_TAG_pointer_type" => Node::Pointer {
                target: self.target(id, d)?,
            },
            "DW_TAG_typedef" => Node::Typedef {
                name: name.unwrap_or_default(),
                target: self.target(id, d)?,
            },
            "DW_TAG_const_type" => Node::Qualified {
                qual: "const",
                target: self.target(id, d)?,
            },
            "DW_TAG_volatile_type" => Node::Qualified {
                qual: "volatile",
                target: self.target(id, d)?,
            },
            "DW_TAG_restrict_type" => Node::Qualified {
                qual: "restrict",
                target: self.target(id, d)?,
            },
            "DW_TAG_subroutine_type" => Node::Func,
            "DW_TAG_structure_type" | "DW_TAG_union_type" => {
                let union = d.tag == "DW_TAG_union_type";
                if d.attr("DW_AT_declaration").is_some() {
                    return Ok(Node::Forward {
                        union,
                        name: name.unwrap_or_default(),
                    });
                }
                let mut members = Vec::new();
                for &c in &d.children {
                    let m = self.die(c)?;
                    if m.tag != "DW_TAG_member" {
                        continue;
                    }
                    let loc = Self::num(m, "DW_AT_data_member_location").unwrap_or(0);
                    let loc =
                        u64::try_from(loc).map_err(|_| malformed("negative member offset"))?;
                    let ty = self.target(c, m)?;
                    let bit_size = Self::num(m, "DW_AT_bit_size").map(|b| b as u32);
                    let bit_offset = match (bit_size, Self::num(m, "DW_AT_bit_offset")) {
                        (Some(bs), Some(bo)) => {
                            let unit = match Self::num(m, "DW_AT_byte_size") {
                                Some(s) => s as u64,
                                None => size_of(self, ty)?,
                            };
                            (loc * 8 + unit * 8)
                                .checked_sub(bo as u64 + u64::from(bs))
                                .ok_or_else(|| malformed("bad DW_AT_bit_offset"))?
                        }
                        _ => loc * 8,
                    };
                    members.push(Member {
                        name: m.attr("DW_AT_name").map(str::to_owned),
                        bit_offset,
                        bit_size,
                        ty,
                    });
                }
                Node::Aggregate {
                    union,
                    name,
                    size,
                    members,
                }
            }
            "DW_TAG_enumeration_type" => {
                let mut values = Vec::new();
                for &c in &d.children {
                    let m = self.die(c)?;
                    if m.tag == "DW_TAG_enumerator" {
                        values.push((
                            m.attr("DW_AT_name").unwrap_or_default().to_owned(),
                            Self::signed(m, "DW_AT_const_value").unwrap_or(0),
                        ));
                    }
                }
                Node::Enum {
                    name,
                    size: if size == 0 { 4 } else { size },
                    values,
                }
            }
            "DW_TAG_array_type" => {
                let elem = self.target(id, d)?;
                let mut dims = Vec::new();
                for &c in &d.children {
                    let m = self.die(c)?;
                    if m.tag == "DW_TAG_subrange_type" {
                        let n = Self::num(m, "DW_AT_count")
                            .or_else(|| Self::signed(m, "DW_AT_upper_bound").map(|u| u + 1))
                            .unwrap_or(0);
                        dims.push(n.max(0) as u64);
                    }
                }
                // Multi-dimensional arrays flattened to one count (rare in the manifest).
                let count = dims.iter().product::<u64>();
                Node::Array {
                    elem,
                    count: Some(if dims.is_empty() { 0 } else { count }),
                }
            }
            other => Node::Base {
                name: format!("<{other}>"),
                size,
            },
        })
    }
}

impl TypeSource for DwarfDump {
    fn find(&self, kind: Kind, name: &str) -> RResult<Option<TypeId>> {
        Ok(self.index.get(&(kind, name.to_owned())).copied())
    }
    fn node(&self, id: TypeId) -> RResult<Node> {
        self.decode(id)
    }
}

/// Parse `System.map` (`ffffffff81000000 T _text`) for the wanted names; globals win.
pub fn parse_system_map(text: &str, wanted: &[&str]) -> HashMap<String, u64> {
    let mut out: HashMap<String, (u64, bool)> = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !wanted.contains(&name) {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let global = ty.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        match out.get(name) {
            Some((_, true)) => {}
            Some((_, false)) if !global => {}
            _ => {
                out.insert(name.to_owned(), (addr, global));
            }
        }
    }
    out.into_iter().map(|(k, (a, _))| (k, a)).collect()
}

/// Build a profile from the two texts of a Volatility 2 profile.
pub fn import_texts(
    module_dwarf: &str,
    system_map: &str,
    release: Option<&str>,
    origin: &str,
) -> RResult<Profile> {
    let manifest = Manifest::builtin();
    let dump = DwarfDump::parse(module_dwarf)?;
    let mut p = Profile::new("volatility2");
    p.source
        .inputs
        .push(format!("{origin} (module.dwarf, System.map)"));
    if let Some(r) = release {
        // No banner in a Volatility 2 profile: synthesise the release part only.
        fill_from_banner(&mut p, &format!("Linux version {r} "));
        if origin.to_ascii_lowercase().contains("debian") {
            p.kernel.distribution = Some("debian".into());
            let parts: Vec<&str> = r.splitn(3, '-').collect();
            if parts.len() == 3 {
                p.kernel.flavour = Some(parts[2].to_owned());
            }
        }
    }
    let syms = parse_system_map(system_map, &manifest.wanted_symbol_names());
    for s in &manifest.symbols {
        p.record_symbol(
            s,
            |n| syms.get(n).map(|a| (*a, 0)),
            Some("not in System.map"),
        );
    }
    let ex = extract(&manifest, &[&dump])?;
    p.types = ex.types;
    p.enums = ex.enums;
    for mut a in ex.absent {
        if a.kind != "field" {
            a.note = Some("not described by the profile's module.dwarf".into());
        }
        p.absent.push(a);
    }
    p.absent.sort();
    // The dumps never describe `enum pageflags`: add the numbers of the kernel line.
    super::oldflags::complete(&mut p);
    Ok(p)
}

/// Import a Volatility 2 profile zip.
pub fn import_zip(path: &Path) -> Result<Profile> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::Import {
        path: path.into(),
        msg: format!("not a readable zip archive: {e}"),
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    let dwarf_name = names
        .iter()
        .find(|n| n.ends_with("module.dwarf"))
        .ok_or_else(|| Error::Import {
            path: path.into(),
            msg: "no module.dwarf in the zip: not a Volatility 2 Linux profile".into(),
        })?
        .clone();
    let map_name = names
        .iter()
        .find(|n| {
            n.rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with("System.map"))
        })
        .ok_or_else(|| Error::Import {
            path: path.into(),
            msg: "no System.map in the zip: not a Volatility 2 Linux profile".into(),
        })?
        .clone();
    let mut read = |name: &str| -> Result<String> {
        let entry = zip.by_name(name).map_err(|e| Error::Import {
            path: path.into(),
            msg: format!("{name}: {e}"),
        })?;
        let mut buf = Vec::new();
        entry
            .take(MAX_MEMBER)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Import {
                path: path.into(),
                msg: format!("{name}: corrupt zip member: {e}"),
            })?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let dwarf = read(&dwarf_name)?;
    let map = read(&map_name)?;
    let release = map_name
        .rsplit('/')
        .next()
        .and_then(|b| b.strip_prefix("System.map-"))
        .map(str::to_owned);
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    import_texts(&dwarf, &map, release.as_deref(), &origin).map_err(|m| Error::Import {
        path: path.into(),
        msg: m.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dwarfdump_numbers_in_all_three_dialects() {
        assert_eq!(parse_num("DW_OP_plus_uconst 208"), Some(208));
        assert_eq!(parse_num("0x1d"), Some(29));
        assert_eq!(parse_num("-3"), Some(-3));
        // Debian 9's dump prints one-byte forms twice; the offset is the unsigned one.
        assert_eq!(parse_num("192 (-64)"), Some(192));
        assert_eq!(parse_signed("192 (-64)"), Some(-64));
        assert_eq!(parse_num("255(as signed = -1)"), Some(255));
        assert_eq!(parse_signed("255(as signed = -1)"), Some(-1));
        assert_eq!(
            parse_signed("0xffffffff80000000 (-2147483648)"),
            Some(-2147483648)
        );
        assert_eq!(parse_signed("12"), Some(12));
        assert_eq!(parse_num("x"), None);
    }

    #[test]
    fn member_offsets_printed_with_their_signed_reading() {
        let text = "<0><0xb><DW_TAG_compile_unit> DW_AT_name<m.c>\n\
<1><0x10><DW_TAG_structure_type> DW_AT_name<s> DW_AT_byte_size<0x00000100>\n\
<2><0x20><DW_TAG_member> DW_AT_name<a> DW_AT_type<<0x40>> DW_AT_data_member_location<0>\n\
<2><0x28><DW_TAG_member> DW_AT_name<b> DW_AT_type<<0x40>> DW_AT_data_member_location<208 (-48)>\n\
<1><0x40><DW_TAG_base_type> DW_AT_name<long> DW_AT_byte_size<0x00000008>\n";
        let d = DwarfDump::parse(text).unwrap();
        let id = d.find(Kind::Aggregate, "s").unwrap().unwrap();
        let Node::Aggregate { members, .. } = d.node(id).unwrap() else {
            panic!("not a struct")
        };
        assert_eq!(members[1].bit_offset, 208 * 8);
    }
}
