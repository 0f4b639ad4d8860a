//! The pct sender: QEMU's precopy stream in (a unix socket QEMU migrates into), pct frames
//! out (TCP to the receiver).
//!
//! Three threads:
//!
//! - the *encoder* (the caller's thread) decodes QEMU's stream record by record. A `PAGE`
//!   record of the mapped RAM block whose page the cache map covers becomes part of a
//!   reference run ([`RunBuilder`]: RAM offset, disk offset, BLAKE3 of the exact bytes
//!   QEMU sent); everything else is batched and zstd-compressed into data frames, in
//!   stream order. The original bytes of every run are kept until the receiver acks it.
//!   The cache map is asked for once, when the `ram` section's `MEM_SIZE` record arrives:
//!   QEMU started dirty tracking just before writing it, so any later guest write is re-sent
//!   by QEMU, and the hash catches whatever the map got wrong;
//! - the *writer* sends queued frames ([`Outbox`]), urgent ones first, optionally capped by
//!   a [`TokenBucket`];
//! - the *listener* reads the receiver's frames: fallback requests and per-page hash
//!   requests (both answered urgently from the kept originals), acks, the receiver's report
//!   and the final `Complete`.
//!
//! Every stage blocks when the next is full, so QEMU drains at the link's pace.

use super::flow::{Outbox, TokenBucket};
use super::refmap::RefMap;
use super::stream::{RamBlock, RamRecord, Record, Recorder, StreamError, StreamStats};
use super::switchover::{SwitchoverCheck, SwitchoverReport};
use super::wire::{
    hash_pages, read_frame, Frame, PageRefs, Payload, RunBuilder, Session, WireError, WireStats,
};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Cap on pct's own sending rate, bytes per second.
    pub bandwidth: Option<u64>,
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

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes `f`, counts it, and queues it (urgent or not).
fn queue(
    outbox: &Outbox,
    stats: &Mutex<WireStats>,
    f: &Frame,
    urgent: bool,
) -> Result<(), SendError> {
    let mut buf = Vec::new();
    let n = f.encode(&mut buf)?;
    lock(stats).count(f, n);
    let r = if urgent {
        outbox.push_urgent(buf)
    } else {
        outbox.push(buf)
    };
    r.map_err(|_| SendError::Closed)
}

/// Bytes for a data or fallback frame: zstd-compressed at `level`, or raw.
fn pack(data: &[u8], level: Option<i32>) -> Result<Payload, WireError> {
    match level {
        Some(l) => Payload::compress(data, l),
        None => Ok(Payload::raw(data.to_vec())),
    }
}

/// True if `fd` has data to read right now.
fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0
}

/// Runs one migration's sender side. `tcp` has completed the hello exchange (`session`);
/// `qemu` is QEMU's migration connection. `map` is called once with QEMU's RAM blocks,
/// right after dirty tracking started, and returns the reference map for one block (or
/// `None`: send everything). `check`, if given, runs the switchover check on its RAM block
/// ([`SwitchoverCheck`]). Returns once the receiver confirmed completion.
#[allow(clippy::too_many_arguments)]
pub fn send<F>(
    mut qemu: UnixStream,
    tcp: TcpStream,
    session: Session,
    opts: &SenderOptions,
    wire_stats: WireStats,
    map: F,
    check: Option<SwitchoverCheck<'_>>,
    counters: Arc<Counters>,
) -> Result<SenderReport, SendError>
where
    F: FnOnce(&[RamBlock]) -> Result<Option<RefMap>, String>,
{
    let outbox = Arc::new(Outbox::new(opts.outbox_bytes));
    let stats: Shared<WireStats> = Arc::new(Mutex::new(wire_stats));
    let originals: Shared<Originals> = Arc::default();
    let io = |what| move |source| SendError::Io { what, source };

    let writer = {
        let mut tcp = tcp.try_clone().map_err(io("cloning the TCP socket"))?;
        let outbox = outbox.clone();
        let counters = counters.clone();
        let mut bucket = opts.bandwidth.map(TokenBucket::new);
        std::thread::Builder::new()
            .name("pct-send-writer".into())
            .spawn(move || -> Result<(), io::Error> {
                while let Some(b) = outbox.pop() {
                    if let Some(tb) = bucket.as_mut() {
                        tb.take(b.len());
                    }
                    if let Err(e) = tcp.write_all(&b) {
                        outbox.abort();
                        return Err(e);
                    }
                    counters
                        .wire_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            })
            .map_err(io("starting the writer thread"))?
    };

    let listener = {
        let mut tcp = tcp.try_clone().map_err(io("cloning the TCP socket"))?;
        let qemu = qemu.try_clone().map_err(io("cloning QEMU's socket"))?;
        let (outbox, stats, originals) = (outbox.clone(), stats.clone(), originals.clone());
        let (counters, level) = (counters.clone(), opts.zstd_level);
        let hash_len = session.hash_len;
        std::thread::Builder::new()
            .name("pct-send-listener".into())
            .spawn(move || {
                let r = listen(
                    &mut tcp, &outbox, &stats, &originals, &counters, level, hash_len,
                );
                if r.is_err() {
                    // Unblock the encoder wherever it waits.
                    outbox.abort();
                    let _ = qemu.shutdown(Shutdown::Read);
                }
                r
            })
            .map_err(io("starting the listener thread"))?
    };

    let encoded = encode(
        &mut qemu, &session, opts, &outbox, &stats, &originals, map, check, &counters,
    );
    if encoded.is_err() {
        outbox.abort();
        let _ = tcp.shutdown(Shutdown::Both);
    }
    // The writer keeps running after the stream ended: fallback requests for the last
    // runs may still come, up to `Complete`.
    let heard = listener
        .join()
        .unwrap_or_else(|_| Err(SendError::Protocol("listener thread panicked".into())));
    outbox.close();
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
    let _ = tcp.shutdown(Shutdown::Both);
    // The most telling error first: what the receiver said, then ours.
    let end = match (encoded, heard) {
        (_, Err(e @ SendError::Peer(_))) => return Err(e),
        // The encoder found the outbox closed because the listener failed: its error is
        // the cause.
        (Err(SendError::Closed), Err(e)) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(enc), Ok(end)) => (enc, end),
    };
    wrote.map_err(io("sending to the receiver"))?;
    let (enc, receiver) = end;
    let peak_originals = lock(&originals).peak;
    let wire = lock(&stats).clone();
    Ok(SenderReport {
        stream: enc.stream,
        wire,
        ref_pages: enc.ref_pages,
        runs: enc.runs,
        fallback_pages: counters.fallback_pages.load(Ordering::Relaxed),
        map_pages: enc.map_pages,
        switchover: enc.switchover,
        peak_originals,
        completed_at: Instant::now(),
        receiver,
    })
}

