//! From `super_blocks` to page-cache pages: every superblock, its inodes (`s_inodes`
//! linked by `i_sb_list`), each inode's `i_mapping` tree, and each block device's own
//! page cache (`bd_inode`, or from 6.10 the inode of `bd_mapping`). Returns what it found even when parts of a walk fail.

use super::list::list_for_each_entry;
use super::page::{PageState, Pages};
use super::radix_tree::radix_tree_for_each;
use super::xarray::xa_for_each;
use super::{at_va, need, LeSlice, WalkError};
use crate::kernel::Kernel;
use crate::profile::PageCacheTree;
use crate::sanitize::sanitize;

/// Caps that bound a walk over hostile memory.
pub const MAX_SUPER_BLOCKS: usize = 4096;
pub const MAX_INODES_PER_SB: usize = 4 << 20;

/// A mounted filesystem.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SuperBlockInfo {
    pub va: u64,
    /// `s_type->name`, sanitised.
    pub fs_type: String,
    /// `s_id` (the device name, e.g. `vda1`), sanitised.
    pub id: String,
    pub dev: u32,
    pub blocksize_bits: u8,
    /// `struct block_device *` (0 for filesystems without one: tmpfs, proc…).
    pub bdev: u64,
    /// Byte offset of the filesystem's partition on its disk.
    pub part_start: u64,
}

/// One cached page of an inode: an order-0 folio, or one page of a large folio (whose
/// head's flags give every page of it its state).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CachedPage {
    pub index: u64,
    pub pfn: u64,
    pub state: PageState,
    /// The order of the folio the page belongs to (0: a folio of one page).
    pub order: u8,
}

/// An inode with page cache.
#[derive(Debug, Clone)]
pub struct InodeCache {
    pub va: u64,
    /// Index into [`CacheWalk::super_blocks`].
    pub sb: usize,
    pub ino: u64,
    pub mode: u16,
    pub size: u64,
    /// Link count, where the profile has it: 0 for a deleted file still held open.
    pub nlink: Option<u32>,
    pub mapping: u64,
    /// The block device's own inode (raw disk blocks: ext4 metadata, directories…).
    pub is_bdev: bool,
    /// ext4 only: the in-memory `i_data` (extent root or block pointers) and `i_flags`.
    pub ext4: Option<Ext4InodeInfo>,
    pub pages: Vec<CachedPage>,
}

/// What the walk reads of an ext4 inode's `struct ext4_inode_info` (the in-memory inode
/// that embeds the VFS `struct inode` as `vfs_inode`). Not to be confused with
/// [`crate::blockmap::Ext4Inode`], the block mapper's input built from it.
#[derive(Debug, Clone, Copy)]
pub struct Ext4InodeInfo {
    pub i_data: [u8; 60],
    pub i_flags: u32,
}

/// Everything one walk found.
#[derive(Debug, Default)]
pub struct CacheWalk {
    pub super_blocks: Vec<SuperBlockInfo>,
    pub inodes: Vec<InodeCache>,
    /// Parts of the walk that failed (corrupt or changing structures), with context.
    pub problems: Vec<String>,
    pub struct_page_size: u64,
}

fn c_string(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or(b)
}

struct Offsets {
    s_list: u64,
    s_inodes: u64,
    s_type: u64,
    s_id: u64,
    s_dev: u64,
    s_blocksize_bits: u64,
    s_bdev: u64,
    fst_name: u64,
    i_sb_list: u64,
    i_ino: u64,
    i_mode: u64,
    i_size: u64,
    i_nlink: Option<u64>,
    i_mapping: u64,
    a_i_pages: u64,
    a_nrpages: u64,
    /// `xarray.xa_head` (XArray kernels; radix-tree kernels read the root themselves).
    xa_head: Option<u64>,
    bd_start_sect: Option<u64>,
    /// `block_device.bd_part` → `hd_struct.start_sect` (≤ 5.10).
    bd_part: Option<(u64, u64)>,
    bd_partno: Option<u64>,
    bd_inode: Option<u64>,
    /// `block_device.bd_mapping` (≥ 6.10, where `bd_inode` is gone) and `inode.i_data`:
    /// the device's inode is the one whose `i_data` that mapping is.
    bd_mapping: Option<u64>,
    i_data: Option<u64>,
    ext4_vfs_inode: Option<u64>,
    ext4_i_data: Option<u64>,
    ext4_i_flags: Option<u64>,
    sb_size: u64,
    inode_size: u64,
    page_flags: u64,
    page_private: Option<u64>,
    pg_private: Option<u32>,
    bh_state: Option<u64>,
    bh_this_page: Option<u64>,
    bh_bits: Option<(u32, u32, u32, u32)>,
}

