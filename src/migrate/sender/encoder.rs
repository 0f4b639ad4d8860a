//! The sender's encoder: QEMU's stream in, record by record, frames out (into the
//! [`Outbox`](super::super::flow::Outbox)), in stream order.
//!
//! A `PAGE` record of the mapped RAM block whose page the cache map covers joins a reference
//! run ([`RunBuilder`]), its bytes kept as the run's originals; any other record is added to
//! the current batch of stream bytes, sent as a (compressed) data frame when it is full,
//! before any run, and whenever QEMU's socket has nothing more to read right now. The cache
//! map is taken when the `ram` section's first `MEM_SIZE` record arrives; at the `ram` END
//! part's EOS the switchover check, if any, re-sends what QEMU's dirty tracking missed.

use super::{lock, pack, wait_readable, Pipeline, SendError, SenderOptions, StreamMap};
use crate::migrate::freemap::{ElisionReport, FreeMap};
use crate::migrate::refmap::RefMap;
use crate::migrate::stream::{
    put_page, put_zero, Decoder, Item, PageAddr, RamBlock, RamRecord, Record, Recorder,
    StreamStats, Switchover, SwitchoverPoint,
};
use crate::migrate::switchover::{LiveHashes, SwitchoverCheck, SwitchoverReport};
use crate::migrate::timeline::{now_unix_ms, SenderMarks};
use crate::migrate::wire::{Frame, PageRefs, RunBuilder, Session, PAGE_SIZE};
use crate::qemu::Channel;
use std::sync::atomic::Ordering;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

/// How long the end-to-end window may stay full without an ack before the migration is
/// failed (and cancelled: the source guest keeps running).
const STALL: Duration = Duration::from_secs(120);

fn is_page(rec: &Record<'_>) -> bool {
    matches!(rec, Record::Ram(RamRecord::Page { .. }))
}

/// What the encoder did.
pub(super) struct Encoded {
    pub(super) stream: StreamStats,
    pub(super) ref_pages: u64,
    pub(super) runs: u64,
    pub(super) map_pages: u64,
    pub(super) switchover: Option<SwitchoverReport>,
    pub(super) elision: Option<ElisionReport>,
    pub(super) marks: SenderMarks,
    /// Link bytes sent when the guest stopped.
    pub(super) wire_at_stop: Option<u64>,
}

/// The encoder's state over one stream.
pub(super) struct Encoder<'a, 'g, F> {
    shared: &'a Pipeline,
    opts: &'a SenderOptions,
    /// Asked for the cache map once, at the first `MEM_SIZE` record.
    map: Option<F>,
    /// The mapped block's index in `MEM_SIZE`, and its map.
    refmap: Option<(usize, RefMap)>,
    /// The same block's free pages, if they are elided.
    free: Option<FreeMap<'g>>,
    map_pages: u64,
    check: Option<SwitchoverCheck<'a>>,
    switchover: Option<SwitchoverReport>,
    /// Where the stream is with respect to the switchover.
    at: Switchover,
    marks: SenderMarks,
    /// Stream offset and link bytes when the guest stopped.
    at_stop: Option<(u64, u64)>,
    runs: RunBuilder,
    /// The current run's original bytes.
    run_pages: Vec<u8>,
    /// Stream bytes waiting for a data frame.
    batch: Vec<u8>,
    /// `ZERO` records in the batch (each costs the destination a page).
    batch_zero: u64,
    ref_pages: u64,
    run_count: u64,
    /// Stream bytes pct adds (pages the switchover check re-sent) and removes (the bytes
    /// of elided pages).
    added: u64,
    removed: u64,
    recorder: Option<Recorder>,
}

fn recording(source: std::io::Error) -> SendError {
    SendError::Io {
        what: "recording the stream",
        source,
    }
}

