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

/// `bench-link`: pct's relay throughput on loopback, plaintext and TLS, zstd off and on,
/// through the real sender and receiver ([`replay`]).
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
    let mut rows = Vec::new();
    for zstd in [false, true] {
        let mut plain_best = None;
        for (name, security) in [("plaintext", Security::Plaintext), ("TLS 1.3", tls.clone())] {
            let opts = ReplayOptions {
                sender_security: security.clone(),
                receiver_security: security,
                host: "127.0.0.1".into(),
                sender: SenderOptions {
                    zstd_level: zstd.then_some(1),
                    ..SenderOptions::default()
                },
                receiver: ReceiverOptions::default(),
                verify: a.verify,
            };
            let mut rates = Vec::new();
            let mut wire = 0;
            for _ in 0..a.runs {
                let r = replay(stream.clone(), &opts)?;
                if r.identical == Some(false) {
                    bail!("the receiver's output differs from the stream ({name})");
                }
                wire = r.wire_bytes;
                rates.push(r.mb_per_s());
            }
            rates.sort_by(f64::total_cmp);
            let best = rates[rates.len() - 1];
            let median = rates[rates.len() / 2];
            let ratio = plain_best.map(|p: f64| best / p);
            plain_best.get_or_insert(best);
            eprintln!(
                "zstd {:<3}  {name:<9}  {best:8.1} MB/s best, {median:8.1} median of {}; wire {:.1} MB{}",
                if zstd { "on" } else { "off" },
                a.runs,
                wire as f64 / 1e6,
                ratio.map_or_else(String::new, |r| format!("; {r:.2} of plaintext"))
            );
            rows.push(serde_json::json!({
                "zstd": zstd,
                "link": name,
                "best_mb_s": best,
                "median_mb_s": median,
                "runs": rates,
                "wire_bytes": wire,
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
