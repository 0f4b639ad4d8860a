//! The source side of a migration that a VM manager drives (`pct-migrate proxy`): libvirt
//! (or Nova or KubeVirt through it) tells the source QEMU to migrate to `tcp:127.0.0.1:PORT`,
//! where pct listens, and pct carries the stream to its receiver, which feeds the
//! destination QEMU that the manager started listening.
//!
//! pct owns no monitor here. It learns everything from the host and from the stream:
//! - the QEMU process: the peer of the accepted connection ([`process::tcp_peer_pid`]), or
//!   `--pid`;
//! - the guest's RAM block: the largest block of the stream's `MEM_SIZE` record, read
//!   without consuming it (`MSG_PEEK`), and where the process maps that many bytes
//!   ([`process::ram_mapping`]); read through `/proc/PID/mem` as needed ([`ProcessRam`]);
//! - the block's guest-physical layout: a PC's RAM in one piece up to 2.75 GiB; above that,
//!   split at 4 GiB where the guest kernel's own `max_pfn` says;
//! - whether the switchover check is needed: KVM or TCG from QEMU's descriptors, QEMU's
//!   version from its executable.
//!
//! A failure anywhere closes QEMU's connection: its migration fails and the manager keeps
//! the source guest running, as after any failed migration.

use super::link::{self, Security};
use super::sender::{self, Connections, Counters, SenderHooks, SenderOptions, StreamMap};
use super::source::{dial_receiver, summarize, take_map, CheckMode, Notice, Notify, Progress};
use super::stream::{Decoder, RamBlock};
use super::summary::Summary;
use super::switchover::SwitchoverCheck;

use crate::disk::{Disk, DiskFormat};
use crate::kernel::select::select_profile;
use crate::kernel::Kernel;
use crate::memory::{GuestMemory, RawLayout};
use crate::profile::Profile;
use crate::qemu::migration::dirty_tracking_misses_writes;
use crate::qemu::process;
use crate::qemu::ram::ProcessRam;
use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the proxy is to do.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Where the source QEMU will connect, HOST:PORT (the `--migrateuri` given to libvirt).
    pub listen: String,
    /// The source QEMU's process; `None`: the peer of its connection.
    pub pid: Option<u32>,
    /// Kernel profile; `None`: selected for the guest.
    pub profile: Option<PathBuf>,
    /// The source's copy of the guest disk, for blocks the guest has not cached.
    pub disk: Option<PathBuf>,
    pub disk_format: DiskFormat,
    /// Replace cached pages by references (else pct is a plain transport).
    pub teleport: bool,
    pub switchover_check: CheckMode,
    /// How long to wait for the source QEMU to connect.
    pub accept_timeout: Duration,
    pub sender: SenderOptions,
    /// TLS to the receiver, or plain TCP.
    pub security: Security,
    /// The VM as the receiver's service knows it (`--vm`; empty: a one-shot receiver).
    pub vm: String,
}

/// Guest RAM of a PC machine up to this size lies in one piece from guest-physical 0 (QEMU
/// splits it at 4 GiB only from 2.75 GiB on q35, 3.5 GiB on i440fx).
const PC_UNSPLIT_MAX: u64 = 0xb000_0000;

