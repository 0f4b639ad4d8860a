//! Block mapping: where on the guest's disk the bytes of a cached file page lie.
//!
//! Given what a walker read of an ext4 inode (`ext4_inode_info.i_data`, `i_flags`,
//! `i_size`) and of its filesystem (block size, partition start), this stage says for
//! each 4 KiB page of the file whether its bytes are one contiguous byte range of the
//! disk, and where: `partition start + physical block × block size` (the partition start
//! is the block device's `bd_start_sect` × 512, see [`crate::walk::fs`]).
//!
//! - [`extent`]: extent trees (`ext4_extent_header` / `_idx` / `ext4_extent`), validated.
//! - [`indirect`]: direct / indirect / double / triple indirect block maps.
//! - [`inode`]: the inputs ([`Ext4Inode`], [`Ext4Volume`], `i_flags` bits) and
//!   [`BlockMapper`], logical block → physical run.
//! - [`pages`]: page-level rules and [`PageMapper`] / [`map_file_pages`], page runs.
//! - [`source`]: [`BlockSource`], how index and indirect blocks are read.
//! - [`ondisk`]: superblock, group descriptors, inodes and directories read from a disk
//!   image (for tests, and for guests whose profile lacks the ext4 types).
//! - [`xfs`]: XFS's superblock, inodes and data-fork extents (inline list or bmbt B+tree)
//!   read from the disk; its extents feed the same page-level rules.
//!
//! A walker maps the cached pages of one inode like this (pages sorted ascending; one
//! tree descent per extent leaf, not per page):
//!
//! ```ignore
//! let vol = Ext4Volume { block_size: 1 << s_blocksize_bits, partition_start: start_sect * 512,
//!                        blocks_count: None };
//! let inode = Ext4Inode::from_words(ino, i_flags, i_size, &i_data);
//! let disk = ImageFile::open("disk.img", vol.partition_start)?;
//! let map = map_file_pages(&vol, &inode, &disk, MapOptions::default(), page_indices)?;
//! for r in &map.runs { /* pages r.page.. r.page + r.pages are disk bytes at r.disk_offset */ }
//! ```
//!
//! Guest and disk data are hostile: every node is validated, every walk is bounded (tree
//! depth ≤ 5, a cap on block reads per inode), failures are [`BlockMapError`] values.

pub mod error;
pub mod extent;
pub mod indirect;
pub mod inode;
mod meta;
pub mod ondisk;
pub mod pages;
pub mod source;
pub mod xfs;

pub use error::{BlockMapError, NodeAt, OnDiskError};
pub use inode::{BlockMapper, Ext4Inode, Ext4Volume};
pub use meta::{BlockExtent, MapKind, DEFAULT_MAX_BLOCK_READS};
pub use pages::{
    map_file_pages, FileMap, MapOptions, PageMapper, PageRun, PageState, TailPage, Unrestorable,
    PAGE_SIZE,
};
pub use source::{BlockSource, DiskBytes, ImageFile};