impl<'a, 'g, F> Encoder<'a, 'g, F>
where
    F: FnOnce(&[RamBlock]) -> Result<Option<StreamMap<'g>>, String>,
{
    pub(super) fn new(
        shared: &'a Pipeline,
        session: &Session,
        opts: &'a SenderOptions,
        map: F,
        check: Option<SwitchoverCheck<'a>>,
    ) -> Result<Self, SendError> {
        let recorder = match &opts.record {
            Some(p) => Some(Recorder::create(p).map_err(recording)?),
            None => None,
        };
        Ok(Encoder {
            shared,
            opts,
            map: Some(map),
            refmap: None,
            free: None,
            map_pages: 0,
            check,
            switchover: None,
            at: Switchover::default(),
            marks: SenderMarks::default(),
            at_stop: None,
            runs: RunBuilder::new(session).with_max_pages(opts.max_run_pages),
            run_pages: Vec::new(),
            batch: Vec::with_capacity(opts.batch_bytes + 8192),
            batch_zero: 0,
            ref_pages: 0,
            run_count: 0,
            added: 0,
            removed: 0,
            recorder,
        })
    }

    /// Encodes the whole stream QEMU sends on `qemu`, then the `End` frame.
    pub(super) fn run(mut self, qemu: &mut Channel) -> Result<Encoded, SendError> {
        std::thread::scope(|scope| {
            let mut dec = Decoder::new();
            // The switchover check's baseline (during the live phase) and its hashing of
            // the stopped guest, once begun.
            let mut baseline = None;
            let mut hashing = None;
            loop {
                while dec.advance()? {
                    let Some(item) = dec.item() else { break };
                    self.shared
                        .counters
                        .stream_bytes
                        .store(dec.offset(), Ordering::Relaxed);
                    self.switchover(&item, scope, &mut baseline, &mut hashing)?;
                    self.record(&item)?;
                }
                // About to wait for QEMU: send what is pending so the receiver is never
                // starved.
                if !wait_readable(qemu, Duration::ZERO) {
                    self.flush_run()?;
                    self.flush_batch()?;
                }
                let n = dec
                    .read_from(qemu, self.opts.read_chunk)
                    .map_err(|e| SendError::Io {
                        what: "reading QEMU's migration stream",
                        source: e,
                    })?;
                if n == 0 {
                    dec.finish()?;
                    break;
                }
            }
            self.finish(&dec)
        })
    }

    /// Follows the switchover. Once QEMU's first pass over RAM is over, starts the
    /// switchover check's baseline. When the `ram` section's END part begins, the guest is
    /// stopped: marks the time and pct's backlog, and starts hashing the guest's RAM for
    /// the switchover check while the END part streams on. At its EOS, everything QEMU
    /// will send for RAM is out: re-sends what it missed, before the EOS.
    fn switchover<'s>(
        &mut self,
        item: &Item<'_>,
        scope: &'s Scope<'s, '_>,
        baseline: &mut Option<ScopedJoinHandle<'s, ()>>,
        hashing: &mut Option<ScopedJoinHandle<'s, LiveHashes>>,
    ) -> Result<(), SendError>
    where
        'a: 's,
    {
        if let Some(c) = self.check.as_mut() {
            c.observe(&item.record);
            if c.baseline_due() {
                *baseline = Some(scope.spawn(c.baseline()));
            }
        }
        match self.at.observe(&item.record) {
            Some(SwitchoverPoint::EndPart) => {
                self.marks.ram_end = Some(now_unix_ms());
                let wire = self.shared.note_stop(&mut self.marks);
                self.at_stop = Some((item.offset, wire));
                if let Some(c) = self.check.as_ref().filter(|c| !c.done()) {
                    *hashing = Some(scope.spawn(c.hasher()));
                }
            }
            Some(SwitchoverPoint::Eos) => {
                self.marks.eos = Some(now_unix_ms());
                if self.free.is_some() {
                    self.resend_not_free()?;
                }
                let live = hashing
                    .take()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                if self.check.as_ref().is_some_and(|c| !c.done()) {
                    self.resend_missed(live)?;
                    self.marks.checked = Some(now_unix_ms());
                }
            }
            None => {}
        }
        Ok(())
    }

    /// What the batch and the current run will cost the destination, in pages.
    fn pending_pages(&self) -> u64 {
        ((self.batch.len() + self.run_pages.len()) / PAGE_SIZE) as u64 + self.batch_zero
    }

    /// Handles one record of QEMU's stream.
    fn record(&mut self, item: &Item<'_>) -> Result<(), SendError> {
        if self.shared.window.full_with(self.pending_pages()) {
            // The destination is behind: send what is pending, and read no more of QEMU's
            // stream until it caught up.
            self.flush_run()?;
            self.flush_batch()?;
            let open = self
                .shared
                .window
                .wait_open(STALL)
                .map_err(|_| SendError::Closed)?;
            if !open {
                return Err(SendError::Protocol(format!(
                    "the receiver gave the destination QEMU nothing for {} s (stream offset \
                     {}): is the destination QEMU stuck?",
                    STALL.as_secs(),
                    item.offset
                )));
            }
        }
        if let Record::Ram(RamRecord::Page { page, data }) = item.record {
            let mapped = self.refmap.as_ref().is_some_and(|(b, _)| *b == page.block);
            let disk = match self.refmap.as_mut() {
                Some((_, m)) if mapped => m.lookup(page.offset),
                _ => None,
            };
            if let (Some(f), true) = (self.free.as_mut(), mapped) {
                if disk.is_some() {
                    f.forwarded(page.offset);
                } else if f.elide(page.offset, data) {
                    return self.elide(item, &page);
                }
            }
            if let Some(r) = self.recorder.as_mut() {
                r.record(item.raw).map_err(recording)?;
            }
            if let Some(disk) = disk {
                self.flush_batch()?;
                let block = page.block as u32;
                if let Some(done) = self
                    .runs
                    .push(block, page.offset, page.continued, disk, data)
                {
                    self.send_run(done)?;
                }
                self.run_pages.extend_from_slice(data);
                self.ref_pages += 1;
                self.shared
                    .counters
                    .ref_pages
                    .store(self.ref_pages, Ordering::Relaxed);
                return Ok(());
            }
        }
        if let (Some(r), false) = (self.recorder.as_mut(), is_page(&item.record)) {
            r.record(item.raw).map_err(recording)?;
        }
        self.flush_run()?;
        self.batch.extend_from_slice(item.raw);
        if let Record::Ram(RamRecord::Zero { page, .. }) = item.record {
            self.batch_zero += 1;
            if let Some(f) = self.free.as_mut() {
                if self.refmap.as_ref().is_some_and(|(b, _)| *b == page.block) {
                    f.forwarded(page.offset);
                }
            }
        }
        if let Record::Ram(RamRecord::MemSize { blocks, .. }) = item.record {
            if self.map.is_some() {
                self.take_map(blocks)?;
            }
        }
        self.flush_full()
    }

    /// Sends a free page's `PAGE` record as a `ZERO` record (the recording, if any, holds
    /// the `ZERO` record too: it is the stream the destination gets).
    fn elide(&mut self, item: &Item<'_>, page: &PageAddr<'_>) -> Result<(), SendError> {
        self.flush_run()?;
        let before = self.batch.len();
        let block = (!page.continued).then_some(page.block_name);
        put_zero(&mut self.batch, block, page.offset, 0)
            .map_err(|e| SendError::Protocol(format!("eliding a page: {e}")))?;
        let zero = &self.batch[before..];
        if let Some(r) = self.recorder.as_mut() {
            r.record(zero).map_err(recording)?;
        }
        self.removed += (item.raw.len() - zero.len()) as u64;
        self.batch_zero += 1;
        self.flush_full()
    }

    /// Sends the batch if it is full.
    fn flush_full(&mut self) -> Result<(), SendError> {
        if self.batch.len() >= self.opts.batch_bytes {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Dirty tracking is on: takes the cache map now.
    fn take_map(&mut self, blocks: &[RamBlock]) -> Result<(), SendError> {
        self.flush_batch()?;
        let f = self
            .map
            .take()
            .ok_or_else(|| SendError::Map("map taken twice".into()))?;
        if let Some(StreamMap { refs, free }) = f(blocks).map_err(SendError::Map)? {
            if let Some(i) = blocks.iter().position(|b| b.name == refs.block()) {
                self.map_pages = refs.pages();
                self.refmap = Some((i, refs));
                self.free = free;
            }
        }
        Ok(())
    }

    /// Free-page elision's re-check, with the guest stopped: re-sends, as `PAGE` records in
    /// the current batch, the elided pages its kernel no longer holds free, as they are now.
    fn resend_not_free(&mut self) -> Result<(), SendError> {
        self.flush_run()?;
        let (Some(free), Some((_, refs))) = (self.free.as_mut(), self.refmap.as_ref()) else {
            return Ok(());
        };
        let offsets = free.recheck().map_err(|e| {
            SendError::Protocol(format!(
                "re-checking elided free pages in the stopped guest: {e}"
            ))
        })?;
        let mut extra = Vec::new();
        for (n, &offset) in offsets.iter().enumerate() {
            let page = free.page(offset).ok_or_else(|| {
                SendError::Protocol(format!(
                    "elided page at RAM offset {offset:#x} is outside the guest's RAM file"
                ))
            })?;
            // The first names the block, the rest continue it.
            let name = (n == 0).then_some(refs.block());
            put_page(&mut extra, name, offset, page)
                .map_err(|e| SendError::Protocol(format!("re-sending an elided page: {e}")))?;
            if let Some(c) = self.check.as_mut() {
                c.note_resent(offset, page);
            }
        }
        if let Some(r) = self.recorder.as_mut() {
            r.record(&extra).map_err(recording)?;
        }
        self.added += extra.len() as u64;
        self.batch.extend_from_slice(&extra);
        Ok(())
    }

    /// The switchover check: re-sends, as `PAGE` records in the current batch, the pages
    /// whose last record does not hold the stopped guest's RAM.
    /// `live`: the stopped guest's page hashes, if hashed already.
    fn resend_missed(&mut self, live: Option<LiveHashes>) -> Result<(), SendError> {
        self.flush_run()?;
        let Some(check) = self.check.as_mut() else {
            return Ok(());
        };
        let mut extra = Vec::new();
        let repaired = match live {
            Some(live) => check.repair_with(live, &mut extra),
            None => check.repair(&mut extra),
        };
        let report = repaired.map_err(|e| SendError::Protocol(format!("re-sending pages: {e}")))?;
        if let Some(r) = self.recorder.as_mut() {
            r.record(&extra).map_err(recording)?;
        }
        self.added += extra.len() as u64;
        self.batch.extend_from_slice(&extra);
        self.switchover = Some(report);
        Ok(())
    }

    /// Sends the batch as one data frame, if it holds anything.
    fn flush_batch(&mut self) -> Result<(), SendError> {
        if !self.batch.is_empty() {
            let data = pack(&self.batch, self.opts.zstd_level)?;
            let cost = (self.batch.len() / PAGE_SIZE) as u64 + self.batch_zero;
            self.shared.queue_stream(&Frame::Data(data), cost.max(1))?;
            self.batch.clear();
            self.batch_zero = 0;
        }
        Ok(())
    }

    /// Ends the current run, if any, and sends it.
    fn flush_run(&mut self) -> Result<(), SendError> {
        match self.runs.flush() {
            Some(done) => self.send_run(done),
            None => Ok(()),
        }
    }

    /// Sends a finished run; its originals are kept first, before the receiver can ask.
    fn send_run(&mut self, run: PageRefs) -> Result<(), SendError> {
        let pages = run.pages.len() as u64;
        lock(&self.shared.originals).push(std::mem::take(&mut self.run_pages));
        self.shared.queue_stream(&Frame::PageRefs(run), pages)?;
        self.run_count += 1;
        Ok(())
    }

    /// After QEMU's stream ended: what is pending, then `End`.
    fn finish(mut self, dec: &Decoder) -> Result<Encoded, SendError> {
        self.flush_run()?;
        self.flush_batch()?;
        if let Some(r) = self.recorder.take() {
            r.finish().map_err(recording)?;
        }
        self.shared
            .counters
            .stream_bytes
            .store(dec.offset(), Ordering::Relaxed);
        let end = Frame::End {
            stream_bytes: dec.offset() + self.added - self.removed,
            runs: self.run_count,
        };
        self.shared.queue(&end, false)?;
        self.marks.end_queued = Some(now_unix_ms());
        if let Some((offset, _)) = self.at_stop {
            self.marks.final_stream_bytes = Some(
                (dec.offset().saturating_sub(offset) + self.added).saturating_sub(self.removed),
            );
        }
        Ok(Encoded {
            stream: dec.stats().clone(),
            ref_pages: self.ref_pages,
            runs: self.run_count,
            map_pages: self.map_pages,
            switchover: self.switchover,
            elision: self.free.as_ref().map(|f| f.report().clone()),
            marks: self.marks,
            wire_at_stop: self.at_stop.map(|a| a.1),
        })
    }
}
