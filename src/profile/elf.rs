//! ELF input: sanity checks with useful errors, symbols, bytes at a virtual address, build-id,
//! and debug sections (with relocations applied for relocatable modules).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader};
use object::{
    LittleEndian, Object, ObjectSection, ObjectSymbol, RelocationKind, RelocationTarget,
    SectionFlags, SymbolSection,
};

use super::error::{Error, Result};

/// A parsed x86_64 ELF file (vmlinux or a kernel module / its `.debug` file).
pub struct ElfImage<'d> {
    pub path: PathBuf,
    pub data: &'d [u8],
    file: ElfFile64<'d, LittleEndian>,
}

/// A symbol's link-time address and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolInfo {
    pub address: u64,
    pub size: u64,
}

/// Recognise a compressed x86 kernel (bzImage): the setup header magic `HdrS` at 0x202.
pub fn is_bzimage(data: &[u8]) -> bool {
    data.get(0x202..0x206) == Some(b"HdrS")
}

impl<'d> ElfImage<'d> {
    /// Check and parse `data` (the contents of `path`).
    pub fn parse(path: &Path, data: &'d [u8]) -> Result<Self> {
        if is_bzimage(data) {
            return Err(Error::CompressedKernel { path: path.into() });
        }
        if !data.starts_with(b"\x7fELF") {
            let what = if data.is_empty() {
                "empty file"
            } else if data.starts_with(b"PK\x03\x04") {
                "a zip archive (a Volatility 2 profile? use `build-profile --from-volatility2`)"
            } else {
                "not an ELF file"
            };
            return Err(Error::bad(path, what));
        }
        if data.len() < 64 {
            return Err(Error::bad(path, "truncated ELF header"));
        }
        if data[4] != elf::ELFCLASS64 {
            return Err(Error::bad(
                path,
                "32-bit ELF: pct supports x86_64 kernels only",
            ));
        }
        if data[5] != elf::ELFDATA2LSB {
            return Err(Error::bad(
                path,
                "big-endian ELF: pct supports x86_64 kernels only",
            ));
        }
        let machine = u16::from_le_bytes([data[18], data[19]]);
        if machine != elf::EM_X86_64 {
            return Err(Error::bad(
                path,
                format!(
                    "ELF for machine {machine} ({}), pct supports x86_64 kernels only",
                    machine_name(machine)
                ),
            ));
        }
        let file = ElfFile64::<LittleEndian>::parse(data)
            .map_err(|e| Error::bad(path, format!("truncated or malformed ELF: {e}")))?;
        // Section headers must lie inside the file: catches truncated downloads early.
        let endian = LittleEndian;
        let hdr = file.elf_header();
        let shoff = hdr.e_shoff(endian);
        let shsize = u64::from(hdr.e_shentsize(endian)) * u64::from(hdr.e_shnum(endian));
        if shoff.saturating_add(shsize) > data.len() as u64 {
            return Err(Error::bad(
                path,
                "truncated ELF: section headers past end of file",
            ));
        }
        for s in file.elf_section_table().iter() {
            if s.sh_type(endian) != elf::SHT_NOBITS {
                let end = s.sh_offset(endian).saturating_add(s.sh_size(endian));
                if end > data.len() as u64 {
                    return Err(Error::bad(
                        path,
                        format!(
                            "truncated ELF: a section ends at byte {end}, the file has {}",
                            data.len()
                        ),
                    ));
                }
            }
        }
        Ok(ElfImage {
            path: path.into(),
            data,
            file,
        })
    }

    /// Relocatable object (a `.ko`), whose debug sections need relocations applied.
    pub fn is_relocatable(&self) -> bool {
        self.file.elf_header().e_type(LittleEndian) == elf::ET_REL
    }

    /// Whether the file has a symbol table.
    pub fn has_symtab(&self) -> bool {
        self.file.section_by_name(".symtab").is_some()
    }

    /// Whether a section exists (and is not empty).
    pub fn has_section(&self, name: &str) -> bool {
        self.file
            .section_by_name(name)
            .is_some_and(|s| s.size() > 0)
    }

