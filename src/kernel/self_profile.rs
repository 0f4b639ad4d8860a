//! A profile from the guest's memory alone: no vmlinux, no debug package.
//!
//! A kernel built with `CONFIG_DEBUG_INFO_BTF` and `CONFIG_KALLSYMS_ALL` (Debian 11 and
//! later, Ubuntu, Fedora, RHEL 8.2+) carries everything a profile holds:
//! - where it is: the VMCOREINFO note (KASLR shift, `phys_base`, page tables, build-id);
//! - its symbols: the kallsyms tables ([`super::kallsyms`]);
//! - its types: the BTF blobs of vmlinux and of each loaded module ([`super::btf`]), ext4's
//!   among them where ext4 is a module.
//!
//! [`build_profile_from_memory`] turns them into the same [`Profile`] that
//! `build-profile VMLINUX` writes, driven by the same manifest.

use super::btf::{module_btfs, vmlinux_btf, MemBtfError};
use super::kallsyms::{FoundBy, Kallsyms, KallsymsError};
use super::vmcoreinfo::VmcoreInfo;
use super::{find_vmcoreinfo, LocateError, LocatedBy, Location, START_KERNEL_MAP};
use crate::memory::GuestMemory;
use crate::profile::btf::Btf;
use crate::profile::build::{check_required, fill_from_banner};
use crate::profile::types::{extract, TypeSource};
use crate::profile::{Manifest, Profile};
use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

/// The `source.method` of a profile built from memory.
pub const METHOD: &str = "btf-memory";

