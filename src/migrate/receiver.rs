//! The pct receiver: pct frames in (the link from the sender), a standard QEMU precopy stream out
//! (the destination QEMU's `migrate-incoming` socket).
//!
//! Three stages, each a thread, joined by bounded channels so that a slow destination
//! QEMU slows the link down (and with it the source QEMU), never fills memory:
//!
//! - the *reader* takes frames off the link;
//! - the *restorer* decompresses data frames and, for each reference run, reads the pages
//!   from the disk image (contiguous disk ranges in one read) and checks the hash. It runs
//!   ahead of emission by the channel's depth, so the link never waits on the disk;
//! - the *emitter* (the caller's thread) writes to QEMU in the sender's order. A run whose
//!   hash failed (stale disk, guest write after the map was taken, read error) is not
//!   emitted until the sender's original bytes for it arrived (docs/design.md, rules 1
//!   and 2); frames that arrive meanwhile are held back, in order. For a failed run hash
//!   the emitter first asks for the run's per-page hashes and fetches only the pages that
//!   differ (or could not be read); the fetched originals are checked against their page
//!   hashes and the assembled run against its run hash before anything is emitted
//!   (`receiver/fallback.rs`). The emitter acks runs so the sender can drop its originals.
//!
//! Reading a run's pages from disk and writing them back as `PAGE` records is
//! `receiver/pages.rs`. The session's last frames (`Report` and `Complete`, or `Error`)
//! wait for the destination QEMU's verdict: [`receive`] returns before, and [`Closing`]
//! sends them ([`super::destination`] does both).

mod fallback;
mod pages;

pub use pages::{bench_restore, read_pages, RestoreBench};

use super::link::LinkStream;
use super::stream::{Decoder, Recorder};
use super::timeline::{now_unix_ms, ReceiverMarks};
use super::wire::{read_frame, write_frame, Frame, PageRefs, WireError, WireStats};
use crate::disk::Disk;
use crate::qemu::Channel;
use fallback::{FailedRun, Link};
use pages::page_views;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tunables of the receiver.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Frames between the reader and the restorer.
    pub frame_queue: usize,
    /// Restored items between the restorer and the emitter (the disk read-ahead).
    pub restore_queue: usize,
    /// Ack after this many runs (the sender then drops their originals).
    pub ack_every: u64,
    /// Ack after this many stream frames (and whenever the emitter runs out of work), for
    /// the sender's end-to-end window.
    pub ack_frames: u64,
    /// After a failed run hash, ask for per-page hashes and fetch only the pages that
    /// differ (otherwise fetch the whole run).
    pub page_hashes: bool,
    /// Keep a copy of the stream given to QEMU in this file (diagnosis).
    pub record: Option<std::path::PathBuf>,
    /// Relay what the destination QEMU writes back on its channel (its return path) to
    /// the sender, and return only once QEMU has closed the channel: for a destination a
    /// VM manager drives, whose source QEMU waits for that return path
    /// ([`super::destination::DestinationQemu::Incoming`]).
    pub return_path: bool,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            frame_queue: 16,
            restore_queue: 32,
            ack_every: 32,
            ack_frames: 8,
            page_hashes: true,
            record: None,
            return_path: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("link to the sender: {0}")]
    Wire(#[from] WireError),
    #[error("the sender closed the connection before the end of the stream")]
    Closed,
    #[error("the sender failed: {0}")]
    Peer(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("writing to the destination QEMU: {0}")]
    Qemu(io::Error),
    #[error("{0}")]
    Io(io::Error),
    /// The TLS session under the link failed.
    #[error("link to the sender: {0}")]
    Tls(String),
}

/// What the receiver did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReceiverReport {
    /// Bytes of QEMU stream written to the destination QEMU.
    pub stream_bytes: u64,
    pub runs: u64,
    /// Pages referenced by the sender.
    pub ref_pages: u64,
    /// Pages restored from disk whose hash matched.
    pub verified_pages: u64,
    /// Pages whose original bytes had to come from the sender.
    pub fallback_pages: u64,
    /// Pages that could not be read from the disk image (counted in `fallback_pages` too).
    pub unreadable_pages: u64,
    /// Runs whose run hash failed and whose per-page hashes were asked for.
    #[serde(default)]
    pub hash_requests: u64,
    /// Seconds the restorer spent reading and hashing pages.
    pub restore_seconds: f64,
    /// Seconds the emitter waited for fallback data.
    pub fallback_wait_seconds: f64,
    /// Stream bytes received in data frames (before and after compression).
    pub data_raw: u64,
    pub data_wire: u64,
    /// Wall-clock time (Unix ms, the destination host's clock) when the destination QEMU
    /// had loaded the whole stream (its `MIGRATION completed` event).
    pub loaded_at_unix_ms: Option<f64>,
    /// When the destination guest resumed (`RESUME` event), unless it was kept paused.
    pub resumed_at_unix_ms: Option<f64>,
    /// The receiver's marks on the switchover timeline.
    #[serde(default)]
    pub marks: ReceiverMarks,
}

