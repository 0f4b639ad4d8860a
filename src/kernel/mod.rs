//! Locating the guest kernel in its memory with no CPU registers: KASLR offsets,
//! `phys_base`, the direct-map and vmemmap bases, and the kernel page tables; then
//! reading kernel virtual addresses.
//!
//! Primary route: the VMCOREINFO note (from an ELF core, or found in RAM). Kernels before
//! 4.10 publish `SYMBOL(phys_base)`, the variable's address, not `NUMBER(phys_base)`: their
//! note is placed by where it lies in RAM (the profile's `vmcoreinfo_note`), and the
//! `phys_base` variable must then hold the shift found.
//! Fallback for kernels without one: the profile's `linux_banner` bytes, then
//! `init_task`, whose `files` pointer gives the virtual shift
//! (`init_task.files - &init_files`).

pub mod btf;
pub mod kallsyms;
pub mod overrides;
pub mod pagetable;
pub mod select;
pub mod self_profile;
pub mod vmcoreinfo;

use crate::memory::{GuestMemory, MemError};
use crate::profile::Profile;
use std::borrow::Cow;
use vmcoreinfo::VmcoreInfo;

/// `__START_KERNEL_map`: where the kernel image is linked.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Pre-4.8 fixed bases (4-level paging).
const FIXED_PAGE_OFFSET: u64 = 0xffff_8800_0000_0000;
const FIXED_VMEMMAP: u64 = 0xffff_ea00_0000_0000;

/// Why the kernel could not be located.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error("the profile is for {profile} but the memory image holds {image}{hint}")]
    WrongProfile {
        profile: String,
        image: String,
        hint: String,
    },
    #[error("the kernel could not be found in guest memory: {0}")]
    NotFound(String),
    #[error("the profile lacks {0}, which locating the kernel needs")]
    ProfileLacks(String),
    #[error("kernel virtual address {va:#x} ({what}) is not mapped")]
    Unmapped { va: u64, what: String },
}

/// How the kernel was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocatedBy {
    VmcoreinfoNote,
    VmcoreinfoInRam,
    BannerAndInitTask,
}

/// Where the kernel is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Location {
    pub method: LocatedBy,
    pub release: Option<String>,
    pub build_id: Option<String>,
    /// Runtime VA − link-time VA of kernel image symbols.
    pub virt_offset: u64,
    /// Physical load shift: image PA = VA − `__START_KERNEL_map` + phys_base.
    pub phys_base: u64,
    pub page_offset_base: u64,
    pub vmemmap_base: u64,
    /// Guest-physical address of the kernel's top-level page table.
    pub pgd: u64,
    pub levels: u8,
}

/// A located kernel: translates and reads kernel virtual addresses.
pub struct Kernel<'a> {
    pub mem: &'a GuestMemory,
    pub profile: &'a Profile,
    pub loc: Location,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The guest's VMCOREINFO: from the source's own note (an ELF core), else found in RAM