/// Why no profile could be built from the guest's memory.
#[derive(Debug, thiserror::Error)]
pub enum SelfProfileError {
    #[error(
        "no VMCOREINFO note in guest memory, so the kernel cannot be located without a profile: \
         pass --profile with one built by `pct-introspect build-profile VMLINUX`"
    )]
    NoVmcoreinfo,
    #[error("locating the kernel: {0}")]
    Locate(#[from] LocateError),
    #[error("{0}; build a profile from the kernel's -dbg vmlinux instead: `pct-introspect build-profile VMLINUX`")]
    Kallsyms(#[from] KallsymsError),
    #[error("{0}")]
    Btf(#[from] MemBtfError),
    #[error("{0}")]
    Profile(String),
}

/// What building took, for reports and benches.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfProfileStats {
    pub kallsyms_found_by: FoundBy,
    pub symbols_decoded: usize,
    pub vmlinux_btf_bytes: usize,
    /// Modules whose BTF was read (names sanitised).
    pub modules: Vec<String>,
    pub elapsed_ms: f64,
}

/// Builds the guest kernel's profile from `mem`.
pub fn build_profile_from_memory(
    mem: &GuestMemory,
) -> Result<(Profile, SelfProfileStats), SelfProfileError> {
    build_profile_from_memory_with(mem, None)
}

/// [`build_profile_from_memory`], also writing the BTF blobs it read into `dump_btf`:
/// `vmlinux.btf` and `<module>.btf` (split BTF), raw, as `/sys/kernel/btf/` shows them,
/// for `pahole` (`--btf_base vmlinux.btf` for a module) or `bpftool btf dump file`.
pub fn build_profile_from_memory_with(
    mem: &GuestMemory,
    dump_btf: Option<&Path>,
) -> Result<(Profile, SelfProfileStats), SelfProfileError> {
    let t0 = Instant::now();
    let found = find_vmcoreinfo(mem)
        .map_err(LocateError::from)?
        .ok_or(SelfProfileError::NoVmcoreinfo)?;
    build_profile_at(mem, found, dump_btf, t0)
}

/// The build itself, from the VMCOREINFO note already found in `mem` (`t0`: when the
/// caller began looking, for the stats).
pub(crate) fn build_profile_at(
    mem: &GuestMemory,
    (info, method): (VmcoreInfo, LocatedBy),
    dump_btf: Option<&Path>,
    t0: Instant,
) -> Result<(Profile, SelfProfileStats), SelfProfileError> {
    let loc = Location::from_vmcoreinfo(&info, method)?;
    check_page_tables(mem, &loc, &info)?;
    let ksyms = Kallsyms::read(mem, &loc, &info)?;
    let link = |runtime: u64| {
        // Image symbols move with KASLR; absolute ones (per-CPU offsets) do not.
        if runtime >= START_KERNEL_MAP {
            runtime.wrapping_sub(loc.virt_offset)
        } else {
            runtime
        }
    };

    let manifest = Manifest::builtin();
    let mut profile = Profile::new(METHOD);
    profile.kernel.build_id = info.build_id().map(str::to_ascii_lowercase);
    let banner_va = ksyms.lookup_name("linux_banner");
    let mut banner_size = 0;
    if let Some(va) = banner_va {
        let text = read_c_string(mem, &loc, va, 4096, "linux_banner")?;
        banner_size = text.len() as u64 + 1;
        let banner = String::from_utf8_lossy(&text).into_owned();
        fill_from_banner(&mut profile, &banner);
        profile.kernel.banner = Some(banner);
    }
    if profile.kernel.release.is_none() {
        profile.kernel.release = info.release().map(str::to_owned);
    }
    for s in &manifest.symbols {
        // kallsyms has no sizes; the banner's is its text's.
        profile.record_symbol(
            s,
            |n| {
                let sym = ksyms.get(n)?;
                let size = if n == "linux_banner" { banner_size } else { 0 };
                Some((link(sym.address), size))
            },
            None,
        );
    }

    let (btf_va, btf_bytes) = vmlinux_btf(
        mem,
        &loc,
        ksyms.lookup_name("__start_BTF"),
        ksyms.lookup_name("__stop_BTF"),
    )?;
    let btf_len = btf_bytes.len();
    let invalid = |what: &str, va: u64, len: usize, msg: String| MemBtfError::Invalid {
        what: what.to_owned(),
        va,
        len: len as u64,
        msg,
    };
    if let Some(dir) = dump_btf {
        dump(dir, "vmlinux", &btf_bytes)?;
    }
    let base = Btf::parse_blob(Cow::Owned(btf_bytes), None)
        .map_err(|m| invalid("vmlinux BTF", btf_va, btf_len, m.0))?;
    // Module BTF only matters where the manifest's types live in modules (ext4 on Debian's
    // generic kernels): a module whose BTF cannot be read is left out, and named in the
    // error should a required type then be missing.
    let mut module_problems = Vec::new();
    let all_modules = match ksyms.lookup_name("btf_modules") {
        Some(head) => module_btfs(mem, &loc, &base, head).unwrap_or_else(|e| {
            module_problems.push(e.to_string());
            Vec::new()
        }),
        None => Vec::new(), // CONFIG_DEBUG_INFO_BTF_MODULES off: vmlinux must do
    };
    let mut modules = Vec::with_capacity(all_modules.len());
    let mut split = Vec::with_capacity(all_modules.len());
    for m in &all_modules {
        match Btf::parse_blob(Cow::Borrowed(&m.data[..]), Some(&base)) {
            Ok(b) => {
                if let Some(dir) = dump_btf {
                    dump(dir, &m.name, &m.data)?;
                }
                split.push(b);
                modules.push(m);
            }
            Err(e) => module_problems.push(
                invalid(
                    &format!("BTF of module {}", m.name),
                    m.va,
                    m.data.len(),
                    e.0,
                )
                .to_string(),
            ),
        }
    }
    let mut sources: Vec<&dyn TypeSource> = vec![&base];
    sources.extend(split.iter().map(|b| b as &dyn TypeSource));
    let ex = extract(&manifest, &sources).map_err(|m| SelfProfileError::Profile(m.0))?;

    let what = format!("guest memory ({})", mem.description());
    profile.source.inputs.push(format!(
        "{what}: VMCOREINFO, kallsyms ({}), vmlinux BTF ({btf_len} bytes)",
        match ksyms.tables.found_by {
            FoundBy::Vmcoreinfo => "tables named by VMCOREINFO",
            FoundBy::Structure => "tables found by their structure",
        }
    ));
    for (i, m) in modules.iter().enumerate() {
        let provided: Vec<&str> = ex
            .origin
            .iter()
            .filter(|(_, &o)| o == i + 1)
            .map(|(k, _)| k.as_str())
            .collect();
        if !provided.is_empty() {
            profile.source.inputs.push(format!(
                "module {} (split BTF; {})",
                m.name,
                provided.join(", ")
            ));
        }
    }
    profile.types = ex.types;
    profile.enums = ex.enums;
    profile.absent.extend(ex.absent);
    profile.absent.sort();
    if let Err(e) = check_required(Path::new(&what), &profile.absent) {
        let ext4 = profile
            .absent
            .iter()
            .any(|a| a.required && a.key.starts_with("ext4_"));
        let hint = if ext4 {
            format!(
                " (ext4's types are in no BTF the guest holds: {} module BTFs were read [{}]{}; \
                 is ext4 a module not loaded yet, or the kernel built without \
                 CONFIG_DEBUG_INFO_BTF_MODULES?)",
                modules.len(),
                modules
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if module_problems.is_empty() {
                    String::new()
                } else {
                    format!("; others could not be: {}", module_problems.join("; "))
                }
            )
        } else {
            String::new()
        };
        return Err(SelfProfileError::Profile(format!("{e}{hint}")));
    }
    let stats = SelfProfileStats {
        kallsyms_found_by: ksyms.tables.found_by,
        symbols_decoded: ksyms.len(),
        vmlinux_btf_bytes: btf_len,
        modules: modules.iter().map(|m| m.name.clone()).collect(),
        elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    Ok((profile, stats))
}

/// Writes one BTF blob as `dir/<name>.btf` (`name` is sanitised guest data: no `/`).
fn dump(dir: &Path, name: &str, data: &[u8]) -> Result<(), SelfProfileError> {
    let file = dir.join(format!("{}.btf", name.replace(['/', '.'], "_")));
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&file, data))
        .map_err(|e| SelfProfileError::Profile(format!("writing {}: {e}", file.display())))
}