/// What the restorer hands the emitter.
enum Restored {
    Bytes(Vec<u8>),
    Run {
        refs: PageRefs,
        data: Vec<u8>,
        bad: Vec<usize>,
        /// Indices of the pages that could not be read.
        unreadable: Vec<usize>,
    },
    Fallback {
        run: u64,
        first: u32,
        data: Vec<u8>,
    },
    PageHashes {
        run: u64,
        first: u32,
        count: u32,
        hash_len: u8,
        hashes: Vec<u8>,
    },
    End {
        stream_bytes: u64,
        runs: u64,
    },
}

type Failure = Arc<Mutex<Option<RecvError>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fail(slot: &Failure, e: RecvError) {
    let mut s = lock(slot);
    if s.is_none() {
        *s = Some(e);
    }
}

/// Runs one migration's receiver side. `link` has completed the hello exchange; `qemu` is
/// connected to the destination QEMU's incoming socket. Returns once the whole stream was
/// written to QEMU: the caller then waits for QEMU to finish loading it and closes the
/// session with a [`Closing`] taken before (`Report` and `Complete`, or `Error`), as
/// [`super::destination`] does.
pub fn receive(
    link: LinkStream,
    disk: Disk,
    mut qemu: Channel,
    opts: &ReceiverOptions,
    wire_stats: WireStats,
) -> Result<(ReceiverReport, WireStats), RecvError> {
    let failure: Failure = Arc::default();
    let emit_done = AtomicBool::new(false);
    let stats = Arc::new(Mutex::new(wire_stats));
    let (ftx, frx) = sync_channel::<Frame>(opts.frame_queue);
    let (itx, irx) = sync_channel::<Restored>(opts.restore_queue);
    let restore_time = Arc::new(Mutex::new(Duration::ZERO));
    let marks = Arc::new(Mutex::new(ReceiverMarks::default()));

    let reader = {
        let mut link = link.try_clone().map_err(RecvError::Io)?;
        let (failure, stats, marks) = (failure.clone(), stats.clone(), marks.clone());
        std::thread::Builder::new()
            .name("pct-recv-reader".into())
            .spawn(move || loop {
                match read_frame(&mut link, super::wire::MAX_PAYLOAD) {
                    Ok(Some((f, n))) => {
                        lock(&stats).count(&f, n);
                        if matches!(f, Frame::End { .. }) {
                            lock(&marks).end_read = Some(now_unix_ms());
                        }
                        if let Frame::Error { message, .. } = f {
                            fail(&failure, RecvError::Peer(message));
                            return;
                        }
                        if ftx.send(f).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        fail(&failure, RecvError::Closed);
                        return;
                    }
                    Err(e) => {
                        fail(&failure, e.into());
                        return;
                    }
                }
            })
            .map_err(RecvError::Io)?
    };

    let restorer = {
        let (failure, restore_time, marks) = (failure.clone(), restore_time.clone(), marks.clone());
        std::thread::Builder::new()
            .name("pct-recv-restorer".into())
            .spawn(move || {
                for f in frx {
                    let item = match f {
                        Frame::Data(p) => match p.decompress() {
                            Ok(b) => Restored::Bytes(b),
                            Err(e) => return fail(&failure, e.into()),
                        },
                        Frame::PageRefs(refs) => {
                            let t = Instant::now();
                            let (data, ok) = read_pages(&disk, &refs);
                            let unreadable: Vec<usize> =
                                (0..ok.len()).filter(|&i| !ok[i]).collect();
                            let mut bad = refs.verify(&page_views(&data));
                            if !unreadable.is_empty() && bad.is_empty() {
                                bad = unreadable.clone();
                            }
                            *lock(&restore_time) += t.elapsed();
                            lock(&marks).last_verified = Some(now_unix_ms());
                            Restored::Run {
                                refs,
                                data,
                                bad,
                                unreadable,
                            }
                        }
                        Frame::FallbackData {
                            run, first, data, ..
                        } => match data.decompress() {
                            Ok(d) => Restored::Fallback {
                                run,
                                first,
                                data: d,
                            },
                            Err(e) => return fail(&failure, e.into()),
                        },
                        Frame::PageHashes {
                            run,
                            first,
                            count,
                            hash_len,
                            hashes,
                        } => Restored::PageHashes {
                            run,
                            first,
                            count,
                            hash_len,
                            hashes,
                        },
                        Frame::End { stream_bytes, runs } => Restored::End { stream_bytes, runs },
                        other => {
                            return fail(
                                &failure,
                                RecvError::Protocol(format!(
                                    "unexpected {} frame from the sender",
                                    other.name()
                                )),
                            )
                        }
                    };
                    if itx.send(item).is_err() {
                        return;
                    }
                }
            })
            .map_err(RecvError::Io)?
    };

    let control = Mutex::new(link.try_clone().map_err(RecvError::Io)?);
    let emitted = std::thread::scope(|s| {
        let back = opts
            .return_path
            .then(|| {
                let qemu = qemu.try_clone()?;
                let (control, stats, done) = (&control, &stats, &emit_done);
                std::thread::Builder::new()
                    .name("pct-recv-return".into())
                    .spawn_scoped(s, move || relay_return_path(qemu, control, stats, done))
            })
            .transpose()
            .map_err(RecvError::Io)?;
        let emitted = emit(&mut qemu, &control, &irx, &stats, opts, &failure);
        emit_done.store(true, Ordering::Relaxed);
        if emitted.is_err() {
            // QEMU waits for the rest of the stream, and the return-path thread for QEMU:
            // closing the channel fails QEMU's load, which closes its end.
            let _ = qemu.shutdown(Shutdown::Both);
        }
        let closed = back.map(|t| {
            t.join()
                .unwrap_or_else(|_| Err(RecvError::Protocol("return-path thread panicked".into())))
        });
        match (emitted, closed) {
            (Ok(r), Some(Ok(at))) => Ok(ReceiverReport {
                loaded_at_unix_ms: Some(at),
                ..r
            }),
            (Ok(_), Some(Err(e))) | (Err(e), _) => Err(e),
            (Ok(r), None) => Ok(r),
        }
    });
    drop(irx);
    // The first failure, taken before the shutdown below makes the reader fail as well.
    let emitted = emitted.map_err(|e| lock(&failure).take().unwrap_or(e));
    if emitted.is_err() {
        // The reader may be blocked on the link: shut down for reading only, which wakes
        // it, and leaves the sending side open for the caller's `Error` frame
        // ([`Closing::fail`]).
        let _ = link.shutdown(Shutdown::Read);
    }
    let mut report = match emitted {
        Ok(r) => r,
        Err(first) => {
            let _ = restorer.join();
            let _ = reader.join();
            // Under TLS, a link closed or broken has its cause in the TLS session.
            return Err(match (first, link.tls_failure()) {
                (RecvError::Closed | RecvError::Wire(WireError::Io(_)), Some(why)) => {
                    RecvError::Tls(why)
                }
                (e, _) => e,
            });
        }
    };
    // Reader and restorer stay blocked on the socket until the sender closes it (after
    // `Complete`); they end on their own and are not joined.
    drop((reader, restorer));
    report.restore_seconds = lock(&restore_time).as_secs_f64();
    let last_emitted = report.marks.last_emitted;
    report.marks = lock(&marks).clone();
    report.marks.last_emitted = last_emitted;
    let s = lock(&stats).clone();
    report.data_raw = s.passthrough_raw;
    report.data_wire = s.passthrough_wire;
    Ok((report, s))
}

