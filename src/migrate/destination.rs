//! The destination side of one migration, end to end (`pct-migrate receive`): checking
//! and preparing the destination QEMU (started with `-incoming defer`), accepting one pct
//! sender (authenticated by TLS unless `--insecure-plaintext`), starting QEMU's incoming
//! migration, running the [`super::receiver`],
//! waiting for QEMU to load the whole stream, and closing the session: `Report` and
//! `Complete` on success, `Error` (with the reason) on any failure after the hello. When a
//! VM manager drives the destination QEMU instead ([`DestinationQemu::Incoming`]), pct
//! only connects to where QEMU listens and writes the stream.

use super::link::{self, LinkStream, Security};
use super::receiver::{self, Closing, ReceiverOptions, ReceiverReport};
use super::tls::{Peer, TlsError};
use super::wire::WireStats;
use crate::disk::{Disk, DiskFormat};
use crate::qemu::migration::{self as ctl, MigrationStatus, RunState, SockDir};
use crate::qemu::EventKind;
use crate::qemu::Qmp;
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the destination side is to do.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Address to listen on for the sender, HOST:PORT.
    pub listen: String,
    /// TLS (the sender's certificate must chain to our CA) or plain TCP.
    pub security: Security,
    /// The destination QEMU, and who drives it.
    pub qemu: DestinationQemu,
    /// The destination's copy of the guest disk: a raw image, a block device or a qcow2
    /// image ([`crate::disk`]).
    pub disk: PathBuf,
    /// How to read it (`Auto` probes for qcow2).
    pub disk_format: DiskFormat,
    /// How long to wait for the sender.
    pub accept_timeout: Duration,
    /// The receiver's tunables (and its stream record).
    pub receiver: ReceiverOptions,
}

/// The destination QEMU, as the receiver reaches it.
#[derive(Debug, Clone)]
pub enum DestinationQemu {
    /// pct drives it over this QMP socket: QEMU waits with `-incoming defer`, pct starts
    /// its incoming migration and waits for it to load the stream.
    Qmp(PathBuf),
    /// A VM manager (libvirt) drives it: QEMU listens for the stream at this HOST:PORT
    /// (`-incoming tcp:…` or `migrate-incoming`), and the manager resumes it. pct connects,
    /// writes the stream and waits for QEMU to close the connection, which it does once it
    /// has loaded the stream (or failed to: the manager sees which).
    Incoming(String),
}

/// A migration received.
#[derive(Debug, Clone)]
pub struct Received {
    pub report: ReceiverReport,
    /// The report as sent to the sender (JSON).
    pub report_json: String,
    /// From the sender's connection to `Complete`.
    pub elapsed: Duration,
    /// The disk the pages were restored from, as opened ([`Disk::description`]).
    pub disk: String,
}

impl Received {
    /// The report as sent, with `total_s`.
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut v: serde_json::Value = serde_json::from_str(&self.report_json)?;
        v["total_s"] = self.elapsed.as_secs_f64().into();
        Ok(v)
    }

    /// One line for people; `disk`: the path the pages were restored from.
    pub fn to_text(&self, disk: &std::path::Path) -> String {
        let r = &self.report;
        format!(
            "received {:.1} MB of QEMU stream in {:.2} s: {} pages restored from {} ({}; {} verified, {} fallen back), restore {:.2} s\n",
            r.stream_bytes as f64 / 1e6,
            self.elapsed.as_secs_f64(),
            r.ref_pages,
            disk.display(),
            self.disk,
            r.verified_pages,
            r.fallback_pages,
            r.restore_seconds
        )
    }
}

/// What the destination side tells the user while it waits for its sender.
#[derive(Debug)]
pub enum Notice<'a> {
    /// The listening socket is bound (the sender may connect).
    Listening(SocketAddr),
    /// The sender connected from this address; with TLS, it is authenticated, and this is
    /// who it is.
    Sender(SocketAddr, Option<&'a Peer>),
    /// A connection refused at the TLS handshake ([`TlsError::Refused`]: who, and why).
    /// The receiver waits on for its sender.
    Refused(&'a TlsError),
}

impl fmt::Display for Notice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Listening(addr) => write!(f, "receiver listening on {addr}"),
            Notice::Sender(addr, None) => write!(f, "sender connected from {addr} (plaintext)"),
            Notice::Sender(addr, Some(p)) => write!(
                f,
                "sender connected from {addr}: {} (TLS 1.3, {})",
                p.subject, p.suite
            ),
            Notice::Refused(e) => write!(f, "{e}"),
        }
    }
}

