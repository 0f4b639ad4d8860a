//! The cache map, pct's interface between introspection and migration: sorted, merged
//! runs of (guest-physical address, disk byte offset, length) whose memory holds exactly
//! the disk's bytes, each attributed to its device, inode and, where the dentry cache
//! knows it, a path.
//!
//! Built from a [`CacheWalk`]: clean pages of regular ext4 and XFS files go through the
//! block map (XFS's from its on-disk inodes, [`crate::blockmap::xfs`]); clean pages of a block device's own cache map directly (partition start +
//! index × 4 KiB). Metadata blocks the block map needs (extent index blocks, indirect
//! blocks) are read from the guest's cached copies first, then from the disk image.

pub mod source;

use crate::blockmap::xfs::{ExtentList, XfsFs};
use crate::blockmap::{self, Ext4Inode, Ext4Volume, MapOptions, Unrestorable};
use crate::disk::Disk;
use crate::kernel::Kernel;
use crate::walk::dentry::dentry_path;
use crate::walk::fs::CacheWalk;
use crate::walk::page::PageState;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

const PAGE: u64 = 4096;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
/// Filesystems the ext4 driver mounts (Debian lets it serve ext2 and ext3 too).
const EXT_FAMILY: [&str; 3] = ["ext4", "ext3", "ext2"];

/// Per-filesystem state: where metadata blocks come from, and the on-disk view.
struct SbContext<'a> {
    source: source::MetaSource<'a>,
    ondisk: Option<Result<blockmap::ondisk::Ext4Fs<source::MetaSource<'a>>, String>>,
    xfs: Option<Result<XfsFs<source::MetaSource<'a>>, String>>,
    k: &'a Kernel<'a>,
    walk: &'a CacheWalk,
    sb: usize,
    disk: Option<&'a Disk>,
}

impl<'a> SbContext<'a> {
    fn new(
        k: &'a Kernel<'a>,
        walk: &'a CacheWalk,
        sb: usize,
        disk: Option<&'a Disk>,
    ) -> SbContext<'a> {
        SbContext {
            source: source::MetaSource::new(k, walk, sb, disk),
            ondisk: None,
            xfs: None,
            k,
            walk,
            sb,
            disk,
        }
    }

    /// The inode as the filesystem's inode table holds it (guest cache first, then disk).
    fn ondisk_inode(&mut self, ino: u64) -> Result<Ext4Inode, String> {
        let (k, walk, sb, disk) = (self.k, self.walk, self.sb, self.disk);
        let start = walk.super_blocks[sb].part_start;
        let fs = self.ondisk.get_or_insert_with(|| {
            blockmap::ondisk::Ext4Fs::new(source::MetaSource::new(k, walk, sb, disk), start)
                .map_err(|e| e.to_string())
        });
        let fs = fs.as_ref().map_err(Clone::clone)?;
        let ino = u32::try_from(ino).map_err(|_| format!("inode number {ino} is out of range"))?;
        Ok(fs
            .read_inode(ino)
            .map_err(|e| e.to_string())?
            .as_ext4_inode())
    }
}