/// Sends a frame on the control path (fallback requests, acks, the return path): whole
/// frames, one writer at a time.
fn control(link: &Mutex<LinkStream>, stats: &Mutex<WireStats>, f: &Frame) -> Result<(), RecvError> {
    let n = write_frame(&mut *lock(link), f)?;
    lock(stats).count(f, n);
    Ok(())
}

/// How long the destination QEMU may take, once it has the whole stream, to load it and
/// close its channel.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The return-path thread: forwards what the destination QEMU writes on its channel to the
/// sender as [`Frame::ReturnPath`], until QEMU closes the channel (it has loaded the stream,
/// or failed to) and returns when that was (unix ms). QEMU writes its return path only after
/// the source opened it and, in precopy, its `SHUT` once the stream is loaded; the source
/// QEMU waits for that `SHUT` before it completes. `done`: the whole stream was written to
/// QEMU (from then on it has [`LOAD_TIMEOUT`]).
fn relay_return_path(
    mut qemu: Channel,
    link: &Mutex<LinkStream>,
    stats: &Mutex<WireStats>,
    done: &AtomicBool,
) -> Result<f64, RecvError> {
    qemu.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(RecvError::Qemu)?;
    let mut buf = vec![0u8; super::wire::MAX_RETURN_PATH];
    let mut since_done: Option<Instant> = None;
    loop {
        match qemu.read(&mut buf) {
            Ok(0) => return Ok(now_unix_ms()),
            Ok(n) => control(
                link,
                stats,
                &Frame::ReturnPath {
                    data: buf[..n].to_vec(),
                },
            )?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if done.load(Ordering::Relaxed) {
                    let t = *since_done.get_or_insert_with(Instant::now);
                    if t.elapsed() > LOAD_TIMEOUT {
                        return Err(RecvError::Protocol(format!(
                            "the destination QEMU had not closed its migration channel {} s \
                             after it had the whole stream",
                            LOAD_TIMEOUT.as_secs()
                        )));
                    }
                }
            }
            // A reset after QEMU's last words is its way of closing too; whether it loaded
            // the stream is for its manager to tell.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(now_unix_ms()),
            Err(e) => return Err(RecvError::Qemu(e)),
        }
    }
}

