//! The kernel's own symbol table, kallsyms, read out of guest memory.
//!
//! `scripts/kallsyms` compresses every symbol name against a table of 256 tokens and
//! lays the tables out in `.rodata`, in this order:
//!
//! ```text
//! kallsyms_offsets[n]        s32 each, addresses relative to kallsyms_relative_base
//! kallsyms_relative_base     u64
//! kallsyms_num_syms          u32 (unsigned long before 6.x: the low half reads the same)
//! kallsyms_names             per symbol: length (1 byte, or 2 with the top bit set: ≥ 6.1),
//!                            then that many token numbers; the first expanded character
//!                            is the symbol's type letter (T, t, D, d, R, r, B, b …)
//! kallsyms_markers, …
//! kallsyms_token_table       256 NUL-terminated token strings
//! kallsyms_token_index[256]  u16 offset of each token in the table
//! ```
//!
//! VMCOREINFO names the tables on kernels that export them (Debian 6.1 does); elsewhere
//! [`find_by_structure`] finds them by that structure. Decoding mirrors the kernel's
//! `kallsyms_expand_symbol` and `kallsyms_sym_address`. All of it is guest data: every
//! length and offset is bounded, and anything inconsistent is an error naming what and where.

use super::vmcoreinfo::VmcoreInfo;
use super::{LocateError, Location, START_KERNEL_MAP};
use crate::memory::GuestMemory;
use std::collections::HashMap;

/// More symbols than any kernel has (Debian's generic kernel has about 190,000).
const MAX_SYMS: u32 = 4 << 20;
/// Upper bound on the compressed names table.
const MAX_NAMES_BYTES: u64 = 64 << 20;
/// How far past the kernel's `_stext` the structural search looks.
const SEARCH_SPAN: u64 = 96 << 20;

/// Why the symbol table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error(transparent)]
    Read(#[from] LocateError),
    #[error(
        "the kernel's symbol table (kallsyms) was not found in guest memory: VMCOREINFO names \
         no kallsyms tables and none were found by their structure{0}"
    )]
    NotFound(String),
    #[error("kallsyms table {table} at {va:#x} is malformed: {msg}")]
    Malformed {
        table: &'static str,
        va: u64,
        msg: String,
    },
}

/// Where the tables are (runtime virtual addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    pub offsets: u64,
    pub relative_base: u64,
    pub num_syms: u64,
    pub names: u64,
    pub token_table: u64,
    pub token_index: u64,
    /// How the tables were found.
    pub found_by: FoundBy,
}

/// How [`Tables`] were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    Vmcoreinfo,
    Structure,
}

/// One decoded symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sym {
    /// Runtime address (KASLR applied; per-CPU symbols are offsets, never shifted).
    pub address: u64,
    /// The `nm`-style type letter: upper case for global symbols.
    pub kind: u8,
}

impl Sym {
    pub fn is_global(&self) -> bool {
        self.kind.is_ascii_uppercase()
    }
}

/// The decoded symbol table: name → symbol, a global definition winning over a local one
/// (as in the ELF symbol table, where pct's vmlinux profiles take their symbols from).
pub struct Kallsyms {
    pub tables: Tables,
    syms: HashMap<String, Sym>,
    /// Whether the kernel stores per-CPU symbols as absolute values
    /// (`CONFIG_KALLSYMS_ABSOLUTE_PERCPU`).
    pub absolute_percpu: bool,
}

impl Kallsyms {
    /// Finds and decodes the symbol table of the kernel at `loc`.
    pub fn read(
        mem: &GuestMemory,
        loc: &Location,
        info: &VmcoreInfo,
    ) -> Result<Kallsyms, KallsymsError> {
        match tables_from_vmcoreinfo(info) {
            Some(t) => Self::decode(mem, loc, t),
            None => find_by_structure(mem, loc, info),
        }
    }