impl<'a> SbContext<'a> {
    /// The page map of XFS inode `ino` (`i_size` bytes, as the VFS inode says) for the
    /// sorted page indices `pages`, from its on-disk inode and data fork.
    fn xfs_file_map(
        &mut self,
        ino: u64,
        i_size: u64,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<blockmap::FileMap, String> {
        let (k, walk, sb, disk) = (self.k, self.walk, self.sb, self.disk);
        let start = walk.super_blocks[sb].part_start;
        let fs = self.xfs.get_or_insert_with(|| {
            XfsFs::new(source::MetaSource::new(k, walk, sb, disk), start)
                .map_err(|e| format!("XFS superblock: {e}"))
        });
        let fs = fs.as_ref().map_err(Clone::clone)?;
        let inode = fs
            .read_inode(ino)
            .map_err(|e| format!("on-disk inode: {e}"))?;
        if !inode.is_reg() {
            return Err(format!("on-disk inode {ino} is not a regular file"));
        }
        let extents = fs.extents(&inode).map_err(|e| e.to_string())?;
        let vol = Ext4Volume {
            block_size: fs.superblock().blocksize,
            partition_start: start,
            blocks_count: Some(fs.superblock().dblocks),
        };
        let blocks = blockmap::BlockMapper::from_list(ExtentList::new(&extents));
        blockmap::PageMapper::<source::MetaSource>::from_blocks(
            &vol,
            ino,
            i_size,
            blocks,
            map_options(),
        )
        .and_then(|mut m| m.map_pages(pages))
        .map_err(|e| e.to_string())
    }
}

/// How file pages are mapped: the partial last page too. The kernel zeroes a page past
/// EOF before it writes it, so with 4 KiB blocks the disk block holds exactly the page
/// (ext4 zeroes the tail again on truncate, XFS zeroes the EOF block's tail when it
/// extends or truncates). Smaller blocks give a `Tail` (disk bytes, then zeros), which a
/// run cannot express: those stay out.
fn map_options() -> MapOptions {
    MapOptions {
        tail_page: true,
        ..MapOptions::default()
    }
}

/// One run of the map. `ino`/`file_offset`/`path` are absent for block-device cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    pub gpa: u64,
    pub disk_offset: u64,
    pub len: u64,
    /// The filesystem's device (`s_id`, e.g. `vda1`).
    pub dev: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Why cached pages are not in the map, counted.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Exclusions {
    /// Page states other than clean (dirty, writeback, shmem…).
    pub by_state: BTreeMap<String, u64>,
    /// Clean pages the block map could not restore (hole, unwritten, …).
    pub by_block_map: BTreeMap<String, u64>,
    /// Clean pages on filesystems pct cannot map (not ext4, no block device).
    pub unsupported_fs: u64,
    /// Inodes whose block map failed, with the error.
    pub failed_inodes: Vec<String>,
}

/// The cache map and how it came to be.
#[derive(Debug, Default)]
pub struct CacheMap {
    pub runs: Vec<Run>,
    pub excluded: Exclusions,
    /// The guest's free pages when the map was taken, if asked for
    /// ([`ScanOptions::free_pages`](crate::introspect::ScanOptions)).
    pub free: Option<FreePages>,
}

/// The buddy allocator's free blocks at one moment, with what is needed to re-check them
/// later (where the kernel is) and what the kernel makes of free pages' bytes.
#[derive(Debug, Clone)]
pub struct FreePages {
    /// In PFN order.
    pub blocks: Vec<crate::walk::page_scan::FreeBlock>,
    pub loc: crate::kernel::Location,
    pub init: crate::walk::buddy::FreePageInit,
}

impl FreePages {
    /// Page frames in the blocks.
    pub fn frames(&self) -> u64 {
        self.blocks.iter().map(|b| 1u64 << b.order).sum()
    }
}

impl CacheMap {
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Writes the map as JSON lines (one run per line; see docs/cache-map.md).
    pub fn write_jsonl(&self, mut w: impl Write) -> std::io::Result<()> {
        for r in &self.runs {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// Builds the map. `disk` is the guest's disk, if the host has it.
pub fn build(k: &Kernel, walk: &CacheWalk, disk: Option<&Disk>) -> CacheMap {
    let mut map = CacheMap::default();
    let mut pieces: Vec<Run> = Vec::new();
    let mut per_sb: HashMap<usize, SbContext> = HashMap::new();
    for ic in &walk.inodes {
        let sb = &walk.super_blocks[ic.sb];
        let clean: Vec<_> = ic
            .pages
            .iter()
            .filter(|p| p.state == PageState::Clean)
            .collect();
        for p in ic.pages.iter().filter(|p| p.state != PageState::Clean) {
            *map.excluded
                .by_state
                .entry(p.state.name().to_owned())
                .or_default() += 1;
        }
        if clean.is_empty() {
            continue;
        }
        if ic.is_bdev {
            for p in clean {
                pieces.push(Run {
                    gpa: p.pfn * PAGE,
                    disk_offset: sb.part_start + p.index * PAGE,
                    len: PAGE,
                    dev: sb.id.clone(),
                    ino: None,
                    file_offset: None,
                    path: None,
                });
            }
            continue;
        }
        let is_xfs = sb.fs_type == "xfs";
        if sb.bdev == 0
            || !(is_xfs || EXT_FAMILY.contains(&sb.fs_type.as_str()))
            || ic.mode & S_IFMT != S_IFREG
        {
            map.excluded.unsupported_fs += clean.len() as u64;
            continue;
        }
        let fs = per_sb
            .entry(ic.sb)
            .or_insert_with(|| SbContext::new(k, walk, ic.sb, disk));
        let fm = if is_xfs {
            fs.xfs_file_map(ic.ino, ic.size, clean.iter().map(|p| p.index))
        } else {
            ext4_file_map(fs, ic, sb, clean.iter().map(|p| p.index))
        };
        let fm = match fm {
            Ok(fm) => fm,
            Err(e) => {
                map.excluded
                    .failed_inodes
                    .push(format!("inode {} on {}: {e}", ic.ino, sb.id));
                *map.excluded.by_block_map.entry("error".into()).or_default() += clean.len() as u64;
                continue;
            }
        };
        if fm.tail.is_some() {
            *map.excluded
                .by_block_map
                .entry("partial_last_page".into())
                .or_default() += 1;
        }
        for (_, why) in &fm.unrestorable {
            *map.excluded
                .by_block_map
                .entry(reason(*why).into())
                .or_default() += 1;
        }
        // Like d_path(): a file deleted while still open keeps its name, marked.
        let path = (!fm.runs.is_empty())
            .then(|| dentry_path(k, ic.va))
            .flatten()
            .map(|p| {
                if ic.nlink == Some(0) {
                    format!("{p} (deleted)")
                } else {
                    p
                }
            });
        // Runs are in file order; clean pages were asked for in index order.
        let pfn_of: BTreeMap<u64, u64> = clean.iter().map(|p| (p.index, p.pfn)).collect();
        for r in &fm.runs {
            for i in 0..r.pages {
                let index = r.page + i;
                let Some(&pfn) = pfn_of.get(&index) else {
                    continue;
                };
                pieces.push(Run {
                    gpa: pfn * PAGE,
                    disk_offset: r.disk_offset + i * PAGE,
                    len: PAGE,
                    dev: sb.id.clone(),
                    ino: Some(ic.ino),
                    file_offset: Some(index * PAGE),
                    path: path.clone(),
                });
            }
        }
    }
    pieces.sort_by_key(|r| r.gpa);
    pieces.dedup_by_key(|r| r.gpa);
    for p in pieces {
        if let Some(last) = map.runs.last_mut() {
            let follows = last.gpa + last.len == p.gpa
                && last.disk_offset + last.len == p.disk_offset
                && last.dev == p.dev
                && last.ino == p.ino
                && match (last.file_offset, p.file_offset) {
                    (Some(a), Some(b)) => a + last.len == b,
                    (None, None) => true,
                    _ => false,
                };
            if follows {
                last.len += p.len;
                continue;
            }
        }
        map.runs.push(p);
    }
    map
}

/// The page map of an ext4 inode for the sorted page indices `pages`: from the in-memory
/// `ext4_inode_info` when the profile describes it, otherwise from the on-disk inode
/// (imported profiles often lack ext4's private types).
fn ext4_file_map(
    fs: &mut SbContext,
    ic: &crate::walk::fs::InodeCache,
    sb: &crate::walk::fs::SuperBlockInfo,
    pages: impl IntoIterator<Item = u64>,
) -> Result<blockmap::FileMap, String> {
    let vol = Ext4Volume {
        block_size: 1u32 << sb.blocksize_bits.min(16),
        partition_start: sb.part_start,
        blocks_count: None,
    };
    let inode = match ic.ext4 {
        Some(e4) => Ext4Inode {
            ino: ic.ino,
            i_flags: e4.i_flags,
            i_size: ic.size,
            i_block: e4.i_data,
        },
        None => fs
            .ondisk_inode(ic.ino)
            .map_err(|e| format!("on-disk inode: {e}"))?,
    };
    blockmap::map_file_pages(&vol, &inode, &fs.source, map_options(), pages)
        .map_err(|e| e.to_string())
}

fn reason(u: Unrestorable) -> &'static str {
    match u {
        Unrestorable::BeyondEof => "beyond_eof",
        Unrestorable::PartialEof => "partial_last_page",
        Unrestorable::Hole => "hole",
        Unrestorable::Unwritten => "unwritten",
        Unrestorable::Discontiguous => "discontiguous_blocks",
        Unrestorable::Unaddressable => "unaddressable",
        Unrestorable::InlineData => "inline_data",
        Unrestorable::Encrypted => "encrypted",
        Unrestorable::JournalData => "journal_data",
    }
}