    /// Raw section contents, relocated for `ET_REL` files.
    pub fn section(&self, name: &str) -> Result<Option<Cow<'d, [u8]>>> {
        let Some(sec) = self.file.section_by_name(name) else {
            return Ok(None);
        };
        if let SectionFlags::Elf { sh_flags } = sec.flags() {
            if sh_flags & u64::from(elf::SHF_COMPRESSED) != 0 {
                return Err(Error::bad(
                    &self.path,
                    format!("section {name} is compressed (SHF_COMPRESSED); decompress it with `objcopy --decompress-debug-sections`"),
                ));
            }
        }
        let data = sec
            .data()
            .map_err(|e| Error::bad(&self.path, format!("section {name}: {e}")))?;
        if !self.is_relocatable() {
            return Ok(Some(Cow::Borrowed(data)));
        }
        let mut relocs = sec.relocations().peekable();
        if relocs.peek().is_none() {
            return Ok(Some(Cow::Borrowed(data)));
        }
        let mut buf = data.to_vec();
        for (off, r) in relocs {
            if r.kind() != RelocationKind::Absolute {
                continue;
            }
            let base = match r.target() {
                RelocationTarget::Symbol(i) => match self.file.symbol_by_index(i) {
                    Ok(s) => s.address(),
                    Err(_) => continue,
                },
                _ => 0,
            };
            let value = base.wrapping_add(r.addend() as u64);
            let width = usize::from(r.size() / 8);
            let Some(slot) = usize::try_from(off)
                .ok()
                .and_then(|o| buf.get_mut(o..o.checked_add(width)?))
            else {
                return Err(Error::bad(
                    &self.path,
                    format!("relocation of {name} at {off:#x} is outside the section"),
                ));
            };
            match width {
                4 => slot.copy_from_slice(&(value as u32).to_le_bytes()),
                8 => slot.copy_from_slice(&value.to_le_bytes()),
                _ => {}
            }
        }
        Ok(Some(Cow::Owned(buf)))
    }

    /// Look up symbols by name; a global definition wins over a local one.
    pub fn symbols(&self, wanted: &[&str]) -> HashMap<String, SymbolInfo> {
        let mut out: HashMap<String, (SymbolInfo, bool)> = HashMap::new();
        for sym in self.file.symbols() {
            if matches!(sym.section(), SymbolSection::Undefined) {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if !wanted.contains(&name) {
                continue;
            }
            let info = SymbolInfo {
                address: sym.address(),
                size: sym.size(),
            };
            let global = sym.is_global();
            match out.get(name) {
                Some((_, true)) => {}
                Some((_, false)) if !global => {}
                _ => {
                    out.insert(name.to_owned(), (info, global));
                }
            }
        }
        out.into_iter().map(|(k, (v, _))| (k, v)).collect()
    }

    /// Up to `len` bytes of loaded data at link-time virtual address `va`.
    pub fn read_va(&self, va: u64, len: u64) -> Option<&'d [u8]> {
        for sec in self.file.sections() {
            let (addr, size) = (sec.address(), sec.size());
            if addr == 0 || va < addr || va >= addr.saturating_add(size) {
                continue;
            }
            let data = sec.data().ok()?;
            let start = usize::try_from(va - addr).ok()?;
            let end = start
                .saturating_add(usize::try_from(len).ok()?)
                .min(data.len());
            return data.get(start..end);
        }
        None
    }

    /// The GNU build-id note, lower-case hex.
    pub fn build_id(&self) -> Option<String> {
        let id = self.file.build_id().ok()??;
        Some(id.iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn machine_name(m: u16) -> &'static str {
    match m {
        elf::EM_386 => "i386",
        elf::EM_AARCH64 => "aarch64",
        elf::EM_ARM => "arm",
        elf::EM_RISCV => "riscv",
        elf::EM_PPC64 => "ppc64",
        elf::EM_S390 => "s390",
        elf::EM_MIPS => "mips",
        _ => "unknown",
    }
}

/// Memory-map a file read-only.
pub fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a read-only shared mapping (memmap2 maps MAP_SHARED): only `&[u8]` reads are made
    // through it. Another process writing the file changes bytes under us, which the readers
    // tolerate (every offset and length is bounds-checked, content is never trusted). What no
    // check prevents is SIGBUS if the file is truncated while mapped; kernel debug files and
    // profiles are not rewritten in place by any tool pct expects (package managers replace
    // them by rename, which leaves this mapping intact).
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}