    /// `kallsyms_lookup_name`: the runtime address of `name`.
    pub fn lookup_name(&self, name: &str) -> Option<u64> {
        self.syms.get(name).map(|s| s.address)
    }

    /// The symbol called `name`.
    pub fn get(&self, name: &str) -> Option<Sym> {
        self.syms.get(name).copied()
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// Decodes the tables at `t`.
    pub fn decode(mem: &GuestMemory, loc: &Location, t: Tables) -> Result<Kallsyms, KallsymsError> {
        let bad =
            |table: &'static str, va: u64, msg: String| KallsymsError::Malformed { table, va, msg };
        let num = loc.read_u32(mem, t.num_syms, "kallsyms_num_syms")?;
        if num == 0 || num > MAX_SYMS {
            return Err(bad(
                "kallsyms_num_syms",
                t.num_syms,
                format!("{num} symbols is not plausible"),
            ));
        }
        let tokens = Tokens::read(mem, loc, t.token_table, t.token_index)?;
        let names_len = t
            .token_table
            .checked_sub(t.names)
            .filter(|&l| l > 0 && l <= MAX_NAMES_BYTES)
            .ok_or_else(|| {
                bad(
                    "kallsyms_names",
                    t.names,
                    format!(
                        "does not lie before the token table at {:#x} within {MAX_NAMES_BYTES} bytes",
                        t.token_table
                    ),
                )
            })?;
        let names = loc.read(mem, t.names, names_len, "kallsyms_names")?;
        let offsets = loc.read(mem, t.offsets, u64::from(num) * 4, "kallsyms_offsets")?;
        let base = loc.read_u64(mem, t.relative_base, "kallsyms_relative_base")?;
        let offsets: Vec<i32> = offsets
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // With CONFIG_KALLSYMS_ABSOLUTE_PERCPU, every non-per-CPU symbol is stored as a
        // negative offset; without it no offset is negative (the base is the lowest address).
        let absolute_percpu = offsets.iter().any(|&o| o < 0);
        let mut syms: HashMap<String, Sym> = HashMap::with_capacity(num as usize);
        let mut pos = 0usize;
        let mut name = Vec::with_capacity(128);
        for &off in offsets.iter() {
            let (len, entry_at) = name_entry(&names, pos).ok_or_else(|| {
                bad(
                    "kallsyms_names",
                    t.names + pos as u64,
                    "runs past the end of the table".into(),
                )
            })?;
            let entry = names.get(entry_at..entry_at + len).ok_or_else(|| {
                bad(
                    "kallsyms_names",
                    t.names + pos as u64,
                    format!("a {len}-byte name runs past the end of the table"),
                )
            })?;
            pos = entry_at + len;
            tokens.expand(entry, &mut name);
            let Some((&kind, rest)) = name.split_first() else {
                return Err(bad(
                    "kallsyms_names",
                    t.names + pos as u64,
                    "empty symbol name".into(),
                ));
            };
            let Ok(text) = std::str::from_utf8(rest) else {
                continue; // not a name anything looks up
            };
            let address = if absolute_percpu {
                if off >= 0 {
                    off as u64
                } else {
                    base.wrapping_sub(1).wrapping_sub(i64::from(off) as u64)
                }
            } else {
                base.wrapping_add(u64::from(off as u32))
            };
            let sym = Sym { address, kind };
            match syms.get(text) {
                Some(old) if old.is_global() || !sym.is_global() => {}
                _ => {
                    syms.insert(text.to_owned(), sym);
                }
            }
        }
        Ok(Kallsyms {
            tables: t,
            syms,
            absolute_percpu,
        })
    }
}

/// The tables VMCOREINFO names, if it names them all.
pub fn tables_from_vmcoreinfo(info: &VmcoreInfo) -> Option<Tables> {
    Some(Tables {
        offsets: info.symbol("kallsyms_offsets")?,
        relative_base: info.symbol("kallsyms_relative_base")?,
        num_syms: info.symbol("kallsyms_num_syms")?,
        names: info.symbol("kallsyms_names")?,
        token_table: info.symbol("kallsyms_token_table")?,
        token_index: info.symbol("kallsyms_token_index")?,
        found_by: FoundBy::Vmcoreinfo,
    })
}

/// The length of the name entry at `pos` and where its token bytes start: one length byte,
/// or two when the first has its top bit set (little-endian base 128, as 6.1 writes it).
fn name_entry(names: &[u8], pos: usize) -> Option<(usize, usize)> {
    let first = *names.get(pos)?;
    if first & 0x80 == 0 {
        return Some((usize::from(first), pos + 1));
    }
    let second = *names.get(pos + 1)?;
    Some((
        usize::from(first & 0x7f) | (usize::from(second) << 7),
        pos + 2,
    ))
}

/// The 256 tokens, as byte strings.
struct Tokens {
    table: Vec<u8>,
    /// (start, end) of each token in `table`.
    spans: Vec<(usize, usize)>,
}

impl Tokens {
    fn read(
        mem: &GuestMemory,
        loc: &Location,
        table_va: u64,
        index_va: u64,
    ) -> Result<Tokens, KallsymsError> {
        let index = loc.read(mem, index_va, 512, "kallsyms_token_index")?;
        let index: Vec<usize> = index
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let max = index.iter().copied().max().unwrap_or(0);
        // The last token ends before the index (the table ends where the index starts,
        // give or take alignment); read up to the index, at most 64 KiB.
        let len = index_va
            .checked_sub(table_va)
            .filter(|&l| l as usize > max && l <= 64 << 10)
            .ok_or_else(|| KallsymsError::Malformed {
                table: "kallsyms_token_table",
                va: table_va,
                msg: format!(
                    "the token index at {index_va:#x} does not follow the table closely \
                     (largest token offset {max})"
                ),
            })?;
        let table = loc
            .read(mem, table_va, len, "kallsyms_token_table")?
            .into_owned();
        let spans = Self::spans(&table, &index).map_err(|msg| KallsymsError::Malformed {
            table: "kallsyms_token_table",
            va: table_va,
            msg,
        })?;
        Ok(Tokens { table, spans })
    }