/// (the first note whose text carries KERNELOFFSET and phys_base).
///
/// Since 4.13 the kernel allocates the note with `alloc_pages_exact`, so its name sits 12
/// bytes into a page (after namesz, descsz and type): that one spot per page is looked at
/// first, which is quick even when the page lies at the top of a large guest. Older kernels
/// keep the note in the image's `.bss`, anywhere in a page: a full scan finds those.
///
/// `Ok(None)`: there is none; an error: guest RAM could not be read to the end.
pub fn find_vmcoreinfo(mem: &GuestMemory) -> Result<Option<(VmcoreInfo, LocatedBy)>, MemError> {
    let from_core = mem.vmcoreinfo().map(VmcoreInfo::parse);
    if let Some(info) = from_core
        .as_ref()
        .filter(|i| i.number("phys_base").is_some())
    {
        return Ok(Some((info.clone(), LocatedBy::VmcoreinfoNote)));
    }
    // A note without NUMBER(phys_base) (before 4.10) is placed by where it lies in RAM.
    let usable = |bytes: &[u8]| {
        VmcoreInfo::from_note_bytes(bytes).filter(|info| {
            (info.kernel_offset().is_some() && info.number("phys_base").is_some())
                || info.symbol("phys_base").is_some()
        })
    };
    let in_ram = |gpa: u64, at: usize, info: VmcoreInfo| {
        let found_at = Some(gpa + at as u64);
        Some((VmcoreInfo { found_at, ..info }, LocatedBy::VmcoreinfoInRam))
    };
    let marker = vmcoreinfo::NOTE_MARKER;
    let aligned = mem.find_page_with_prefix(12, marker, |page| {
        // The note's text is looked for up to 64 KiB past its name.
        let note = mem.read_upto(page + 12, 12 + 64 * 1024)?;
        Ok(usable(&note).and_then(|info| in_ram(page, 12, info)))
    })?;
    if aligned.is_some() {
        return Ok(aligned);
    }
    for piece in mem.pieces() {
        let (gpa, bytes) = piece?;
        let mut from = 0;
        while let Some(i) = find(&bytes[from..], marker) {
            let at = from + i;
            if let Some(info) = usable(&bytes[at..]) {
                return Ok(in_ram(gpa, at, info));
            }
            from = at + 1;
        }
    }
    Ok(from_core.map(|info| (info, LocatedBy::VmcoreinfoNote)))
}

impl Location {
    /// Where the kernel is, from VMCOREINFO alone (the randomised direct-map and vmemmap
    /// bases are left 0: reading them needs the profile's symbols).
    pub fn from_vmcoreinfo(info: &VmcoreInfo, method: LocatedBy) -> Result<Location, LocateError> {
        let virt_offset = info
            .kernel_offset()
            .ok_or_else(|| LocateError::NotFound("VMCOREINFO has no KERNELOFFSET".into()))?;
        let phys_base = info
            .number("phys_base")
            .ok_or_else(|| LocateError::NotFound("VMCOREINFO has no NUMBER(phys_base)".into()))?
            as u64;
        Self::from_vmcoreinfo_at(info, method, virt_offset, phys_base)
    }

    /// [`from_vmcoreinfo`](Self::from_vmcoreinfo) with the shifts already known.
    pub fn from_vmcoreinfo_at(
        info: &VmcoreInfo,
        method: LocatedBy,
        virt_offset: u64,
        phys_base: u64,
    ) -> Result<Location, LocateError> {
        let levels = if info.number("pgtable_l5_enabled") == Some(1) {
            5
        } else {
            4
        };
        let pgd_va = ["init_top_pgt", "init_level4_pgt", "swapper_pg_dir"]
            .iter()
            .find_map(|n| info.symbol(n))
            .ok_or_else(|| LocateError::NotFound("VMCOREINFO names no init_top_pgt".into()))?;
        Ok(Location {
            method,
            release: info.release().map(str::to_owned),
            build_id: info.build_id().map(str::to_owned),
            virt_offset,
            phys_base,
            page_offset_base: 0,
            vmemmap_base: 0,
            pgd: pgd_va
                .wrapping_sub(START_KERNEL_MAP)
                .wrapping_add(phys_base),
            levels,
        })
    }

    /// Guest-physical address of kernel VA `va`: the direct map by formula once its base
    /// is known, everything else (the kernel image, modules, vmalloc) through the page
    /// tables. Modules sit right above the image, so the image formula would give them
    /// wrong addresses.
    pub fn va_to_pa(&self, mem: &GuestMemory, va: u64) -> Option<u64> {
        let end = mem.end_gpa();
        if self.page_offset_base != 0
            && va >= self.page_offset_base
            && va - self.page_offset_base < end
        {
            return Some(va - self.page_offset_base);
        }
        pagetable::translate(mem, self.pgd, self.levels, va)
    }

