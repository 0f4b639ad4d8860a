//! The switchover check: at the moment QEMU stops the source guest for good, does the
//! stream hold the guest's RAM as it is?
//!
//! Precopy is only as good as QEMU's dirty tracking: a guest write that QEMU does not see
//! is never re-sent, and the destination resumes with the old bytes. QEMU 7.2 under TCG
//! loses such writes (the word-at-a-time bitmap sync clears dirty bits without making the
//! vCPU's TLB trap the next write again; fixed upstream in QEMU 9.0, commit 03bfc2188f
//! "physmem: Fix migration dirty bitmap coherency with TCG memory access"). Measured on the
//! lab's db guest with stock QEMU migrating into a file (`tools/qemu-lost-writes.sh`): in
//! 2 of 8 migrations, 9 and 49 pages of the stopped source differed from their last record
//! in the stream.
//!
//! The sender remembers a hash of the last content it forwarded for every page of the main
//! RAM block. When the `ram` section's END part is over (its EOS, with the guest stopped
//! since QEMU began that part), it hashes every page of the live RAM block and re-sends,
//! as ordinary `PAGE` records before that EOS, each page whose content is not the one the
//! destination is about to hold. The destination then holds the source's RAM exactly,
//! whatever the dirty tracking missed. The cost is one pass over guest RAM during the
//! downtime (xxh3 at memory speed: about 60 ms per GiB here), so it is on by default only
//! for TCG sources.
//!
//! Most of that pass can move out of the downtime. Chunk by chunk behind QEMU's first
//! pass, a thread drops the chunk's entries from a [`TouchLog`] (QEMU's page table entries
//! for the RAM file) and hashes its pages right after: the *baseline*; then it refreshes
//! the pages QEMU touched since. At the switchover only the pages the log says QEMU's
//! process touched since are hashed again; every other page still holds its baseline
//! content. Where no log can be kept, or a chunk was not done in time, those pages are
//! hashed, and the report says why.

use super::stream::{put_page, EncodeError, RamBlock, RamRecord, Record};
use crate::memory::ondemand::ProcessMem;
use crate::memory::GuestMemory;
use crate::qemu::ram::ProcessRam;
use crate::qemu::touched::TouchLog;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::xxh3_64;

const PAGE: u64 = 4096;

/// The page hash the check compares; 0 is kept for "never sent".
fn page_hash(data: &[u8]) -> u64 {
    xxh3_64(data).max(1)
}

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SwitchoverReport {
    /// Pages of the block compared with the stopped guest's RAM.
    pub pages_checked: u64,
    /// Pages hashed at the switchover: those the touch log holds, or every page (see
    /// `scope`).
    pub pages_hashed: u64,
    /// Which pages were hashed at the switchover: "touched" (those QEMU's process touched
    /// since the baseline) or "all: WHY", with why no touch log served.
    pub scope: String,
    /// Time the baseline took (dropping QEMU's entries, then hashing every page), during
    /// the live phase; zero where there was none.
    #[serde(serialize_with = "as_ms")]
    pub baseline_time: Duration,
    /// Refresh rounds the baseline ran (pages QEMU touched, dropped and hashed again).
    pub baseline_refreshes: u32,
    /// Pages whose last record did not hold the guest's content: re-sent.
    pub pages_resent: u64,
    /// Pages QEMU never sent (left alone: QEMU had its reasons, e.g. a discarded range).
    pub pages_never_sent: u64,
    /// Time from the END part's EOS until the check was done: what it added to the
    /// downtime.
    #[serde(serialize_with = "as_ms")]
    pub time: Duration,
    /// Time spent hashing the stopped guest's RAM, from the END part's start (it overlaps
    /// the END part's transfer).
    #[serde(serialize_with = "as_ms")]
    pub hash_time: Duration,
    /// For a guest whose RAM is anonymous memory of QEMU: the time reading the stopped
    /// guest's RAM block through `/proc/PID/mem` took (part of `hash_time`; of the threads
    /// that read and hashed it in turns, the longest).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_ms_opt")]
    pub read_time: Option<Duration>,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn as_ms_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => as_ms(d, s),
        None => s.serialize_none(),
    }
}