/// Receives one migration. `notify` is told when the listening socket is bound (before the
/// sender may connect), who connected, and who was refused.
pub fn receive(opts: &DestinationOptions, notify: &dyn Fn(Notice<'_>)) -> Result<Received> {
    let disk = Disk::open(&opts.disk, opts.disk_format)
        .context("opening the destination's copy of the guest disk")?;
    // A QEMU that pct drives is checked before the sender may come.
    let qmp = match &opts.qemu {
        DestinationQemu::Qmp(p) => Some(prepare_qmp(p)?),
        DestinationQemu::Incoming(_) => None,
    };
    let (link, wire_stats, started) = accept_sender(opts, notify)?;
    receive_admitted(
        Admitted {
            link,
            wire_stats,
            started,
        },
        disk,
        &opts.qemu,
        qmp,
        &opts.receiver,
    )
}

/// A sender whose hello was accepted: its link, the hello frames counted, and when it
/// came.
pub struct Admitted {
    pub link: LinkStream,
    pub wire_stats: WireStats,
    pub started: Instant,
}

/// Receives the migration of `sender` into `qemu`, restoring pages from `disk`; `qmp`: the
/// destination QEMU's monitor, already checked by [`prepare_qmp`] (else connected here).
/// Any failure is also told to the sender.
pub fn receive_admitted(
    sender: Admitted,
    disk: Disk,
    qemu: &DestinationQemu,
    qmp: Option<Qmp>,
    ropts: &ReceiverOptions,
) -> Result<Received> {
    let mut closing = Closing::new(&sender.link)?;
    let got = match qemu {
        DestinationQemu::Qmp(path) => qmp
            .map_or_else(|| prepare_qmp(path), Ok)
            .and_then(|qmp| receive_qmp(qmp, sender, disk, ropts)),
        DestinationQemu::Incoming(addr) => receive_managed(sender, disk, addr, ropts),
    };
    match got {
        Ok((report, started, disk)) => complete(closing, report, started, disk),
        // The one place that tells the sender: one `Error` frame, whatever failed.
        Err(e) => {
            closing.fail(&format!("{e:#}"));
            Err(e)
        }
    }
}

/// Connects to the destination QEMU's monitor and checks that it waits for a migration
/// (`-incoming defer`), with the capabilities and events pct needs.
pub fn prepare_qmp(path: &Path) -> Result<Qmp> {
    let mut qmp = Qmp::connect(path, Duration::from_secs(10))
        .with_context(|| format!("connecting to the destination QEMU at {}", path.display()))?;
    let state = ctl::run_state(&mut qmp)?;
    if state != RunState::Inmigrate {
        bail!("the destination QEMU is `{state}`, not waiting for a migration: start it with -incoming defer");
    }
    ctl::prepare(&mut qmp)?;
    ctl::enable_events(&mut qmp)?;
    Ok(qmp)
}

/// [`receive_admitted`] into a destination QEMU that pct drives over `qmp`. Returns the
/// report, when the sender came, and the disk's description. A failure is not told to the
/// sender here: [`receive_admitted`] does.
fn receive_qmp(
    mut qmp: Qmp,
    sender: Admitted,
    disk: Disk,
    ropts: &ReceiverOptions,
) -> Result<(ReceiverReport, Instant, String)> {
    let dir = SockDir::new("dst")?;
    let sock = dir.path().join("qemu.sock");
    let qemu = ctl::start_destination(&mut qmp, &format!("unix:{}", sock.display()))
        .and_then(|()| ctl::connect_destination(&sock, Duration::from_secs(10)))
        .context("destination QEMU")?;
    // Connected: QEMU's listening socket needs no path any more, and removing the directory
    // now leaves nothing behind even if pct is killed.
    drop(dir);
    let disk_description = disk.description().to_owned();
    let got = receiver::receive(sender.link, disk, qemu.into(), ropts, sender.wire_stats);
    let mut report = match got {
        Ok((report, _)) => report,
        Err(e) => {
            let status = ctl::wait_final(&mut qmp, Duration::from_secs(10))
                .map_or_else(|_| "gone (QEMU exited)".into(), |i| i.status.to_string());
            bail!("receiver: {e}\n  destination QEMU migration: {status}");
        }
    };
    let info = ctl::wait_final(&mut qmp, Duration::from_secs(120)).context("destination QEMU")?;
    if info.status != MigrationStatus::Completed {
        bail!(
            "the destination QEMU could not load the stream: migration {} {}",
            info.status,
            info.error.unwrap_or_default()
        );
    }
    // When the destination had it all, and when the guest resumed there (if not -S): QEMU
    // sends RESUME before it reports `running`, so one more round trip collects it.
    let _ = ctl::run_state(&mut qmp);
    for ev in qmp.take_events() {
        match ev.kind {
            EventKind::Migration(MigrationStatus::Completed) => {
                report.loaded_at_unix_ms = ev.at_unix_ms
            }
            EventKind::Resume => report.resumed_at_unix_ms = ev.at_unix_ms,
            _ => {}
        }
    }
    Ok((report, sender.started, disk_description))
}

/// Closes the session with `Report` and `Complete`: the migration was received.
fn complete(
    closing: Closing,
    report: ReceiverReport,
    started: Instant,
    disk: String,
) -> Result<Received> {
    let report_json = closing.complete(&report)?;
    Ok(Received {
        report,
        report_json,
        elapsed: started.elapsed(),
        disk,
    })
}

/// The sender, accepted (with TLS: authenticated) and greeted: the link, its counted hello
/// frames, and when it came.
fn accept_sender(
    opts: &DestinationOptions,
    notify: &dyn Fn(Notice<'_>),
) -> Result<(LinkStream, WireStats, Instant)> {
    let l = link::listen(&opts.listen)?;
    notify(Notice::Listening(l.local_addr()?));
    let mut refused = |e: &TlsError| notify(Notice::Refused(e));
    let mut got = link::accept_peer(&l, &opts.security, opts.accept_timeout, &mut refused)?;
    drop(l);
    notify(Notice::Sender(got.addr, got.peer.as_ref()));
    let mut wire_stats = WireStats::default();
    let started = Instant::now();
    // A one-shot receiver takes whatever VM the sender names: it has only one.
    link::hello_as_receiver(
        &mut got.link,
        &mut wire_stats,
        Duration::from_secs(30),
        |_| Ok(()),
    )
    .with_context(|| format!("the sender at {}", got.addr))?;
    Ok((got.link, wire_stats, started))
}

/// [`receive_admitted`] into a destination QEMU that a VM manager drives
/// ([`DestinationQemu::Incoming`]). Like [`receive_qmp`], it leaves telling the sender of
/// a failure to [`receive_admitted`].
fn receive_managed(
    sender: Admitted,
    disk: Disk,
    qemu_addr: &str,
    ropts: &ReceiverOptions,
) -> Result<(ReceiverReport, Instant, String)> {
    let qemu = link::connect(qemu_addr, Duration::from_secs(30))
        .map_err(|e| anyhow!("the destination QEMU's incoming migration: {e}"))?;
    let disk_description = disk.description().to_owned();
    // The source QEMU waits for the destination's return path (its `SHUT`): relayed, and
    // QEMU's closing its channel marks the stream loaded.
    let ropts = ReceiverOptions {
        return_path: true,
        ..ropts.clone()
    };
    match receiver::receive(sender.link, disk, qemu.into(), &ropts, sender.wire_stats) {
        Ok((report, _)) => Ok((report, sender.started, disk_description)),
        Err(e) => {
            bail!("receiver: {e}\n  the connection to the destination QEMU is closed: its migration fails")
        }
    }
}