    /// `len` bytes at kernel VA `va` (copied only when they span discontiguous pages).
    pub fn read<'m>(
        &self,
        mem: &'m GuestMemory,
        va: u64,
        len: u64,
        what: &str,
    ) -> Result<Cow<'m, [u8]>, LocateError> {
        let unmapped = |at: u64| LocateError::Unmapped {
            va: at,
            what: what.to_owned(),
        };
        let first = self.va_to_pa(mem, va).ok_or_else(|| unmapped(va))?;
        let in_page = 4096 - (va & 4095);
        if len <= in_page {
            return Ok(Cow::Borrowed(mem.slice(first, len)?));
        }
        // Spans pages: contiguous in the direct map, otherwise gather page by page.
        if self.page_offset_base != 0 && va >= self.page_offset_base && va < START_KERNEL_MAP {
            if let Ok(s) = mem.slice(first, len) {
                return Ok(Cow::Borrowed(s));
            }
        }
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1 << 30));
        let mut cur = va;
        while (out.len() as u64) < len {
            let pa = self.va_to_pa(mem, cur).ok_or_else(|| unmapped(cur))?;
            let n = (4096 - (cur & 4095)).min(len - out.len() as u64);
            out.extend_from_slice(mem.slice(pa, n)?);
            cur = cur.wrapping_add(n);
        }
        Ok(Cow::Owned(out))
    }

    /// The little-endian u32 at kernel VA `va`.
    pub fn read_u32(&self, mem: &GuestMemory, va: u64, what: &str) -> Result<u32, LocateError> {
        Ok(u32::from_le_bytes(self.read_array(mem, va, what)?))
    }

    /// The little-endian u64 at kernel VA `va`.
    pub fn read_u64(&self, mem: &GuestMemory, va: u64, what: &str) -> Result<u64, LocateError> {
        Ok(u64::from_le_bytes(self.read_array(mem, va, what)?))
    }

    fn read_array<const N: usize>(
        &self,
        mem: &GuestMemory,
        va: u64,
        what: &str,
    ) -> Result<[u8; N], LocateError> {
        let b = self.read(mem, va, N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        Ok(a)
    }
}

