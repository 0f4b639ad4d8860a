//! Reference runs: a run of `PAGE` records replaced by references ([`PageRefs`]), how the
//! sender groups pages into runs ([`RunBuilder`]), how the receiver checks what it read
//! from its disk against the run's hashes, and the run's encoding inside a `PageRefs` frame.

use super::handshake::{caps, Session};
use super::hash::{hash_page, hash_run};
use super::varint::{put_varint, unzigzag, zigzag, Reader};
use super::{check_hash_len, malformed, WireError, MAX_RUN_PAGES, PAGE_SIZE, SECTOR};

/// One referenced page: where it goes in its RAM block, where it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Byte offset inside the RAM block (page aligned).
    pub offset: u64,
    /// Byte offset on the destination's disk (sector aligned).
    pub disk_offset: u64,
}

/// A run of consecutive `PAGE` records of one RAM block, replaced by references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRefs {
    /// Index of the RAM block in QEMU's `MEM_SIZE` list.
    pub block: u32,
    /// The first record carried the block name (the others are `CONTINUE`).
    pub first_named: bool,
    /// Increasing RAM offsets.
    pub pages: Vec<PageRef>,
    pub hash_len: u8,
    /// `pages.len()` hashes (per page) or one (per run), `hash_len` bytes each.
    pub hashes: Vec<u8>,
}

/// Flag bits of a `PageRefs` payload: the first record names the block; one hash covers
/// the run.
const REF_FIRST_NAMED: u8 = 1 << 0;
const REF_RUN_HASH: u8 = 1 << 1;

impl PageRefs {
    /// True if one hash covers the whole run.
    pub fn run_hash(&self) -> bool {
        self.hashes.len() == self.hash_len as usize && self.pages.len() > 1
    }

    /// Checks `data` (the pages as read from disk, in order) against the hashes; returns
    /// the indices of the pages that must be fetched from the sender (all of them for a
    /// failed run hash).
    pub fn verify(&self, data: &[&[u8]]) -> Vec<usize> {
        let n = self.pages.len();
        let len = self.hash_len as usize;
        if data.len() != n || data.iter().any(|d| d.len() != PAGE_SIZE) {
            return (0..n).collect();
        }
        if self.run_hash() {
            return if hash_run(data, len) == self.hashes {
                Vec::new()
            } else {
                (0..n).collect()
            };
        }
        (0..n)
            .filter(|&i| hash_page(data[i], len) != self.hashes[i * len..(i + 1) * len])
            .collect()
    }
}

/// Groups the pages the sender replaces into runs, in stream order.
///
/// A run extends while the next referenced page is the very next record of the stream, in
/// the same block at a higher offset, and sent with `CONTINUE`. Call [`RunBuilder::flush`]
/// before forwarding any other record, so that order is preserved.
#[derive(Debug)]
pub struct RunBuilder {
    hash_len: u8,
    run_hash: bool,
    max_pages: usize,
    cur: Option<PageRefs>,
    hasher: blake3::Hasher,
}

impl RunBuilder {
    /// Runs hashed as `session` says (one hash per run if both ends have [`caps::RUN_HASH`]).
    pub fn new(session: &Session) -> RunBuilder {
        RunBuilder {
            hash_len: session.hash_len,
            run_hash: session.caps & caps::RUN_HASH != 0,
            max_pages: MAX_RUN_PAGES,
            cur: None,
            hasher: blake3::Hasher::new(),
        }
    }

    /// Caps the pages per run (at most [`MAX_RUN_PAGES`]).
    pub fn with_max_pages(mut self, n: usize) -> RunBuilder {
        self.max_pages = n.clamp(1, MAX_RUN_PAGES);
        self
    }

    /// Adds the page at `offset` of `block` (sent with `CONTINUE` if `continued`), found on
    /// disk at `disk_offset`. Returns the previous run if this page could not join it.
    pub fn push(
        &mut self,
        block: u32,
        offset: u64,
        continued: bool,
        disk_offset: u64,
        data: &[u8],
    ) -> Option<PageRefs> {
        let joins = self.cur.as_ref().is_some_and(|r| {
            continued
                && r.block == block
                && r.pages.len() < self.max_pages
                && r.pages.last().is_some_and(|p| offset > p.offset)
        });
        let done = if joins { None } else { self.flush() };
        let run = self.cur.get_or_insert_with(|| PageRefs {
            block,
            first_named: !continued,
            pages: Vec::new(),
            hash_len: self.hash_len,
            hashes: Vec::new(),
        });
        run.pages.push(PageRef {
            offset,
            disk_offset,
        });
        // In run mode a one-page run's hash is that page's hash: both are BLAKE3 of the
        // same bytes.
        if self.run_hash {
            self.hasher.update(data);
        } else {
            run.hashes
                .extend_from_slice(&hash_page(data, self.hash_len as usize));
        }
        done
    }

