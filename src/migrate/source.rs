//! The source side of one migration, end to end (`pct-migrate --qmp … --to …`): opening the
//! guest (its RAM, the kernel profile, the source's disk copy), driving the source QEMU over
//! QMP, accepting its migration connection, running the [`super::sender`] against
//! the receiver, watching QEMU meanwhile (status, `STOP` event, progress, cancel on
//! failure), and summing the migration up ([`Summary`]). [`Source::predict`] is
//! `--dry-run`: what a migration would cost now, without migrating.
//!
//! Nothing here prints: what the caller should tell the user arrives as [`Notice`]s.

use super::freemap::FreeMap;
use super::link::{self, Security};
use super::predict::{self, DryRun};
use super::refmap::RefMap;
use super::sender::{
    self, Connections, Counters, SenderHooks, SenderOptions, SenderReport, StreamMap,
};
use super::stream::RamBlock;
use super::summary::Summary;
use super::switchover::SwitchoverCheck;
use super::tls::Peer;
use super::wire::{Session, WireStats};
use crate::disk::{Disk, DiskFormat};
use crate::introspect::{scan, ScanOptions};
use crate::kernel::select::{select_profile, Origin};
use crate::memory::GuestMemory;
use crate::profile::Profile;
use crate::qemu::migration::{self as ctl, MigrationStatus, RunState, SockDir};
use crate::qemu::ram::{self as live, Backend, ProcessRam};
use crate::qemu::EventKind;
use crate::qemu::Qmp;
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

/// When the switchover check runs (`--switchover-check`): `Auto` runs it where QEMU's
/// dirty tracking misses writes: TCG guests (`query-kvm`) of QEMU before 9.0
/// (`query-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckMode {
    Auto,
    On,
    Off,
}

/// What the source side is to do.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Kernel profile; `None`: selected for the guest ([`select_profile`]).
    pub profile: Option<PathBuf>,
    /// The source's copy of the guest disk (raw, block device or qcow2), for blocks the
    /// guest has not cached.
    pub disk: Option<PathBuf>,
    /// How to read `disk` (`Auto` probes for qcow2).
    pub disk_format: DiskFormat,
    /// Replace cached pages by references (else pct is a plain transport).
    pub teleport: bool,
    /// Send the guest's free pages as zero pages (with `teleport`; docs/migration.md,
    /// "Free-page elision").
    pub free_elision: bool,
    pub switchover_check: CheckMode,
    /// The sender's tunables (rate cap, compression, stream record).
    pub sender: SenderOptions,
    /// TLS (the receiver's certificate must chain to our CA and name the host in `--to`)
    /// or plain TCP.
    pub security: Security,
    /// The VM as the receiver's service knows it (`--vm`; empty: a one-shot receiver).
    pub vm: String,
}

/// Where a migration stands, every 250 ms.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub elapsed: Duration,
    /// QEMU's migration status, as last queried.
    pub status: &'a str,
    pub stream_bytes: u64,
    pub wire_bytes: u64,
    pub ref_pages: u64,
}

