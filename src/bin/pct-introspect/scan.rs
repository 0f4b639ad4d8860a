//! `pct-introspect scan`: the forensic dry-run.

use pct::disk::{Disk, DiskFormat};
use pct::introspect::{scan, ScanOptions};
use pct::kernel::select::select_profile;
use pct::memory::GuestMemory;
use pct::qemu::ram as qemu;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ScanArgs {
    /// Kernel profile (JSON) [default: the shipped or cached profile with the guest's
    /// build-id, else one built from the guest's memory and cached].
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Guest RAM: a raw RAM file (QEMU memory-backend-file) or a `dump-guest-memory` ELF core.
    #[arg(long, required_unless_present = "qmp", conflicts_with = "qmp")]
    memory: Option<PathBuf>,
    /// A live QEMU's QMP socket: pct finds and maps its RAM file itself (read-only).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// The guest's disk (raw image, block device or qcow2): metadata blocks the guest has
    /// not cached, and --verify.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// How to read --disk: raw, qcow2 (backing chain included), or auto: qcow2 if the file
    /// starts with qcow2's magic. Say raw for an untrusted guest's raw disk (a guest can
    /// write that magic into its first sector).
    #[arg(long, value_enum, default_value_t = DiskFormat::Auto, requires = "disk")]
    disk_format: DiskFormat,
    /// Byte-compare every run of the map with the disk image.
    #[arg(long, requires = "disk")]
    verify: bool,
    /// Also scan the struct page array: RAM census and a cross-check of the tree walk.
    #[arg(long)]
    cross_check: bool,
    /// Write the cache map as JSON lines (gpa, disk_offset, len, dev, ino, file_offset, path).
    #[arg(long, value_name = "FILE")]
    map_out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Guest memory from `--memory` or `--qmp`.
pub fn open_memory(memory: Option<&Path>, qmp: Option<&Path>) -> Result<GuestMemory, String> {
    match (memory, qmp) {
        (Some(p), _) => GuestMemory::open(p),
        (None, Some(q)) => qemu::open_live(q),
        (None, None) => return Err("give --memory IMG or --qmp SOCK".into()),
    }
    .map_err(|e| e.to_string())
}

pub fn run(a: ScanArgs) -> Result<ExitCode, String> {
    let mem = open_memory(a.memory.as_deref(), a.qmp.as_deref())?;
    let selected = select_profile(&mem, a.profile.as_deref()).map_err(|e| e.to_string())?;
    eprintln!("using profile {}", selected.origin);
    let profile = selected.profile;
    let disk = match &a.disk {
        Some(p) => Some(Disk::open(p, a.disk_format).map_err(|e| e.to_string())?),
        None => None,
    };
    let opts = ScanOptions {
        cross_check: a.cross_check,
        verify: a.verify,
        free_pages: false,
    };
    let (map, report) = scan(&mem, &profile, disk.as_ref(), opts).map_err(|e| e.to_string())?;
    if let Some(path) = &a.map_out {
        let f = std::fs::File::create(path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        map.write_jsonl(std::io::BufWriter::new(f))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    match a.format {
        Format::Text => print!("{}", report.to_text()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        ),
    }
    let bad_verify = report
        .verify
        .as_ref()
        .is_some_and(|v| v.mismatching_pages > 0 || v.unreadable_runs > 0);
    let bad_cross = report.cross_check.as_ref().is_some_and(|c| !c.agrees());
    Ok(if bad_verify || bad_cross {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
