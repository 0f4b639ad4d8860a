//! Where the block map reads metadata blocks (extent index blocks, indirect blocks):
//! the guest's own cached copy in its block device's page cache when it has one (the
//! newest version, and no disk needed), else the host's disk image.

use crate::blockmap::BlockSource;
use crate::disk::Disk;
use crate::kernel::Kernel;
use crate::walk::fs::CacheWalk;
use crate::walk::page::PageState;
use std::collections::HashMap;
use std::io;

pub struct MetaSource<'a> {
    k: &'a Kernel<'a>,
    /// bdev page index → pfn, for uptodate pages of this filesystem's block device.
    cached: HashMap<u64, u64>,
    part_start: u64,
    disk: Option<&'a Disk>,
}

impl<'a> MetaSource<'a> {
    pub fn new(
        k: &'a Kernel<'a>,
        walk: &CacheWalk,
        sb: usize,
        disk: Option<&'a Disk>,
    ) -> MetaSource<'a> {
        let cached = walk
            .inodes
            .iter()
            .filter(|i| i.is_bdev && i.sb == sb)
            .flat_map(|i| i.pages.iter())
            // The guest's in-memory copy is what its kernel maps with, whether or not the
            // disk has caught up with it.
            .filter(|p| {
                matches!(
                    p.state,
                    PageState::Clean | PageState::Dirty | PageState::BuffersBusy
                )
            })
            .map(|p| (p.index, p.pfn))
            .collect();
        MetaSource {
            k,
            cached,
            part_start: walk.super_blocks[sb].part_start,
            disk,
        }
    }
}

impl BlockSource for MetaSource<'_> {
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        let bs = buf.len() as u64;
        let rel = pblk
            .checked_mul(bs)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block number overflows"))?;
        if let Some(&pfn) = self.cached.get(&(rel / 4096)) {
            if let Ok(page) = self.k.mem.page(pfn) {
                let off = (rel % 4096) as usize;
                if let Some(b) = page.get(off..off + buf.len()) {
                    buf.copy_from_slice(b);
                    return Ok(());
                }
            }
        }
        match self.disk {
            Some(d) => Ok(d.read_exact_at(buf, self.part_start + rel)?),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("metadata block {pblk} is not in the guest's cache and no --disk image was given"),
            )),
        }
    }
}
