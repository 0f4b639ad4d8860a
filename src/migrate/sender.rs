//! The pct sender: QEMU's precopy stream in (a unix socket QEMU migrates into), pct frames
//! out (the link to the receiver: TCP, or TLS over it).
//!
//! Three threads:
//!
//! - the *encoder* (the caller's thread) decodes QEMU's stream record by record. A `PAGE`
//!   record of the mapped RAM block whose page the cache map covers becomes part of a
//!   reference run (`RunBuilder`: RAM offset, disk offset, BLAKE3 of the exact bytes
//!   QEMU sent); everything else is batched and zstd-compressed into data frames, in
//!   stream order. The original bytes of every run are kept until the receiver acks it.
//!   The cache map is asked for once, when the `ram` section's `MEM_SIZE` record arrives:
//!   QEMU started dirty tracking just before writing it, so any later guest write is re-sent
//!   by QEMU, and the hash catches whatever the map got wrong (`sender/encoder.rs`);
//! - the *writer* sends queued frames ([`Outbox`]), urgent ones first, optionally capped by
//!   a [`TokenBucket`];
//! - the *listener* reads the receiver's frames: fallback requests and per-page hash
//!   requests (both answered urgently from the kept originals), acks, the receiver's report
//!   and the final `Complete`.
//!
//! Every stage blocks when the next is full, so QEMU drains at the link's pace.

mod encoder;

use super::flow::{Outbox, TokenBucket, Window};
use super::freemap::{ElisionReport, FreeMap};
use super::link::LinkStream;
use super::refmap::RefMap;
use super::stream::{RamBlock, StreamError, StreamStats};
use super::switchover::{SwitchoverCheck, SwitchoverReport};
use super::timeline::{now_unix_ms, SenderMarks};
use super::wire::{hash_pages, read_frame, Frame, Payload, Session, WireError, WireStats};
use crate::qemu::Channel;
use encoder::Encoder;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tunables of the sender.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// zstd level for data and fallback frames; `None`: send them raw.
    pub zstd_level: Option<i32>,
    /// Stream bytes per data frame (before compression).
    pub batch_bytes: usize,
    /// Bytes of frames queued for the link at most.
    pub outbox_bytes: usize,
    /// The end-to-end window: pages of stream sent but not yet given to the destination
    /// QEMU, at most ([`Window`]).
    pub window_pages: u64,
    /// Cap on pct's own sending rate. Clones share it: the migrations started from clones
    /// of one `SenderOptions` (an evacuation's VMs) are capped together.
    pub bandwidth: Option<Arc<TokenBucket>>,
    /// Pages per reference run at most (one hash per run when the receiver agrees).
    pub max_run_pages: usize,
    /// Read size on QEMU's socket.
    pub read_chunk: usize,
    /// Keep a copy of the stream as forwarded (QEMU's, plus pages the switchover check
    /// re-sent) in this file, for diagnosis.
    pub record: Option<std::path::PathBuf>,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            zstd_level: Some(1),
            batch_bytes: 256 << 10,
            outbox_bytes: 256 << 10,
            // 8 MiB of pages: 15 to 30 ms of a destination QEMU's work.
            window_pages: 2048,
            bandwidth: None,
            max_run_pages: 32,
            read_chunk: 256 << 10,
            record: None,
        }
    }
}

/// Live counters, for a progress display.
#[derive(Debug, Default)]
pub struct Counters {
    pub stream_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub ref_pages: AtomicU64,
    pub fallback_pages: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("link to the receiver: {0}")]
    Wire(#[from] WireError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("the receiver failed: {0}")]
    Peer(String),
    #[error("the receiver closed the connection before the migration completed")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("introspection: {0}")]
    Map(String),
    /// The TLS session under the link failed.
    #[error("link to the receiver: {0}")]
    Tls(String),
}

/// What the receiver said at the end.
#[derive(Debug, Clone, Default)]
pub struct ReceiverEnd {
    pub stream_bytes: u64,
    pub report: Option<serde_json::Value>,
}

/// What the sender did.
#[derive(Debug, Clone)]
pub struct SenderReport {
    pub stream: StreamStats,
    pub wire: WireStats,
    pub ref_pages: u64,
    pub runs: u64,
    pub fallback_pages: u64,
    /// Pages the cache map covered when it was taken.
    pub map_pages: u64,
    /// Largest amount of original page bytes kept for fallback at one time.
    pub peak_originals: usize,
    /// What the switchover check found, if it ran.
    pub switchover: Option<SwitchoverReport>,
    /// What free-page elision did, if it ran.
    pub elision: Option<ElisionReport>,
    /// The sender's marks on the switchover timeline.
    pub marks: SenderMarks,
    /// When the receiver's `Complete` arrived.
    pub completed_at: Instant,
    pub receiver: ReceiverEnd,
}

