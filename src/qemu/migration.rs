//! QEMU's migration control over QMP: the capabilities pct needs, starting the migration
//! on both ends, and its state (typed: [`MigrationStatus`], [`RunState`]).
//!
//! pct parses the plain precopy stream only, and carries it over a one-way pipe. So every
//! capability that changes the RAM encoding (xbzrle, compress, multifd), adds a second
//! phase (postcopy) or needs a channel back from the destination (return-path,
//! pause-before-switchover, COLO) is switched off on both ends before the migration starts.
//! TLS inside QEMU would make the stream opaque: it is refused. pct paces QEMU by
//! backpressure, so QEMU's own bandwidth cap is lifted on the source.
//!
//! Both QEMUs migrate through a unix socket in a private directory ([`SockDir`]): the
//! source connects to pct's ([`accept_source`]), pct connects to the destination's
//! ([`connect_destination`]).

use super::monitor::{Qmp, QmpError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Capabilities pct switches off.
pub const OFF: &[&str] = &[
    "xbzrle",
    "compress",
    "multifd",
    "postcopy-ram",
    "postcopy-preempt",
    "postcopy-blocktime",
    "return-path",
    "pause-before-switchover",
    "x-colo",
    "rdma-pin-all",
    "dirty-bitmaps",
    "block",
    "release-ram",
    "background-snapshot",
    "zero-copy-send",
    "switchover-ack",
];

/// QEMU's `max-bandwidth` on the source while pct paces it (bytes/s; 10 GB/s).
pub const SOURCE_MAX_BANDWIDTH: u64 = 10_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("QEMU has TLS migration set up (tls-creds `{0}`): pct needs the plain stream; clear it with migrate-set-parameters tls-creds \"\"")]
    Tls(String),
    #[error("{0}")]
    State(String),
    #[error("timed out after {0:?} waiting for the migration to {1}")]
    Timeout(Duration, &'static str),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CtlError {
    move |source| CtlError::Io {
        what: what.into(),
        source,
    }
}

/// Switches off what pct cannot carry; returns the names it switched off.
pub fn prepare(qmp: &mut Qmp) -> Result<Vec<String>, CtlError> {
    let params = qmp.execute("query-migrate-parameters", None)?;
    if let Some(creds) = params.get("tls-creds").and_then(Value::as_str) {
        if !creds.is_empty() {
            return Err(CtlError::Tls(creds.to_owned()));
        }
    }
    let caps = qmp.execute("query-migrate-capabilities", None)?;
    let mut off = Vec::new();
    for c in caps.as_array().into_iter().flatten() {
        let (Some(name), Some(true)) = (c["capability"].as_str(), c["state"].as_bool()) else {
            continue;
        };
        if OFF.contains(&name) {
            off.push(name.to_owned());
        }
    }
    if !off.is_empty() {
        let list: Vec<Value> = off
            .iter()
            .map(|n| json!({ "capability": n, "state": false }))
            .collect();
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )?;
    }
    Ok(off)
}

/// QEMU's `downtime-limit` parameter (ms): the pause the operator allows.
pub fn downtime_limit(qmp: &mut Qmp) -> Result<Option<u64>, CtlError> {
    let params = qmp.execute("query-migrate-parameters", None)?;
    Ok(params.get("downtime-limit").and_then(Value::as_u64))
}

/// Asks QEMU for `MIGRATION` status events (to time the destination's side).
pub fn enable_events(qmp: &mut Qmp) -> Result<(), CtlError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
    )?;
    Ok(())
}

/// A migration's state, as `query-migrate` and the `MIGRATION` event name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    PreSwitchover,
    Device,
    WaitUnplug,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Colo,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    /// A state this build does not know (a newer QEMU's).
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// Whether the migration has ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// QEMU's own spelling (`completed`, `pre-switchover`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Colo => "colo",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The guest's run state, as `query-status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    Inmigrate,
    Postmigrate,
    FinishMigrate,
    Prelaunch,
    Suspended,
    Shutdown,
    InternalError,
    IoError,
    GuestPanicked,
    Debug,
    RestoreVm,
    SaveVm,
    Watchdog,
    Colo,
    /// A state this build does not know.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Inmigrate => "inmigrate",
            RunState::Postmigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Prelaunch => "prelaunch",
            RunState::Suspended => "suspended",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Debug => "debug",
            RunState::RestoreVm => "restore-vm",
            RunState::SaveVm => "save-vm",
            RunState::Watchdog => "watchdog",
            RunState::Colo => "colo",
            RunState::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

