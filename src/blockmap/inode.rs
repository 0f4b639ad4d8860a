//! What the mapper is given about one ext4 inode and its filesystem, the `i_flags` bits
//! that decide how (and whether) its blocks map, and [`BlockMapper`], which resolves a
//! logical block through the extent tree or the indirect blocks (`ext4_map_blocks`).

use super::error::BlockMapError;
use super::extent::ExtentTree;
use super::indirect::IndirectMap;
use super::meta::{BlockExtent, MetaReader, DEFAULT_MAX_BLOCK_READS};
use super::source::BlockSource;

// `i_flags` bits (fs/ext4/ext4.h; the same values on disk and in `ext4_inode_info`).
pub const EXT4_ENCRYPT_FL: u32 = 0x0000_0800;
pub const EXT4_JOURNAL_DATA_FL: u32 = 0x0000_4000;
pub const EXT4_EXTENTS_FL: u32 = 0x0008_0000;
pub const EXT4_VERITY_FL: u32 = 0x0010_0000;
pub const EXT4_DAX_FL: u32 = 0x0200_0000;
pub const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;

/// One inode as the walker read it from guest RAM (`ext4_inode_info`), or as
/// [`super::ondisk`] read it from the disk (`struct ext4_inode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4Inode {
    /// Inode number (for error messages).
    pub ino: u64,
    /// `i_flags`.
    pub i_flags: u32,
    /// `i_size` (the VFS inode's, in RAM: it is the newest).
    pub i_size: u64,
    /// The 60 bytes of `i_block` (`ext4_inode_info.i_data`: 15 × le32), unchanged.
    pub i_block: [u8; 60],
}

impl Ext4Inode {
    /// Build from `i_data` as 15 host-order words (as a walker may have decoded them).
    pub fn from_words(ino: u64, i_flags: u32, i_size: u64, i_data: &[u32; 15]) -> Ext4Inode {
        let mut i_block = [0u8; 60];
        for (chunk, w) in i_block.chunks_exact_mut(4).zip(i_data) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ext4Inode {
            ino,
            i_flags,
            i_size,
            i_block,
        }
    }

    pub fn has_flag(&self, fl: u32) -> bool {
        self.i_flags & fl != 0
    }
}

/// The filesystem the inode lives on, as placed on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4Volume {
    /// Filesystem block size in bytes: 1024, 2048 or 4096 (`1 << s_blocksize_bits`).
    pub block_size: u32,
    /// Byte offset of the filesystem on the disk (partition start sector × 512).
    pub partition_start: u64,
    /// Blocks in the filesystem, when known: pointers past it are rejected as corrupt.
    pub blocks_count: Option<u64>,
}

impl Ext4Volume {
    pub fn check(&self) -> Result<(), BlockMapError> {
        match self.block_size {
            1024 | 2048 | 4096 => Ok(()),
            bs => Err(BlockMapError::BlockSize(bs)),
        }
    }

    /// Disk byte offset of physical block `pblk`.
    pub fn disk_offset(&self, ino: u64, pblk: u64) -> Result<u64, BlockMapError> {
        pblk.checked_mul(u64::from(self.block_size))
            .and_then(|o| o.checked_add(self.partition_start))
            .ok_or(BlockMapError::Overflow { ino, pblk })
    }
}

enum Walker<'s, S: BlockSource + ?Sized> {
    Extents(ExtentTree<'s, S>),
    Indirect(IndirectMap<'s, S>),
    /// Extents read in full beforehand (XFS's data fork).
    List(super::xfs::ExtentList),
}

/// Resolves logical blocks of one inode to physical blocks, reading metadata blocks
/// through a [`BlockSource`], at most `max_block_reads` of them over its lifetime.
pub struct BlockMapper<'s, S: BlockSource + ?Sized> {
    walker: Walker<'s, S>,
}

impl<'s, S: BlockSource + ?Sized> BlockMapper<'s, S> {
    pub fn new(vol: &Ext4Volume, inode: &Ext4Inode, source: &'s S) -> Result<Self, BlockMapError> {
        Self::with_limit(vol, inode, source, DEFAULT_MAX_BLOCK_READS)
    }

    /// Fails for inline-data inodes (`i_block` holds data, not block pointers) and for
    /// an extent root that does not validate.
    pub fn with_limit(
        vol: &Ext4Volume,
        inode: &Ext4Inode,
        source: &'s S,
        max_block_reads: u32,
    ) -> Result<Self, BlockMapError> {
        vol.check()?;
        if inode.has_flag(EXT4_INLINE_DATA_FL) {
            return Err(BlockMapError::Unmappable {
                ino: inode.ino,
                why: "inline data",
            });
        }
        let rd = MetaReader::new(
            source,
            inode.ino,
            vol.block_size as usize,
            vol.blocks_count,
            max_block_reads,
        );
        let walker = if inode.has_flag(EXT4_EXTENTS_FL) {
            Walker::Extents(ExtentTree::new(rd, &inode.i_block)?)
        } else {
            Walker::Indirect(IndirectMap::new(rd, &inode.i_block))
        };
        Ok(BlockMapper { walker })
    }

    /// A mapper over a file's whole extent list, read beforehand (XFS).
    pub fn from_list(list: super::xfs::ExtentList) -> Self {
        BlockMapper {
            walker: Walker::List(list),
        }
    }

    /// What backs logical block `lblk`, and for how many blocks from there on.
    pub fn map(&mut self, lblk: u64) -> Result<BlockExtent, BlockMapError> {
        match &mut self.walker {
            Walker::Extents(t) => t.map(lblk),
            Walker::Indirect(m) => m.map(lblk),
            Walker::List(l) => Ok(l.map(lblk)),
        }
    }

    /// Metadata blocks read so far.
    pub fn reads(&self) -> u32 {
        match &self.walker {
            Walker::Extents(t) => t.reads(),
            Walker::Indirect(m) => m.reads(),
            Walker::List(_) => 0,
        }
    }
}