/// Follows the stream for one RAM block and checks it against the live RAM at switchover.
pub struct SwitchoverCheck<'a> {
    ram: LiveRam<'a>,
    /// The block's name and its index in the `MEM_SIZE` list, once announced.
    name: String,
    block: Option<usize>,
    /// Per page, the hash of the last content forwarded (0: never sent).
    sent: Vec<u64>,
    done: bool,
    /// The hash of a zero page (nearly every `ZERO` record's), computed once.
    zero_page: u64,
    /// QEMU's pid and RAM file, for a touch log; or why none is to be kept.
    touch: Result<(u32, PathBuf), String>,
    /// Per chunk of [`CHUNK`] pages, how many QEMU has sent at least once.
    chunk_sent: Vec<u32>,
    /// Chunks QEMU sent every page of, for the baseline thread (the receiving end is
    /// `ready_rx` until [`baseline`](Self::baseline) takes it).
    ready: Option<mpsc::Sender<usize>>,
    ready_rx: Option<mpsc::Receiver<usize>>,
    baseline_due: bool,
    /// What the baseline thread found so far.
    baseline: Arc<Mutex<Baseline>>,
    /// Tells the baseline thread that the switchover has come.
    cancel: Arc<AtomicBool>,
}

/// Where the check reads the guest's RAM block.
enum LiveRam<'a> {
    /// A live view: QEMU's shared RAM file, mapped.
    Mapped(&'a GuestMemory),
    /// QEMU's anonymous memory: read through `/proc/PID/mem` once the guest is stopped.
    Process(ProcessRam),
}

impl LiveRam<'_> {
    fn len(&self) -> u64 {
        match self {
            LiveRam::Mapped(ram) => ram.live_block_len().unwrap_or(0),
            LiveRam::Process(p) => p.len,
        }
    }
}

/// Why the check could not be done: the migration fails and the source runs on.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("reading the stopped guest's RAM: {0}")]
    Read(String),
}

/// Pages per baseline chunk (8 MiB): the baseline takes a chunk once QEMU has sent every
/// page of it, so it trails QEMU's first pass over RAM.
const CHUNK: usize = 2048;

/// The check's baseline, as far as it got: a touch log, and per chunk dropped from it, its
/// pages' hashes right after the drop.
#[derive(Debug, Default)]
struct Baseline {
    /// `None` until the baseline thread started; an error says why it keeps no log.
    log: Option<Result<Arc<TouchLog>, String>>,
    /// Per page (valid in chunks marked done, for pages not marked stale).
    hashes: Vec<u64>,
    done: Vec<bool>,
    /// Pages a refresh round is dropping and hashing again: their `hashes` may be older
    /// than their entries' drop.
    stale: Vec<bool>,
    /// Time the thread spent on chunks and refresh rounds, and how many rounds it ran.
    time: Duration,
    refreshes: u32,
}

/// How often the baseline thread, once idle, takes again the pages QEMU touched since
/// (so that fewer are left to hash at the switchover), and the fewest it bothers with.
const REFRESH_EVERY: Duration = Duration::from_millis(150);
const REFRESH_MIN_PAGES: usize = 256;

impl<'a> SwitchoverCheck<'a> {
    /// A check of the RAM block `ram` is a live view of; `None` if it is not a live view
    /// (an image, or a copy taken through /proc/PID/mem).
    pub fn new(ram: &'a GuestMemory) -> Option<SwitchoverCheck<'a>> {
        Some(SwitchoverCheck::with_ram(
            ram.live_block()?.to_owned(),
            LiveRam::Mapped(ram),
        ))
    }

    /// A check of a RAM block that is anonymous memory of QEMU's process: no baseline (no
    /// RAM file to keep a touch log of); at the switchover the stopped guest's block is
    /// read through `/proc/PID/mem` and every page hashed.
    pub fn for_process(ram: ProcessRam) -> SwitchoverCheck<'a> {
        let name = ram.block.clone();
        let pid = ram.pid;
        let mut c = SwitchoverCheck::with_ram(name, LiveRam::Process(ram));
        c.touch = Err(format!(
            "the guest's RAM is anonymous memory of QEMU (pid {pid}), read through \
             /proc/{pid}/mem with the guest stopped"
        ));
        c
    }