/// The guest's run state (`query-status`).
pub fn run_state(qmp: &mut Qmp) -> Result<RunState, CtlError> {
    let st = qmp.execute("query-status", None)?;
    RunState::deserialize(&st["status"])
        .map_err(|e| CtlError::State(format!("query-status answered {st}: {e}")))
}

/// True if the guest's vCPUs run under KVM (`query-kvm`); false for TCG.
pub fn uses_kvm(qmp: &mut Qmp) -> Result<bool, CtlError> {
    let v = qmp.execute("query-kvm", None)?;
    Ok(v["enabled"].as_bool().unwrap_or(false))
}

/// QEMU's version (`query-version`): major and minor.
pub fn version(qmp: &mut Qmp) -> Result<(u64, u64), CtlError> {
    let v = qmp.execute("query-version", None)?;
    let q = &v["qemu"];
    match (q["major"].as_u64(), q["minor"].as_u64()) {
        (Some(major), Some(minor)) => Ok((major, minor)),
        _ => Err(CtlError::State(format!("query-version answered {v}"))),
    }
}

/// Whether this QEMU's dirty tracking can miss guest writes: QEMU before 9.0 under TCG
/// (fixed upstream by commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency
/// with TCG memory access").
pub fn misses_writes(qmp: &mut Qmp) -> Result<bool, CtlError> {
    Ok(dirty_tracking_misses_writes(uses_kvm(qmp)?, version(qmp)?))
}

/// The rule behind [`misses_writes`]: TCG, and QEMU before 9.0.
pub fn dirty_tracking_misses_writes(kvm: bool, (major, _minor): (u64, u64)) -> bool {
    !kvm && major < 9
}

/// Starts the outgoing migration into `uri` (e.g. `unix:/run/pct/x.sock`).
pub fn start_source(qmp: &mut Qmp, uri: &str) -> Result<(), CtlError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": SOURCE_MAX_BANDWIDTH })),
    )?;
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// Starts the incoming side (QEMU must have been started with `-incoming defer`).
pub fn start_destination(qmp: &mut Qmp, uri: &str) -> Result<(), CtlError> {
    let state = run_state(qmp)?;
    if state != RunState::Inmigrate {
        return Err(CtlError::State(format!(
            "the destination QEMU is `{state}`, not waiting for a migration: start it with \
             -incoming defer"
        )));
    }
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// The parts of `query-migrate` pct reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Info {
    pub status: MigrationStatus,
    /// Milliseconds, as QEMU measured them (source side).
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    /// Bytes QEMU wrote into the stream.
    pub ram_transferred: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    pub error: Option<String>,
}