/// What the source side tells the user while it works.
#[derive(Debug)]
pub enum Notice<'a> {
    /// The QEMU process whose migration connection came from this address (the proxy).
    Source(u32, std::net::SocketAddr),
    /// The receiver, authenticated by TLS.
    Receiver(&'a Peer),
    /// The kernel profile in use, and where it came from.
    Profile(&'a Origin),
    /// The switchover check cannot run, and why.
    NoSwitchoverCheck(&'a str),
    /// QEMU capabilities pct switched off.
    CapabilitiesOff(&'a [String]),
    /// Taking the cache map failed: every page is sent.
    MapFailed(&'a str),
    Progress(Progress<'a>),
    /// No more progress notices.
    ProgressEnd,
}

impl fmt::Display for Notice<'_> {
    /// The message for the user (the progress line without its carriage return).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Source(pid, peer) => {
                write!(f, "source QEMU: process {pid}, connected from {peer}")
            }
            Notice::Receiver(p) => {
                write!(f, "receiver: {} (TLS 1.3, {})", p.subject, p.suite)
            }
            Notice::Profile(origin) => write!(f, "using profile {origin}"),
            Notice::NoSwitchoverCheck(why) => write!(f, "warning: no switchover check: {why}"),
            Notice::CapabilitiesOff(caps) => {
                write!(f, "switched off QEMU capabilities: {}", caps.join(", "))
            }
            Notice::MapFailed(e) => {
                write!(f, "warning: introspection failed, sending every page: {e}")
            }
            Notice::Progress(p) => write!(
                f,
                "  {:6.1} s  {:<10} stream {:8.1} MB  wire {:8.1} MB  teleported {:>8} pages  ",
                p.elapsed.as_secs_f64(),
                p.status,
                p.stream_bytes as f64 / 1e6,
                p.wire_bytes as f64 / 1e6,
                p.ref_pages
            ),
            Notice::ProgressEnd => Ok(()),
        }
    }
}

/// Receives the [`Notice`]s (from more than one thread).
pub type Notify<'n> = &'n (dyn Fn(Notice<'_>) + Sync);

/// The source guest, opened: its QMP connection, and what teleportation or the switchover
/// check need of it.
pub struct Source<'n> {
    opts: SourceOptions,
    notify: Notify<'n>,
    mem: Option<GuestMemory>,
    profile: Option<Profile>,
    disk: Option<Disk>,
    /// The switchover check is to run (and can).
    check: bool,
    qmp: Qmp,
    /// The guest's main RAM, as the source QEMU holds it.
    ram: MainRam,
}

fn connect(path: &std::path::Path) -> Result<Qmp> {
    Qmp::connect(path, Duration::from_secs(10))
        .with_context(|| format!("connecting to the source QEMU at {}", path.display()))
}

impl<'n> Source<'n> {
    /// Opens the guest for a migration.
    pub fn for_migration(opts: SourceOptions, notify: Notify<'n>) -> Result<Source<'n>> {
        let map = opts.teleport;
        Source::open(opts, map, notify)
    }

    /// Opens the guest for [`Source::predict`].
    pub fn for_dry_run(opts: SourceOptions, notify: Notify<'n>) -> Result<Source<'n>> {
        Source::open(opts, true, notify)
    }

    /// `map`: the cache map will be taken (RAM and profile are needed).
    fn open(opts: SourceOptions, map: bool, notify: Notify<'n>) -> Result<Source<'n>> {
        let check_wanted = match opts.switchover_check {
            CheckMode::On => true,
            CheckMode::Off => false,
            CheckMode::Auto => ctl::misses_writes(&mut connect(&opts.qmp)?)?,
        };
        // QEMU serves one client per QMP socket: this connection is closed before
        // open_live makes its own.
        let ram = main_ram(&mut connect(&opts.qmp)?, &opts.qmp)?;
        // The map reads guest RAM; so does the check of a shared RAM file (anonymous RAM is
        // read for the check, through /proc/PID/mem, when the guest has stopped).
        let mem = match &ram {
            MainRam::File(_) if map || check_wanted => Some(live::open_live(&opts.qmp)),
            MainRam::Process(p) if map => Some(p.open()),
            _ => None,
        }
        .transpose()
        .map_err(|e| anyhow!("mapping the guest's RAM: {e}"))?;
        let qmp = connect(&opts.qmp)?;
        // A shared RAM file is checked through its mapping, anonymous RAM through
        // /proc/PID/mem.
        let check = check_wanted
            && match &ram {
                MainRam::File(_) => mem.as_ref().and_then(SwitchoverCheck::new).is_some(),
                MainRam::Process(_) => true,
            };
        if check_wanted && !check {
            let why = "the switchover check needs the guest's RAM as a shared memory-backend-file \
                       (memory-backend-file,share=on) or as anonymous memory of QEMU's process";
            if opts.switchover_check == CheckMode::On {
                bail!("{why}; run without --switchover-check on");
            }
            notify(Notice::NoSwitchoverCheck(why));
        }
        let profile = match &mem {
            Some(m) if map => {
                let selected =
                    select_profile(m, opts.profile.as_deref()).map_err(|e| anyhow!("{e}"))?;
                notify(Notice::Profile(&selected.origin));
                Some(selected.profile)
            }
            _ => None,
        };
        let disk = opts
            .disk
            .as_ref()
            .map(|p| {
                Disk::open(p, opts.disk_format)
                    .context("opening the source's copy of the guest disk")
            })
            .transpose()?;
        Ok(Source {
            opts,
            notify,
            mem,
            profile,
            disk,
            check,
            qmp,
            ram,
        })
    }

    /// `--dry-run`: the forensic report and what a migration would cost now.
    pub fn predict(&self) -> Result<DryRun> {
        let (Some(mem), Some(profile)) = (&self.mem, &self.profile) else {
            bail!("a dry run needs the guest's RAM and a profile (Source::for_dry_run)");
        };
        predict::dry_run(
            mem,
            profile,
            self.disk.as_ref(),
            self.ram.block(),
            self.opts.free_elision,
        )
    }

    /// Migrates the guest to the pct receiver at `to` (HOST:PORT); returns once the
    /// receiver and the source QEMU confirmed completion. On failure the migration is
    /// cancelled and the source guest keeps running.
    pub fn migrate(self, to: &str) -> Result<Summary> {
        let Source {
            opts,
            notify,
            mem,
            profile,
            disk,
            check,
            mut qmp,
            ram,
        } = self;
        let block = ram.block().to_owned();
        let state = ctl::run_state(&mut qmp)?;
        if !matches!(state, RunState::Running | RunState::Paused) {
            bail!("the source guest is `{state}`: nothing to migrate");
        }
        let disabled = ctl::prepare(&mut qmp)?;
        let downtime_limit = ctl::downtime_limit(&mut qmp)?;
        if !disabled.is_empty() {
            notify(Notice::CapabilitiesOff(&disabled));
        }

        let (link, session, wire_stats) = dial_receiver(to, &opts.security, &opts.vm, notify)?;

        let dir = SockDir::new("src")?;
        let sock = dir.path().join("qemu.sock");
        let listener =
            UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
        let started = Instant::now();
        ctl::start_source(&mut qmp, &format!("unix:{}", sock.display()))?;
        let qemu = ctl::accept_source(&listener, &mut qmp).inspect_err(|_| {
            let _ = ctl::cancel(&mut qmp);
        })?;
        drop(listener);
        // QEMU is connected: nothing needs the socket's directory any more, and removing it
        // now leaves nothing behind even if pct is killed.
        let _ = std::fs::remove_file(&sock);
        drop(dir);

        let counters = Arc::new(Counters::default());
        let check = match (check, &ram) {
            (false, _) => None,
            (true, MainRam::File(backend)) => mem
                .as_ref()
                .and_then(SwitchoverCheck::new)
                .map(|c| c.with_touch_log(touch_log(&mut qmp, backend))),
            (true, MainRam::Process(p)) => Some(SwitchoverCheck::for_process(p.clone())),
        };
        let mut scan_s = None;
        let mut free_scan_ms = None;
        let free_elision = opts.free_elision;
        let map = |_blocks: &[RamBlock]| -> Result<Option<StreamMap<'_>>, String> {
            let taken = take_map(&mem, &profile, disk.as_ref(), &block, free_elision, notify);
            (scan_s, free_scan_ms) = (taken.scan_s, taken.free_scan_ms);
            Ok(taken.map)
        };
        let conn = Connections {
            qemu: qemu.into(),
            link,
            session,
            wire_stats,
        };
        let hooks = SenderHooks {
            map,
            check,
            counters: counters.clone(),
        };
        let (sent, watched) = std::thread::scope(|s| {
            let (wtx, wrx) = mpsc::channel();
            let watcher = s.spawn(|| watch(qmp, wrx, &counters, started, notify));
            let sent = sender::send(conn, &opts.sender, hooks);
            let _ = wtx.send(if sent.is_ok() {
                WatchCmd::Finish
            } else {
                WatchCmd::Cancel
            });
            (sent, watcher.join())
        });
        let Watched { mut qmp, stop_at } =
            watched.map_err(|_| anyhow!("watcher thread panicked"))?;
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                let info = ctl::wait_final(&mut qmp, Duration::from_secs(30)).ok();
                let state = ctl::run_state(&mut qmp).map_or_else(|_| "?".into(), |s| s.to_string());
                let status = info.map_or_else(|| "?".into(), |i| i.status.to_string());
                bail!("{e}\n  QEMU migration {status}; the source guest is {state}");
            }
        };
        let info = ctl::wait_final(&mut qmp, Duration::from_secs(60))?;
        if info.status != MigrationStatus::Completed {
            bail!(
                "the receiver confirmed, but the source QEMU says the migration {}: {}",
                info.status,
                info.error.unwrap_or_default()
            );
        }
        let mut s = summarize(&report, opts.teleport, started, stop_at);
        s.time.downtime_qemu_ms = info.downtime_ms;
        s.time.downtime_limit_ms = downtime_limit;
        s.time.scan_s = scan_s;
        s.time.free_scan_ms = free_scan_ms;
        s.ram_copied_bytes = mem.as_ref().and_then(GuestMemory::copied_bytes);
        s.capabilities_disabled = disabled;
        Ok(s)
    }
}

/// The cache map taken for a migration, and what it cost.
pub(super) struct MapTaken<'g> {
    /// `None`: introspection failed (the user was told), every page is sent.
    pub map: Option<StreamMap<'g>>,
    pub scan_s: Option<f64>,
    pub free_scan_ms: Option<f64>,
}

/// Takes the cache map of `mem` for the RAM block `block` (and its free pages, with
/// `free_elision` and a live view); none without a memory view and a profile. A failure is
/// only a notice: the map is a hint, and without it the migration is a plain one.
pub(super) fn take_map<'g>(
    mem: &'g Option<GuestMemory>,
    profile: &'g Option<Profile>,
    disk: Option<&'g Disk>,
    block: &str,
    free_elision: bool,
    notify: Notify<'_>,
) -> MapTaken<'g> {
    let (Some(mem), Some(profile)) = (mem, profile) else {
        // Nothing to map with (pct as a plain transport).
        return MapTaken {
            map: None,
            scan_s: None,
            free_scan_ms: None,
        };
    };
    let t = Instant::now();
    let scan_opts = ScanOptions {
        // Elision needs a live view (below): no free-page scan for anonymous RAM.
        free_pages: free_elision && mem.live_block().is_some(),
        ..ScanOptions::default()
    };
    match scan(mem, profile, disk, scan_opts) {
        Ok((map, report)) => {
            let refs = RefMap::new(block, &map, mem.regions());
            // Elision needs the re-check to read the stopped guest's struct pages live:
            // anonymous RAM (no live view, pages copied in once) elides nothing.
            let free = map
                .free
                .zip(mem.live_block_len())
                .map(|(f, len)| FreeMap::new(mem, profile, &f, len));
            MapTaken {
                map: Some(StreamMap { refs, free }),
                scan_s: Some(t.elapsed().as_secs_f64()),
                free_scan_ms: report.timings_ms.get("free_pages").copied(),
            }
        }
        Err(e) => {
            notify(Notice::MapFailed(&e.to_string()));
            MapTaken {
                map: None,
                scan_s: None,
                free_scan_ms: None,
            }
        }
    }
}

