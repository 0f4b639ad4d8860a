//! Page-level answers: is 4 KiB page `index` of a file a contiguous byte range of the
//! disk, and where. [`PageMapper`] answers page by page, reusing the last block run it
//! got, so the sorted pages of one inode cost one tree descent per extent leaf (or per
//! indirect block), not one per page; [`PageMapper::map_pages`] folds the answers into
//! runs of `(first page, disk offset, page count)`.
//!
//! The rules (a page is `PAGE_SIZE` = 4096 bytes, a block 1, 2 or 4 KiB):
//! - A full page (entirely below `i_size`) is restorable when all its `4096 / bs` blocks
//!   are mapped, written (not in an unwritten extent) and physically contiguous.
//! - Pages at or past `ceil(i_size / 4096)` are never restorable (`BeyondEof`).
//! - The page holding EOF (`i_size % 4096 != 0`): the kernel reads the blocks that hold
//!   file bytes whole from the disk (so the tail of the EOF block past `i_size` comes
//!   from the disk, and ext4 keeps it zeroed there on writeback and truncate) and fills
//!   the blocks entirely past EOF with zeros. So the page equals `n × bs` disk bytes
//!   (`n` = blocks holding file bytes) followed by zeros. That holds for a kernel-written
//!   filesystem but depends on the disk's tail bytes, which nothing here checks, so by
//!   default such a page is reported `PartialEof`. With [`MapOptions::tail_page`] it is
//!   mapped: as a normal restorable page when its disk part is the whole page (4 KiB
//!   blocks), else as a [`TailPage`] (disk part, then zeros) — the receiver's hash
//!   check is what makes that safe.
//! - Inline-data, encrypted (the disk holds ciphertext) and data-journalled inodes (a
//!   clean page may not have reached its home block yet) are not restorable. Verity
//!   inodes are: their data blocks hold plain file bytes (the Merkle tree lies past EOF).

use super::error::BlockMapError;
use super::inode::{
    BlockMapper, Ext4Inode, Ext4Volume, EXT4_ENCRYPT_FL, EXT4_INLINE_DATA_FL, EXT4_JOURNAL_DATA_FL,
};
use super::meta::{BlockExtent, MapKind, DEFAULT_MAX_BLOCK_READS};
use super::source::BlockSource;

pub const PAGE_SIZE: u64 = 4096;

/// Why a page is not restorable from the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unrestorable {
    /// The page starts at or past `i_size`.
    BeyondEof,
    /// The page holds EOF and `tail_page` was not asked for.
    PartialEof,
    /// Some block of the page is a hole (the page holds zeros there).
    Hole,
    /// Some block is in an unwritten extent (zeros in the page, stale bytes on disk).
    Unwritten,
    /// The page's blocks are not consecutive on the disk.
    Discontiguous,
    /// Past the 2^32 logical blocks ext4 can address.
    Unaddressable,
    InlineData,
    Encrypted,
    JournalData,
}

/// The answer for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// The page's 4096 bytes are the disk's bytes at `disk_offset`.
    Restorable {
        disk_offset: u64,
    },
    /// The page is `disk_bytes` (< 4096) bytes of the disk at `disk_offset`, then zeros.
    Tail {
        disk_offset: u64,
        disk_bytes: u32,
    },
    Unrestorable(Unrestorable),
}

/// Pages `page..page + pages` are the disk bytes `disk_offset..disk_offset + pages × 4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub page: u64,
    pub disk_offset: u64,
    pub pages: u64,
}

impl PageRun {
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// The partial last page, when mapped: `disk_bytes` from the disk, the rest zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TailPage {
    pub page: u64,
    pub disk_offset: u64,
    pub disk_bytes: u32,
}

/// The map of the pages asked about, in the order asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMap {
    pub runs: Vec<PageRun>,
    pub tail: Option<TailPage>,
    pub unrestorable: Vec<(u64, Unrestorable)>,
    /// Metadata blocks read to build it.
    pub block_reads: u32,
}

impl FileMap {
    pub fn restorable_pages(&self) -> u64 {
        self.runs.iter().map(|r| r.pages).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Map the partial last page too (see the module documentation).
    pub tail_page: bool,
    /// Cap on metadata block reads for one inode.
    pub max_block_reads: u32,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            tail_page: false,
            max_block_reads: DEFAULT_MAX_BLOCK_READS,
        }
    }
}

/// Answers "where on the disk is page N of this inode" for one inode.
pub struct PageMapper<'s, S: BlockSource + ?Sized> {
    vol: Ext4Volume,
    inode: Ext4Inode,
    opts: MapOptions,
    /// `None` when the whole inode is unrestorable (`whole` says why).
    blocks: Option<BlockMapper<'s, S>>,
    whole: Option<Unrestorable>,
    last: Option<BlockExtent>,
}