/// Carries one manager-driven migration: waits for the source QEMU's connection on
/// `opts.listen` (`listening` is told the bound address), then relays its stream to the
/// pct receiver at `to`. Returns once the receiver confirmed that the destination QEMU
/// has the whole stream.
pub fn relay(
    opts: &ProxyOptions,
    to: &str,
    notify: Notify<'_>,
    listening: impl FnOnce(SocketAddr),
) -> Result<Summary> {
    let listener = link::listen(&opts.listen)?;
    listening(listener.local_addr()?);
    let qemu = link::accept(&listener, opts.accept_timeout)?;
    drop(listener);
    let started = Instant::now();
    let (ours, peer) = (qemu.local_addr()?, qemu.peer_addr()?);
    let pid = match opts.pid {
        Some(pid) => pid,
        None => process::tcp_peer_pid(ours, peer)
            .with_context(|| format!("finding the QEMU process that connected from {peer}"))?,
    };
    notify(Notice::Source(pid, peer));

    let blocks = peek_ram_blocks(&qemu, Duration::from_secs(60))
        .context("reading the RAM blocks at the start of QEMU's stream")?;
    let main = blocks
        .iter()
        .max_by_key(|b| b.used_length)
        .ok_or_else(|| anyhow!("QEMU's stream announces no RAM block"))?;
    let base = process::ram_mapping(pid, main.used_length)
        .with_context(|| format!("finding RAM block {} in QEMU process {pid}", main.name))?;
    let len = main.used_length;
    let mut ram = ProcessRam::in_process(
        pid,
        main.name.clone(),
        base,
        len,
        RawLayout::Identity.regions(len.min(PC_UNSPLIT_MAX)),
    );

    let check = match opts.switchover_check {
        CheckMode::On => true,
        CheckMode::Off => false,
        CheckMode::Auto => dirty_tracking_misses_writes(
            process::uses_kvm(pid)?,
            process::version(pid).context("telling whether QEMU's dirty tracking is exact")?,
        ),
    };
    let (mem, profile) = if opts.teleport {
        let mem = ram
            .open()
            .map_err(|e| anyhow!("opening the guest's RAM: {e}"))?;
        let selected = select_profile(&mem, opts.profile.as_deref()).map_err(|e| anyhow!("{e}"))?;
        notify(Notice::Profile(&selected.origin));
        let layout = pc_layout(&mem, &selected.profile, len)?;
        ram = ram.with_regions(layout.regions(len));
        let mem = mem.with_regions(layout.regions(len));
        (Some(mem), Some(selected.profile))
    } else {
        (None, None)
    };
    let disk = opts
        .disk
        .as_ref()
        .map(|p| {
            Disk::open(p, opts.disk_format).context("opening the source's copy of the guest disk")
        })
        .transpose()?;

    let (link, session, wire_stats) = dial_receiver(to, &opts.security, &opts.vm, notify)?;
    let counters = Arc::new(Counters::default());
    let block = main.name.clone();
    let (mut scan_s, mut free_scan_ms) = (None, None);
    let map = |_blocks: &[RamBlock]| -> Result<Option<StreamMap<'_>>, String> {
        let taken = take_map(&mem, &profile, disk.as_ref(), &block, false, notify);
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
        check: check.then(|| SwitchoverCheck::for_process(ram.clone())),
        counters: counters.clone(),
    };
    let done = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        s.spawn(|| progress(&done, &counters, started, notify));
        let sent = sender::send(conn, &opts.sender, hooks);
        done.store(true, Ordering::Relaxed);
        sent
    });
    let report = sent.map_err(|e| {
        anyhow!("{e}\n  the connection to the source QEMU is closed: its migration fails and the guest stays on the source")
    })?;
    // QEMU stops the guest just before its last RAM pass: the END part's start.
    let mut s = summarize(&report, opts.teleport, started, report.marks.ram_end);
    s.time.scan_s = scan_s;
    s.time.free_scan_ms = free_scan_ms;
    s.ram_copied_bytes = mem.as_ref().and_then(GuestMemory::copied_bytes);
    Ok(s)
}

/// The RAM blocks of QEMU's `MEM_SIZE` record, read at the start of the stream without
/// consuming it (`MSG_PEEK`): the stream is then relayed from its first byte.
fn peek_ram_blocks(qemu: &TcpStream, timeout: Duration) -> Result<Vec<RamBlock>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = qemu.peek(&mut buf).context("peeking at QEMU's stream")?;
        if n == 0 {
            bail!("QEMU closed its migration connection before sending its RAM blocks");
        }
        let mut d = Decoder::new();
        d.feed(&buf[..n]);
        while d.advance().map_err(|e| anyhow!("{e}"))? {
            if !d.blocks().is_empty() {
                return Ok(d.blocks().to_vec());
            }
        }
        if n == buf.len() {
            bail!("no RAM block list in QEMU's first {n} bytes");
        }
        if Instant::now() > deadline {
            bail!("QEMU sent {n} bytes and no RAM block list in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a PC machine lays out a RAM block of `len` bytes: in one piece up to 2.75 GiB;
/// above, the part beyond the PCI hole sits at 4 GiB, and its size is what the guest
/// kernel's `max_pfn` shows above 4 GiB.
fn pc_layout(mem: &GuestMemory, profile: &Profile, len: u64) -> Result<RawLayout> {
    if len <= PC_UNSPLIT_MAX {
        return Ok(RawLayout::Identity);
    }
    let kernel = Kernel::locate(mem, profile).map_err(|e| anyhow!("locating the kernel: {e}"))?;
    let at = kernel
        .symbol("max_pfn")
        .ok_or_else(|| anyhow!("the profile has no symbol max_pfn"))?;
    let max_pfn = kernel
        .read_u64(at, "max_pfn")
        .map_err(|e| anyhow!("reading max_pfn: {e}"))?;
    let high = max_pfn.saturating_mul(4096).saturating_sub(1 << 32);
    let below_4g = len
        .checked_sub(high)
        .filter(|b| (0x8000_0000..=0xe000_0000).contains(b));
    match below_4g {
        Some(below_4g) => Ok(RawLayout::SplitAt4G { below_4g }),
        None => bail!(
            "guest max_pfn {max_pfn:#x} does not fit a PC's RAM block of {len} bytes split at \
             the PCI hole"
        ),
    }
}

/// Progress notices every 250 ms until `done`.
fn progress(done: &AtomicBool, counters: &Counters, started: Instant, notify: Notify<'_>) {
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        notify(Notice::Progress(Progress {
            elapsed: started.elapsed(),
            status: "relaying",
            stream_bytes: counters.stream_bytes.load(Ordering::Relaxed),
            wire_bytes: counters.wire_bytes.load(Ordering::Relaxed),
            ref_pages: counters.ref_pages.load(Ordering::Relaxed),
        }));
    }
    notify(Notice::ProgressEnd);
}