/// The link to the pct receiver at `to`, dialled (with TLS: authenticated, and the user
/// told who answered) and greeted: the link, the session the hellos settled, their frames.
pub(super) fn dial_receiver(
    to: &str,
    security: &link::Security,
    vm: &str,
    notify: Notify<'_>,
) -> Result<(link::LinkStream, Session, WireStats)> {
    let mut wire_stats = WireStats::default();
    let (mut link, peer) =
        link::dial(to, security, Duration::from_secs(30)).context("the pct receiver")?;
    if let Some(p) = &peer {
        notify(Notice::Receiver(p));
    }
    let session = link::hello_as_sender(&mut link, vm, &mut wire_stats, Duration::from_secs(30))
        .with_context(|| format!("the pct receiver at {to}"))?;
    Ok((link, session, wire_stats))
}

/// The summary of a migration the receiver confirmed: `started` when QEMU's stream began,
/// `stop_at` (unix ms) when the source guest stopped, if known.
pub(super) fn summarize(
    report: &SenderReport,
    teleport: bool,
    started: Instant,
    stop_at: Option<f64>,
) -> Summary {
    let mut s = Summary::new(report, teleport);
    s.time.total_s = report.completed_at.duration_since(started).as_secs_f64();
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
    s.stopped_at(stop_at);
    s
}