    fn with_ram(name: String, ram: LiveRam<'a>) -> SwitchoverCheck<'a> {
        SwitchoverCheck {
            name,
            ram,
            block: None,
            sent: Vec::new(),
            done: false,
            zero_page: page_hash(&[0; PAGE as usize]),
            touch: Err("no touch log was asked for".into()),
            chunk_sent: Vec::new(),
            ready: None,
            ready_rx: None,
            baseline_due: false,
            baseline: Arc::default(),
            cancel: Arc::default(),
        }
    }

    /// Keeps a touch log of QEMU's process `pid`, which maps the block from `file`
    /// (or, where `touch` is an error, says why none is kept and hashes every page).
    pub fn with_touch_log(mut self, touch: Result<(u32, PathBuf), String>) -> Self {
        if let LiveRam::Mapped(_) = self.ram {
            self.touch = touch;
        }
        self
    }

    /// Whether [`baseline`](Self::baseline) is to be started now: QEMU has sent every page
    /// of a chunk, and no baseline was started.
    pub fn baseline_due(&self) -> bool {
        self.baseline_due && self.ready_rx.is_some() && !self.done
    }

    /// The baseline, to run on its own thread while the guest runs on, until the
    /// switchover: for each chunk QEMU has sent in full, drops the chunk's entries from the
    /// touch log and hashes its pages. When no chunk is waiting, every [`REFRESH_EVERY`] it
    /// drops and hashes again the pages of done chunks that QEMU touched since
    /// ([`refresh`]).
    pub fn baseline(&mut self) -> impl FnOnce() + Send + 'a {
        let rx = self.ready_rx.take();
        let ram = match self.ram {
            LiveRam::Mapped(ram) => Some(ram),
            LiveRam::Process(_) => None,
        };
        let (pages, touch) = (self.sent.len(), self.touch.clone());
        let (state, cancel) = (self.baseline.clone(), self.cancel.clone());
        move || {
            // Only a mapped block has a touch log ([`with_touch_log`]).
            let Some(ram) = ram else {
                return;
            };
            let started = touch
                .and_then(|(pid, file)| TouchLog::start(pid, &file, ram, pages as u64 * PAGE))
                .map(Arc::new);
            let log = {
                let mut st = lock(&state);
                st.hashes = vec![0; pages];
                st.done = vec![false; pages.div_ceil(CHUNK)];
                st.stale = vec![false; pages];
                st.log = Some(started.clone());
                started
            };
            let (Ok(log), Some(rx)) = (log, rx) else {
                return;
            };
            let mut refreshed = Instant::now();
            while !cancel.load(Ordering::Relaxed) {
                let c = match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(c) => c,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if refreshed.elapsed() >= REFRESH_EVERY {
                            refresh(ram, &log, &state, &cancel);
                            refreshed = Instant::now();
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let t = Instant::now();
                let (first, count) = (c * CHUNK, CHUNK.min(pages - c * CHUNK));
                if let Err(e) = log.drop_entries(ram, first, count) {
                    lock(&state).log = Some(Err(e));
                    return;
                }
                let Some((h, _)) = hash_block(ram, first..first + count, &|_| None, &cancel) else {
                    return;
                };
                let mut st = lock(&state);
                // Past the switchover the hasher has taken the state: nothing to add to.
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                st.hashes[first..first + count].copy_from_slice(&h);
                st.done[c] = true;
                st.time += t.elapsed();
            }
        }
    }

    /// Notes `rec` (in stream order). At the EOS that ends the `ram` section's END part
    /// ([`stream::Switchover`](super::stream::Switchover) says which), call
    /// [`repair`](Self::repair) before forwarding it.
    pub fn observe(&mut self, rec: &Record<'_>) {
        match rec {
            Record::Ram(RamRecord::MemSize { blocks, .. }) if self.block.is_none() => {
                self.announce(blocks)
            }
            Record::Ram(RamRecord::Page { page, data }) if Some(page.block) == self.block => {
                self.note(page.offset, page_hash(data))
            }
            Record::Ram(RamRecord::Zero { page, fill }) if Some(page.block) == self.block => {
                let hash = match fill {
                    0 => self.zero_page,
                    f => page_hash(&[*f; PAGE as usize]),
                };
                self.note(page.offset, hash)
            }
            _ => {}
        }
    }

    /// Notes a page pct itself re-sends (an elided free page the stopped guest no longer
    /// has free) with `data`, before [`repair`](Self::repair).
    pub fn note_resent(&mut self, offset: u64, data: &[u8]) {
        if self.block.is_some() {
            self.note(offset, page_hash(data));
        }
    }

    /// Whether [`repair`](Self::repair) has run.
    pub fn done(&self) -> bool {
        self.done
    }

    fn announce(&mut self, blocks: &[RamBlock]) {
        if let Some(i) = blocks.iter().position(|b| b.name == self.name) {
            self.block = Some(i);
            // Pages past the RAM file cannot be checked; the stream's length is QEMU's word,
            // the file's is the kernel's: keep the smaller.
            let len = blocks[i].used_length.min(self.ram.len());
            self.sent = vec![0; (len / PAGE) as usize];
            self.chunk_sent = vec![0; self.sent.len().div_ceil(CHUNK)];
            if self.touch.is_ok() {
                let (tx, rx) = mpsc::channel();
                (self.ready, self.ready_rx) = (Some(tx), Some(rx));
            }
        }
    }

    fn note(&mut self, offset: u64, hash: u64) {
        let Some(i) = usize::try_from(offset / PAGE)
            .ok()
            .filter(|&i| i < self.sent.len())
        else {
            return;
        };
        if self.sent[i] == 0 {
            let c = i / CHUNK;
            self.chunk_sent[c] += 1;
            let size = CHUNK.min(self.sent.len() - c * CHUNK);
            if self.chunk_sent[c] as usize == size {
                if let Some(tx) = &self.ready {
                    // The baseline thread may be gone (it stopped at an error): no matter.
                    let _ = tx.send(c);
                    self.baseline_due = true;
                }
            }
        }
        self.sent[i] = hash;
    }

    /// The hashing half of the check, to run (on its own thread) once the guest is
    /// stopped: the `ram` section's END part may still be on its way meanwhile. Stops the
    /// baseline, then hashes the pages its touch log holds as touched and those of chunks
    /// it did not get to, and takes the others' hashes from it; without a baseline, hashes
    /// every page of the live block. Uses as many threads as the host has cores (up to 8):
    /// the guest's vCPUs are stopped, and the check is downtime.
    pub fn hasher(&self) -> impl FnOnce() -> LiveHashes + Send + 'a {
        let pages = self.sent.len();
        let source = match &self.ram {
            LiveRam::Mapped(ram) => LiveRam::Mapped(ram),
            LiveRam::Process(p) => LiveRam::Process(p.clone()),
        };
        self.cancel.store(true, Ordering::Relaxed);
        let baseline = std::mem::take(&mut *lock(&self.baseline));
        let started = self.ready_rx.is_none();
        let why_none = match &self.touch {
            Err(why) => why.clone(),
            Ok(_) if !started => "QEMU had sent no chunk of RAM in full".into(),
            Ok(_) => "the baseline had not started".into(),
        };
        move || {
            let t = Instant::now();
            let ram = match source {
                LiveRam::Mapped(ram) => ram,
                LiveRam::Process(process) => return hash_process(&process, pages, why_none, t),
            };
            let done = |i: usize| {
                baseline.done.get(i / CHUNK).copied().unwrap_or(false)
                    && !baseline.stale.get(i).copied().unwrap_or(true)
            };
            let log = match baseline.log {
                Some(Ok(log)) if (0..pages).any(done) => Ok(log),
                Some(Ok(_)) => Err("the baseline had finished no chunk".to_owned()),
                Some(Err(why)) => Err(why),
                None => Err(why_none),
            };
            let never = AtomicBool::new(false);
            let (known, scope): (Box<dyn Fn(usize) -> Option<u64> + Sync>, _) =
                match log.and_then(|l| l.touched(ram)) {
                    Ok(touched) => (
                        Box::new(move |i| {
                            (done(i) && !touched.get(i).copied().unwrap_or(true))
                                .then(|| baseline.hashes[i])
                        }),
                        "touched".to_owned(),
                    ),
                    Err(why) => (Box::new(|_| None), format!("all: {why}")),
                };
            let (hashes, hashed) = hash_block(ram, 0..pages, &*known, &never).unwrap_or_default();
            LiveHashes {
                hashes,
                hashed,
                scope,
                baseline_time: baseline.time,
                baseline_refreshes: baseline.refreshes,
                time: t.elapsed(),
                ..LiveHashes::default()
            }
        }
    }

