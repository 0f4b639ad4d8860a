//! `build-profile`: vmlinux (+ modules) → [`Profile`], driven by the manifest.
//!
//! Symbols come from the ELF symbol table, the banner from `.rodata` through `linux_banner`,
//! types from `.BTF` when present (fast) with DWARF as the fallback for anything BTF lacks,
//! and from each `--module`'s DWARF for types that live in modules (ext4 on Debian's generic
//! and rt flavours).

use std::path::{Path, PathBuf};

use super::btf::Btf;
use super::dwarf::{DwarfSections, DwarfTypes};
use super::elf::{map_file, ElfImage};
use super::error::{Error, Result};
use super::manifest::Manifest;
use super::model::{Absent, Profile};
use super::types::{extract, Extracted, TypeSource};

/// Which debug format to read types from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DebugFormat {
    /// BTF when present, DWARF for what it lacks.
    #[default]
    Auto,
    /// BTF only.
    Btf,
    /// DWARF only.
    Dwarf,
}

/// Options of [`build_profile`].
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Kernel modules (or their `.debug` files) holding types vmlinux lacks.
    pub modules: Vec<PathBuf>,
    pub method: DebugFormat,
}

/// Build a profile from a vmlinux with debug information.
pub fn build_profile(vmlinux: &Path, opts: &BuildOptions) -> Result<Profile> {
    let manifest = Manifest::builtin();
    let map = map_file(vmlinux)?;
    let elf = ElfImage::parse(vmlinux, &map)?;
    if elf.is_relocatable() {
        return Err(Error::bad(
            vmlinux,
            "this is a kernel module (ET_REL), not vmlinux: pass vmlinux first and modules with --module",
        ));
    }
    if !elf.has_symtab() {
        return Err(Error::bad(
            vmlinux,
            "stripped ELF (no .symtab): use the unstripped vmlinux from the -dbg package \
             (/usr/lib/debug/boot/vmlinux-<release>)",
        ));
    }
    let has_btf = elf.has_section(".BTF");
    let has_dwarf = elf.has_section(".debug_info");
    match (opts.method, has_btf, has_dwarf) {
        (_, false, false) => {
            return Err(Error::bad(
                vmlinux,
                "no type information (.BTF or .debug_info): use the vmlinux from the -dbg package",
            ))
        }
        (DebugFormat::Btf, false, _) => return Err(Error::bad(vmlinux, "no .BTF section")),
        (DebugFormat::Dwarf, _, false) => {
            return Err(Error::bad(
                vmlinux,
                "no DWARF (.debug_info): use the vmlinux from the -dbg package",
            ))
        }
        _ => {}
    }

    let mut profile = Profile::new("");
    read_identity(&elf, &mut profile);
    read_symbols(&elf, &manifest, &mut profile);

    // Modules: DWARF only (their BTF is split BTF on top of vmlinux's).
    let mod_maps = opts
        .modules
        .iter()
        .map(|p| map_file(p).map(|m| (p.clone(), m)))
        .collect::<Result<Vec<_>>>()?;
    let mod_elves = mod_maps
        .iter()
        .map(|(p, m)| ElfImage::parse(p, m))
        .collect::<Result<Vec<_>>>()?;
    let mod_secs = mod_elves
        .iter()
        .map(|e| {
            DwarfSections::load(e)?.ok_or_else(|| {
                Error::bad(
                    &e.path,
                    "module has no DWARF (.debug_info): pass its debug file from the -dbg package \
                     (/usr/lib/debug/lib/modules/<release>/…/NAME.ko)",
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let wanted = manifest.wanted_type_names();
    let mod_types = mod_secs
        .iter()
        .zip(&mod_elves)
        .map(|(s, e)| DwarfTypes::new(s, &wanted, &e.path))
        .collect::<Result<Vec<_>>>()?;

    let btf = if has_btf && opts.method != DebugFormat::Dwarf {
        let data = elf.section(".BTF")?.unwrap_or_default();
        Some(Btf::parse(data, vmlinux)?)
    } else {
        None
    };
    let extract_with = |first: Vec<&dyn TypeSource>| -> Result<Extracted> {
        let mut sources = first;
        sources.extend(mod_types.iter().map(|t| t as &dyn TypeSource));
        extract(&manifest, &sources).map_err(|m| Error::bad(vmlinux, m.0))
    };
    let mut method = "dwarf";
    let mut vmlinux_sources = 1;
    let mut ex = None;
    if let Some(btf) = &btf {
        let e = extract_with(vec![btf])?;
        method = "btf";
        let missing_required = e.absent.iter().any(|a| a.required);
        ex = Some(e);
        if missing_required && has_dwarf && opts.method == DebugFormat::Auto {
            ex = None; // fall back below
        }
    }
    let dwarf_secs;
    let dwarf_types;
    let ex = match ex {
        Some(e) => e,
        None => {
            dwarf_secs = DwarfSections::load(&elf)?
                .ok_or_else(|| Error::bad(vmlinux, "no DWARF (.debug_info)"))?;
            dwarf_types = DwarfTypes::new(&dwarf_secs, &wanted, vmlinux)?;
            match &btf {
                Some(b) => {
                    method = "btf+dwarf";
                    vmlinux_sources = 2;
                    extract_with(vec![b, &dwarf_types])?
                }
                None => extract_with(vec![&dwarf_types])?,
            }
        }
    };
    profile.source.method = method.to_owned();
    profile.source.inputs.push(format!(
        "{} ({method}; symbols, banner)",
        file_name(vmlinux)
    ));
    for (i, m) in opts.modules.iter().enumerate() {
        let provided: Vec<&str> = ex
            .origin
            .iter()
            .filter(|(_, &o)| o == vmlinux_sources + i)
            .map(|(k, _)| k.as_str())
            .collect();
        if provided.is_empty() {
            let looked: Vec<&str> = ex
                .absent
                .iter()
                .filter(|a| a.kind == "type" || a.kind == "enum")
                .map(|a| a.key.as_str())
                .collect();
            return Err(Error::bad(
                m,
                format!(
                    "module provides none of the manifest's types missing from vmlinux \
                     (still missing: {})",
                    if looked.is_empty() {
                        "nothing".to_owned()
                    } else {
                        looked.join(", ")
                    }
                ),
            ));
        }
        profile
            .source
            .inputs
            .push(format!("{} (dwarf; {})", file_name(m), provided.join(", ")));
    }
    profile.types = ex.types;
    profile.enums = ex.enums;
    profile.absent.extend(ex.absent);
    profile.absent.sort();
    check_required(vmlinux, &profile.absent)?;
    Ok(profile)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Refuse a profile that lacks a required entry, naming every one.
pub(crate) fn check_required(path: &Path, absent: &[Absent]) -> Result<()> {
    let missing: Vec<&Absent> = absent.iter().filter(|a| a.required).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what = missing
        .iter()
        .map(|a| format!("{} {}", a.kind, a.key))
        .collect::<Vec<_>>()
        .join(", ");
    let tried = missing
        .iter()
        .map(|a| a.tried.join("|"))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = if missing.iter().any(|a| a.key.starts_with("ext4_")) {
        "; ext4 is probably a module in this kernel: add --module with ext4.ko's debug file \
         (Debian: /usr/lib/debug/lib/modules/<release>/kernel/fs/ext4/ext4.ko)"
            .to_owned()
    } else {
        String::new()
    };
    Err(Error::MissingRequired {
        path: path.into(),
        what,
        tried,
        hint,
    })
}

/// Release, banner, build-id, distribution and flavour.
fn read_identity(elf: &ElfImage<'_>, profile: &mut Profile) {
    profile.kernel.build_id = elf.build_id();
    let syms = elf.symbols(&["linux_banner"]);
    if let Some(s) = syms.get("linux_banner") {
        let len = if s.size > 0 { s.size.min(4096) } else { 1024 };
        if let Some(bytes) = elf.read_va(s.address, len) {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            profile.kernel.banner = Some(String::from_utf8_lossy(&bytes[..end]).into_owned());
        }
    }
    if let Some(b) = &profile.kernel.banner {
        fill_from_banner(profile, &b.clone());
    }
}

/// Derive release, distribution and flavour from a `linux_banner`.
pub(crate) fn fill_from_banner(profile: &mut Profile, banner: &str) {
    let release = banner
        .strip_prefix("Linux version ")
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned);
    if let Some(r) = &release {
        profile.kernel.release = Some(r.clone());
        let distro = if banner.contains("Debian") {
            Some("debian")
        } else if banner.contains("Ubuntu") {
            Some("ubuntu")
        } else if banner.contains("Red Hat") {
            Some("rhel")
        } else {
            None
        };
        profile.kernel.distribution = distro.map(str::to_owned);
        // Debian/Ubuntu releases: <version>-<abi>-<flavour>, e.g. 6.1.0-56-cloud-amd64.
        let parts: Vec<&str> = r.splitn(3, '-').collect();
        if distro.is_some() && parts.len() == 3 {
            profile.kernel.flavour = Some(parts[2].to_owned());
        }
    }
}

fn read_symbols(elf: &ElfImage<'_>, manifest: &Manifest, profile: &mut Profile) {
    let found = elf.symbols(&manifest.wanted_symbol_names());
    for s in &manifest.symbols {
        profile.record_symbol(s, |n| found.get(n).map(|i| (i.address, i.size)), None);
    }
}

/// The conventional file name for a profile: `<distribution>-<release>.json`.
pub fn default_file_name(profile: &Profile) -> String {
    let release = profile.kernel.release.as_deref().unwrap_or("unknown");
    match &profile.kernel.distribution {
        Some(d) => format!("{d}-{release}.json"),
        None => format!("linux-{release}.json"),
    }
}