impl Offsets {
    fn new(k: &Kernel) -> Result<Offsets, WalkError> {
        let p = k.profile;
        let o = |t: &str, f: &str| p.offset(t, f);
        Ok(Offsets {
            s_list: need(p, "super_block", "s_list")?,
            s_inodes: need(p, "super_block", "s_inodes")?,
            s_type: need(p, "super_block", "s_type")?,
            s_id: need(p, "super_block", "s_id")?,
            s_dev: need(p, "super_block", "s_dev")?,
            s_blocksize_bits: need(p, "super_block", "s_blocksize_bits")?,
            s_bdev: need(p, "super_block", "s_bdev")?,
            fst_name: need(p, "file_system_type", "name")?,
            i_sb_list: need(p, "inode", "i_sb_list")?,
            i_ino: need(p, "inode", "i_ino")?,
            i_mode: need(p, "inode", "i_mode")?,
            i_size: need(p, "inode", "i_size")?,
            i_nlink: o("inode", "i_nlink"),
            i_mapping: need(p, "inode", "i_mapping")?,
            a_i_pages: need(p, "address_space", "i_pages")?,
            a_nrpages: need(p, "address_space", "nrpages")?,
            xa_head: p.offset("xarray", "xa_head"),
            bd_start_sect: o("block_device", "bd_start_sect"),
            bd_part: o("block_device", "bd_part").zip(o("hd_struct", "start_sect")),
            bd_partno: o("block_device", "bd_partno"),
            bd_inode: o("block_device", "bd_inode"),
            bd_mapping: o("block_device", "bd_mapping"),
            i_data: o("inode", "i_data"),
            ext4_vfs_inode: o("ext4_inode_info", "vfs_inode"),
            ext4_i_data: o("ext4_inode_info", "i_data"),
            ext4_i_flags: o("ext4_inode_info", "i_flags"),
            sb_size: p
                .size_of("super_block")
                .unwrap_or(0)
                .max(need(p, "super_block", "s_inodes")? + 16),
            inode_size: p
                .size_of("inode")
                .unwrap_or(0)
                .max(need(p, "inode", "i_sb_list")? + 16),
            page_flags: need(p, "page", "flags")?,
            page_private: o("page", "private"),
            pg_private: p.pageflag("PG_private"),
            bh_state: o("buffer_head", "b_state"),
            bh_this_page: o("buffer_head", "b_this_page"),
            bh_bits: (|| {
                let v = |n: &str| {
                    p.enum_value("bh_state_bits", n)
                        .and_then(|v| u32::try_from(v).ok())
                };
                Some((
                    v("BH_Uptodate")?,
                    v("BH_Dirty")?,
                    v("BH_Lock")?,
                    v("BH_PrivateStart")?,
                ))
            })(),
        })
    }
}

/// Walks every superblock's inodes and their page cache.
pub fn walk_page_cache(k: &Kernel) -> Result<CacheWalk, WalkError> {
    let o = Offsets::new(k)?;
    let pages = Pages::new(k)?;
    let head = k
        .symbol("super_blocks")
        .ok_or_else(|| WalkError::ProfileLacks("symbol super_blocks".into()))?;
    let mut out = CacheWalk {
        struct_page_size: pages.struct_size(),
        ..Default::default()
    };
    let mut sbs = Vec::new();
    list_for_each_entry(k, head, o.s_list, MAX_SUPER_BLOCKS, "super_blocks", |sb| {
        sbs.push(sb);
        Ok(())
    })?;
    for sb in sbs {
        let b = match k.read(sb, o.sb_size, "super_block") {
            Ok(b) => b,
            Err(e) => {
                out.problems.push(format!("super_block {sb:#x}: {e}"));
                continue;
            }
        };
        let (info, bd_inode) =
            match read_super_block(k, &o, sb, &at_va(&b, sb, "super_block"), &mut out.problems) {
                Ok(x) => x,
                Err(e) => {
                    out.problems.push(format!("super_block {sb:#x}: {e}"));
                    continue;
                }
            };
        let fs_type = info.fs_type.clone();
        let sbi = out.super_blocks.len();
        out.super_blocks.push(info);
        // The bdev pseudo-filesystem's inodes are the block devices: each mounted
        // filesystem reaches its own through `s_bdev->bd_inode` below.
        if fs_type == "bdev" {
            continue;
        }
        let is_ext4 = fs_type == "ext4";
        let mut inodes = Vec::new();
        let r = list_for_each_entry(
            k,
            sb + o.s_inodes,
            o.i_sb_list,
            MAX_INODES_PER_SB,
            "s_inodes",
            |inode| {
                inodes.push(inode);
                Ok(())
            },
        );
        if let Err(e) = r {
            out.problems
                .push(format!("inodes of super_block {sb:#x} ({fs_type}): {e}"));
        }
        for inode in inodes {
            match walk_inode(k, &o, &pages, inode, sbi, is_ext4, false) {
                Ok(Some((ic, problems))) => {
                    out.inodes.push(ic);
                    out.problems.extend(problems);
                }
                Ok(None) => {}
                Err(e) => out
                    .problems
                    .push(format!("inode {inode:#x} on {fs_type}: {e}")),
            }
        }
        if bd_inode != 0 {
            match walk_inode(k, &o, &pages, bd_inode, sbi, false, true) {
                Ok(Some((ic, problems))) => {
                    out.inodes.push(ic);
                    out.problems.extend(problems);
                }
                Ok(None) => {}
                Err(e) => out
                    .problems
                    .push(format!("block device inode {bd_inode:#x}: {e}")),
            }
        }
    }
    Ok(out)
}