    /// Compares every page sent so far with `live` (the stopped guest's RAM, from
    /// [`hasher`](Self::hasher)), and appends a `PAGE` record to `out` for each one that
    /// differs. Call once, at the END part's EOS.
    pub fn repair_with(
        &mut self,
        live: LiveHashes,
        out: &mut Vec<u8>,
    ) -> Result<SwitchoverReport, CheckError> {
        let t = Instant::now();
        self.done = true;
        if let Some(e) = live.error {
            return Err(CheckError::Read(e));
        }
        // The pages to re-send come from where they were hashed.
        let ram = match (&live.process, &self.ram) {
            (Some(process), _) => Resend::Process(process),
            (None, LiveRam::Mapped(ram)) => Resend::Mapped(ram),
            (None, LiveRam::Process(_)) => {
                return Err(CheckError::Read(
                    "the stopped guest's RAM was not read".into(),
                ))
            }
        };
        let mut buf = vec![0; PAGE as usize];
        let mut r = SwitchoverReport {
            hash_time: live.time,
            pages_hashed: live.hashed,
            scope: live.scope,
            baseline_time: live.baseline_time,
            baseline_refreshes: live.baseline_refreshes,
            read_time: live.read_time,
            ..SwitchoverReport::default()
        };
        for (i, (&sent, &now)) in self.sent.iter().zip(&live.hashes).enumerate() {
            if sent == 0 {
                r.pages_never_sent += 1;
                continue;
            }
            if now == 0 {
                continue; // past the RAM file
            }
            r.pages_checked += 1;
            if now == sent {
                continue;
            }
            let offset = i as u64 * PAGE;
            let page = match ram {
                Resend::Mapped(ram) => match ram.live_block_page(offset) {
                    Some(page) => page,
                    None => continue,
                },
                // The guest is stopped: the page is as it was hashed.
                Resend::Process(process) => {
                    process.read_at(offset, &mut buf).map_err(|e| {
                        CheckError::Read(format!(
                            "page {offset:#x} of RAM block {} from {}: {e}",
                            self.name,
                            process.path().display()
                        ))
                    })?;
                    &buf[..]
                }
            };
            // The first names the block, the rest continue it.
            let name = (r.pages_resent == 0).then_some(self.name.as_str());
            put_page(out, name, offset, page)?;
            r.pages_resent += 1;
        }
        r.time = t.elapsed();
        Ok(r)
    }