impl Info {
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

/// `query-migrate`.
pub fn query(qmp: &mut Qmp) -> Result<Info, CtlError> {
    let v = qmp.execute("query-migrate", None)?;
    let u = |k: &str| v.get(k).and_then(Value::as_u64);
    let ram = |k: &str| v.get("ram").and_then(|r| r.get(k)).and_then(Value::as_u64);
    Ok(Info {
        status: MigrationStatus::deserialize(&v["status"]).unwrap_or_default(),
        total_time_ms: u("total-time"),
        downtime_ms: u("downtime"),
        expected_downtime_ms: u("expected-downtime"),
        ram_transferred: ram("transferred"),
        dirty_sync_count: ram("dirty-sync-count"),
        error: v["error-desc"].as_str().map(str::to_owned),
    })
}

/// Polls `query-migrate` until it reaches a final state or `timeout` passes.
pub fn wait_final(qmp: &mut Qmp, timeout: Duration) -> Result<Info, CtlError> {
    let start = Instant::now();
    loop {
        let i = query(qmp)?;
        if i.is_final() {
            return Ok(i);
        }
        if start.elapsed() > timeout {
            return Err(CtlError::Timeout(timeout, "finish"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Cancels an outgoing migration; the source guest keeps running.
pub fn cancel(qmp: &mut Qmp) -> Result<(), CtlError> {
    qmp.execute("migrate_cancel", None)?;
    Ok(())
}

/// A private directory for the QEMU-side unix sockets, removed on drop.
#[derive(Debug)]
pub struct SockDir(PathBuf);

impl SockDir {
    /// `$TMPDIR/pct-migrate-TAG-PID-N`, created afresh: N counts this process's
    /// directories, so that concurrent migrations (the receiver service, an evacuation)
    /// each have their own.
    pub fn new(tag: &str) -> Result<SockDir, CtlError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pct-migrate-{tag}-{}-{n}", std::process::id());
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
        Ok(SockDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (30 s at most) for the source QEMU, told to `migrate` into `l`'s socket, to
/// connect, watching its migration status for an early failure.
pub fn accept_source(l: &UnixListener, qmp: &mut Qmp) -> Result<UnixStream, CtlError> {
    let accepting = || io_err("accepting QEMU's migration connection");
    l.set_nonblocking(true).map_err(accepting())?;
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(accepting())?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(accepting()(e)),
        }
        let info = query(qmp)?;
        if info.status == MigrationStatus::Failed {
            return Err(CtlError::State(format!(
                "QEMU's migration failed before it connected: {}",
                info.error.unwrap_or_default()
            )));
        }
        if start.elapsed() > Duration::from_secs(30) {
            let addr = l.local_addr().map_err(accepting())?;
            return Err(CtlError::State(format!(
                "QEMU did not connect to {addr:?} within 30 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send buffer of pct's connection into the destination QEMU (Linux doubles it). Small:
/// what pct has written there counts as delivered, and a destination QEMU can take a
/// millisecond over a few KB of stream (a run of `ZERO` records, each a page to fault in).
pub const DESTINATION_SEND_BUFFER: usize = 32 << 10;

/// Connects to the destination QEMU's incoming socket `p` (after `migrate-incoming`),
/// retrying until `timeout`.
pub fn connect_destination(p: &Path, timeout: Duration) -> Result<UnixStream, CtlError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(p) {
            Ok(s) => {
                rustix::net::sockopt::set_socket_send_buffer_size(&s, DESTINATION_SEND_BUFFER)
                    .map_err(|e| io_err("sizing the destination socket's send buffer")(e.into()))?;
                return Ok(s);
            }
            Err(e) if start.elapsed() > timeout => {
                return Err(io_err(format!(
                    "connecting to the destination QEMU's incoming socket {}",
                    p.display()
                ))(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A stock QEMU migration (no pct in the path), the peer pct's benchmarks measure against.
#[derive(Debug, Clone)]
pub struct StockRun {
    /// The source's last `query-migrate` answer, as QEMU gave it.
    pub query: Value,
    /// Source `STOP` to destination `RESUME`, both QEMUs' own event timestamps.
    pub downtime_end_to_end_ms: Option<f64>,
    /// From the `migrate` command to the poll that saw it complete (every 200 ms), by
    /// pct's clock: QEMU's own `total-time` sometimes reads 0.
    pub elapsed_s: f64,
}

/// Migrates the guest of `src` into `dst` (started with `-incoming defer`) over `uri`
/// (e.g. `tcp:10.0.0.2:7401`) with QEMU's default capabilities, and waits until the
/// destination runs the guest.
pub fn stock_migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    uri: &str,
    timeout: Duration,
) -> Result<StockRun, CtlError> {
    dst.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    let start = Instant::now();
    src.execute("migrate", Some(json!({ "uri": uri })))?;
    let query = loop {
        let q = src.execute("query-migrate", None)?;
        // A QEMU that was itself once a destination keeps answering with its incoming
        // migration's status (`completed`) on top of the outgoing one's figures, from the
        // first answer on: only the run state, `postmigrate` once the outgoing migration
        // completed, says this migration is over.
        let status = MigrationStatus::deserialize(&q["status"]);
        let over = match status {
            Ok(MigrationStatus::Completed) => run_state(src)? == RunState::Postmigrate,
            Ok(s) => s.is_final(),
            Err(_) => false,
        };
        if over {
            break q;
        }
        if start.elapsed() > timeout {
            return Err(CtlError::Timeout(timeout, "finish"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed_s = start.elapsed().as_secs_f64();
    if query["status"] != "completed" {
        return Err(CtlError::State(format!(
            "stock migration {}: {}",
            query["status"],
            query["error-desc"].as_str().unwrap_or_default()
        )));
    }
    for _ in 0..100 {
        if run_state(dst)? == RunState::Running {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = |qmp: &mut Qmp, kind: super::EventKind| {
        qmp.take_events()
            .into_iter()
            .find(|e| e.kind == kind)
            .and_then(|e| e.at_unix_ms)
    };
    let stop = at(src, super::EventKind::Stop);
    let resume = at(dst, super::EventKind::Resume);
    Ok(StockRun {
        query,
        downtime_end_to_end_ms: stop.zip(resume).map(|(s, r)| r - s),
        elapsed_s,
    })
}
