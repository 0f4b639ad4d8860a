//! The auxiliary subcommands: `qmp` and `stock` (QEMU's monitor from the shell, for the lab
//! scripts and the benchmarks' stock-QEMU peer, through pct's own QMP client),
//! `bench-restore` and `bench-link`.

use anyhow::{bail, Context, Result};
use pct::disk::{Disk, DiskFormat};
use pct::migrate::link::Security;
use pct::migrate::receiver::{bench_restore, ReceiverOptions};
use pct::migrate::replay::{replay, synthetic_stream, Content, ReplayOptions};
use pct::migrate::sender::SenderOptions;
use pct::migrate::tls::certs::{keygen, HostSpec};
use pct::migrate::tls::Identity;
use pct::qemu::migration::stock_migrate;
use pct::qemu::Qmp;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
pub struct BenchLinkArgs {
    /// A QEMU stream recorded with --record-stream [default: a synthetic one].
    #[arg(long, value_name = "FILE")]
    stream: Option<PathBuf>,
    /// Size of the synthetic stream, MB.
    #[arg(long, default_value_t = 512)]
    mb: u64,
    /// What the synthetic stream's pages hold.
    #[arg(long, value_enum, default_value_t = Content::Mixed)]
    content: Content,
    /// Runs of each configuration (the best is reported, and the median).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Compare the receiver's output with the stream (hashes both: slower).
    #[arg(long)]
    verify: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
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

/// CPU time this process has used so far (user and system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one `rusage` through the pointer, which points at `ru`,
    // alive and writable for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `bench-link`: pct's relay throughput on loopback, plaintext and TLS, zstd off and on,
/// through the real sender and receiver ([`replay`]). Plaintext and TLS runs alternate, so
/// that both see the same load; CPU time (both ends, this process) is counted too.
pub fn bench_link_main(a: BenchLinkArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (stream, what) = match &a.stream {
        Some(p) => (
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            format!("recorded stream {}", p.display()),
        ),
        None => (
            synthetic_stream(a.mb * 1_000_000, a.content)?,
            format!("synthetic stream ({:?} pages)", a.content).to_lowercase(),
        ),
    };
    let stream = Arc::new(stream);
    let gb = stream.len() as f64 / 1e9;
    eprintln!("{what}: {:.1} MB", stream.len() as f64 / 1e6);
    let dir = std::env::temp_dir().join(format!("pct-bench-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let issued = keygen(
        &dir,
        &["127.0.0.1"
            .parse::<HostSpec>()
            .map_err(anyhow::Error::msg)?],
    );
    let id = issued.and_then(|i| Identity::load(&i.hosts[0]));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = Security::Tls(Arc::new(id?));
    let links = [("plaintext", Security::Plaintext), ("TLS 1.3", tls)];
    let mut rows = Vec::new();
    for zstd in [false, true] {
        // Per link: MB/s and CPU seconds per GB of stream, run by run.
        let mut rates = [Vec::new(), Vec::new()];
        let mut cpu = [Vec::new(), Vec::new()];
        let mut wire = [0u64; 2];
        for _ in 0..a.runs {
            for (i, (name, security)) in links.iter().enumerate() {
                let opts = ReplayOptions {
                    sender_security: security.clone(),
                    receiver_security: security.clone(),
                    host: "127.0.0.1".into(),
                    sender: SenderOptions {
                        zstd_level: zstd.then_some(1),
                        ..SenderOptions::default()
                    },
                    receiver: ReceiverOptions::default(),
                    verify: a.verify,
                };
                let before = cpu_seconds();
                let r = replay(stream.clone(), &opts)?;
                cpu[i].push((cpu_seconds() - before) / gb);
                if r.identical == Some(false) {
                    bail!("the receiver's output differs from the stream ({name})");
                }
                wire[i] = r.wire_bytes;
                rates[i].push(r.mb_per_s());
            }
        }
        let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
        for (i, (name, _)) in links.iter().enumerate() {
            let best = rates[i].iter().copied().fold(f64::NAN, f64::max);
            let cpu_gb = median(&mut cpu[i]);
            let ratio = (i > 0).then(|| medians[i] / medians[0]);
            eprintln!(
                "zstd {:<3}  {name:<9}  {:8.1} MB/s median of {} ({best:.1} best), {cpu_gb:.2} CPU s/GB; wire {:.1} MB{}",
                if zstd { "on" } else { "off" },
                medians[i],
                a.runs,
                wire[i] as f64 / 1e6,
                ratio.map_or_else(String::new, |r| format!("; {r:.2} of plaintext"))
            );
            rows.push(serde_json::json!({
                "zstd": zstd,
                "link": name,
                "median_mb_s": medians[i],
                "best_mb_s": best,
                "runs_mb_s": rates[i],
                "cpu_s_per_gb": cpu_gb,
                "wire_bytes": wire[i],
                "ratio_to_plaintext": ratio,
            }));
        }
    }
    if a.json {
        let out = serde_json::json!({
            "stream": what,
            "stream_bytes": stream.len(),
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