    /// [`hasher`](Self::hasher) and [`repair_with`](Self::repair_with) in one go, with
    /// the guest stopped.
    pub fn repair(&mut self, out: &mut Vec<u8>) -> Result<SwitchoverReport, CheckError> {
        let t = Instant::now();
        let live = self.hasher()();
        let mut r = self.repair_with(live, out)?;
        r.time = t.elapsed();
        Ok(r)
    }
}

/// The hasher for a block of QEMU's anonymous memory: reads the stopped guest's block
/// through `/proc/PID/mem` in pieces of 8 MiB on up to 8 threads, and hashes every page as
/// it goes, keeping nothing but the hashes (the pages to re-send are read again: the guest
/// stays stopped). `scope` says why every page is hashed.
fn hash_process(process: &ProcessRam, pages: usize, scope: String, t: Instant) -> LiveHashes {
    let failed = |error: String| LiveHashes {
        error: Some(error),
        time: t.elapsed(),
        ..LiveHashes::default()
    };
    let mem = match process.memory() {
        Ok(m) => m,
        Err(e) => return failed(e.to_string()),
    };
    const PIECE_PAGES: usize = 2048;
    let in_block = pages.min((mem.len() / PAGE) as usize);
    let parts = on_threads(0..in_block, |part| {
        let mut buf = vec![0; PIECE_PAGES * PAGE as usize];
        let (mut out, mut read) = (Vec::with_capacity(part.len()), Duration::ZERO);
        for start in part.clone().step_by(PIECE_PAGES) {
            let n = PIECE_PAGES.min(part.end - start);
            let bytes = &mut buf[..n * PAGE as usize];
            let r = Instant::now();
            mem.read_at(start as u64 * PAGE, bytes)?;
            read += r.elapsed();
            out.extend(bytes.chunks(PAGE as usize).map(page_hash));
        }
        Ok::<_, std::io::Error>((out, read))
    });
    let (mut hashes, mut read_time) = (Vec::with_capacity(pages), Duration::ZERO);
    for part in parts {
        match part {
            Ok((h, read)) => {
                hashes.extend(h);
                read_time = read_time.max(read);
            }
            Err(e) => {
                return failed(format!(
                    "reading RAM block {} from {}: {e}",
                    process.block,
                    mem.path().display()
                ))
            }
        }
    }
    // Past the block: 0, as for a RAM file.
    hashes.resize(pages, 0);
    LiveHashes {
        hashes,
        hashed: in_block as u64,
        scope: format!("all: {scope}"),
        time: t.elapsed(),
        read_time: Some(read_time),
        process: Some(mem),
        ..LiveHashes::default()
    }
}