/// Original bytes of the runs the receiver has not acked yet.
#[derive(Debug, Default)]
struct Originals {
    /// Run number of `runs[0]`.
    base: u64,
    runs: VecDeque<Vec<u8>>,
    bytes: usize,
    peak: usize,
}

impl Originals {
    fn push(&mut self, data: Vec<u8>) {
        self.bytes += data.len();
        self.peak = self.peak.max(self.bytes);
        self.runs.push_back(data);
    }

    fn ack(&mut self, upto: u64) {
        while self.base < upto {
            match self.runs.pop_front() {
                Some(r) => self.bytes -= r.len(),
                None => break,
            }
            self.base += 1;
        }
    }

    fn pages(&self, run: u64, first: u32, count: u32) -> Option<&[u8]> {
        let idx = usize::try_from(run.checked_sub(self.base)?).ok()?;
        let r = self.runs.get(idx)?;
        let start = first as usize * super::wire::PAGE_SIZE;
        let end = start + count as usize * super::wire::PAGE_SIZE;
        r.get(start..end)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the sender's threads share.
struct Pipeline {
    /// Frames waiting for the link (the writer drains it).
    outbox: Outbox,
    /// Frames counted both ways.
    stats: Mutex<WireStats>,
    /// Original bytes of the runs not acked yet (the encoder adds, the listener serves).
    originals: Mutex<Originals>,
    counters: Arc<Counters>,
    /// Stream frames not yet given to the destination QEMU.
    window: Window,
    /// The link, for asking how much it still holds.
    link: LinkStream,
    /// The guest is stopped (the `ram` section's END part has begun).
    stopped: AtomicBool,
    /// The listener failed (and shut QEMU's stream and the outbox down): its error is the
    /// cause of whatever the encoder then hits.
    listener_failed: AtomicBool,
    /// Fallback and hash requests answered since then.
    final_requests: AtomicU64,
}

impl Pipeline {
    /// The guest has stopped: notes pct's backlog (queued frames, unacknowledged bytes)
    /// and the link bytes so far; returns the latter.
    fn note_stop(&self, marks: &mut SenderMarks) -> u64 {
        self.stopped.store(true, Ordering::Relaxed);
        let unacked = self.link.unacked_bytes().unwrap_or(0);
        marks.backlog_bytes = Some(self.outbox.queued_bytes() as u64 + unacked);
        marks.backlog_pages = Some(self.window.outstanding().0);
        self.counters.wire_bytes.load(Ordering::Relaxed)
    }

    /// Counts a request from the receiver that falls inside the downtime.
    fn note_request(&self) {
        if self.stopped.load(Ordering::Relaxed) {
            self.final_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a stream frame (data or run) costing the destination `cost` pages.
    fn queue_stream(&self, f: &Frame, cost: u64) -> Result<(), SendError> {
        // Counted before it can reach the receiver, whose ack may come back at once.
        self.window.sent(cost);
        self.queue(f, false)
    }

    /// Fails everything that waits on the pipeline (the session failed).
    fn abort(&self) {
        self.outbox.abort();
        self.window.close();
    }

    /// Encodes `f`, counts it, and queues it (urgent or not).
    fn queue(&self, f: &Frame, urgent: bool) -> Result<(), SendError> {
        let mut buf = Vec::new();
        let n = f.encode(&mut buf)?;
        lock(&self.stats).count(f, n);
        let r = if urgent {
            self.outbox.push_urgent(buf)
        } else {
            self.outbox.push(buf)
        };
        r.map_err(|_| SendError::Closed)
    }
}

/// Bytes for a data or fallback frame: zstd-compressed at `level`, or raw.
fn pack(data: &[u8], level: Option<i32>) -> Result<Payload, WireError> {
    match level {
        Some(l) => Payload::compress(data, l),
        None => Ok(Payload::raw(data.to_vec())),
    }
}

/// The connections of one migration's sender side.
#[derive(Debug)]
pub struct Connections {
    /// QEMU's migration connection (the stream comes in here).
    pub qemu: Channel,
    /// The receiver, after the hello exchange.
    pub link: LinkStream,
    /// What the hello exchange settled.
    pub session: Session,
    /// The hello exchange's frames, counted.
    pub wire_stats: WireStats,
}

/// What the sender learns from the guest when dirty tracking starts.
pub struct StreamMap<'a> {
    /// The pages the destination can restore from its disk.
    pub refs: RefMap,
    /// The same block's free pages, to elide (`None`: sent as they are).
    pub free: Option<FreeMap<'a>>,
}

/// What the sender consults besides the stream.
pub struct SenderHooks<'a, F> {
    /// Called once with QEMU's RAM blocks, right after dirty tracking started; returns the
    /// reference map and free pages for one block (or `None`: send everything).
    pub map: F,
    /// The switchover check on its RAM block, if it is to run ([`SwitchoverCheck`]).
    pub check: Option<SwitchoverCheck<'a>>,
    /// Live counters, for a progress display.
    pub counters: Arc<Counters>,
}

/// Runs one migration's sender side: reads QEMU's stream from `conn.qemu` and sends it as
/// pct frames on `conn.link`. Returns once the receiver confirmed completion.
pub fn send<'g, F>(
    conn: Connections,
    opts: &SenderOptions,
    hooks: SenderHooks<'g, F>,
) -> Result<SenderReport, SendError>
where
    F: FnOnce(&[RamBlock]) -> Result<Option<StreamMap<'g>>, String>,
{
    let Connections {
        mut qemu,
        link,
        session,
        wire_stats,
    } = conn;
    let SenderHooks {
        map,
        check,
        counters,
    } = hooks;
    let io = |what| move |source| SendError::Io { what, source };
    let shared = Arc::new(Pipeline {
        outbox: Outbox::new(opts.outbox_bytes),
        window: Window::new(opts.window_pages),
        stats: Mutex::new(wire_stats),
        originals: Mutex::default(),
        counters,
        link: link.try_clone().map_err(io("cloning the link"))?,
        stopped: AtomicBool::new(false),
        listener_failed: AtomicBool::new(false),
        final_requests: AtomicU64::new(0),
    });

    let writer = {
        let mut link = link.try_clone().map_err(io("cloning the link"))?;
        let shared = shared.clone();
        let bucket = opts.bandwidth.clone();
        std::thread::Builder::new()
            .name("pct-send-writer".into())
            .spawn(move || -> Result<Option<f64>, io::Error> {
                let mut last = None;
                while let Some(b) = shared.outbox.pop() {
                    if let Some(tb) = &bucket {
                        tb.take(b.len());
                    }
                    if let Err(e) = link.write_all(&b) {
                        shared.abort();
                        return Err(e);
                    }
                    shared
                        .counters
                        .wire_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    last = Some(now_unix_ms());
                }
                Ok(last)
            })
            .map_err(io("starting the writer thread"))?
    };

    let listener = {
        let mut link = link.try_clone().map_err(io("cloning the link"))?;
        let mut qemu = qemu.try_clone().map_err(io("cloning QEMU's socket"))?;
        let shared = shared.clone();
        let (level, hash_len) = (opts.zstd_level, session.hash_len);
        std::thread::Builder::new()
            .name("pct-send-listener".into())
            .spawn(move || {
                let r = listen(&mut link, &mut qemu, &shared, level, hash_len);
                if r.is_err() {
                    shared.listener_failed.store(true, Ordering::SeqCst);
                    // Unblock the encoder wherever it waits.
                    shared.abort();
                    let _ = qemu.shutdown(Shutdown::Read);
                }
                r
            })
            .map_err(io("starting the listener thread"))?
    };

    let encoded = Encoder::new(&shared, &session, opts, map, check).and_then(|e| e.run(&mut qemu));
    if encoded.is_err() {
        shared.abort();
        let _ = link.shutdown(Shutdown::Both);
    }
    // The writer keeps running after the stream ended: fallback requests for the last
    // runs may still come, up to `Complete`.
    let heard = listener
        .join()
        .unwrap_or_else(|_| Err(SendError::Protocol("listener thread panicked".into())));
    shared.outbox.close();
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
    let _ = link.shutdown(Shutdown::Both);
    // Under TLS, a link closed or broken has its cause in the TLS session.
    let tls_cause = |e: SendError| match (e, link.tls_failure()) {
        (
            SendError::Closed | SendError::Io { .. } | SendError::Wire(WireError::Io(_)),
            Some(why),
        ) => SendError::Tls(why),
        (e, _) => e,
    };
    let (encoded, heard) = (encoded.map_err(tls_cause), heard.map_err(tls_cause));
    // The most telling error first: what the receiver said, then ours.
    let end = match (encoded, heard) {
        (_, Err(e @ SendError::Peer(_))) => return Err(e),
        // The encoder found the outbox closed, or QEMU's stream cut short, because the
        // listener failed (and shut both down): the listener's error is the cause.
        (Err(SendError::Closed), Err(e)) => return Err(e),
        (Err(_), Err(e)) if shared.listener_failed.load(Ordering::SeqCst) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(enc), Ok(end)) => (enc, end),
    };
    let last_written = wrote
        .map_err(io("sending to the receiver"))
        .map_err(tls_cause)?;
    let (enc, receiver) = end;
    let mut marks = enc.marks;
    marks.last_written = last_written;
    marks.final_requests = shared.final_requests.load(Ordering::Relaxed);
    marks.peak_window_pages = Some(shared.window.outstanding().1);
    if let Some(at) = enc.wire_at_stop {
        let total = shared.counters.wire_bytes.load(Ordering::Relaxed);
        marks.final_wire_bytes = Some(total.saturating_sub(at));
    }
    let peak_originals = lock(&shared.originals).peak;
    let wire = lock(&shared.stats).clone();
    Ok(SenderReport {
        stream: enc.stream,
        wire,
        ref_pages: enc.ref_pages,
        runs: enc.runs,
        fallback_pages: shared.counters.fallback_pages.load(Ordering::Relaxed),
        map_pages: enc.map_pages,
        switchover: enc.switchover,
        elision: enc.elision,
        marks,
        peak_originals,
        completed_at: Instant::now(),
        receiver,
    })
}