impl<'a> Kernel<'a> {
    /// Finds the kernel described by `profile` in `mem`.
    pub fn locate(mem: &'a GuestMemory, profile: &'a Profile) -> Result<Kernel<'a>, LocateError> {
        Self::locate_with(mem, profile, find_vmcoreinfo(mem)?)
    }

    /// [`locate`](Self::locate) with the VMCOREINFO note already looked for
    /// ([`find_vmcoreinfo`]).
    pub fn locate_with(
        mem: &'a GuestMemory,
        profile: &'a Profile,
        found: Option<(VmcoreInfo, LocatedBy)>,
    ) -> Result<Kernel<'a>, LocateError> {
        if let Some((info, method)) = found {
            return Self::from_vmcoreinfo(mem, profile, &info, method);
        }
        Self::from_banner(mem, profile)
    }

    fn check_identity(
        profile: &Profile,
        release: Option<&str>,
        build_id: Option<&str>,
    ) -> Result<(), LocateError> {
        let same = match (profile.kernel.build_id.as_deref(), build_id) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => match (profile.kernel.release.as_deref(), release) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            },
        };
        if same {
            return Ok(());
        }
        let image = format!(
            "{} (build-id {})",
            release.unwrap_or("an unknown release"),
            build_id.unwrap_or("unknown")
        );
        let known = build_id.and_then(select::known_profile);
        let hint = match known {
            Some(path) => format!("; the profile {} matches it", path.display()),
            None => "; run without --profile and pct builds the guest's profile from its own                      memory (or build one from its -dbg vmlinux with `pct-introspect build-profile`)"
                .to_owned(),
        };
        Err(LocateError::WrongProfile {
            profile: format!(
                "{} (build-id {})",
                profile.kernel.release.as_deref().unwrap_or("?"),
                profile.kernel.build_id.as_deref().unwrap_or("?")
            ),
            image,
            hint,
        })
    }

    fn from_vmcoreinfo(
        mem: &'a GuestMemory,
        profile: &'a Profile,
        info: &VmcoreInfo,
        method: LocatedBy,
    ) -> Result<Kernel<'a>, LocateError> {
        Self::check_identity(profile, info.release(), info.build_id())?;
        let loc = match info.number("phys_base") {
            Some(_) => Location::from_vmcoreinfo(info, method)?,
            None => {
                // No KASLR before 3.14, and no KERNELOFFSET either.
                let virt_offset = info.kernel_offset().unwrap_or(0);
                let phys_base = Self::phys_base_from_note(mem, profile, info, virt_offset)?;
                Location::from_vmcoreinfo_at(info, method, virt_offset, phys_base)?
            }
        };
        Self::finish(mem, profile, loc)
    }

    /// `phys_base` of a kernel whose VMCOREINFO gives only `SYMBOL(phys_base)`: the note
    /// lies in the kernel image at the profile's `vmcoreinfo_note` (its name 12 bytes in,
    /// after the ELF note header), which fixes the physical shift; the `phys_base`
    /// variable, read at the address that shift gives, must then hold it, and the two
    /// symbols must be where the profile says. A note or a profile of another build fails
    /// these checks.
    fn phys_base_from_note(
        mem: &GuestMemory,
        profile: &Profile,
        info: &VmcoreInfo,
        virt_offset: u64,
    ) -> Result<u64, LocateError> {
        let name_pa = info.found_at.ok_or_else(|| {
            LocateError::NotFound(
                "VMCOREINFO has no NUMBER(phys_base) and its note was not found in RAM".into(),
            )
        })?;
        let sym = |n: &str| {
            profile
                .symbol(n)
                .ok_or_else(|| LocateError::ProfileLacks(format!("symbol {n}")))
        };
        let note_va = sym("vmcoreinfo_note")?.wrapping_add(virt_offset);
        let phys_base = name_pa
            .wrapping_sub(12)
            .wrapping_sub(note_va.wrapping_sub(START_KERNEL_MAP));
        let var_va = info
            .symbol("phys_base")
            .ok_or_else(|| LocateError::NotFound("VMCOREINFO has no SYMBOL(phys_base)".into()))?;
        let profile_var = sym("phys_base")?.wrapping_add(virt_offset);
        if var_va != profile_var {
            return Err(LocateError::NotFound(format!(
                "VMCOREINFO puts phys_base at {var_va:#x}, the profile at {profile_var:#x}: \
                 the profile describes another build of this release"
            )));
        }
        let var_pa = var_va
            .wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(phys_base);
        let held = mem.read_u64(var_pa)?;
        if held != phys_base {
            return Err(LocateError::NotFound(format!(
                "the VMCOREINFO note at {name_pa:#x} puts the kernel's phys_base at \
                 {phys_base:#x}, but the variable (at {var_pa:#x}) holds {held:#x}: not the \
                 kernel the profile describes"
            )));
        }
        Ok(phys_base)
    }

    /// The fallback for kernels without VMCOREINFO, usable on its own: the profile's
    /// `linux_banner`, then `init_task.files`, then the page tables.
    pub fn locate_by_banner(
        mem: &'a GuestMemory,
        profile: &'a Profile,
    ) -> Result<Kernel<'a>, LocateError> {
        Self::from_banner(mem, profile)
    }

    fn from_banner(mem: &'a GuestMemory, profile: &'a Profile) -> Result<Kernel<'a>, LocateError> {
        let banner = profile
            .kernel
            .banner
            .as_deref()
            .ok_or_else(|| LocateError::ProfileLacks("the linux_banner text".into()))?;
        let sym = |n: &str| {
            profile
                .symbol(n)
                .ok_or_else(|| LocateError::ProfileLacks(format!("symbol {n}")))
        };
        let (banner_va, init_task, init_files) =
            (sym("linux_banner")?, sym("init_task")?, sym("init_files")?);
        let files_off = profile
            .offset("task_struct", "files")
            .ok_or_else(|| LocateError::ProfileLacks("task_struct.files".into()))?;
        let mut needle = banner.as_bytes().to_vec();
        needle.push(0);
        for piece in mem.pieces() {
            let (gpa, bytes) = piece?;
            let mut from = 0;
            while let Some(i) = find(&bytes[from..], &needle) {
                let banner_pa = gpa + (from + i) as u64;
                from += i + 1;
                // init_task lies at the same distance from linux_banner as at link time.
                let task_pa = banner_pa.wrapping_add(init_task.wrapping_sub(banner_va));
                let Ok(files) = mem.read_u64(task_pa + files_off) else {
                    continue;
                };
                let virt_offset = files.wrapping_sub(init_files);
                if virt_offset % 0x20_0000 != 0 || virt_offset >= 0x4000_0000 {
                    continue; // not a plausible KASLR shift: a stray copy of the banner
                }
                let phys_base = banner_pa.wrapping_sub(
                    banner_va
                        .wrapping_add(virt_offset)
                        .wrapping_sub(START_KERNEL_MAP),
                );
                let pgd_va = ["init_top_pgt", "init_level4_pgt", "swapper_pg_dir"]
                    .iter()
                    .find_map(|n| profile.symbol(n))
                    .ok_or_else(|| LocateError::ProfileLacks("symbol init_top_pgt".into()))?;
                let loc = Location {
                    method: LocatedBy::BannerAndInitTask,
                    release: profile.kernel.release.clone(),
                    build_id: None,
                    virt_offset,
                    phys_base,
                    page_offset_base: 0,
                    vmemmap_base: 0,
                    pgd: pgd_va
                        .wrapping_add(virt_offset)
                        .wrapping_sub(START_KERNEL_MAP)
                        .wrapping_add(phys_base),
                    levels: 4,
                };
                return Self::finish(mem, profile, loc);
            }
        }
        Err(LocateError::NotFound(
            "no VMCOREINFO note and the profile's linux_banner is not in this image: \
             wrong profile, or not a Linux guest's memory"
                .into(),
        ))
    }

    /// Reads the randomised bases (or takes the fixed ones of older kernels).
    fn finish(
        mem: &'a GuestMemory,
        profile: &'a Profile,
        loc: Location,
    ) -> Result<Kernel<'a>, LocateError> {
        let mut k = Kernel { mem, profile, loc };
        let base = |name: &str, fixed: u64| -> Result<u64, LocateError> {
            match profile.symbol(name) {
                Some(link) => {
                    let pa = k.image_pa(link + k.loc.virt_offset);
                    Ok(mem.read_u64(pa)?)
                }
                None => Ok(fixed),
            }
        };
        let pob = base("page_offset_base", FIXED_PAGE_OFFSET)?;
        let vmb = base("vmemmap_base", FIXED_VMEMMAP)?;
        k.loc.page_offset_base = pob;
        k.loc.vmemmap_base = vmb;
        // Sanity: the direct map must translate through the page tables like the formula says.
        let probe = pob + 0x100_0000;
        match pagetable::translate(mem, k.loc.pgd, k.loc.levels, probe) {
            Some(0x100_0000) => Ok(k),
            other => Err(LocateError::NotFound(format!(
                "page tables at {:#x} do not map the direct map base {pob:#x} as expected (got {other:x?}): \
                 wrong profile or corrupt image",
                k.loc.pgd
            ))),
        }
    }

    /// Physical address of a runtime kernel-image VA.
    pub fn image_pa(&self, va: u64) -> u64 {
        va.wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.loc.phys_base)
    }

    /// Runtime VA of a profile symbol.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        Some(
            self.profile
                .symbol(name)?
                .wrapping_add(self.loc.virt_offset),
        )
    }

    /// Guest-physical address of kernel VA `va`.
    pub fn va_to_pa(&self, va: u64) -> Option<u64> {
        self.loc.va_to_pa(self.mem, va)
    }

    /// `len` bytes at kernel VA `va` (copied only when they span discontiguous pages).
    pub fn read(&self, va: u64, len: u64, what: &str) -> Result<Cow<'a, [u8]>, LocateError> {
        self.loc.read(self.mem, va, len, what)
    }

    pub fn read_u64(&self, va: u64, what: &str) -> Result<u64, LocateError> {
        self.loc.read_u64(self.mem, va, what)
    }
}