struct Encoded {
    stream: StreamStats,
    ref_pages: u64,
    runs: u64,
    map_pages: u64,
    switchover: Option<SwitchoverReport>,
}

#[allow(clippy::too_many_arguments)]
fn encode<F>(
    qemu: &mut UnixStream,
    session: &Session,
    opts: &SenderOptions,
    outbox: &Outbox,
    stats: &Mutex<WireStats>,
    originals: &Mutex<Originals>,
    map: F,
    mut check: Option<SwitchoverCheck<'_>>,
    counters: &Counters,
) -> Result<Encoded, SendError>
where
    F: FnOnce(&[RamBlock]) -> Result<Option<RefMap>, String>,
{
    let mut dec = super::stream::Decoder::new();
    let mut map = Some(map);
    let mut refmap: Option<(usize, RefMap)> = None;
    let mut map_pages = 0;
    let mut runs = RunBuilder::new(session).with_max_pages(opts.max_run_pages);
    let mut run_pages: Vec<u8> = Vec::new();
    let mut batch: Vec<u8> = Vec::with_capacity(opts.batch_bytes + 8192);
    let (mut ref_pages, mut run_count) = (0u64, 0u64);
    let level = opts.zstd_level;
    // Stream bytes pct adds (pages the switchover check re-sent).
    let mut added = 0u64;
    let mut switchover = None;
    let recording = |source| SendError::Io {
        what: "recording the stream",
        source,
    };
    let mut recorder = match &opts.record {
        Some(p) => Some(Recorder::create(p).map_err(recording)?),
        None => None,
    };

    let flush_batch = |batch: &mut Vec<u8>| -> Result<(), SendError> {
        if !batch.is_empty() {
            queue(outbox, stats, &Frame::Data(pack(batch, level)?), false)?;
            batch.clear();
        }
        Ok(())
    };
    let send_run = |run: PageRefs, pages: &mut Vec<u8>, count: &mut u64| -> Result<(), SendError> {
        // Keep the originals before the receiver can ask for them.
        lock(originals).push(std::mem::take(pages));
        queue(outbox, stats, &Frame::PageRefs(run), false)?;
        *count += 1;
        Ok(())
    };

    loop {
        while dec.advance()? {
            let Some(item) = dec.item() else { break };
            counters.stream_bytes.store(dec.offset(), Ordering::Relaxed);
            let at_switchover = match check.as_mut() {
                Some(c) => c.observe(&item.record).then_some(c),
                None => None,
            };
            if let Some(c) = at_switchover {
                // The END part's EOS: the guest is stopped, everything QEMU will send for
                // RAM is out. Re-send what it missed, before the EOS.
                if let Some(done) = runs.flush() {
                    send_run(done, &mut run_pages, &mut run_count)?;
                }
                let mut extra = Vec::new();
                let report = c
                    .repair(&mut extra)
                    .map_err(|e| SendError::Protocol(format!("re-sending pages: {e}")))?;
                if let Some(r) = recorder.as_mut() {
                    r.record(&extra).map_err(recording)?;
                }
                added += extra.len() as u64;
                batch.extend_from_slice(&extra);
                switchover = Some(report);
            }
            if let Some(r) = recorder.as_mut() {
                r.record(item.raw).map_err(recording)?;
            }
            if let Record::Ram(RamRecord::Page { page, data }) = item.record {
                let disk = match refmap.as_mut() {
                    Some((b, m)) if *b == page.block => m.lookup(page.offset),
                    _ => None,
                };
                if let Some(disk) = disk {
                    flush_batch(&mut batch)?;
                    let block = page.block as u32;
                    if let Some(done) = runs.push(block, page.offset, page.continued, disk, data) {
                        send_run(done, &mut run_pages, &mut run_count)?;
                    }
                    run_pages.extend_from_slice(data);
                    ref_pages += 1;
                    counters.ref_pages.store(ref_pages, Ordering::Relaxed);
                    continue;
                }
            }
            if let Some(done) = runs.flush() {
                send_run(done, &mut run_pages, &mut run_count)?;
            }
            batch.extend_from_slice(item.raw);
            let first_mem_size = match item.record {
                Record::Ram(RamRecord::MemSize { blocks, .. }) if map.is_some() => {
                    Some(blocks.to_vec())
                }
                _ => None,
            };
            if let Some(blocks) = first_mem_size {
                // Dirty tracking is on: take the cache map now.
                flush_batch(&mut batch)?;
                let f = map
                    .take()
                    .ok_or_else(|| SendError::Map("map taken twice".into()))?;
                if let Some(m) = f(&blocks).map_err(SendError::Map)? {
                    if let Some(i) = blocks.iter().position(|b| b.name == m.block()) {
                        map_pages = m.pages();
                        refmap = Some((i, m));
                    }
                }
            }
            if batch.len() >= opts.batch_bytes {
                flush_batch(&mut batch)?;
            }
        }
        // About to wait for QEMU: send what is pending so the receiver is never starved.
        if !readable(qemu) {
            if let Some(done) = runs.flush() {
                send_run(done, &mut run_pages, &mut run_count)?;
            }
            flush_batch(&mut batch)?;
        }
        let n = dec
            .read_from(qemu, opts.read_chunk)
            .map_err(|e| SendError::Io {
                what: "reading QEMU's migration stream",
                source: e,
            })?;
        if n == 0 {
            dec.finish()?;
            break;
        }
    }
    if let Some(done) = runs.flush() {
        send_run(done, &mut run_pages, &mut run_count)?;
    }
    flush_batch(&mut batch)?;
    if let Some(r) = recorder {
        r.finish().map_err(recording)?;
    }
    counters.stream_bytes.store(dec.offset(), Ordering::Relaxed);
    queue(
        outbox,
        stats,
        &Frame::End {
            stream_bytes: dec.offset() + added,
            runs: run_count,
        },
        false,
    )?;
    Ok(Encoded {
        stream: dec.stats().clone(),
        ref_pages,
        runs: run_count,
        map_pages,
        switchover,
    })
}

