//! Checked, budgeted reads of one inode's metadata blocks (extent index and leaf blocks,
//! indirect blocks), and [`BlockExtent`], the answer both tree walkers give: what backs
//! logical block `lblk` and the next `len - 1` blocks (the role of the kernel's
//! `struct ext4_map_blocks`).

use super::error::BlockMapError;
use super::source::BlockSource;

/// What backs a run of logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Written data at physical blocks `pblk..pblk + len`.
    Mapped { pblk: u64 },
    /// Allocated but unwritten (`ee_len > EXT_INIT_MAX_LEN`): reads as zeros, the disk
    /// holds stale bytes.
    Unwritten { pblk: u64 },
    /// Nothing allocated: reads as zeros.
    Hole,
}

/// Logical blocks `lblk..lblk + len` of a file and what backs them (`len >= 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockExtent {
    pub lblk: u64,
    pub len: u64,
    pub kind: MapKind,
}

impl BlockExtent {
    pub fn contains(&self, lblk: u64) -> bool {
        lblk >= self.lblk && lblk - self.lblk < self.len
    }

    /// Physical block of logical block `lblk` (inside this extent), if mapped.
    pub fn pblk_of(&self, lblk: u64) -> Option<u64> {
        match self.kind {
            MapKind::Mapped { pblk } if self.contains(lblk) => pblk.checked_add(lblk - self.lblk),
            _ => None,
        }
    }
}

/// Default cap on metadata block reads for one inode's mapper.
pub const DEFAULT_MAX_BLOCK_READS: u32 = 1 << 16;

/// Reads metadata blocks of one inode: range-checked against the filesystem size and
/// counted against a budget, so hostile trees cost bounded work.
pub(crate) struct MetaReader<'s, S: BlockSource + ?Sized> {
    source: &'s S,
    pub ino: u64,
    pub block_size: usize,
    pub blocks_count: Option<u64>,
    reads: u32,
    limit: u32,
}

impl<'s, S: BlockSource + ?Sized> MetaReader<'s, S> {
    pub fn new(
        source: &'s S,
        ino: u64,
        block_size: usize,
        blocks_count: Option<u64>,
        limit: u32,
    ) -> Self {
        MetaReader {
            source,
            ino,
            block_size,
            blocks_count,
            reads: 0,
            limit,
        }
    }

    /// Check that physical blocks `pblk..pblk + len` exist (block 0 never holds file data
    /// or file metadata: it holds the boot sector and/or the superblock).
    pub fn check_range(
        &self,
        pblk: u64,
        len: u64,
        what: &'static str,
    ) -> Result<(), BlockMapError> {
        let bad = || BlockMapError::BlockRange {
            ino: self.ino,
            pblk,
            what,
        };
        let end = pblk.checked_add(len).ok_or_else(bad)?;
        if pblk == 0 || end > 1 << 48 {
            return Err(bad());
        }
        match self.blocks_count {
            Some(n) if end > n => Err(bad()),
            _ => Ok(()),
        }
    }

    /// Read metadata block `pblk` into `buf` (resized to the block size).
    pub fn read(
        &mut self,
        pblk: u64,
        what: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<(), BlockMapError> {
        self.check_range(pblk, 1, what)?;
        if self.reads >= self.limit {
            return Err(BlockMapError::Budget {
                ino: self.ino,
                limit: self.limit,
            });
        }
        self.reads += 1;
        buf.resize(self.block_size, 0);
        self.source
            .read_block(pblk, buf)
            .map_err(|source| BlockMapError::Read {
                ino: self.ino,
                pblk,
                source,
            })
    }

    pub fn reads(&self) -> u32 {
        self.reads
    }
}