/// The page tables VMCOREINFO points at must map the kernel image where its physical
/// load address says, or nothing read through them means anything.
fn check_page_tables(
    mem: &GuestMemory,
    loc: &Location,
    info: &VmcoreInfo,
) -> Result<(), SelfProfileError> {
    let Some(stext) = info.symbol("_stext") else {
        return Ok(());
    };
    let want = stext
        .wrapping_sub(START_KERNEL_MAP)
        .wrapping_add(loc.phys_base);
    let end = mem.end_gpa();
    if loc.pgd >= end || want >= end {
        return Err(LocateError::NotFound(format!(
            "the kernel's page tables ({:#x}) or image ({want:#x}) lie past the end of this \
             memory image ({end:#x}): a truncated dump?",
            loc.pgd
        ))
        .into());
    }
    match loc.va_to_pa(mem, stext) {
        Some(pa) if pa == want => Ok(()),
        got => Err(LocateError::NotFound(format!(
            "the page tables at {:#x} map _stext ({stext:#x}) to {got:x?}, not {want:#x}: \
             a corrupt image or a VMCOREINFO note from another boot",
            loc.pgd
        ))
        .into()),
    }
}

/// A NUL-terminated string of at most `max` bytes at kernel VA `va`, read page by page.
fn read_c_string(
    mem: &GuestMemory,
    loc: &Location,
    va: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, LocateError> {
    let mut out = Vec::new();
    let mut cur = va;
    while (out.len() as u64) < max {
        let n = (4096 - (cur & 4095)).min(max - out.len() as u64);
        let chunk = loc.read(mem, cur, n, what)?;
        if let Some(end) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        cur = cur.wrapping_add(n);
    }
    Ok(out)
}