    /// Each token's span: it starts at its index entry and ends at the next NUL.
    fn spans(table: &[u8], index: &[usize]) -> Result<Vec<(usize, usize)>, String> {
        index
            .iter()
            .enumerate()
            .map(|(i, &start)| {
                let rest = table
                    .get(start..)
                    .ok_or_else(|| format!("token {i} starts past the table"))?;
                let n = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| format!("token {i} is not NUL-terminated"))?;
                if n == 0 {
                    return Err(format!("token {i} is empty"));
                }
                Ok((start, start + n))
            })
            .collect()
    }

    /// `kallsyms_expand_symbol`: the token bytes of one entry → the name, type letter first.
    fn expand(&self, entry: &[u8], out: &mut Vec<u8>) {
        out.clear();
        for &t in entry {
            let (s, e) = self.spans[usize::from(t)];
            out.extend_from_slice(&self.table[s..e]);
        }
    }
}

/// Finds the tables by their structure, for kernels whose VMCOREINFO does not name them,
/// and returns them decoded.
///
/// Anchor: `kallsyms_relative_base` holds the runtime address of the kernel's lowest text
/// symbol, `_stext`'s (VMCOREINFO names `_stext`), and is followed by a plausible symbol
/// count and a names table whose entries parse; the offsets table ends right before it. The
/// token table and index follow the names, past the markers: an index of 256 increasing
/// u16 whose entries point just past the NULs of the table right before it.
pub fn find_by_structure(
    mem: &GuestMemory,
    loc: &Location,
    info: &VmcoreInfo,
) -> Result<Kallsyms, KallsymsError> {
    let stext = info
        .symbol("_stext")
        .ok_or_else(|| KallsymsError::NotFound(": VMCOREINFO names no _stext either".into()))?;
    let start_pa = stext
        .wrapping_sub(START_KERNEL_MAP)
        .wrapping_add(loc.phys_base);
    let image = mem.read_upto(start_pa, SEARCH_SPAN).map_err(|e| {
        KallsymsError::NotFound(format!(
            ": the kernel image (_stext at {stext:#x}, physical {start_pa:#x}) is not in this \
             memory: {e}"
        ))
    })?;
    let va_of = |off: usize| stext + off as u64;
    let needle = stext.to_le_bytes();
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&image[from..], &needle) {
        let at = from + i;
        from = at + 1;
        if at % 8 != 0 {
            continue;
        }
        let Some(num) = image
            .get(at + 8..at + 12)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            continue;
        };
        if !(1000..=MAX_SYMS).contains(&num) {
            continue;
        }
        let names_at = at + 16;
        let Some(names_end) = names_extent(&image[names_at..], num) else {
            continue;
        };
        let names_end = names_at + names_end;
        let Some((table, index)) = find_token_tables(&image, names_end) else {
            continue;
        };
        let offsets_len = 4 * num as usize;
        // The offsets end at the base, padded to 8 bytes.
        for pad in [0usize, 4] {
            let Some(off_at) = at.checked_sub(offsets_len + pad) else {
                continue;
            };
            let t = Tables {
                offsets: va_of(off_at),
                relative_base: va_of(at),
                num_syms: va_of(at + 8),
                names: va_of(names_at),
                token_table: va_of(table),
                token_index: va_of(index),
                found_by: FoundBy::Structure,
            };
            // The right padding makes the symbols VMCOREINFO names decode to its addresses
            // (`_stext` alone cannot tell: `_text` and `startup_64` share its address).
            if let Ok(k) = Kallsyms::decode(mem, loc, t) {
                if agrees_with_vmcoreinfo(&k, info) {
                    return Ok(k);
                }
            }
        }
    }
    Err(KallsymsError::NotFound(
        " (kernel built without CONFIG_KALLSYMS_ALL, or not a Linux image)".into(),
    ))
}