/// Where the source QEMU keeps the guest's main RAM.
enum MainRam {
    /// A memory-backend-file (the largest): its RAM block is named after the backend.
    File(Backend),
    /// Anonymous memory of QEMU's process (QEMU's and libvirt's default): the block that
    /// holds guest-physical 1 MiB (`pc.ram` on a PC machine).
    Process(ProcessRam),
}

impl MainRam {
    /// The RAM block's name in the migration stream.
    fn block(&self) -> &str {
        match self {
            MainRam::File(b) => &b.id,
            MainRam::Process(p) => &p.block,
        }
    }
}

/// The guest's main RAM: its largest memory-backend-file, else QEMU's own memory.
fn main_ram(qmp: &mut Qmp, socket: &std::path::Path) -> Result<MainRam> {
    let backends = live::backends(qmp).map_err(|e| anyhow!("{e}"))?;
    if let Some(b) = backends.into_iter().max_by_key(|b| b.size) {
        return Ok(MainRam::File(b));
    }
    let mtree = qmp
        .hmp("info mtree -f")
        .with_context(|| format!("reading the memory map of the QEMU at {}", socket.display()))?;
    ProcessRam::find(qmp, &mtree, socket)
        .map(MainRam::Process)
        .map_err(|e| anyhow!("finding the guest's RAM in QEMU's process: {e}"))
}