/// The [`SuperBlockInfo`] of the `super_block` at `sb`, whose bytes `r` holds, and its
/// block device's `bd_inode` (0 when there is none to walk). Problems with the block
/// device go to `problems`.
fn read_super_block(
    k: &Kernel,
    o: &Offsets,
    sb: u64,
    r: &LeSlice,
    problems: &mut Vec<String>,
) -> Result<(SuperBlockInfo, u64), WalkError> {
    let s_type = r.u64(o.s_type, "s_type")?;
    let fs_type = k
        .read(s_type, o.fst_name + 8, "file_system_type")
        .ok()
        .and_then(|t| {
            let name = at_va(&t, s_type, "file_system_type")
                .u64(o.fst_name, "name")
                .ok()?;
            k.read(name, 32, "file_system_type.name")
                .ok()
                .map(|n| sanitize(c_string(&n)))
        })
        .unwrap_or_else(|| "?".into());
    let id = sanitize(c_string(r.slice(o.s_id, 32, "s_id")?));
    let bdev = r.u64(o.s_bdev, "s_bdev")?;
    let (part_start, bd_inode) = if bdev == 0 {
        (0, 0)
    } else {
        match block_device(k, o, bdev) {
            Ok((start, bd_inode, problem)) => {
                if let Some(p) = problem {
                    problems.push(format!("block device {bdev:#x} of {id} ({fs_type}): {p}"));
                }
                (start, bd_inode)
            }
            Err(e) => {
                problems.push(format!(
                    "block device {bdev:#x} of {id} ({fs_type}): {e}; partition start assumed 0"
                ));
                (0, 0)
            }
        }
    };
    let info = SuperBlockInfo {
        va: sb,
        fs_type,
        id,
        dev: r.u32(o.s_dev, "s_dev")?,
        blocksize_bits: r.u8(o.s_blocksize_bits, "s_blocksize_bits")?,
        bdev,
        part_start,
    };
    Ok((info, bd_inode))
}

