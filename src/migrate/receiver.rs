//! The pct receiver: pct frames in (TCP from the sender), a standard QEMU precopy stream out
//! (the destination QEMU's `migrate-incoming` socket).
//!
//! Three stages, each a thread, joined by bounded channels so that a slow destination
//! QEMU slows the link down (and with it the source QEMU), never fills memory:
//!
//! - the *reader* takes frames off the TCP connection;
//! - the *restorer* decompresses data frames and, for each reference run, reads the pages
//!   from the disk image (contiguous disk ranges in one read) and checks the hash. It runs
//!   ahead of emission by the channel's depth, so the link never waits on the disk;
//! - the *emitter* (the caller's thread) writes to QEMU in the sender's order. A run whose
//!   hash failed (stale disk, guest write after the map was taken, read error) is not
//!   emitted until the sender's original bytes for it arrived (DESIGN.md invariants 1
//!   and 2); frames that arrive meanwhile are held back, in order. For a failed run hash
//!   the emitter first asks for the run's per-page hashes and fetches only the pages that
//!   differ (or could not be read); the fetched originals are checked against their page
//!   hashes and the assembled run against its run hash before anything is emitted. The
//!   emitter acks runs so the sender can drop its originals.

use super::stream::{Decoder, Recorder};
use super::wire::{
    hash_page, read_frame, write_frame, Frame, PageRefs, WireError, WireStats, PAGE_SIZE,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tunables of the receiver.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Frames between the reader and the restorer.
    pub frame_queue: usize,
    /// Restored items between the restorer and the emitter (the disk read-ahead).
    pub restore_queue: usize,
    /// Ack after this many runs.
    pub ack_every: u64,
    /// After a failed run hash, ask for per-page hashes and fetch only the pages that
    /// differ (otherwise fetch the whole run).
    pub page_hashes: bool,
    /// Keep a copy of the stream given to QEMU in this file (diagnosis).
    pub record: Option<std::path::PathBuf>,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            frame_queue: 16,
            restore_queue: 32,
            ack_every: 32,
            page_hashes: true,
            record: None,
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
}