/// Acks, unless the last ack already said as much: `runs` restored and `frames` stream
/// frames given to QEMU (what the sender's window counts, see [`super::flow::Window`]).
fn ack(
    link: &Mutex<LinkStream>,
    stats: &Mutex<WireStats>,
    acked: &mut (u64, u64),
    runs: u64,
    frames: u64,
) -> Result<(), RecvError> {
    if frames > acked.1 {
        *acked = (runs, frames);
        control(link, stats, &Frame::Ack { runs, frames })?;
    }
    Ok(())
}

/// The emitter: writes the stream to QEMU in order.
fn emit(
    qemu: &mut Channel,
    link: &Mutex<LinkStream>,
    rx: &Receiver<Restored>,
    stats: &Mutex<WireStats>,
    opts: &ReceiverOptions,
    failure: &Failure,
) -> Result<ReceiverReport, RecvError> {
    let mut r = ReceiverReport::default();
    let mut held: VecDeque<Restored> = VecDeque::new();
    // RAM block names, learnt from the MEM_SIZE record in what we emit.
    let mut probe = Some(Decoder::new());
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(1 << 20);
    // Runs and stream frames given to QEMU, and as last acked.
    let mut frames = 0u64;
    let mut acked = (0u64, 0u64);
    let mut recorder = match &opts.record {
        Some(p) => Some(Recorder::create(p).map_err(RecvError::Io)?),
        None => None,
    };
    let closed = || lock(failure).take().unwrap_or(RecvError::Closed);
    let mut write = |bytes: &[u8], r: &mut ReceiverReport, names: &mut Vec<String>| {
        qemu.write_all(bytes).map_err(RecvError::Qemu)?;
        if let Some(rec) = recorder.as_mut() {
            rec.record(bytes).map_err(RecvError::Io)?;
        }
        r.stream_bytes += bytes.len() as u64;
        r.marks.last_emitted = Some(now_unix_ms());
        if let Some(p) = probe.as_mut() {
            p.feed(bytes);
            while p
                .advance()
                .map_err(|e| RecvError::Protocol(format!("the rebuilt stream: {e}")))?
            {
                if !p.blocks().is_empty() {
                    *names = p.blocks().iter().map(|b| b.name.clone()).collect();
                    probe = None;
                    break;
                }
            }
        }
        Ok::<(), RecvError>(())
    };
    loop {
        let item = match held.pop_front() {
            Some(i) => i,
            None => match rx.try_recv() {
                Ok(i) => i,
                Err(TryRecvError::Empty) => {
                    // About to wait for the link: tell the sender how far QEMU got, so
                    // that its window is open while this end has nothing to do.
                    ack(link, stats, &mut acked, r.runs, frames)?;
                    rx.recv().map_err(|_| closed())?
                }
                Err(TryRecvError::Disconnected) => return Err(closed()),
            },
        };
        if matches!(item, Restored::Bytes(_) | Restored::Run { .. }) {
            frames += 1;
        }
        match item {
            Restored::Bytes(b) => {
                write(&b, &mut r, &mut names)?;
                if frames - acked.1 >= opts.ack_frames {
                    ack(link, stats, &mut acked, r.runs, frames)?;
                }
            }
            Restored::Run {
                refs,
                mut data,
                bad,
                unreadable,
            } => {
                let run_no = r.runs;
                let n = refs.pages.len();
                let mut fetched = 0usize;
                if !bad.is_empty() {
                    let t = Instant::now();
                    let mut link = Link {
                        link,
                        stats,
                        rx,
                        held: &mut held,
                        failure,
                    };
                    let failed = FailedRun {
                        refs: &refs,
                        run_no,
                        bad: &bad,
                        unreadable: &unreadable,
                        data: &mut data,
                    };
                    fetched = link.restore_failed(failed, opts.page_hashes, &mut r)?;
                    r.fallback_wait_seconds += t.elapsed().as_secs_f64();
                }
                let name = match (refs.first_named, names.get(refs.block as usize)) {
                    (false, _) => "",
                    (true, Some(n)) => n.as_str(),
                    (true, None) => {
                        return Err(RecvError::Protocol(format!(
                            "reference to RAM block {} before QEMU announced it",
                            refs.block
                        )))
                    }
                };
                out.clear();
                refs.emit_records(name, &page_views(&data), &mut out)?;
                let o = std::mem::take(&mut out);
                write(&o, &mut r, &mut names)?;
                out = o;
                r.runs += 1;
                r.ref_pages += n as u64;
                r.fallback_pages += fetched as u64;
                r.verified_pages += (n - fetched) as u64;
                r.unreadable_pages += unreadable.len() as u64;
                if r.runs - acked.0 >= opts.ack_every || frames - acked.1 >= opts.ack_frames {
                    ack(link, stats, &mut acked, r.runs, frames)?;
                }
            }
            Restored::Fallback { run, .. } | Restored::PageHashes { run, .. } => {
                return Err(RecvError::Protocol(format!(
                    "fallback data or page hashes for run {run}, which were not requested"
                )))
            }
            Restored::End { stream_bytes, runs } => {
                if (stream_bytes, runs) != (r.stream_bytes, r.runs) {
                    return Err(RecvError::Protocol(format!(
                        "the sender sent {stream_bytes} stream bytes in {runs} runs, \
                         {} bytes in {} runs arrived",
                        r.stream_bytes, r.runs
                    )));
                }
                qemu.flush().map_err(RecvError::Qemu)?;
                let _ = qemu.shutdown(Shutdown::Write);
                if let Some(rec) = recorder.take() {
                    rec.finish().map_err(RecvError::Io)?;
                }
                ack(link, stats, &mut acked, r.runs, frames)?;
                return Ok(r);
            }
        }
    }
}

