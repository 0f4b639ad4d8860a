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

use super::stream::{put_page, EncodeError, RamBlock, RamRecord, Record};
use crate::memory::GuestMemory;
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
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Follows the stream for one RAM block and checks it against the live RAM at switchover.
pub struct SwitchoverCheck<'a> {
    ram: &'a GuestMemory,
    /// The block's name and its index in the `MEM_SIZE` list, once announced.
    name: String,
    block: Option<usize>,
    /// Per page, the hash of the last content forwarded (0: never sent).
    sent: Vec<u64>,
    done: bool,
    /// The hash of a zero page (nearly every `ZERO` record's), computed once.
    zero_page: u64,
}

impl<'a> SwitchoverCheck<'a> {
    /// A check of the RAM block `ram` is a live view of; `None` if it is not a live view
    /// (an image, or a copy taken through /proc/PID/mem).
    pub fn new(ram: &'a GuestMemory) -> Option<SwitchoverCheck<'a>> {
        Some(SwitchoverCheck {
            name: ram.live_block()?.to_owned(),
            ram,
            block: None,
            sent: Vec::new(),
            done: false,
            zero_page: page_hash(&[0; PAGE as usize]),
        })
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

    /// Whether [`repair`](Self::repair) has run.
    pub fn done(&self) -> bool {
        self.done
    }

    fn announce(&mut self, blocks: &[RamBlock]) {
        if let Some(i) = blocks.iter().position(|b| b.name == self.name) {
            self.block = Some(i);
            // Pages past the RAM file cannot be checked; the stream's length is QEMU's word,
            // the file's is the kernel's: keep the smaller.
            let len = blocks[i]
                .used_length
                .min(self.ram.live_block_len().unwrap_or(0));
            self.sent = vec![0; (len / PAGE) as usize];
        }
    }

    fn note(&mut self, offset: u64, hash: u64) {
        if let Some(slot) = usize::try_from(offset / PAGE)
            .ok()
            .and_then(|i| self.sent.get_mut(i))
        {
            *slot = hash;
        }
    }

    /// The hashing half of the check, to run (on its own thread) once the guest is
    /// stopped: the `ram` section's END part may still be on its way meanwhile. Hashes
    /// every page of the live block with as many threads as the host has cores (up to 8):
    /// the guest's vCPUs are stopped, and the check is downtime.
    pub fn hasher(&self) -> impl FnOnce() -> LiveHashes + Send + 'a {
        let (ram, pages) = (self.ram, self.sent.len());
        move || {
            let t = Instant::now();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
            let chunk = pages.div_ceil(threads).max(1);
            let hashes = std::thread::scope(|s| {
                let workers: Vec<_> = (0..pages)
                    .step_by(chunk)
                    .map(|first| s.spawn(move || hash_pages(ram, first, chunk.min(pages - first))))
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            LiveHashes {
                hashes,
                time: t.elapsed(),
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
    ) -> Result<SwitchoverReport, EncodeError> {
        let t = Instant::now();
        self.done = true;
        let mut r = SwitchoverReport {
            hash_time: live.time,
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
            let Some(page) = self.ram.live_block_page(offset) else {
                continue;
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
    pub fn repair(&mut self, out: &mut Vec<u8>) -> Result<SwitchoverReport, EncodeError> {
        let t = Instant::now();
        let live = self.hasher()();
        let mut r = self.repair_with(live, out)?;
        r.time = t.elapsed();
        Ok(r)
    }
}

/// The hash of every page of the live block at one moment (0: past the RAM file).
#[derive(Debug, Default)]
pub struct LiveHashes {
    hashes: Vec<u64>,
    time: Duration,
}

/// Hashes `count` pages of the live block from page `first` on.
fn hash_pages(ram: &GuestMemory, first: usize, count: usize) -> Vec<u64> {
    (first..first + count)
        .map(|i| ram.live_block_page(i as u64 * PAGE).map_or(0, page_hash))
        .collect()
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

    /// Feeds a stream that sent pages 0..3 as `sent` (page 3 never), up to the END part's
    /// EOS (as [`Switchover`] finds it); returns what the check re-sent.
    fn run(ram: &GuestMemory, sent: [u8; 3]) -> (SwitchoverReport, Vec<u8>) {
        let blocks = [RamBlock {
            name: BLOCK.into(),
            used_length: 4 * PAGE,
            shared_addr: None,
        }];
        let pages: Vec<Vec<u8>> = sent.iter().map(|f| vec![*f; PAGE as usize]).collect();
        let mut c = SwitchoverCheck::new(ram).expect("a live view");
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

    #[test]
    fn resends_exactly_the_pages_the_stream_got_wrong() {
        // The guest wrote page 1 after QEMU last sent it and page 2 (sent as a ZERO record)
        // too; page 0 is as sent; page 3 was never sent.
        let ram = ram([7, 9, 5, 1]);
        let (r, out) = run(&ram, [7, 8, 0]);
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
    }

    #[test]
    fn a_faithful_stream_needs_nothing() {
        let ram = ram([7, 8, 0, 0]);
        let (r, out) = run(&ram, [7, 8, 0]);
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