/// Whether every kernel-image symbol VMCOREINFO names (at least three) decodes to the
/// address VMCOREINFO gives.
fn agrees_with_vmcoreinfo(k: &Kallsyms, info: &VmcoreInfo) -> bool {
    let mut matched = 0;
    for (key, value) in &info.values {
        let Some(name) = key
            .strip_prefix("SYMBOL(")
            .and_then(|r| r.strip_suffix(')'))
        else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(value, 16) else {
            continue;
        };
        if addr < START_KERNEL_MAP {
            continue; // a pointer's value (mem_section), not the symbol's address
        }
        match k.lookup_name(name) {
            Some(a) if a == addr => matched += 1,
            Some(_) => return false,
            None => {}
        }
    }
    matched >= 3
}

/// The byte length of a names table of `num` entries at the start of `bytes`, if every
/// entry's length fits.
fn names_extent(bytes: &[u8], num: u32) -> Option<usize> {
    let mut pos = 0;
    for _ in 0..num {
        let (len, at) = name_entry(bytes, pos)?;
        if len == 0 {
            return None;
        }
        pos = at + len;
        if pos > bytes.len() {
            return None;
        }
    }
    Some(pos)
}

/// The token table and index (their offsets in `bytes`, which starts page-aligned) within
/// 16 MiB after offset `from` (the end of the names): a run of 256 u16 at an even address, the first 0 and each larger than the last,
/// preceded by a table in which token i ends with a NUL just before token i+1 starts.
fn find_token_tables(bytes: &[u8], from: usize) -> Option<(usize, usize)> {
    let span = bytes.len().min(from.saturating_add(16 << 20));
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let mut at = from + (from & 1);
    while at + 512 <= span {
        // Cheap rejection first: nearly every position fails on its first two entries.
        let quick = u16_at(at) == Some(0) && u16_at(at + 2).is_some_and(|v| (2..64).contains(&v));
        let index: Option<Vec<usize>> = if quick {
            (0..256).map(|i| u16_at(at + 2 * i)).collect()
        } else {
            None
        };
        let ok = index
            .as_ref()
            .is_some_and(|ix| ix.windows(2).all(|w| w[1] > w[0] + 1 && w[1] - w[0] < 64));
        if let (true, Some(ix)) = (ok, index) {
            let last = ix[255];
            // The table starts `last + len(token 255) + 1` bytes before the index, plus padding.
            for table_len in last + 2..(last + 72).min(at - from + 1) {
                let t = at - table_len;
                let table = &bytes[t..at];
                let ends_right = ix.windows(2).all(|w| {
                    table.get(w[1] - 1) == Some(&0) && !table[w[0]..w[1] - 1].contains(&0)
                });
                let last_ok = table
                    .get(last..)
                    .and_then(|r| r.iter().position(|&b| b == 0))
                    .is_some_and(|n| n > 0 && table[last + n + 1..].iter().all(|&b| b == 0));
                if ends_right && last_ok {
                    return Some((t, at));
                }
            }
        }
        at += 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_lengths_take_one_byte_or_two() {
        assert_eq!(name_entry(&[5], 0), Some((5, 1)));
        // 0x81 0x02: (1 | 2 << 7) = 257 bytes, as 6.1 writes big names.
        assert_eq!(name_entry(&[0x81, 0x02], 0), Some((257, 2)));
        assert_eq!(name_entry(&[0x81], 0), None);
        assert_eq!(names_extent(&[2, 7, 7, 1, 9], 2), Some(5));
        assert_eq!(names_extent(&[2, 7, 7, 3, 9], 2), None, "runs past the end");
        assert_eq!(names_extent(&[0, 7], 1), None, "empty entry");
    }

    /// A token table of 256 tokens ("T", "a", "b", …) followed by its index.
    fn tables(pad: usize) -> (Vec<u8>, usize, usize) {
        let mut table = Vec::new();
        let mut index = Vec::new();
        for i in 0..256u32 {
            index.push(table.len() as u16);
            let tok = match i {
                0 => "T".to_owned(),
                1 => "_stext".to_owned(),
                _ => format!("t{i}"),
            };
            table.extend_from_slice(tok.as_bytes());
            table.push(0);
        }
        let mut bytes = vec![0xeeu8; 100]; // what precedes: the names' tail, markers…
        let t = bytes.len();
        bytes.extend_from_slice(&table);
        bytes.extend(std::iter::repeat_n(0, pad));
        let ix = bytes.len();
        for v in index {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        (bytes, t, ix)
    }

    #[test]
    fn token_tables_are_found_by_structure_with_any_padding() {
        let mut tried = 0;
        for pad in 0..8 {
            let (bytes, t, ix) = tables(pad);
            if ix % 2 == 0 {
                // The index is u16-aligned in every kernel.
                assert_eq!(find_token_tables(&bytes, 0), Some((t, ix)), "pad {pad}");
                tried += 1;
            }
        }
        assert_eq!(tried, 4);
    }

    #[test]
    fn tokens_expand_and_reject_garbage() {
        let (bytes, t, ix) = tables(0);
        let index: Vec<usize> = bytes[ix..]
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let table = bytes[t..ix].to_vec();
        let spans = Tokens::spans(&table, &index).expect("spans");
        let tokens = Tokens { table, spans };
        let mut out = Vec::new();
        tokens.expand(&[0, 1], &mut out);
        assert_eq!(out, b"T_stext");
        let mut bad = index.clone();
        bad[7] = 100_000;
        assert!(Tokens::spans(&tokens.table, &bad).is_err());
        let no_nul = vec![b'x'; 32];
        assert!(Tokens::spans(&no_nul, &[0]).is_err());
    }
}