    /// Ends the current run, if any.
    pub fn flush(&mut self) -> Option<PageRefs> {
        let mut run = self.cur.take()?;
        if self.run_hash {
            run.hashes = self.hasher.finalize().as_bytes()[..self.hash_len as usize].to_vec();
        }
        self.hasher.reset();
        Some(run)
    }
}

impl PageRefs {
    /// `block | flags | hash_len | count | first page | (gap - 1)* | disk deltas | hashes`.
    pub(super) fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let r = self;
        let name = "page refs";
        let n = r.pages.len();
        if n == 0 || n > MAX_RUN_PAGES {
            return Err(malformed(name, format!("{n} pages")));
        }
        check_hash_len(name, r.hash_len)?;
        let len = r.hash_len as usize;
        let run_hash = r.hashes.len() == len && n > 1;
        if !run_hash && r.hashes.len() != n * len {
            return Err(malformed(name, "hash bytes do not match the page count"));
        }
        put_varint(out, r.block.into());
        let mut flags = 0;
        if r.first_named {
            flags |= REF_FIRST_NAMED;
        }
        if run_hash {
            flags |= REF_RUN_HASH;
        }
        out.push(flags);
        out.push(r.hash_len);
        put_varint(out, n as u64);
        let page = PAGE_SIZE as u64;
        let mut prev: Option<u64> = None;
        for p in &r.pages {
            if p.offset % page != 0 {
                return Err(malformed(
                    name,
                    format!("RAM offset {:#x} unaligned", p.offset),
                ));
            }
            match prev {
                None => put_varint(out, p.offset / page),
                Some(q) if p.offset > q => put_varint(out, (p.offset - q) / page - 1),
                Some(_) => return Err(malformed(name, "RAM offsets not increasing")),
            }
            prev = Some(p.offset);
        }
        let mut expect: i64 = 0;
        for p in &r.pages {
            if p.disk_offset % SECTOR != 0 || p.disk_offset > i64::MAX as u64 / 2 {
                return Err(malformed(name, format!("disk offset {:#x}", p.disk_offset)));
            }
            let sector = (p.disk_offset / SECTOR) as i64;
            put_varint(out, zigzag(sector - expect));
            expect = sector + (PAGE_SIZE as u64 / SECTOR) as i64;
        }
        out.extend_from_slice(&r.hashes);
        Ok(())
    }

    /// Reads a `PageRefs` payload (the layout [`PageRefs::encode_payload`] writes).
    pub(super) fn decode_payload(r: &mut Reader<'_>) -> Result<PageRefs, WireError> {
        let name = r.frame;
        let block = u32::try_from(r.varint()?).map_err(|_| malformed(name, "block index"))?;
        let flags = r.u8()?;
        if flags & !(REF_FIRST_NAMED | REF_RUN_HASH) != 0 {
            return Err(malformed(name, format!("flags {flags:#x}")));
        }
        let hash_len = check_hash_len(name, r.u8()?)?;
        let n = r.varint()?;
        if n == 0 || n > MAX_RUN_PAGES as u64 {
            return Err(malformed(name, format!("{n} pages")));
        }
        let n = n as usize;
        let run_hash = flags & REF_RUN_HASH != 0;
        if run_hash && n == 1 {
            return Err(malformed(name, "run hash on a single page"));
        }
        let page = PAGE_SIZE as u64;
        let mut pages = Vec::with_capacity(n);
        let mut offset = 0u64;
        for i in 0..n {
            let v = r.varint()?;
            let next = if i == 0 {
                v.checked_mul(page)
            } else {
                v.checked_add(1)
                    .and_then(|g| g.checked_mul(page))
                    .and_then(|d| offset.checked_add(d))
            };
            offset = next.ok_or_else(|| malformed(name, "RAM offset overflows"))?;
            pages.push(PageRef {
                offset,
                disk_offset: 0,
            });
        }
        let mut expect: i64 = 0;
        for p in &mut pages {
            let sector = expect
                .checked_add(unzigzag(r.varint()?))
                .filter(|s| (0..i64::MAX / 1024).contains(s))
                .ok_or_else(|| malformed(name, "disk offset out of range"))?;
            p.disk_offset = sector as u64 * SECTOR;
            expect = sector + (PAGE_SIZE as u64 / SECTOR) as i64;
        }
        let hash_bytes = if run_hash { 1 } else { n } * hash_len as usize;
        let hashes = r.take(hash_bytes)?.to_vec();
        Ok(PageRefs {
            block,
            first_named: flags & REF_FIRST_NAMED != 0,
            pages,
            hash_len,
            hashes,
        })
    }
}