/// How long the session's last frames may take to leave.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(30);

/// The frames that close a session, receiver → sender: [`Frame::Report`] and
/// [`Frame::Complete`] once the destination QEMU has loaded the whole stream, or
/// [`Frame::Error`] on failure. Take it before [`receive`] consumes the connection.
pub struct Closing {
    link: LinkStream,
}

impl Closing {
    /// A handle on the sender's connection (a clone of the socket).
    pub fn new(link: &LinkStream) -> io::Result<Closing> {
        Ok(Closing {
            link: link.try_clone()?,
        })
    }

    /// Tells the sender the migration failed (best effort: the link may be gone), and
    /// closes this direction of the connection.
    pub fn fail(&mut self, message: &str) {
        let sent = write_frame(
            &mut self.link,
            &Frame::Error {
                code: 1,
                message: message.to_owned(),
            },
        );
        if sent.is_ok() {
            self.link.finish_sending(CLOSING_TIMEOUT);
        }
    }

    /// Sends `report` (as JSON) and `Complete`, then closes this direction of the
    /// connection. Returns the JSON sent.
    pub fn complete(mut self, report: &ReceiverReport) -> Result<String, WireError> {
        let json = serde_json::to_string(report).map_err(|e| WireError::Malformed {
            frame: "report",
            msg: e.to_string(),
        })?;
        write_frame(&mut self.link, &Frame::Report { json: json.clone() })?;
        write_frame(
            &mut self.link,
            &Frame::Complete {
                stream_bytes: report.stream_bytes,
            },
        )?;
        // The process may exit right after: the frames must have left it.
        if !self.link.finish_sending(CLOSING_TIMEOUT) {
            return Err(WireError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the sender did not take the last frames",
            )));
        }
        Ok(json)
    }
}