/// The listener thread: everything the receiver sends, up to `Complete`. What the
/// destination QEMU said on its return path goes to the source QEMU (`qemu`).
fn listen(
    link: &mut LinkStream,
    qemu: &mut Channel,
    shared: &Pipeline,
    level: Option<i32>,
    hash_len: u8,
) -> Result<ReceiverEnd, SendError> {
    let mut report = None;
    loop {
        let Some((frame, n)) = read_frame(link, super::wire::MAX_PAYLOAD)? else {
            return Err(SendError::Closed);
        };
        lock(&shared.stats).count(&frame, n);
        match frame {
            Frame::FallbackRequest { run, first, count } => {
                shared.note_request();
                let data = {
                    let o = lock(&shared.originals);
                    let pages = o.pages(run, first, count).ok_or_else(|| {
                        SendError::Protocol(format!(
                            "fallback request for run {run} pages {first}+{count}, which is \
                             not kept (acked or never sent)"
                        ))
                    })?;
                    pack(pages, level)?
                };
                shared
                    .counters
                    .fallback_pages
                    .fetch_add(u64::from(count), Ordering::Relaxed);
                let reply = Frame::FallbackData {
                    run,
                    first,
                    count,
                    data,
                };
                shared.queue(&reply, true)?;
            }
            Frame::HashRequest { run, first, count } => {
                shared.note_request();
                let hashes = {
                    let o = lock(&shared.originals);
                    let pages = o.pages(run, first, count).ok_or_else(|| {
                        SendError::Protocol(format!(
                            "hash request for run {run} pages {first}+{count}, which is not \
                             kept (acked or never sent)"
                        ))
                    })?;
                    hash_pages(pages, hash_len as usize)
                };
                let reply = Frame::PageHashes {
                    run,
                    first,
                    count,
                    hash_len,
                    hashes,
                };
                shared.queue(&reply, true)?;
            }
            Frame::Ack { runs, frames } => {
                lock(&shared.originals).ack(runs);
                shared.window.acked(frames);
            }
            Frame::Report { json } => report = serde_json::from_str(&json).ok(),
            Frame::ReturnPath { data } => {
                qemu.write_all(&data).map_err(|source| SendError::Io {
                    what: "relaying the destination's return path to the source QEMU",
                    source,
                })?;
            }
            Frame::Complete { stream_bytes } => {
                return Ok(ReceiverEnd {
                    stream_bytes,
                    report,
                })
            }
            Frame::Error { message, .. } => return Err(SendError::Peer(message)),
            other => {
                return Err(SendError::Protocol(format!(
                    "unexpected {} frame from the receiver",
                    other.name()
                )))
            }
        }
    }
}

/// Waits at most `timeout` for `fd` to become readable; true if it did (or if it has
/// hung up or failed: a read will then not block either).
pub fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    // poll(2) takes milliseconds as a C int: longer waits are capped, as there.
    let timeout = timeout.min(Duration::from_millis(i32::MAX as u64));
    let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::from(i32::MAX) / 1000,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    poll(&mut fds, Some(&ts)).is_ok_and(|n| n > 0)
}