/// One refresh round of the baseline: the pages of done chunks that QEMU's process touched
/// since their entries were dropped are marked stale, dropped again, hashed again, and
/// published. The stale mark goes first (under the lock, before any entry is dropped): a
/// hasher that takes the state mid-round hashes those pages itself, since their old
/// hashes predate the drop its touch log now counts from. A failed round leaves them stale.
fn refresh(ram: &GuestMemory, log: &TouchLog, state: &Mutex<Baseline>, cancel: &AtomicBool) {
    let t = Instant::now();
    let Ok(touched) = log.qemu_touched() else {
        return;
    };
    let pages: Vec<usize> = {
        let mut st = lock(state);
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        let pages: Vec<usize> = (0..touched.len())
            .filter(|&i| touched[i] && st.done.get(i / CHUNK).copied().unwrap_or(false))
            .collect();
        if pages.len() < REFRESH_MIN_PAGES {
            return;
        }
        for &i in &pages {
            st.stale[i] = true;
        }
        pages
    };
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for &i in &pages {
        match ranges.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => ranges.push(i..i + 1),
        }
    }
    if log.drop_again(ram, &ranges).is_err() {
        return;
    }
    let mut hashes = Vec::with_capacity(pages.len());
    for (n, &i) in pages.iter().enumerate() {
        if n % 1024 == 0 && cancel.load(Ordering::Relaxed) {
            return;
        }
        hashes.push(live_page_hash(ram, i));
    }
    let mut st = lock(state);
    if cancel.load(Ordering::Relaxed) {
        return;
    }
    for (&i, h) in pages.iter().zip(hashes) {
        st.hashes[i] = h;
        st.stale[i] = false;
    }
    st.time += t.elapsed();
    st.refreshes += 1;
}

/// Locks `m`; a thread that panicked holding it left only hashes behind, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The hash of every page of the live block at one moment (0: past the RAM file).
#[derive(Default)]
pub struct LiveHashes {
    hashes: Vec<u64>,
    /// Of them, hashed at that moment (the others came from the baseline).
    hashed: u64,
    scope: String,
    baseline_time: Duration,
    baseline_refreshes: u32,
    time: Duration,
    /// For a block of QEMU's anonymous memory: where the stopped guest's block was read
    /// (to read the pages to re-send again), and the time the reads took (part of
    /// `time`).
    process: Option<ProcessMem>,
    read_time: Option<Duration>,
    /// Why the stopped guest's RAM could not be read.
    error: Option<String>,
}