/// The listener thread: everything the receiver sends, up to `Complete`.
fn listen(
    tcp: &mut TcpStream,
    outbox: &Outbox,
    stats: &Mutex<WireStats>,
    originals: &Mutex<Originals>,
    counters: &Counters,
    level: Option<i32>,
    hash_len: u8,
) -> Result<ReceiverEnd, SendError> {
    let mut report = None;
    loop {
        let Some((frame, n)) = read_frame(tcp, super::wire::MAX_PAYLOAD)? else {
            return Err(SendError::Closed);
        };
        lock(stats).count(&frame, n);
        match frame {
            Frame::FallbackRequest { run, first, count } => {
                let data = {
                    let o = lock(originals);
                    let pages = o.pages(run, first, count).ok_or_else(|| {
                        SendError::Protocol(format!(
                            "fallback request for run {run} pages {first}+{count}, which is \
                             not kept (acked or never sent)"
                        ))
                    })?;
                    pack(pages, level)?
                };
                counters
                    .fallback_pages
                    .fetch_add(u64::from(count), Ordering::Relaxed);
                let reply = Frame::FallbackData {
                    run,
                    first,
                    count,
                    data,
                };
                queue(outbox, stats, &reply, true)?;
            }
            Frame::HashRequest { run, first, count } => {
                let hashes = {
                    let o = lock(originals);
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
                queue(outbox, stats, &reply, true)?;
            }
            Frame::Ack { runs } => lock(originals).ack(runs),
            Frame::Report { json } => report = serde_json::from_str(&json).ok(),
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

/// Waits at most `timeout` for `fd` to become readable; true if it did.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}