/// Where the filesystem on block device `bdev` starts on its disk (bytes), the device's
/// `bd_inode` (or, from 6.10, the inode of its `bd_mapping`; 0 when its page cache is not
/// to be walked), and a problem to record.
///
/// The start is `bd_start_sect` (≥ 5.11) or `bd_part->start_sect` (≤ 5.10), in 512-byte
/// sectors. A profile with neither cannot place a partition: the start is then assumed 0,
/// which is right for a whole disk only, and is recorded as a problem unless `bd_partno`
/// says the device is a whole disk. The device's own page cache is walked only when its
/// start is known (its pages are mapped at start + index × 4 KiB).
fn block_device(
    k: &Kernel,
    o: &Offsets,
    bdev: u64,
) -> Result<(u64, u64, Option<String>), WalkError> {
    let len = [
        o.bd_start_sect,
        o.bd_part.map(|(part, _)| part),
        o.bd_inode,
        o.bd_mapping,
    ]
    .iter()
    .flatten()
    .map(|off| off + 8)
    .max()
    .unwrap_or(0);
    let bytes = if len > 0 {
        k.read(bdev, len, "block_device")?
    } else {
        Default::default()
    };
    let bd = at_va(&bytes, bdev, "block_device");
    let start_sect = if let Some(ss) = o.bd_start_sect {
        Some(bd.u64(ss, "bd_start_sect")?)
    } else if let Some((part, start_off)) = o.bd_part {
        let hd = bd.u64(part, "bd_part")?;
        let h = k.read(hd, start_off + 8, "hd_struct")?;
        Some(at_va(&h, hd, "hd_struct").u64(start_off, "start_sect")?)
    } else {
        None
    };
    let bd_inode = match (o.bd_inode, o.bd_mapping.zip(o.i_data)) {
        (Some(off), _) => bd.u64(off, "bd_inode")?,
        (None, Some((m, i_data))) => bd_mapping_host(k, o, bd.u64(m, "bd_mapping")?, i_data)?,
        (None, None) => 0,
    };
    if let Some(ss) = start_sect {
        return Ok((ss.saturating_mul(512), bd_inode, None));
    }
    let lacks = "the profile has neither block_device.bd_start_sect nor block_device.bd_part";
    let partno = match o.bd_partno {
        Some(off) => {
            let b = k.read(bdev + off, 1, "block_device.bd_partno")?;
            Some(at_va(&b, bdev + off, "block_device").u8(0, "bd_partno")?)
        }
        None => None,
    };
    let problem = match partno {
        // A whole disk: its filesystem starts at 0.
        Some(0) => return Ok((0, bd_inode, None)),
        Some(n) => format!(
            "partition {n} of its disk, but {lacks}: its start is unknown, assumed 0 \
             (the disk offsets of its blocks will not match)"
        ),
        None => format!(
            "{lacks} (nor bd_partno): cannot tell whether it is a partition; partition start \
             assumed 0"
        ),
    };
    Ok((0, 0, Some(problem)))
}

/// The inode of a block device from its `bd_mapping` (≥ 6.10): the mapping is that inode's
/// own `i_data`, so the inode starts `offsetof(struct inode, i_data)` before it. Checked
/// by the inode's `i_mapping` pointing back at the mapping; 0 (nothing to walk) for a
/// null mapping.
fn bd_mapping_host(k: &Kernel, o: &Offsets, mapping: u64, i_data: u64) -> Result<u64, WalkError> {
    if mapping == 0 {
        return Ok(0);
    }
    let inode = mapping.wrapping_sub(i_data);
    let b = k.read(inode + o.i_mapping, 8, "block device inode")?;
    let back = at_va(&b, inode + o.i_mapping, "inode").u64(0, "i_mapping")?;
    if back != mapping {
        return Err(WalkError::Corrupt {
            what: format!("block device mapping {mapping:#x}"),
            msg: format!("its inode {inode:#x} has i_mapping {back:#x}, not the mapping"),
        });
    }
    Ok(inode)
}

/// A block-device page is as on disk only if each of its buffers is up to date, not
/// dirty, not locked and not owned by the journal (any bit from BH_PrivateStart up).
/// Without the buffer_head layout in the profile this cannot be known: not clean.
fn buffers_clean(k: &Kernel, o: &Offsets, page: &LeSlice) -> bool {
    // A buffer_head that cannot be read leaves the page's state unknown: not clean.
    try_buffers_clean(k, o, page).unwrap_or(false)
}

fn try_buffers_clean(k: &Kernel, o: &Offsets, page: &LeSlice) -> Result<bool, WalkError> {
    let (
        Some(priv_off),
        Some(pg_private),
        Some(st_off),
        Some(next_off),
        Some((up, dirty, lock, private_start)),
    ) = (
        o.page_private,
        o.pg_private,
        o.bh_state,
        o.bh_this_page,
        o.bh_bits,
    )
    else {
        return Ok(false);
    };
    if page.u64(o.page_flags, "flags")? >> pg_private & 1 == 0 {
        // No buffers: nothing says which of its blocks were read from the disk (ext4
        // builds some metadata blocks in memory, e.g. a fresh inode-table block).
        return Ok(false);
    }
    let first = page.u64(priv_off, "private")?;
    let mut bh = first;
    // At most 4096 / 512 buffers share a page.
    for _ in 0..8 {
        let bytes = k.read(bh, next_off.max(st_off) + 8, "buffer_head")?;
        let b = at_va(&bytes, bh, "buffer_head");
        let state = b.u64(st_off, "b_state")?;
        if state >> up & 1 == 0
            || state >> dirty & 1 == 1
            || state >> lock & 1 == 1
            || state >> private_start != 0
        {
            return Ok(false);
        }
        bh = b.u64(next_off, "b_this_page")?;
        if bh == first {
            return Ok(true);
        }
    }
    Ok(false)
}