/// Where [`SwitchoverCheck::repair_with`] takes the pages to re-send.
enum Resend<'r> {
    Mapped(&'r GuestMemory),
    Process(&'r ProcessMem),
}

/// The hash of page `i` of the live block as it is now (0: past the RAM file).
fn live_page_hash(ram: &GuestMemory, i: usize) -> u64 {
    ram.live_block_page(i as u64 * PAGE).map_or(0, page_hash)
}

/// Splits the pages `range` into one part per thread, as many threads as the host has cores
/// (up to 8: the guest's vCPUs are stopped when it matters), runs `work` on each part, and
/// returns the results in page order.
fn on_threads<T: Send>(range: Range<usize>, work: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let per_thread = range.len().div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|s| {
        let workers: Vec<_> = range
            .clone()
            .step_by(per_thread)
            .map(|first| s.spawn(move || work(first..(first + per_thread).min(range.end))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// The hash of each of the live block's pages in `range`, hashed on up to 8 threads;
/// `known(i)` gives page `i`'s hash without reading it, where it can. With the hashes, how
/// many pages were read and hashed. `None` if `stop` was set before the end.
fn hash_block(
    ram: &GuestMemory,
    range: Range<usize>,
    known: &(dyn Fn(usize) -> Option<u64> + Sync),
    stop: &AtomicBool,
) -> Option<(Vec<u64>, u64)> {
    let parts = on_threads(range, |part| {
        let (mut out, mut hashed) = (Vec::with_capacity(part.len()), 0);
        for i in part {
            // Often enough to stop within a millisecond, rarely enough to cost nothing.
            if i % 1024 == 0 && stop.load(Ordering::Relaxed) {
                return None;
            }
            out.push(known(i).unwrap_or_else(|| {
                hashed += 1;
                live_page_hash(ram, i)
            }));
        }
        Some((out, hashed))
    });
    let parts = parts.into_iter().collect::<Option<Vec<_>>>()?;
    let hashed = parts.iter().map(|(_, n)| n).sum();
    Some((parts.into_iter().flat_map(|(h, _)| h).collect(), hashed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::{
        PageAddr, SectionHeader, SectionIdent, SectionKind, Switchover, SwitchoverPoint,
        RAM_SECTION,
    };

    const BLOCK: &str = "ram0";

    /// A 4-page "live" RAM block whose page i is filled with `fill[i]`.
    fn ram(fill: [u8; 4]) -> GuestMemory {
        let mut m = memmap2::MmapMut::map_anon(4 * PAGE as usize).expect("anonymous map");
        for (i, f) in fill.iter().enumerate() {
            m[i * PAGE as usize..(i + 1) * PAGE as usize].fill(*f);
        }
        let m = m.make_read_only().expect("read-only");
        GuestMemory::from_map(m, "test RAM")
            .expect("RAM")
            .into_live_block(BLOCK)
    }

    fn section(kind: SectionKind) -> Record<'static> {
        let ident = matches!(kind, SectionKind::Start).then_some(SectionIdent {
            name: RAM_SECTION,
            instance: 0,
            version: 4,
        });
        Record::Section(SectionHeader { kind, id: 2, ident })
    }

    fn addr(pfn: u64) -> PageAddr<'static> {
        PageAddr {
            block: 0,
            block_name: BLOCK,
            offset: pfn * PAGE,
            continued: false,
        }
    }

    /// Feeds `c` a stream that sent pages 0..3 as `sent` (page 3 never), up to the END
    /// part's EOS (as [`Switchover`] finds it); returns what the check re-sent.
    fn run(mut c: SwitchoverCheck<'_>, sent: [u8; 3]) -> (SwitchoverReport, Vec<u8>) {
        let blocks = [RamBlock {
            name: BLOCK.into(),
            used_length: 4 * PAGE,
            shared_addr: None,
        }];
        let pages: Vec<Vec<u8>> = sent.iter().map(|f| vec![*f; PAGE as usize]).collect();
        let mut at = Switchover::default();
        let mut feed = |c: &mut SwitchoverCheck<'_>, rec: Record<'_>| {
            c.observe(&rec);
            at.observe(&rec)
        };
        let eos = || Record::Ram(RamRecord::Eos);
        assert_eq!(feed(&mut c, section(SectionKind::Start)), None);
        let size = Record::Ram(RamRecord::MemSize {
            total: 4 * PAGE,
            blocks: &blocks,
        });
        assert_eq!(feed(&mut c, size), None);
        assert_eq!(
            feed(&mut c, eos()),
            None,
            "an EOS before the END part is not the switchover"
        );
        assert_eq!(feed(&mut c, section(SectionKind::Part)), None);
        for (i, p) in pages.iter().enumerate() {
            let rec = match p[0] {
                0 => Record::Ram(RamRecord::Zero {
                    page: addr(i as u64),
                    fill: 0,
                }),
                _ => Record::Ram(RamRecord::Page {
                    page: addr(i as u64),
                    data: p,
                }),
            };
            assert_eq!(feed(&mut c, rec), None);
        }
        assert_eq!(feed(&mut c, eos()), None);
        assert_eq!(
            feed(&mut c, section(SectionKind::End)),
            Some(SwitchoverPoint::EndPart),
            "the END part begins the switchover"
        );
        assert_eq!(
            feed(&mut c, eos()),
            Some(SwitchoverPoint::Eos),
            "the END part's EOS is the switchover"
        );
        let mut out = Vec::new();
        assert!(!c.done());
        let r = c.repair(&mut out).expect("repair");
        assert!(c.done());
        assert_eq!(feed(&mut c, eos()), None, "one switchover per stream");
        (r, out)
    }

    /// The guest wrote page 1 after QEMU last sent it and page 2 (sent as a ZERO record)
    /// too; page 0 is as sent; page 3 was never sent: pages 1 and 2 must be re-sent.
    fn assert_repairs_wrong_pages(c: SwitchoverCheck<'_>) -> SwitchoverReport {
        let (r, out) = run(c, [7, 8, 0]);
        assert_eq!(
            (r.pages_checked, r.pages_resent, r.pages_never_sent),
            (3, 2, 1)
        );
        let mut want = Vec::new();
        put_page(&mut want, Some(BLOCK), PAGE, &[9; PAGE as usize]).expect("encode");
        put_page(&mut want, None, 2 * PAGE, &[5; PAGE as usize]).expect("encode");
        assert!(
            out == want,
            "re-sent records are not pages 1 (named) and 2 (continued)"
        );
        r
    }

    #[test]
    fn resends_exactly_the_pages_the_stream_got_wrong() {
        let ram = ram([7, 9, 5, 1]);
        assert_repairs_wrong_pages(SwitchoverCheck::new(&ram).expect("a live view"));
    }

    /// Anonymous RAM: here this process's own memory, read through /proc/self/mem as a
    /// QEMU's would be. Only the hashes are kept; re-sent pages are read again.
    #[test]
    fn resends_from_anonymous_memory_of_a_process() {
        let mut m = memmap2::MmapMut::map_anon(4 * PAGE as usize).expect("anonymous map");
        for (page, f) in m.chunks_mut(PAGE as usize).zip([7, 9, 5, 1]) {
            page.fill(f);
        }
        let regions = vec![crate::memory::Region {
            gpa: 0,
            offset: 0,
            len: 4 * PAGE,
        }];
        let process = ProcessRam::in_process(
            std::process::id(),
            BLOCK.into(),
            m.as_ptr() as u64,
            4 * PAGE,
            regions,
        );
        let r = assert_repairs_wrong_pages(SwitchoverCheck::for_process(process));
        assert!(r.read_time.is_some(), "{r:?}");
        assert!(r.scope.contains("anonymous"), "{}", r.scope);
        assert_eq!(r.pages_hashed, 4);
    }

    #[test]
    fn a_faithful_stream_needs_nothing() {
        let ram = ram([7, 8, 0, 0]);
        let (r, out) = run(SwitchoverCheck::new(&ram).expect("a live view"), [7, 8, 0]);
        assert_eq!((r.pages_checked, r.pages_resent), (3, 0));
        assert!(out.is_empty());
    }

    #[test]
    fn only_live_views_can_be_checked() {
        let m = memmap2::MmapMut::map_anon(PAGE as usize)
            .expect("map")
            .make_read_only()
            .expect("ro");
        let image = GuestMemory::from_map(m, "an image").expect("RAM");
        assert!(SwitchoverCheck::new(&image).is_none());
    }
}
