//! `pct-migrate`: live migration of a stock QEMU VM with page-cache teleportation.
//!
//! Source side (default command): drives the source QEMU over QMP, migrates it into a local
//! pct sender and sends pct frames to a receiver. Destination side (`receive`): accepts one
//! sender, feeds the destination QEMU (started with `-incoming defer`) a standard stream,
//! and exits with the migration's status. See docs/migration.md.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pct::introspect::{scan, ScanOptions};
use pct::memory::{qemu as live, GuestMemory};
use pct::migrate::flow::parse_rate;
use pct::migrate::link;
use pct::migrate::qemu_ctl as ctl;
use pct::migrate::receiver::{self, ReceiverOptions};
use pct::migrate::refmap::RefMap;
use pct::migrate::sender::{self, Counters, SenderOptions};
use pct::migrate::summary::Summary;
use pct::migrate::switchover::SwitchoverCheck;
use pct::migrate::wire::{write_frame, Frame, Role, WireStats};
use pct::profile::Profile;
use pct::qmp::Qmp;
use serde_json::Value;
use std::io::IsTerminal;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser)]
#[command(
    name = "pct-migrate",
    version,
    about = "Live migration with page-cache teleportation",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    send: SendArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Destination side: accept one pct sender and feed the destination QEMU.
    Receive(ReceiveArgs),
    /// Read a recorded stream (`--record-stream`): its figures, and where given pages occur.
    InspectStream(InspectArgs),
    /// Benchmark the receiver's restore path (read + verify) on a disk image.
    #[command(hide = true)]
    BenchRestore(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Raw disk image (read it once before to have it page-cached).
    #[arg(long)]
    disk: PathBuf,
    /// Pages to restore (from the start of the image).
    #[arg(long, default_value_t = 76_800)]
    pages: u64,
    /// Pages per reference run.
    #[arg(long, default_value_t = 32)]
    run_pages: usize,
}

#[derive(Args)]
struct InspectArgs {
    /// A QEMU precopy stream, as `--record-stream` writes it.
    file: PathBuf,
    /// List every record of this guest page frame (byte offset / 4096 in the RAM block):
    /// stream offset, kind and a hash of its bytes. Repeatable.
    #[arg(long, value_name = "PFN")]
    page: Vec<u64>,
    /// RAM block for --page [default: the largest].
    #[arg(long)]
    block: Option<String>,
    /// List the section headers (kind, id, stream offset) too.
    #[arg(long)]
    sections: bool,
    /// Compare the block's final content in the stream (each page's last record) with this
    /// raw RAM image (e.g. the source's memory-backend-file after the migration).
    #[arg(long, value_name = "RAM")]
    against: Option<PathBuf>,
}

