//! Restoring a run whose hash failed at the receiver: asking the sender for the run's
//! per-page hashes and for the original bytes of the pages that differ, waiting for the
//! answers while later items are held back in order, and checking what arrived.

use super::super::wire::{hash_page, Frame, PageRefs, WireStats, PAGE_SIZE};
use super::pages::page_views;
use super::{control, lock, Failure, ReceiverReport, RecvError, Restored};
use crate::migrate::link::LinkStream;
use std::collections::VecDeque;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;

/// What the emitter needs to ask the sender something and wait for the answer.
pub(super) struct Link<'a> {
    pub(super) link: &'a Mutex<LinkStream>,
    pub(super) stats: &'a Mutex<WireStats>,
    pub(super) rx: &'a Receiver<Restored>,
    /// Items that arrived while waiting, in order.
    pub(super) held: &'a mut VecDeque<Restored>,
    pub(super) failure: &'a Failure,
}

impl Link<'_> {
    fn send(&mut self, f: &Frame) -> Result<(), RecvError> {
        control(self.link, self.stats, f)
    }

    /// The next reply (fallback data or page hashes); everything else that arrives first
    /// is held back, in order.
    fn reply(&mut self) -> Result<Restored, RecvError> {
        loop {
            let item = self
                .rx
                .recv()
                .map_err(|_| lock(self.failure).take().unwrap_or(RecvError::Closed))?;
            match item {
                Restored::Fallback { .. } | Restored::PageHashes { .. } => return Ok(item),
                other => self.held.push_back(other),
            }
        }
    }
}

/// A run as the restorer handed it over, whose check failed.
pub(super) struct FailedRun<'a> {
    pub(super) refs: &'a PageRefs,
    /// Its number (runs count from 0 in send order).
    pub(super) run_no: u64,
    /// The pages that failed the check (all of them for a failed run hash).
    pub(super) bad: &'a [usize],
    /// The pages the disk would not give.
    pub(super) unreadable: &'a [usize],
    /// The pages as read from disk; fixed in place.
    pub(super) data: &'a mut [u8],
}

impl Link<'_> {
    /// Makes `run.data` match the run's hashes. For a failed run hash (with `page_hashes`),
    /// asks for the run's per-page hashes and fetches only the pages that differ from them
    /// (or could not be read); otherwise fetches the bad pages. The fetched originals must
    /// match their page hashes, and the run its run hash, else the rest of the run is
    /// fetched too; the result must match or this fails. Returns the number of pages
    /// fetched.
    pub(super) fn restore_failed(
        &mut self,
        run: FailedRun<'_>,
        page_hashes: bool,
        report: &mut ReceiverReport,
    ) -> Result<usize, RecvError> {
        let FailedRun {
            refs,
            run_no,
            bad,
            unreadable,
            data,
        } = run;
        let n = refs.pages.len();
        let len = refs.hash_len as usize;
        let mut fetched = vec![false; n];
        let mut want: Vec<usize> = bad.to_vec();
        let mut hashes: Option<Vec<u8>> = None;
        if page_hashes && refs.run_hash() && bad.len() == n {
            report.hash_requests += 1;
            let h = self.fetch_page_hashes(run_no, n, refs.hash_len)?;
            want = (0..n)
                .filter(|&i| {
                    unreadable.contains(&i)
                        || hash_page(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], len)
                            != h[i * len..(i + 1) * len]
                })
                .collect();
            hashes = Some(h);
        }
        self.fetch_originals(run_no, &want, data)?;
        for &i in &want {
            fetched[i] = true;
        }
        let originals_match = hashes.as_ref().is_none_or(|h| {
            want.iter().all(|&i| {
                hash_page(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], len)
                    == h[i * len..(i + 1) * len]
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
                self.fetch_originals(run_no, &rest, data)?;
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
        &mut self,
        run_no: u64,
        n: usize,
        hash_len: u8,
    ) -> Result<Vec<u8>, RecvError> {
        self.send(&Frame::HashRequest {
            run: run_no,
            first: 0,
            count: n as u32,
        })?;
        match self.reply()? {
            Restored::PageHashes {
                run,
                first: 0,
                count,
                hash_len: l,
                hashes,
            } if run == run_no && count as usize == n && l == hash_len => Ok(hashes),
            Restored::PageHashes { run, .. } | Restored::Fallback { run, .. } => {
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
        &mut self,
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
            self.send(&Frame::FallbackRequest {
                run: run_no,
                first,
                count,
            })?;
        }
        while !ranges.is_empty() {
            match self.reply()? {
                Restored::Fallback {
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
                Restored::Fallback { run, .. } | Restored::PageHashes { run, .. } => {
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
}