fn walk_inode(
    k: &Kernel,
    o: &Offsets,
    pages: &Pages,
    inode: u64,
    sb: usize,
    is_ext4: bool,
    is_bdev: bool,
) -> Result<Option<(InodeCache, Vec<String>)>, WalkError> {
    let bytes = k.read(inode, o.inode_size, "inode")?;
    let b = at_va(&bytes, inode, "inode");
    let mapping = b.u64(o.i_mapping, "i_mapping")?;
    if mapping == 0 {
        return Ok(None);
    }
    let a_len = (o.a_nrpages + 8).max(o.xa_head.map_or(0, |x| o.a_i_pages + x + 8));
    let a_bytes = k.read(mapping, a_len, "address_space")?;
    let a = at_va(&a_bytes, mapping, "address_space");
    if a.u64(o.a_nrpages, "nrpages")? == 0 {
        return Ok(None);
    }
    let head = match o.xa_head {
        Some(x) => a.u64(o.a_i_pages + x, "i_pages.xa_head")?,
        None => 0,
    };
    let mut ic = InodeCache {
        va: inode,
        sb,
        ino: b.u64(o.i_ino, "i_ino")?,
        mode: b.u16(o.i_mode, "i_mode")?,
        size: b.u64(o.i_size, "i_size")?,
        nlink: o.i_nlink.map(|off| b.u32(off, "i_nlink")).transpose()?,
        mapping,
        is_bdev,
        ext4: None,
        pages: Vec::new(),
    };
    if is_ext4 {
        if let (Some(vfs), Some(d), Some(fl)) = (o.ext4_vfs_inode, o.ext4_i_data, o.ext4_i_flags) {
            let ei = inode.wrapping_sub(vfs);
            let bytes = k.read(ei, d.max(fl) + 60, "ext4_inode_info")?;
            let e = at_va(&bytes, ei, "ext4_inode_info");
            ic.ext4 = Some(Ext4InodeInfo {
                i_data: e.array(d, "i_data")?,
                i_flags: e.u32(fl, "i_flags")?,
            });
        }
    }
    let what = format!("page cache of inode {}", ic.ino);
    let file_pages = ic.size.div_ceil(4096);
    let mut problems = Vec::new();
    let visit = |index: u64, entry: u64, span: Option<u64>| {
        let Some(pfn) = pages.page_to_pfn(entry) else {
            return Err(WalkError::Corrupt {
                what: what.clone(),
                msg: format!("entry {entry:#x} at index {index} is not a struct page"),
            });
        };
        let mut push = |state, n: u64| {
            let order = n.trailing_zeros() as u8;
            ic.pages.extend((0..n).map(|i| CachedPage {
                index: index + i,
                pfn: pfn + i,
                state,
                order,
            }));
        };
        let bytes = match k.read(entry, pages.struct_size(), "struct page") {
            Ok(bytes) => bytes,
            Err(_) => {
                push(PageState::Inconsistent, 1);
                return Ok(());
            }
        };
        let pb = at_va(&bytes, entry, "page");
        let st = pages.state_of(&pb, mapping, index)?;
        let head = pages.is_head(&pb)?;
        if st == PageState::Inconsistent || (!head && span.is_some_and(|s| s != 1)) {
            // Not the page the tree's entry says, or a multi-index entry for a single page.
            push(PageState::Inconsistent, 1);
            return Ok(());
        }
        // (Checks at most 8 buffers: a large block-device folio with more stays out.)
        let st = if is_bdev && st == PageState::Clean && !buffers_clean(k, o, &pb) {
            PageState::BuffersBusy
        } else {
            st
        };
        if head {
            // A large folio: its head's flags govern all its pages.
            match pages.folio_nr_pages(k, entry, pfn, index, span, file_pages) {
                Ok(n) => push(st, n),
                Err(why) => {
                    problems.push(format!(
                        "{what}: folio at index {index}, frame {pfn:#x}: {why}"
                    ));
                    push(PageState::Inconsistent, 1);
                }
            }
            return Ok(());
        }
        push(st, 1);
        Ok(())
    };
    match k.profile.page_cache_tree() {
        Some(PageCacheTree::XArray) if o.xa_head.is_some() => xa_for_each(k, head, &what, visit)?,
        _ => {
            let mut visit = visit;
            radix_tree_for_each(k, mapping + o.a_i_pages, &what, |i, e| visit(i, e, None))?
        }
    }
    ic.pages.sort_by_key(|p| p.index);
    Ok(Some((ic, problems)))
}