impl<'s, S: BlockSource + ?Sized> PageMapper<'s, S> {
    /// Fails on an unusable volume or an extent root that does not validate; an inode
    /// that cannot be restorable by its flags yields a mapper that says so for every page.
    pub fn new(
        vol: &Ext4Volume,
        inode: &Ext4Inode,
        source: &'s S,
        opts: MapOptions,
    ) -> Result<Self, BlockMapError> {
        vol.check()?;
        let whole = if inode.has_flag(EXT4_INLINE_DATA_FL) {
            Some(Unrestorable::InlineData)
        } else if inode.has_flag(EXT4_ENCRYPT_FL) {
            Some(Unrestorable::Encrypted)
        } else if inode.has_flag(EXT4_JOURNAL_DATA_FL) {
            Some(Unrestorable::JournalData)
        } else {
            None
        };
        let blocks = match whole {
            Some(_) => None,
            None => Some(BlockMapper::with_limit(
                vol,
                inode,
                source,
                opts.max_block_reads,
            )?),
        };
        Ok(PageMapper {
            vol: *vol,
            inode: *inode,
            opts,
            blocks,
            whole,
            last: None,
        })
    }

    /// A mapper for a file of `i_size` bytes whose blocks `blocks` resolves (an XFS file:
    /// none of ext4's inode flags apply).
    pub fn from_blocks(
        vol: &Ext4Volume,
        ino: u64,
        i_size: u64,
        blocks: BlockMapper<'s, S>,
        opts: MapOptions,
    ) -> Result<Self, BlockMapError> {
        vol.check()?;
        Ok(PageMapper {
            vol: *vol,
            inode: Ext4Inode {
                ino,
                i_flags: 0,
                i_size,
                i_block: [0; 60],
            },
            opts,
            blocks: Some(blocks),
            whole: None,
            last: None,
        })
    }

    pub fn block_reads(&self) -> u32 {
        self.blocks.as_ref().map_or(0, |b| b.reads())
    }

    fn lookup(&mut self, lblk: u64) -> Result<BlockExtent, BlockMapError> {
        if let Some(last) = self.last.filter(|l| l.contains(lblk)) {
            return Ok(last);
        }
        let Some(blocks) = self.blocks.as_mut() else {
            return Err(BlockMapError::Unmappable {
                ino: self.inode.ino,
                why: "no block map",
            });
        };
        let ext = blocks.map(lblk)?;
        self.last = Some(ext);
        Ok(ext)
    }

    /// Where page `index` of the file is on the disk, if anywhere.
    pub fn page(&mut self, index: u64) -> Result<PageState, BlockMapError> {
        use Unrestorable::*;
        let no = |why| Ok(PageState::Unrestorable(why));
        if let Some(why) = self.whole {
            return no(why);
        }
        let size = self.inode.i_size;
        let Some(start) = index.checked_mul(PAGE_SIZE).filter(|&s| s < size) else {
            return no(BeyondEof);
        };
        let in_file = (size - start).min(PAGE_SIZE);
        if in_file < PAGE_SIZE && !self.opts.tail_page {
            return no(PartialEof);
        }
        let bs = u64::from(self.vol.block_size);
        let first = start / bs;
        let nblk = in_file.div_ceil(bs);
        if first + nblk > 1 << 32 {
            return no(Unaddressable);
        }
        let mut pblk0 = None;
        let mut expect = 0;
        let mut l = first;
        while l < first + nblk {
            let ext = self.lookup(l)?;
            let pblk = match ext.kind {
                MapKind::Mapped { pblk } => pblk + (l - ext.lblk),
                MapKind::Unwritten { .. } => return no(Unwritten),
                MapKind::Hole => return no(Hole),
            };
            if pblk0.is_none() {
                pblk0 = Some(pblk);
            } else if pblk != expect {
                return no(Discontiguous);
            }
            let take = (ext.len - (l - ext.lblk)).min(first + nblk - l);
            expect = pblk + take;
            l += take;
        }
        let Some(pblk0) = pblk0 else {
            return no(Hole);
        };
        let disk_offset = self.vol.disk_offset(self.inode.ino, pblk0)?;
        let disk_bytes = nblk * bs;
        Ok(if disk_bytes >= PAGE_SIZE {
            PageState::Restorable { disk_offset }
        } else {
            PageState::Tail {
                disk_offset,
                disk_bytes: disk_bytes as u32,
            }
        })
    }

    /// Map `pages` (best sorted ascending: runs only join ascending neighbours).
    pub fn map_pages(
        &mut self,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<FileMap, BlockMapError> {
        let mut map = FileMap::default();
        for page in pages {
            match self.page(page)? {
                PageState::Restorable { disk_offset } => match map.runs.last_mut() {
                    Some(r)
                        if r.page + r.pages == page && r.disk_offset + r.bytes() == disk_offset =>
                    {
                        r.pages += 1
                    }
                    _ => map.runs.push(PageRun {
                        page,
                        disk_offset,
                        pages: 1,
                    }),
                },
                PageState::Tail {
                    disk_offset,
                    disk_bytes,
                } => {
                    map.tail = Some(TailPage {
                        page,
                        disk_offset,
                        disk_bytes,
                    })
                }
                PageState::Unrestorable(why) => map.unrestorable.push((page, why)),
            }
        }
        map.block_reads = self.block_reads();
        Ok(map)
    }
}

/// Map the given pages of one inode (one tree walk per leaf for sorted pages).
pub fn map_file_pages<S: BlockSource + ?Sized>(
    vol: &Ext4Volume,
    inode: &Ext4Inode,
    source: &S,
    opts: MapOptions,
    pages: impl IntoIterator<Item = u64>,
) -> Result<FileMap, BlockMapError> {
    PageMapper::new(vol, inode, source, opts)?.map_pages(pages)
}