/// What the restorer hands the emitter.
enum Item {
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

fn fail(slot: &Failure, e: RecvError) {
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    if s.is_none() {
        *s = Some(e);
    }
}

/// Reads `refs`' pages from `disk`; returns the bytes (zeros where unreadable) and the
/// number of unreadable pages.
pub fn read_pages(disk: &File, refs: &PageRefs) -> (Vec<u8>, Vec<bool>) {
    let n = refs.pages.len();
    let mut data = vec![0u8; n * PAGE_SIZE];
    let mut ok = vec![true; n];
    let mut i = 0;
    while i < n {
        // The longest stretch of pages that are contiguous on disk.
        let mut j = i + 1;
        while j < n && refs.pages[j].disk_offset == refs.pages[j - 1].disk_offset + PAGE_SIZE as u64
        {
            j += 1;
        }
        let buf = &mut data[i * PAGE_SIZE..j * PAGE_SIZE];
        if disk.read_exact_at(buf, refs.pages[i].disk_offset).is_err() {
            // Page by page, to find out which ones fail.
            for k in i..j {
                let b = &mut data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                if disk.read_exact_at(b, refs.pages[k].disk_offset).is_err() {
                    b.fill(0);
                    ok[k] = false;
                }
            }
        }
        i = j;
    }
    (data, ok)
}

fn page_views(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(PAGE_SIZE).collect()
}

/// Runs one migration's receiver side. `tcp` has completed the hello exchange; `qemu` is
/// connected to the destination QEMU's incoming socket. Returns once the whole stream was
/// written to QEMU (the caller then waits for QEMU to finish loading and reports back).
pub fn receive(
    tcp: TcpStream,
    disk: File,
    mut qemu: UnixStream,
    opts: &ReceiverOptions,
    wire_stats: WireStats,
) -> Result<(ReceiverReport, WireStats), RecvError> {
    let failure: Failure = Arc::default();
    let stats = Arc::new(Mutex::new(wire_stats));
    let (ftx, frx) = sync_channel::<Frame>(opts.frame_queue);
    let (itx, irx) = sync_channel::<Item>(opts.restore_queue);
    let restore_time = Arc::new(Mutex::new(Duration::ZERO));

    let reader = {
        let mut tcp = tcp.try_clone().map_err(RecvError::Io)?;
        let (failure, stats) = (failure.clone(), stats.clone());
        std::thread::Builder::new()
            .name("pct-recv-reader".into())
            .spawn(move || loop {
                match read_frame(&mut tcp, super::wire::MAX_PAYLOAD) {
                    Ok(Some((f, n))) => {
                        stats.lock().unwrap_or_else(|p| p.into_inner()).count(&f, n);
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
        let (failure, restore_time) = (failure.clone(), restore_time.clone());
        std::thread::Builder::new()
            .name("pct-recv-restorer".into())
            .spawn(move || {
                for f in frx {
                    let item = match f {
                        Frame::Data(p) => match p.decompress() {
                            Ok(b) => Item::Bytes(b),
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
                            *restore_time.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed();
                            Item::Run {
                                refs,
                                data,
                                bad,
                                unreadable,
                            }
                        }
                        Frame::FallbackData {
                            run, first, data, ..
                        } => match data.decompress() {
                            Ok(d) => Item::Fallback {
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
                        } => Item::PageHashes {
                            run,
                            first,
                            count,
                            hash_len,
                            hashes,
                        },
                        Frame::End { stream_bytes, runs } => Item::End { stream_bytes, runs },
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

    let mut control = tcp.try_clone().map_err(RecvError::Io)?;
    let emitted = emit(&mut qemu, &mut control, &irx, &stats, opts, &failure);
    drop(irx);
    if emitted.is_err() {
        let _ = tcp.shutdown(Shutdown::Both);
    }
    let mut report = match emitted {
        Ok(r) => r,
        Err(e) => {
            let _ = restorer.join();
            let _ = reader.join();
            let first = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(first.unwrap_or(e));
        }
    };
    // Reader and restorer stay blocked on the socket until the sender closes it (after
    // `Complete`); they end on their own and are not joined.
    drop((reader, restorer));
    report.restore_seconds = restore_time
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_secs_f64();
    let s = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.data_raw = s.passthrough_raw;
    report.data_wire = s.passthrough_wire;
    Ok((report, s))
}

/// Sends a frame on the control path (fallback requests, acks).
fn control(tcp: &mut TcpStream, stats: &Mutex<WireStats>, f: &Frame) -> Result<(), RecvError> {
    let n = write_frame(tcp, f)?;
    stats.lock().unwrap_or_else(|p| p.into_inner()).count(f, n);
    Ok(())
}

/// The emitter: writes the stream to QEMU in order.
fn emit(
    qemu: &mut UnixStream,
    tcp: &mut TcpStream,
    rx: &Receiver<Item>,
    stats: &Mutex<WireStats>,
    opts: &ReceiverOptions,
    failure: &Failure,
) -> Result<ReceiverReport, RecvError> {
    let mut r = ReceiverReport::default();
    let mut held: VecDeque<Item> = VecDeque::new();
    // RAM block names, learnt from the MEM_SIZE record in what we emit.
    let mut probe = Some(Decoder::new());
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(1 << 20);
    let mut acked = 0u64;
    let mut recorder = match &opts.record {
        Some(p) => Some(Recorder::create(p).map_err(RecvError::Io)?),
        None => None,
    };
    let next = |held: &mut VecDeque<Item>| -> Result<Item, RecvError> {
        if let Some(i) = held.pop_front() {
            return Ok(i);
        }
        rx.recv().map_err(|_| {
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or(RecvError::Closed)
        })
    };
    let mut write = |bytes: &[u8], r: &mut ReceiverReport, names: &mut Vec<String>| {
        qemu.write_all(bytes).map_err(RecvError::Qemu)?;
        if let Some(rec) = recorder.as_mut() {
            rec.record(bytes).map_err(RecvError::Io)?;
        }
        r.stream_bytes += bytes.len() as u64;
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
        match next(&mut held)? {
            Item::Bytes(b) => write(&b, &mut r, &mut names)?,
            Item::Run {
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
                        tcp,
                        stats,
                        rx,
                        held: &mut held,
                        failure,
                    };
                    fetched = restore_failed(
                        &mut link,
                        &refs,
                        run_no,
                        &bad,
                        &unreadable,
                        &mut data,
                        opts.page_hashes,
                        &mut r,
                    )?;
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
                if r.runs - acked >= opts.ack_every {
                    control(tcp, stats, &Frame::Ack { runs: r.runs })?;
                    acked = r.runs;
                }
            }
            Item::Fallback { run, .. } | Item::PageHashes { run, .. } => {
                return Err(RecvError::Protocol(format!(
                    "fallback data or page hashes for run {run}, which were not requested"
                )))
            }
            Item::End { stream_bytes, runs } => {
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
                if r.runs > acked {
                    control(tcp, stats, &Frame::Ack { runs: r.runs })?;
                }
                return Ok(r);
            }
        }
    }
}

/// What the emitter needs to ask the sender something and wait for the answer.
struct Link<'a> {
    tcp: &'a mut TcpStream,
    stats: &'a Mutex<WireStats>,
    rx: &'a Receiver<Item>,
    /// Items that arrived while waiting, in order.
    held: &'a mut VecDeque<Item>,
    failure: &'a Failure,
}

impl Link<'_> {
    fn send(&mut self, f: &Frame) -> Result<(), RecvError> {
        control(self.tcp, self.stats, f)
    }

    /// The next reply (fallback data or page hashes); everything else that arrives first
    /// is held back, in order.
    fn reply(&mut self) -> Result<Item, RecvError> {
        loop {
            let item = self.rx.recv().map_err(|_| {
                self.failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .unwrap_or(RecvError::Closed)
            })?;
            match item {
                Item::Fallback { .. } | Item::PageHashes { .. } => return Ok(item),
                other => self.held.push_back(other),
            }
        }
    }
}

/// Makes `data` (run `run_no`, read from disk) match `refs`' hashes: `bad` are the pages
/// that failed the check (all of them for a failed run hash), `unreadable` those the disk
/// would not give. For a failed run hash (with `page_hashes`), asks for the run's per-page
/// hashes and fetches only the pages that differ from them; otherwise fetches `bad`. The
/// fetched originals must match their page hashes, and the run its run hash, else the rest
/// of the run is fetched too; the result must match or this fails. Returns the number of
/// pages fetched.
#[allow(clippy::too_many_arguments)]
fn restore_failed(
    link: &mut Link<'_>,
    refs: &PageRefs,
    run_no: u64,
    bad: &[usize],
    unreadable: &[usize],
    data: &mut [u8],
    page_hashes: bool,
    report: &mut ReceiverReport,
) -> Result<usize, RecvError> {
    let n = refs.pages.len();
    let len = refs.hash_len as usize;
    let mut fetched = vec![false; n];
    let mut want: Vec<usize> = bad.to_vec();
    let mut hashes: Option<Vec<u8>> = None;
    if page_hashes && refs.run_hash() && bad.len() == n {
        report.hash_requests += 1;
        let h = fetch_page_hashes(link, run_no, n, refs.hash_len)?;
        want = (0..n)
            .filter(|&i| {
                unreadable.contains(&i)
                    || hash_page(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], len)
                        != h[i * len..(i + 1) * len]
            })
            .collect();
        hashes = Some(h);
    }
    fetch_originals(link, run_no, &want, data)?;
    for &i in &want {
        fetched[i] = true;
    }
    let originals_match = hashes.as_ref().map_or(true, |h| {
        want.iter().all(|&i| {
            hash_page(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], len) == h[i * len..(i + 1) * len]
        })
    });
    if !originals_match {
        return Err(RecvError::Protocol(format!(
            "the sender's original bytes for run {run_no} do not match its page hashes"
        )));
    }
    if !refs.verify(&page_views(data)).is_empty() {
        // The page hashes agreed with pages the run hash refuses: take the whole run.
        let rest: Vec<usize> = (0..n).filter(|&i| !fetched[i]).collect();
        if !rest.is_empty() {
            fetch_originals(link, run_no, &rest, data)?;
            for i in rest {
                fetched[i] = true;
            }
        }
        if !refs.verify(&page_views(data)).is_empty() {
            return Err(RecvError::Protocol(format!(
                "the sender's original bytes for run {run_no} do not match its hash"
            )));
        }
    }
    Ok(fetched.iter().filter(|f| **f).count())
}

/// Asks for the per-page hashes of the `n` pages of run `run_no` and waits for them.
fn fetch_page_hashes(
    link: &mut Link<'_>,
    run_no: u64,
    n: usize,
    hash_len: u8,
) -> Result<Vec<u8>, RecvError> {
    link.send(&Frame::HashRequest {
        run: run_no,
        first: 0,
        count: n as u32,
    })?;
    match link.reply()? {
        Item::PageHashes {
            run,
            first: 0,
            count,
            hash_len: l,
            hashes,
        } if run == run_no && count as usize == n && l == hash_len => Ok(hashes),
        Item::PageHashes { run, .. } | Item::Fallback { run, .. } => {
            Err(RecvError::Protocol(format!(
                "got a reply for run {run} that does not answer the hash request for run {run_no}"
            )))
        }
        _ => Err(RecvError::Protocol("unexpected item".into())),
    }
}

/// Asks for the original bytes of pages `bad` of run `run_no` and waits for them,
/// holding back everything else that arrives meanwhile.
fn fetch_originals(
    link: &mut Link<'_>,
    run_no: u64,
    bad: &[usize],
    data: &mut [u8],
) -> Result<(), RecvError> {
    // Contiguous ranges of bad pages, one request each.
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &i in bad {
        match ranges.last_mut() {
            Some((f, c)) if (*f + *c) as usize == i => *c += 1,
            _ => ranges.push((i as u32, 1)),
        }
    }
    for &(first, count) in &ranges {
        link.send(&Frame::FallbackRequest {
            run: run_no,
            first,
            count,
        })?;
    }
    while !ranges.is_empty() {
        match link.reply()? {
            Item::Fallback {
                run,
                first,
                data: d,
            } if run == run_no => {
                let Some(k) = ranges
                    .iter()
                    .position(|&(f, c)| f == first && c as usize * PAGE_SIZE == d.len())
                else {
                    return Err(RecvError::Protocol(format!(
                        "fallback data for run {run} page {first} does not match a request"
                    )));
                };
                ranges.swap_remove(k);
                let at = first as usize * PAGE_SIZE;
                data[at..at + d.len()].copy_from_slice(&d);
            }
            Item::Fallback { run, .. } | Item::PageHashes { run, .. } => {
                return Err(RecvError::Protocol(format!(
                    "fallback data or page hashes for run {run} while waiting for the \
                     originals of run {run_no}"
                )))
            }
            _ => return Err(RecvError::Protocol("unexpected item".into())),
        }
    }
    Ok(())
}
