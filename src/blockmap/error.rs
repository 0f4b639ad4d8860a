//! Errors of the block mapper and of the on-disk ext4 reader, as values with context:
//! which inode, which block, what was wrong. Guest and disk data are hostile, so every
//! structural check that fails ends up here instead of in a panic.

use crate::memory::reader::FieldError;
use std::io;

/// Where an extent-tree node came from: the root in the inode's `i_block`, or a disk block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAt {
    /// The root node in `i_block` (`ext4_inode_info.i_data`).
    Root,
    /// An index or leaf block, by physical block number.
    Block(u64),
}

impl std::fmt::Display for NodeAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeAt::Root => write!(f, "i_block root"),
            NodeAt::Block(b) => write!(f, "block {b}"),
        }
    }
}

/// Why a file's blocks could not be mapped at all (as opposed to a page that is simply
/// not restorable, see [`super::Unrestorable`]).
#[derive(Debug, thiserror::Error)]
pub enum BlockMapError {
    #[error("unsupported filesystem block size {0} (1024, 2048 or 4096)")]
    BlockSize(u32),
    #[error("inode {ino}: bad extent node at {at}: {why}")]
    ExtentNode {
        ino: u64,
        at: NodeAt,
        why: &'static str,
    },
    #[error("inode {ino}: logical block {lblk}: {why}")]
    Indirect {
        ino: u64,
        lblk: u64,
        why: &'static str,
    },
    #[error("inode {ino}: physical block {pblk} ({what}) lies outside the filesystem")]
    BlockRange {
        ino: u64,
        pblk: u64,
        what: &'static str,
    },
    #[error("inode {ino}: reading physical block {pblk}: {source}")]
    Read {
        ino: u64,
        pblk: u64,
        #[source]
        source: io::Error,
    },
    #[error("inode {ino}: more than {limit} metadata block reads; giving up")]
    Budget { ino: u64, limit: u32 },
    #[error("inode {ino}: blocks not mappable: {why}")]
    Unmappable { ino: u64, why: &'static str },
    #[error("inode {ino}: disk offset of physical block {pblk} overflows")]
    Overflow { ino: u64, pblk: u64 },
    /// A field outside the bytes read for it (a block shorter than the block size).
    #[error("inode {ino}: {source}")]
    Field {
        ino: u64,
        #[source]
        source: FieldError,
    },
}

/// Errors of the on-disk reader ([`super::ondisk`]).
#[derive(Debug, thiserror::Error)]
pub enum OnDiskError {
    #[error("reading {what} at disk byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("no ext4 superblock: {0}")]
    SuperBlock(&'static str),
    #[error("unsupported filesystem feature: {0}")]
    Unsupported(&'static str),
    #[error("no MBR: {0}")]
    Mbr(&'static str),
    #[error("group descriptor {group}: {why}")]
    GroupDesc { group: u64, why: &'static str },
    #[error("inode {ino}: {why}")]
    Inode { ino: u64, why: &'static str },
    #[error("directory inode {ino}: {why}")]
    Dir { ino: u64, why: &'static str },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error(transparent)]
    Map(#[from] BlockMapError),
    /// A field outside the bytes read for it (a short sector, block or entry).
    #[error(transparent)]
    Field(#[from] FieldError),
}