/// Which QEMU process maps the RAM file of `backend`, for the switchover check's touch
/// log; or why it is to keep none. Under TCG only: there every guest write is a store of
/// QEMU's process, while KVM's vCPUs write through page tables of their own.
fn touch_log(qmp: &mut Qmp, backend: &Backend) -> Result<(u32, std::path::PathBuf), String> {
    if ctl::uses_kvm(qmp).map_err(|e| e.to_string())? {
        return Err("the guest runs under KVM".into());
    }
    let pid = qmp
        .peer_pid()
        .ok_or("the QMP socket does not say which process QEMU is")?;
    Ok((pid, backend.mem_path.clone()))
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
/// notes when the guest stopped, reports progress, cancels on request.
fn watch(
    mut qmp: Qmp,
    rx: mpsc::Receiver<WatchCmd>,
    counters: &Counters,
    started: Instant,
    notify: Notify<'_>,
) -> Watched {
    let mut stop_at = None;
    let mut last_status = MigrationStatus::None;
    loop {
        let cmd = rx.recv_timeout(Duration::from_millis(250));
        if let Ok(info) = ctl::query(&mut qmp) {
            last_status = info.status;
        }
        for ev in qmp.take_events() {
            if ev.kind == EventKind::Stop {
                stop_at = ev.at_unix_ms;
            }
        }
        notify(Notice::Progress(Progress {
            elapsed: started.elapsed(),
            status: last_status.as_str(),
            stream_bytes: counters.stream_bytes.load(Ordering::Relaxed),
            wire_bytes: counters.wire_bytes.load(Ordering::Relaxed),
            ref_pages: counters.ref_pages.load(Ordering::Relaxed),
        }));
        match cmd {
            Ok(WatchCmd::Cancel) => {
                let _ = ctl::cancel(&mut qmp);
                break;
            }
            Ok(WatchCmd::Finish) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    notify(Notice::ProgressEnd);
    Watched { qmp, stop_at }
}
