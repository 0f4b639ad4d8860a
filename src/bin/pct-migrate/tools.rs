//! The auxiliary subcommands: `qmp` and `stock` (QEMU's monitor from the shell, for the lab
//! scripts and the benchmarks' stock-QEMU peer, through pct's own QMP client) and
//! `bench-restore`.

use anyhow::{Context, Result};
use pct::disk::{Disk, DiskFormat};
use pct::migrate::receiver::bench_restore;
use pct::qemu::migration::stock_migrate;
use pct::qemu::Qmp;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Disk image: raw, block device or qcow2 (read it once before to have it page-cached).
    #[arg(long)]
    disk: PathBuf,
    /// How to read --disk: raw, qcow2 (backing chain included), or auto: qcow2 if the file
    /// starts with qcow2's magic. Say raw for an untrusted guest's raw disk (a guest can
    /// write that magic into its first sector).
    #[arg(long, value_enum, default_value_t = DiskFormat::Auto, requires = "disk")]
    disk_format: DiskFormat,
    /// Pages to restore (from the start of the image).
    #[arg(long, default_value_t = 76_800)]
    pages: u64,
    /// Pages per reference run.
    #[arg(long, default_value_t = 32)]
    run_pages: usize,
}

#[derive(clap::Args)]
pub struct QmpArgs {
    /// The QEMU's QMP socket.
    socket: PathBuf,
    /// The command, e.g. `query-status`.
    command: String,
    /// Its arguments, as a JSON object.
    arguments: Option<String>,
}

#[derive(clap::Args)]
pub struct StockArgs {
    /// The source QEMU's QMP socket.
    #[arg(long)]
    from: PathBuf,
    /// The destination QEMU's QMP socket (started with -incoming defer).
    #[arg(long)]
    to: PathBuf,
    /// Where the destination listens and the source connects, e.g. `tcp:10.77.0.1:7401`.
    #[arg(long)]
    uri: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

fn connect(p: &Path) -> Result<Qmp> {
    Qmp::connect(p, Duration::from_secs(10))
        .with_context(|| format!("connecting to QMP at {}", p.display()))
}

/// Runs one command and prints its return value as JSON.
pub fn qmp_main(a: QmpArgs) -> Result<()> {
    let args = a
        .arguments
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("the arguments must be a JSON object")?;
    let ret = connect(&a.socket)?.execute(&a.command, args)?;
    println!("{ret}");
    Ok(())
}

/// Stock QEMU migration; prints `query-migrate`'s last answer plus
/// `downtime_end_to_end_ms` and `elapsed_s`, as JSON.
pub fn stock_main(a: StockArgs) -> Result<()> {
    let (mut src, mut dst) = (connect(&a.from)?, connect(&a.to)?);
    let run = stock_migrate(&mut src, &mut dst, &a.uri, Duration::from_secs(a.timeout_s))?;
    let mut out = run.query;
    if let Some(d) = run.downtime_end_to_end_ms {
        out["downtime_end_to_end_ms"] = d.into();
    }
    out["elapsed_s"] = run.elapsed_s.into();
    println!("{out}");
    Ok(())
}

/// Restores `pages` pages from `disk` in runs and prints the rate.
pub fn bench_main(a: BenchArgs) -> Result<()> {
    let disk = Disk::open(&a.disk, a.disk_format)?;
    eprintln!("{}: {}", a.disk.display(), disk.description());
    print!("{}", bench_restore(&disk, a.pages, a.run_pages)?.to_text());
    Ok(())
}
