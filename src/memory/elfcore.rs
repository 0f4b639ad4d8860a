//! ELF cores from QEMU's `dump-guest-memory`: PT_LOAD segments (guest-physical
//! address in `p_paddr`) and the VMCOREINFO note QEMU copies in when the guest
//! exposed one through `-device vmcoreinfo`.

use super::{MemError, Region};
use std::path::Path;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

fn le<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    le::<2>(b, o).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    le::<4>(b, o).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    le::<8>(b, o).map(u64::from_le_bytes)
}

/// Parses the program headers of an x86_64 ELF core: guest RAM regions and VMCOREINFO.
pub fn parse(data: &[u8], path: &Path) -> Result<(Vec<Region>, Option<String>), MemError> {
    let bad = |msg: String| MemError::Format {
        path: path.to_owned(),
        msg,
    };
    if data.len() < 64 || data[4] != 2 || data[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file".into()));
    }
    let e_type = u16_at(data, 16).unwrap_or(0);
    let machine = u16_at(data, 18).unwrap_or(0);
    if e_type != 4 {
        return Err(bad(format!(
            "ELF type {e_type} is not a core dump (ET_CORE); pass a `dump-guest-memory` core or a raw RAM file"
        )));
    }
    if machine != 62 {
        return Err(bad(format!("ELF machine {machine} is not x86_64")));
    }
    let phoff = u64_at(data, 0x20).unwrap_or(0) as usize;
    let phentsize = u16_at(data, 0x36).unwrap_or(0) as usize;
    let phnum = u16_at(data, 0x38).unwrap_or(0) as usize;
    if phentsize < 56 {
        return Err(bad(format!("program header size {phentsize} is too small")));
    }
    let mut regions = Vec::new();
    let mut vmcoreinfo = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (Some(p_type), Some(offset), Some(paddr), Some(filesz)) = (
            u32_at(data, ph),
            u64_at(data, ph + 8),
            u64_at(data, ph + 0x18),
            u64_at(data, ph + 0x20),
        ) else {
            return Err(bad(format!(
                "program header {i} lies past the end of the file (truncated core?)"
            )));
        };
        let end = offset
            .checked_add(filesz)
            .filter(|&e| e <= data.len() as u64);
        match p_type {
            PT_LOAD if filesz > 0 => {
                if end.is_none() {
                    return Err(bad(format!(
                        "segment {i} (guest-physical {paddr:#x}, {filesz} bytes) runs past the end of \
                         the file ({} bytes): the core is truncated",
                        data.len()
                    )));
                }
                regions.push(Region {
                    gpa: paddr,
                    offset,
                    len: filesz,
                });
            }
            PT_NOTE => {
                if let Some(e) = end {
                    vmcoreinfo = vmcoreinfo
                        .or_else(|| find_vmcoreinfo_note(&data[offset as usize..e as usize]));
                }
            }
            _ => {}
        }
    }
    regions.sort_by_key(|r| r.gpa);
    for w in regions.windows(2) {
        if w[0].gpa + w[0].len > w[1].gpa {
            return Err(bad(format!(
                "PT_LOAD segments overlap at guest-physical {:#x}",
                w[1].gpa
            )));
        }
    }
    if regions.is_empty() {
        return Err(bad("no PT_LOAD segment: the core holds no memory".into()));
    }
    Ok((regions, vmcoreinfo))
}

/// Walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned) for `VMCOREINFO`.
pub fn find_vmcoreinfo_note(notes: &[u8]) -> Option<String> {
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = u32_at(notes, off)? as usize;
        let descsz = u32_at(notes, off + 4)? as usize;
        let name_start = off + 12;
        let desc_start = name_start.checked_add(namesz.checked_add(3)? & !3)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = notes.get(name_start..name_start + namesz)?;
        let desc = notes.get(desc_start..desc_end)?;
        if name.strip_suffix(b"\0").unwrap_or(name) == b"VMCOREINFO" {
            let text = desc.split(|&b| b == 0).next().unwrap_or(desc);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        off = desc_end.checked_add(3)? & !3;
    }
    None
}