/// Source side.
#[derive(Args)]
struct SendArgs {
    /// Kernel profile (JSON) [default: the shipped profile matching the guest's build-id].
    #[arg(long)]
    profile: Option<PathBuf>,
    /// The source QEMU's QMP socket.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// The pct receiver, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    /// Cap pct's sending rate, e.g. 50mbit, 6MB/s.
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<String>,
    /// The source's copy of the guest disk (raw): metadata blocks the guest has not cached.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Print the forensic report and the predicted savings; do not migrate.
    #[arg(long)]
    dry_run: bool,
    /// Send every page (no teleportation): pct as a plain transport, for comparison.
    #[arg(long)]
    no_teleport: bool,
    /// Send data uncompressed (with --no-teleport: pct's own overhead, for comparison).
    #[arg(long)]
    no_compress: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Keep a copy of the stream as pct forwards it in FILE (for diagnosis; as large as
    /// the stream).
    #[arg(long, value_name = "FILE")]
    record_stream: Option<PathBuf>,
    /// At switchover, compare every page the destination will hold with the stopped
    /// source's RAM and re-send those that differ (what QEMU's dirty tracking missed; QEMU
    /// before 9.0 misses writes under TCG). auto: on for TCG guests.
    #[arg(long, value_enum, default_value_t = CheckMode::Auto)]
    switchover_check: CheckMode,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CheckMode {
    Auto,
    On,
    Off,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// The destination QEMU's QMP socket (QEMU started with -incoming defer).
    #[arg(long)]
    qmp: PathBuf,
    /// The destination's copy of the guest disk (raw image).
    #[arg(long)]
    disk: PathBuf,
    /// Seconds to wait for the sender.
    #[arg(long, default_value_t = 600)]
    accept_timeout: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Keep a copy of the stream given to the destination QEMU in FILE (for diagnosis;
    /// equal to the sender's record when all went well).
    #[arg(long, value_name = "FILE")]
    record_stream: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Receive(a)) => receive_main(a),
        Some(Cmd::InspectStream(a)) => inspect_stream(a),
        Some(Cmd::BenchRestore(a)) => bench_restore(a),
        None => send_main(cli.send),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pct-migrate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A private directory for the QEMU-side unix sockets, removed on drop.
struct SockDir(PathBuf);

impl SockDir {
    fn new(tag: &str) -> Result<SockDir> {
        let p = std::env::temp_dir().join(format!("pct-migrate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(SockDir(p))
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_profile(path: Option<&Path>, mem: &GuestMemory) -> Result<Profile> {
    let selected = pct::kernel::select::select_profile(mem, path).map_err(|e| anyhow!("{e}"))?;
    eprintln!("pct-migrate: using profile {}", selected.origin);
    Ok(selected.profile)
}

/// The RAM block name of the guest's main memory backend.
fn main_backend(qmp: &mut Qmp) -> Result<String> {
    let b = live::backends(qmp).map_err(|e| anyhow!("{e}"))?;
    b.iter()
        .max_by_key(|b| b.size)
        .map(|b| b.id.clone())
        .ok_or_else(|| anyhow!("the source QEMU has no memory-backend-file"))
}

enum WatchCmd {
    Cancel,
    Finish,
}

struct Watched {
    qmp: Qmp,
    /// Unix ms of the source's `STOP` event.
    stop_at: Option<f64>,
}

/// Owns the source's QMP connection while the stream flows: polls the migration status,
/// notes when the guest stopped, draws the progress line, cancels on request.
fn watch(
    mut qmp: Qmp,
    rx: mpsc::Receiver<WatchCmd>,
    counters: Arc<Counters>,
    started: Instant,
) -> Watched {
    let tty = std::io::stderr().is_terminal();
    let mut stop_at = None;
    let mut last_status = String::new();
    loop {
        let cmd = rx.recv_timeout(Duration::from_millis(250));
        if let Ok(info) = ctl::query(&mut qmp) {
            last_status = info.status;
        }
        for ev in qmp.take_events() {
            if ev["event"] == "STOP" {
                stop_at = ctl::event_time_ms(&ev);
            }
        }
        if tty {
            let mb = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
            eprint!(
                "\r  {:6.1} s  {:<10} stream {:8.1} MB  wire {:8.1} MB  teleported {:>8} pages  ",
                started.elapsed().as_secs_f64(),
                last_status,
                mb(&counters.stream_bytes),
                mb(&counters.wire_bytes),
                counters.ref_pages.load(Ordering::Relaxed)
            );
        }
        match cmd {
            Ok(WatchCmd::Cancel) => {
                let _ = ctl::cancel(&mut qmp);
                break;
            }
            Ok(WatchCmd::Finish) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    if tty {
        eprintln!();
    }
    Watched { qmp, stop_at }
}

fn send_main(a: SendArgs) -> Result<()> {
    let qmp_path = a
        .qmp
        .clone()
        .ok_or_else(|| anyhow!("--qmp SRC.sock is required"))?;
    let bandwidth = a
        .bandwidth
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let teleport = !a.no_teleport;
    let check_wanted = match a.switchover_check {
        CheckMode::On => true,
        CheckMode::Off => false,
        CheckMode::Auto => {
            let mut q = Qmp::connect(&qmp_path, Duration::from_secs(10)).with_context(|| {
                format!("connecting to the source QEMU at {}", qmp_path.display())
            })?;
            !ctl::uses_kvm(&mut q)?
        }
    };
    let mem = if teleport || a.dry_run || check_wanted {
        Some(live::open_live(&qmp_path).map_err(|e| anyhow!("mapping the guest's RAM: {e}"))?)
    } else {
        None
    };
    let check = if check_wanted {
        mem.as_ref().and_then(SwitchoverCheck::new)
    } else {
        None
    };
    if check_wanted && check.is_none() {
        let why = "the switchover check needs the guest's RAM as a shared memory-backend-file \
                   (memory-backend-file,share=on)";
        if a.switchover_check == CheckMode::On {
            bail!("{why}; run without --switchover-check on");
        }
        eprintln!("pct-migrate: warning: no switchover check: {why}");
    }
    let profile = match &mem {
        Some(m) if teleport || a.dry_run => Some(load_profile(a.profile.as_deref(), m)?),
        _ => None,
    };
    let disk = a
        .disk
        .as_ref()
        .map(|p| std::fs::File::open(p).with_context(|| format!("opening {}", p.display())))
        .transpose()?;
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))
        .with_context(|| format!("connecting to the source QEMU at {}", qmp_path.display()))?;
    let block = main_backend(&mut qmp)?;

    if a.dry_run {
        let (mem, profile) = (
            mem.as_ref().unwrap_or_else(|| unreachable!()),
            profile.as_ref().unwrap_or_else(|| unreachable!()),
        );
        return dry_run(mem, profile, disk.as_ref(), &block, a.json);
    }
    let to =
        a.to.clone()
            .ok_or_else(|| anyhow!("--to HOST:PORT is required"))?;

    let state = ctl::run_state(&mut qmp)?;
    if !matches!(state.as_str(), "running" | "paused") {
        bail!("the source guest is `{state}`: nothing to migrate");
    }
    let disabled = ctl::prepare(&mut qmp)?;
    if !disabled.is_empty() {
        eprintln!(
            "pct-migrate: switched off QEMU capabilities: {}",
            disabled.join(", ")
        );
    }

    let mut wire_stats = WireStats::default();
    let mut tcp = link::connect(&to, Duration::from_secs(30))?;
    let session = link::handshake(
        &mut tcp,
        Role::Sender,
        &mut wire_stats,
        Duration::from_secs(30),
    )?;

    let dir = SockDir::new("src")?;
    let sock = dir.0.join("qemu.sock");
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let started = Instant::now();
    ctl::start_source(&mut qmp, &format!("unix:{}", sock.display()))?;
    let qemu = accept_qemu(&listener, &mut qmp).inspect_err(|_| {
        let _ = ctl::cancel(&mut qmp);
    })?;
    drop(listener);
    let _ = std::fs::remove_file(&sock);

    let counters = Arc::new(Counters::default());
    let (wtx, wrx) = mpsc::channel();
    let watcher = {
        let c = counters.clone();
        std::thread::spawn(move || watch(qmp, wrx, c, started))
    };
    let mut scan_s = None;
    let map = |_blocks: &[pct::migrate::stream::RamBlock]| -> Result<Option<RefMap>, String> {
        let (Some(mem), Some(profile)) = (mem.as_ref(), profile.as_ref()) else {
            return Ok(None);
        };
        let t = Instant::now();
        match scan(mem, profile, disk.as_ref(), ScanOptions::default()) {
            Ok((map, _)) => {
                let m = RefMap::new(&block, &map, mem.regions());
                scan_s = Some(t.elapsed().as_secs_f64());
                Ok(Some(m))
            }
            Err(e) => {
                // The map is a hint: without it, the migration is a plain one.
                eprintln!("pct-migrate: warning: introspection failed, sending every page: {e}");
                Ok(None)
            }
        }
    };
    let opts = SenderOptions {
        bandwidth,
        zstd_level: if a.no_compress { None } else { Some(1) },
        record: a.record_stream.clone(),
        ..SenderOptions::default()
    };
    let sent = sender::send(
        qemu,
        tcp,
        session,
        &opts,
        wire_stats,
        map,
        check,
        counters.clone(),
    );
    let _ = wtx.send(if sent.is_ok() {
        WatchCmd::Finish
    } else {
        WatchCmd::Cancel
    });
    let Watched { mut qmp, stop_at } = watcher
        .join()
        .map_err(|_| anyhow!("watcher thread panicked"))?;
    let report = match sent {
        Ok(r) => r,
        Err(e) => {
            let info = ctl::wait_final(&mut qmp, Duration::from_secs(30)).ok();
            let state = ctl::run_state(&mut qmp).unwrap_or_else(|_| "?".into());
            let status = info.map(|i| i.status).unwrap_or_else(|| "?".into());
            bail!("{e}\n  QEMU migration {status}; the source guest is {state}");
        }
    };
    let info = ctl::wait_final(&mut qmp, Duration::from_secs(60))?;
    if info.status != "completed" {
        bail!(
            "the receiver confirmed, but the source QEMU says the migration {}: {}",
            info.status,
            info.error.unwrap_or_default()
        );
    }
    let mut s = Summary::new(&report, teleport);
    s.time.total_s = report.completed_at.duration_since(started).as_secs_f64();
    s.time.downtime_qemu_ms = info.downtime_ms;
    // Source stopped → destination resumed (or loaded everything, if kept paused), by the
    // two hosts' clocks; without the destination's times, → its confirmation arrived here.
    let unix_ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let confirmed = unix_ms(SystemTime::now()) - report.completed_at.elapsed().as_secs_f64() * 1e3;
    let dest = report.receiver.report.as_ref().and_then(|r| {
        r["resumed_at_unix_ms"]
            .as_f64()
            .or_else(|| r["loaded_at_unix_ms"].as_f64())
    });
    s.time.downtime_end_to_end_ms = stop_at.map(|t| dest.unwrap_or(confirmed) - t);
    s.time.scan_s = scan_s;
    s.capabilities_disabled = disabled;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", s.to_text());
    }
    Ok(())
}

/// Waits for QEMU to connect to our socket, watching for an early failure.
fn accept_qemu(l: &UnixListener, qmp: &mut Qmp) -> Result<UnixStream> {
    l.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting QEMU's migration connection"),
        }
        let info = ctl::query(qmp)?;
        if info.status == "failed" {
            bail!(
                "QEMU's migration failed before it connected: {}",
                info.error.unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("QEMU did not connect to {:?} within 30 s", l.local_addr()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--dry-run`: the forensic report and what pct would save on this guest now.
fn dry_run(
    mem: &GuestMemory,
    profile: &Profile,
    disk: Option<&std::fs::File>,
    block: &str,
    json: bool,
) -> Result<()> {
    let (map, report) =
        scan(mem, profile, disk, ScanOptions::default()).map_err(|e| anyhow!("{e}"))?;
    let mut refmap = RefMap::new(block, &map, mem.regions());
    // Predict: QEMU's first pass sends every non-zero page; pct sends references for the
    // mapped ones and the rest zstd-compressed.
    let (mut nonzero, mut zero, mut teleport) = (0u64, 0u64, 0u64);
    let mut rest = Vec::with_capacity(1 << 20);
    let mut rest_wire = 0u64;
    for r in mem.regions() {
        for p in 0..r.len / 4096 {
            let Ok(page) = mem.slice(r.gpa + p * 4096, 4096) else {
                continue;
            };
            if page.iter().all(|&b| b == 0) {
                zero += 1;
                continue;
            }
            nonzero += 1;
            if refmap.lookup(r.offset + p * 4096).is_some() {
                teleport += 1;
            } else {
                rest.extend_from_slice(page);
                if rest.len() >= 1 << 20 {
                    rest_wire += zstd::bulk::compress(&rest, 1)
                        .map(|z| z.len())
                        .unwrap_or(rest.len()) as u64;
                    rest.clear();
                }
            }
        }
    }
    rest_wire += zstd::bulk::compress(&rest, 1)
        .map(|z| z.len())
        .unwrap_or(rest.len()) as u64;
    let stock = nonzero * 4104 + zero * 9;
    let pct_bytes = rest_wire + teleport * 3 + zero / 100;
    let pred = serde_json::json!({
        "pages_nonzero": nonzero,
        "pages_zero": zero,
        "pages_teleportable": teleport,
        "stock_first_pass_bytes": stock,
        "pct_first_pass_bytes": pct_bytes,
        "ratio": pct_bytes as f64 / stock.max(1) as f64,
    });
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["prediction"] = pred;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", report.to_text());
    println!("\npredicted migration (first pass, guest as it is now):");
    println!(
        "  stock QEMU   {:8.1} MB  ({nonzero} pages sent, {zero} zero)",
        stock as f64 / 1e6
    );
    println!(
        "  pct          {:8.1} MB  ({teleport} pages teleported, the rest zstd-compressed): {:.3} x",
        pct_bytes as f64 / 1e6,
        pct_bytes as f64 / stock.max(1) as f64
    );
    for mbit in [50.0, 100.0, 1000.0] {
        println!(
            "  at {mbit:>4} Mbit/s: {:6.1} s -> {:6.1} s",
            stock as f64 * 8.0 / (mbit * 1e6),
            pct_bytes as f64 * 8.0 / (mbit * 1e6)
        );
    }
    Ok(())
}

fn receive_main(a: ReceiveArgs) -> Result<()> {
    let disk = std::fs::File::open(&a.disk)
        .with_context(|| format!("opening the destination disk image {}", a.disk.display()))?;
    let mut qmp = Qmp::connect(&a.qmp, Duration::from_secs(10))
        .with_context(|| format!("connecting to the destination QEMU at {}", a.qmp.display()))?;
    let state = ctl::run_state(&mut qmp)?;
    if state != "inmigrate" {
        bail!("the destination QEMU is `{state}`, not waiting for a migration: start it with -incoming defer");
    }
    ctl::prepare(&mut qmp)?;
    ctl::enable_events(&mut qmp)?;
    let l = link::listen(&a.listen)?;
    eprintln!("pct-migrate: receiver listening on {}", l.local_addr()?);
    let mut tcp = link::accept(&l, Duration::from_secs(a.accept_timeout))?;
    drop(l);
    let mut wire_stats = WireStats::default();
    let started = Instant::now();
    let session = link::handshake(
        &mut tcp,
        Role::Receiver,
        &mut wire_stats,
        Duration::from_secs(30),
    )?;
    let _ = session;
    let mut control = tcp.try_clone()?;
    let fail = |control: &mut std::net::TcpStream, msg: &str| {
        let _ = write_frame(
            control,
            &Frame::Error {
                code: 1,
                message: msg.to_owned(),
            },
        );
    };

    let dir = SockDir::new("dst")?;
    let sock = dir.0.join("qemu.sock");
    if let Err(e) = ctl::start_destination(&mut qmp, &format!("unix:{}", sock.display())) {
        fail(&mut control, &format!("destination QEMU: {e}"));
        return Err(e.into());
    }
    let qemu = connect_unix(&sock, Duration::from_secs(10)).map_err(|e| {
        fail(&mut control, &format!("destination QEMU: {e}"));
        e
    })?;
    let opts = ReceiverOptions {
        record: a.record_stream.clone(),
        ..ReceiverOptions::default()
    };
    let got = receiver::receive(tcp, disk, qemu, &opts, wire_stats);
    let (report, _) = match got {
        Ok(r) => r,
        Err(e) => {
            fail(&mut control, &format!("receiver: {e}"));
            let status = ctl::wait_final(&mut qmp, Duration::from_secs(10))
                .map(|i| i.status)
                .unwrap_or_else(|_| "gone (QEMU exited)".into());
            bail!("{e}\n  destination QEMU migration: {status}");
        }
    };
    let info = match ctl::wait_final(&mut qmp, Duration::from_secs(120)) {
        Ok(i) => i,
        Err(e) => {
            fail(&mut control, &format!("destination QEMU: {e}"));
            return Err(e.into());
        }
    };
    if info.status != "completed" {
        let msg = format!(
            "the destination QEMU could not load the stream: migration {} {}",
            info.status,
            info.error.unwrap_or_default()
        );
        fail(&mut control, &msg);
        bail!(msg);
    }
    // When the destination had it all, and when the guest resumed there (if not -S): QEMU
    // sends RESUME before it reports `running`, so one more round trip collects it.
    let _ = ctl::run_state(&mut qmp);
    let mut report = report;
    for ev in qmp.take_events() {
        match ev["event"].as_str() {
            Some("MIGRATION") if ev["data"]["status"] == "completed" => {
                report.loaded_at_unix_ms = ctl::event_time_ms(&ev)
            }
            Some("RESUME") => report.resumed_at_unix_ms = ctl::event_time_ms(&ev),
            _ => {}
        }
    }
    let json = serde_json::to_string(&report)?;
    write_frame(&mut control, &Frame::Report { json: json.clone() })?;
    write_frame(
        &mut control,
        &Frame::Complete {
            stream_bytes: report.stream_bytes,
        },
    )?;
    let _ = control.shutdown(std::net::Shutdown::Write);
    if a.json {
        let mut v: Value = serde_json::from_str(&json)?;
        v["total_s"] = started.elapsed().as_secs_f64().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "received {:.1} MB of QEMU stream in {:.2} s: {} pages restored from {} ({} verified, {} fallen back), restore {:.2} s",
            report.stream_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            report.ref_pages,
            a.disk.display(),
            report.verified_pages,
            report.fallback_pages,
            report.restore_seconds
        );
    }
    Ok(())
}

fn connect_unix(p: &Path, timeout: Duration) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(p) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > timeout => {
                return Err(e).with_context(|| {
                    format!(
                        "connecting to the destination QEMU's incoming socket {}",
                        p.display()
                    )
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The restorer's work for `pages` pages of `disk`, in runs as the sender builds them:
/// read (contiguous ranges in one read), then check the run hash.
fn bench_restore(a: BenchArgs) -> Result<()> {
    use pct::migrate::wire::{Hello, RunBuilder};
    let disk =
        std::fs::File::open(&a.disk).with_context(|| format!("opening {}", a.disk.display()))?;
    let len = disk.metadata()?.len();
    let pages = a.pages.min(len / 4096);
    let session = Hello::new(Role::Sender).negotiate(&Hello::new(Role::Receiver))?;
    // Build the runs (hashes of the real bytes), as the sender would.
    let mut b = RunBuilder::new(&session).with_max_pages(a.run_pages);
    let mut runs = Vec::new();
    let mut buf = vec![0u8; 4096];
    for p in 0..pages {
        std::os::unix::fs::FileExt::read_exact_at(&disk, &mut buf, p * 4096)?;
        if let Some(r) = b.push(0, p * 4096, p > 0, p * 4096, &buf) {
            runs.push(r);
        }
    }
    runs.extend(b.flush());
    let t = Instant::now();
    let mut bad = 0;
    for r in &runs {
        let (data, _) = receiver::read_pages(&disk, r);
        let views: Vec<&[u8]> = data.chunks(4096).collect();
        bad += r.verify(&views).len();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "restored {pages} pages ({:.1} MB) in {} runs in {secs:.3} s: {:.0} MB/s, {bad} mismatches",
        pages as f64 * 4096.0 / 1e6,
        runs.len(),
        pages as f64 * 4096.0 / secs / 1e6
    );
    Ok(())
}

fn inspect_stream(a: InspectArgs) -> Result<()> {
    use pct::migrate::stream::{RamRecord, Record, StreamReader};
    let f = std::fs::File::open(&a.file)
        .with_context(|| format!("opening the stream record {}", a.file.display()))?;
    let mut rd = StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f));
    // The short page hash the tests print for differing pages.
    let short = |b: &[u8]| {
        let h = blake3::hash(b);
        u64::from_be_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
    };
    let zero_hash = |fill: u8| short(&[fill; 4096]);
    let mut block: Option<usize> = None;
    let mut lines: Vec<String> = Vec::new();
    // With --against: per page of the block, the hash of its last record and where it was.
    let mut last: Vec<Option<(u64, u64)>> = Vec::new();
    while let Some(item) = rd
        .next_item()
        .with_context(|| a.file.display().to_string())?
    {
        let (page, hash) = match item.record {
            Record::Section(h) => {
                if a.sections {
                    let name = h.ident.map(|i| pct::walk::fs::sanitize(i.name.as_bytes()));
                    lines.push(format!(
                        "section {:?} id {} at stream offset {}{}",
                        h.kind,
                        h.id,
                        item.offset,
                        name.map(|n| format!(" `{n}`")).unwrap_or_default()
                    ));
                }
                continue;
            }
            Record::Ram(RamRecord::MemSize { blocks, .. }) if block.is_none() => {
                let i = match &a.block {
                    Some(n) => blocks
                        .iter()
                        .position(|b| &b.name == n)
                        .ok_or_else(|| anyhow!("the stream has no RAM block `{n}`"))?,
                    None => (0..blocks.len())
                        .max_by_key(|&i| blocks[i].used_length)
                        .ok_or_else(|| anyhow!("MEM_SIZE lists no RAM block"))?,
                };
                if a.against.is_some() {
                    last = vec![None; (blocks[i].used_length / 4096) as usize];
                }
                block = Some(i);
                continue;
            }
            Record::Ram(RamRecord::Page { page, data }) if Some(page.block) == block => {
                let wanted = a.page.contains(&(page.offset / 4096));
                let h = (wanted || !last.is_empty()).then(|| short(data));
                (page, h.map(|h| (h, format!("PAGE {h:016x}"))))
            }
            Record::Ram(RamRecord::Zero { page, fill }) if Some(page.block) == block => {
                let h = zero_hash(fill);
                (page, Some((h, format!("ZERO fill {fill:#04x}"))))
            }
            _ => continue,
        };
        let pfn = page.offset / 4096;
        let Some((h, what)) = hash else { continue };
        if a.page.contains(&pfn) {
            lines.push(format!(
                "pfn {pfn:>8}  stream offset {:>12}  {what}",
                item.offset
            ));
        }
        if let Some(slot) = last.get_mut(pfn as usize) {
            *slot = Some((h, item.offset));
        }
    }
    let trailer = rd.trailer().cloned();
    let st = rd.decoder().stats();
    println!(
        "{}: {} bytes, {} PAGE records, {} ZERO records, {} ram section headers, {} bytes of device state{}",
        a.file.display(),
        st.total_bytes,
        st.pages,
        st.zero_pages,
        st.ram_sections,
        st.device_bytes,
        if trailer.and_then(|t| t.eof_offset).is_some() { ", ends with EOF" } else { ", no EOF" }
    );
    for l in lines {
        println!("{l}");
    }
    if let Some(ram) = &a.against {
        let f = std::fs::File::open(ram)
            .with_context(|| format!("opening the RAM image {}", ram.display()))?;
        let mut buf = vec![0u8; 4096];
        let (mut differ, mut missing) = (Vec::new(), 0u64);
        for (pfn, slot) in last.iter().enumerate() {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut buf, pfn as u64 * 4096)
                .with_context(|| format!("reading page {pfn} of {}", ram.display()))?;
            match slot {
                None => missing += 1,
                Some((h, at)) if *h != short(&buf) => differ.push((pfn, *at)),
                Some(_) => {}
            }
        }
        println!(
            "against {}: {} pages, {} never sent, {} differ from their last record",
            ram.display(),
            last.len(),
            missing,
            differ.len()
        );
        for (pfn, at) in differ.iter().take(20) {
            println!("  pfn {pfn:>8}: last sent at stream offset {at}");
        }
    }
    Ok(())
}
