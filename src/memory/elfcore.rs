//! ELF cores from QEMU's `dump-guest-memory`: PT_LOAD segments (guest-physical
//! address in `p_paddr`) and the VMCOREINFO note QEMU copies in when the guest
//! exposed one through `-device vmcoreinfo`. Read with the `object` crate's ELF64
//! program headers and note iterator.

use super::{MemError, Region};
use object::elf::{FileHeader64, EM_X86_64, ET_CORE, PT_LOAD, PT_NOTE};
use object::read::elf::{FileHeader, NoteIterator, ProgramHeader};
use object::LittleEndian as LE;
use std::path::Path;

/// `sizeof(Elf64_Phdr)`.
const PHDR_SIZE: u64 = 56;

/// Parses the program headers of an x86_64 ELF core: guest RAM regions and VMCOREINFO.
pub fn parse(data: &[u8], path: &Path) -> Result<(Vec<Region>, Option<String>), MemError> {
    let bad = |msg: String| MemError::Format {
        path: path.to_owned(),
        msg,
    };
    let not_elf64le = || bad("not a 64-bit little-endian ELF file".into());
    let header = FileHeader64::<LE>::parse(data).map_err(|_| not_elf64le())?;
    if !header.is_little_endian() {
        return Err(not_elf64le());
    }
    let e_type = header.e_type(LE);
    let machine = header.e_machine(LE);
    if e_type != ET_CORE {
        return Err(bad(format!(
            "ELF type {e_type} is not a core dump (ET_CORE); pass a `dump-guest-memory` core or a raw RAM file"
        )));
    }
    if machine != EM_X86_64 {
        return Err(bad(format!("ELF machine {machine} is not x86_64")));
    }
    let phentsize = header.e_phentsize(LE);
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(bad(format!(
            "program header size {phentsize} is not the {PHDR_SIZE} bytes of an ELF64 program header"
        )));
    }
    let phdrs = header.program_headers(LE, data).map_err(|e| {
        let phoff = header.e_phoff(LE);
        let phnum = u64::from(header.e_phnum(LE));
        let end = phnum
            .checked_mul(PHDR_SIZE)
            .and_then(|n| n.checked_add(phoff));
        if end.filter(|&end| end <= data.len() as u64).is_none() {
            bad(format!(
                "the program headers ({phnum} at offset {phoff:#x}) lie past the end of the file \
                 (truncated core?)"
            ))
        } else {
            bad(format!("program headers: {e}"))
        }
    })?;
    let mut regions = Vec::new();
    let mut vmcoreinfo = None;
    for (i, ph) in phdrs.iter().enumerate() {
        let (offset, paddr, filesz) = (ph.p_offset(LE), ph.p_paddr(LE), ph.p_filesz(LE));
        match ph.p_type(LE) {
            PT_LOAD if filesz > 0 => {
                let end = offset.checked_add(filesz);
                if end.filter(|&e| e <= data.len() as u64).is_none() {
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
                // A note segment past the end of the file is skipped, like a note that
                // does not parse: VMCOREINFO is optional.
                if let Ok(notes) = ph.data(LE, data) {
                    vmcoreinfo = vmcoreinfo.or_else(|| find_vmcoreinfo_note(notes));
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

/// Walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned) for `VMCOREINFO`
/// and returns its text (up to the first NUL). Stops at the first malformed note.
pub fn find_vmcoreinfo_note(notes: &[u8]) -> Option<String> {
    let mut it = NoteIterator::<FileHeader64<LE>>::new(LE, 4, notes).ok()?;
    while let Ok(Some(note)) = it.next() {
        let name = note.name_bytes();
        if name.strip_suffix(b"\0").unwrap_or(name) == b"VMCOREINFO" {
            let desc = note.desc();
            let text = desc.split(|&b| b == 0).next().unwrap_or(desc);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 core: header, `segs` program headers, then the segment bytes.
    fn core(e_type: u16, machine: u16, segs: &[(u32, u64, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // ELFCLASS64
        out[5] = 1; // ELFDATA2LSB
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&e_type.to_le_bytes());
        out[18..20].copy_from_slice(&machine.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut data_off = 64 + 56 * segs.len() as u64;
        let mut payload = Vec::new();
        for &(p_type, paddr, bytes) in segs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&data_off.to_le_bytes());
            ph[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
            ph[0x20..0x28].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            ph[0x28..0x30].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(&ph);
            payload.extend_from_slice(bytes);
            data_off += bytes.len() as u64;
        }
        out.extend_from_slice(&payload);
        out
    }

    fn note(name: &[u8], desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&0u32.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// Parses `b` from an 8-byte-aligned start, as a mapping's is.
    fn run(b: &[u8]) -> Result<(Vec<Region>, Option<String>), String> {
        let mut v = vec![0u8; b.len() + 8];
        let off = v.as_ptr().align_offset(8);
        v[off..off + b.len()].copy_from_slice(b);
        parse(&v[off..off + b.len()], Path::new("t.core")).map_err(|e| e.to_string())
    }

    #[test]
    fn regions_and_note() {
        let mut notes = note(b"CORE\0", b"prstatus");
        notes.extend(note(
            b"VMCOREINFO\0",
            b"OSRELEASE=6.1.0\nPAGESIZE=4096\n\0\0",
        ));
        let ram = [7u8; 4096];
        let c = core(
            ET_CORE,
            EM_X86_64,
            &[
                (PT_NOTE, 0, &notes),
                (PT_LOAD, 1 << 32, &ram),
                (PT_LOAD, 0, &ram),
            ],
        );
        let (regions, info) = run(&c).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[0].gpa, regions[0].len), (0, 4096));
        assert_eq!(regions[1].gpa, 1 << 32);
        assert_eq!(&c[regions[0].offset as usize..][..4096], &ram[..]);
        assert_eq!(info.as_deref(), Some("OSRELEASE=6.1.0\nPAGESIZE=4096\n"));
    }

    #[test]
    fn clear_errors() {
        let ram = [0u8; 4096];
        let ok = core(ET_CORE, EM_X86_64, &[(PT_LOAD, 0, &ram)]);
        assert!(run(&ok).is_ok());
        assert!(run(&ok[..40]).unwrap_err().contains("64-bit little-endian"));
        let mut be = ok.clone();
        be[5] = 2;
        assert!(run(&be).unwrap_err().contains("64-bit little-endian"));
        let exec = core(2, EM_X86_64, &[(PT_LOAD, 0, &ram)]);
        assert!(run(&exec).unwrap_err().contains("not a core dump"));
        let arm = core(ET_CORE, 183, &[(PT_LOAD, 0, &ram)]);
        assert!(run(&arm).unwrap_err().contains("not x86_64"));
        assert!(run(&ok[..100]).unwrap_err().contains("truncated"));
        assert!(run(&ok[..ok.len() - 1]).unwrap_err().contains("truncated"));
        let overlap = core(
            ET_CORE,
            EM_X86_64,
            &[(PT_LOAD, 0, &ram), (PT_LOAD, 4095, &ram)],
        );
        assert!(run(&overlap).unwrap_err().contains("overlap"));
        let empty = core(ET_CORE, EM_X86_64, &[(PT_NOTE, 0, &[])]);
        assert!(run(&empty).unwrap_err().contains("no PT_LOAD"));
        assert_eq!(
            find_vmcoreinfo_note(&note(b"VMCOREINFO", b"X=1")[..14]),
            None
        );
    }
}
