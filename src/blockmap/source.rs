//! Where metadata blocks (extent index/leaf blocks, indirect blocks) are read from.
//!
//! The mapper asks for filesystem block `pblk` with a buffer whose length is the block
//! size; a source turns that into a read of the guest's disk: its copy on the host
//! ([`ImageFile`]: a [`Disk`], raw, block device or qcow2, read at partition start +
//! `pblk` × block size), an in-memory or
//! memory-mapped copy ([`DiskBytes`]), or, later, the guest's own cached copy in the block
//! device's page cache.

use crate::disk::{Disk, DiskFormat};
use std::io;
use std::path::Path;

/// A reader of filesystem blocks. `buf.len()` is the block size; the block's disk byte
/// offset is `partition_start + pblk * buf.len()`.
pub trait BlockSource {
    /// Fill `buf` with filesystem block `pblk`, entirely, or fail.
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl<T: BlockSource + ?Sized> BlockSource for &T {
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_block(pblk, buf)
    }
}

/// Disk byte offset of block `pblk` of size `len`, or an error on overflow.
pub fn block_offset(partition_start: u64, pblk: u64, len: usize) -> io::Result<u64> {
    pblk.checked_mul(len as u64)
        .and_then(|o| o.checked_add(partition_start))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block offset overflows"))
}

/// The guest's disk on the host, read by filesystem block.
#[derive(Debug)]
pub struct ImageFile {
    disk: Disk,
    partition_start: u64,
}

impl ImageFile {
    /// Open the raw image `path` read-only; the filesystem starts `partition_start` bytes
    /// into it.
    pub fn open(path: impl AsRef<Path>, partition_start: u64) -> io::Result<ImageFile> {
        Ok(ImageFile::new(
            Disk::open(path, DiskFormat::Raw)?,
            partition_start,
        ))
    }

    pub fn new(disk: Disk, partition_start: u64) -> ImageFile {
        ImageFile {
            disk,
            partition_start,
        }
    }

    pub fn partition_start(&self) -> u64 {
        self.partition_start
    }

    /// Read raw disk bytes at an absolute disk offset (not relative to the partition).
    pub fn read_disk_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Ok(self.disk.read_exact_at(buf, offset)?)
    }
}

impl BlockSource for ImageFile {
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = block_offset(self.partition_start, pblk, buf.len())?;
        Ok(self.disk.read_exact_at(buf, off)?)
    }
}

/// A whole disk held as bytes (a `Vec`, a memory map of the image, a test's corrupted copy).
#[derive(Clone, Copy, Debug)]
pub struct DiskBytes<'a> {
    pub bytes: &'a [u8],
    pub partition_start: u64,
}

impl BlockSource for DiskBytes<'_> {
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = block_offset(self.partition_start, pblk, buf.len())?;
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| Some(o..o.checked_add(buf.len())?))
            .and_then(|r| self.bytes.get(r))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "block beyond the disk"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}
