//! XFS as it lies on the disk, enough to map a regular file's pages: the superblock, an
//! inode found from its number, and the data fork's extent list, whether the inode holds
//! it (EXTENTS format) or a B+tree of `bmbt` blocks does (BTREE format). The walker has
//! no XFS types in its profile (xfs.ko's private structures), so, as for ext4 without
//! `ext4_inode_info`, the file's block map comes from the on-disk inode.
//!
//! Facts used (v5 filesystems, all big-endian):
//! - Superblock at byte 0: magic "XFSB", `sb_blocksize` @0x04, `sb_dblocks` @0x08,
//!   `sb_agblocks` @0x54, `sb_agcount` @0x58, `sb_versionnum` @0x64 (low nibble 5),
//!   `sb_inodesize` @0x68, `sb_inopblock` @0x6A, `sb_blocklog` @0x78, `sb_inopblog` @0x7B,
//!   `sb_agblklog` @0x7C.
//! - Inode number = AG number, then AG block (`agblklog` bits), then the index in the
//!   block (`inopblog` bits); a filesystem block number likewise packs the AG number
//!   above `agblklog` bits of AG block. AG `a` starts at block `a × agblocks`.
//! - Dinode: magic "IN" @0, `di_mode` @2, `di_version` @4 (3), `di_format` @5 (2 extents,
//!   3 btree), `di_size` @0x38, `di_nextents` @0x4C (u32; with `XFS_DIFLAG2_NREXT64` in
//!   `di_flags2` @0x78 the u64 @0x18), `di_forkoff` @0x52 (attr fork offset in 8-byte
//!   units, 0: no attr fork), `di_flags` @0x5A (bit 0: realtime, data on another device,
//!   refused), `di_ino` @0x98; the data fork follows the 176-byte core.
//! - Extent record, 128 bits: bit 127 unwritten, 54 bits file offset, 52 bits start
//!   block, 21 bits length (in filesystem blocks).
//! - BTREE fork root: `bb_level` u16, `bb_numrecs` u16, then keys (u64 file offsets) and
//!   pointers (u64 block numbers), each array sized for as many as the fork holds.
//!   Tree blocks: a 72-byte header (magic "BMA3", level, numrecs, siblings, `bb_blkno`
//!   in 512-byte units, LSN, UUID, `bb_owner` = the inode, CRC), then records (leaves)
//!   or keys and pointers sized for the whole block (nodes).
//!
//! The disk is hostile: every field is checked against the superblock, each tree block
//! must name its inode, its own address and one level below its parent, reads are
//! budgeted, and the extents must be sorted and disjoint.

use super::error::{BlockMapError, OnDiskError};
use super::meta::{BlockExtent, MapKind, DEFAULT_MAX_BLOCK_READS};
use super::ondisk::read_fs_block;
use super::source::BlockSource;
use crate::memory::reader::{Addr, FieldError, LeSlice};

pub const XFS_SB_MAGIC: u32 = 0x5846_5342;
pub const XFS_DINODE_MAGIC: u16 = 0x494E;
pub const XFS_BMAP_CRC_MAGIC: u32 = 0x424D_4133;
pub const XFS_DIFLAG2_NREXT64: u64 = 1 << 4;
/// `di_flags`: the file's data lives on the realtime device, not this one.
pub const XFS_DIFLAG_REALTIME: u16 = 1;
const DINODE_CORE_V3: u64 = 176;
const BTREE_LBLOCK_CRC_LEN: u64 = 72;
const BMDR_HDR: u64 = 4;
const FORMAT_EXTENTS: u8 = 2;
const FORMAT_BTREE: u8 = 3;
/// Deeper bmbt trees cannot exist (XFS's own limit is below this).
const MAX_BTREE_LEVEL: u16 = 9;
/// Most extents one file's map may have here (bounds memory on a hostile tree).
pub const MAX_EXTENTS: u64 = 1 << 20;

/// Big-endian fields of bytes read at a known place, with errors naming it (the bounds
/// checks are [`LeSlice`]'s).
struct Be<'a>(LeSlice<'a>);

impl<'a> Be<'a> {
    fn new(b: &'a [u8], at: Addr, ty: &'static str) -> Be<'a> {
        Be(LeSlice::new(b, at, ty))
    }
    fn u8(&self, off: u64, f: &'static str) -> Result<u8, FieldError> {
        self.0.u8(off, f)
    }
    fn u16(&self, off: u64, f: &'static str) -> Result<u16, FieldError> {
        self.0.array(off, f).map(u16::from_be_bytes)
    }
    fn u32(&self, off: u64, f: &'static str) -> Result<u32, FieldError> {
        self.0.array(off, f).map(u32::from_be_bytes)
    }
    fn u64(&self, off: u64, f: &'static str) -> Result<u64, FieldError> {
        self.0.array(off, f).map(u64::from_be_bytes)
    }
}

/// The fields of `struct xfs_dsb` the mapper needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XfsSuperBlock {
    pub blocksize: u32,
    pub dblocks: u64,
    pub agblocks: u32,
    pub agcount: u32,
    pub versionnum: u16,
    pub inodesize: u16,
    pub inopblock: u16,
    pub blocklog: u8,
    pub inopblog: u8,
    pub agblklog: u8,
}

fn log2_exact(v: u64) -> Option<u8> {
    v.is_power_of_two().then(|| v.trailing_zeros() as u8)
}

impl XfsSuperBlock {
    /// Parses and checks the superblock in `b` (its first sector), read at `at`.
    pub fn parse_at(b: &[u8], at: Addr) -> Result<XfsSuperBlock, OnDiskError> {
        let r = Be::new(b, at, "xfs_dsb");
        if r.u32(0, "sb_magicnum")? != XFS_SB_MAGIC {
            return Err(OnDiskError::SuperBlock("bad XFS magic (want XFSB)"));
        }
        let sb = XfsSuperBlock {
            blocksize: r.u32(0x04, "sb_blocksize")?,
            dblocks: r.u64(0x08, "sb_dblocks")?,
            agblocks: r.u32(0x54, "sb_agblocks")?,
            agcount: r.u32(0x58, "sb_agcount")?,
            versionnum: r.u16(0x64, "sb_versionnum")?,
            inodesize: r.u16(0x68, "sb_inodesize")?,
            inopblock: r.u16(0x6A, "sb_inopblock")?,
            blocklog: r.u8(0x78, "sb_blocklog")?,
            inopblog: r.u8(0x7B, "sb_inopblog")?,
            agblklog: r.u8(0x7C, "sb_agblklog")?,
        };
        if sb.versionnum & 0xF != 5 {
            return Err(OnDiskError::Unsupported("XFS before version 5 (no CRCs)"));
        }
        let bs = u64::from(sb.blocksize);
        if !matches!(sb.blocksize, 1024 | 2048 | 4096) || log2_exact(bs) != Some(sb.blocklog) {
            return Err(OnDiskError::SuperBlock(
                "XFS block size not 1024, 2048 or 4096, or sb_blocklog disagrees",
            ));
        }
        let isz = u64::from(sb.inodesize);
        if !(512..=bs).contains(&isz)
            || log2_exact(isz).is_none()
            || u64::from(sb.inopblock) != bs / isz
            || log2_exact(u64::from(sb.inopblock)) != Some(sb.inopblog)
        {
            return Err(OnDiskError::SuperBlock(
                "XFS inode size, sb_inopblock and sb_inopblog disagree",
            ));
        }
        let agb = u64::from(sb.agblocks);
        // sb_agblklog is log2 of sb_agblocks rounded up.
        if sb.agblocks < 2
            || sb.agcount == 0
            || u64::from(sb.agblklog) != 64 - (agb - 1).leading_zeros() as u64
        {
            return Err(OnDiskError::SuperBlock(
                "XFS sb_agblocks, sb_agcount and sb_agblklog disagree",
            ));
        }
        if sb.dblocks == 0 || sb.dblocks > u64::from(sb.agcount) * agb {
            return Err(OnDiskError::SuperBlock(
                "XFS sb_dblocks outside its allocation groups",
            ));
        }
        Ok(sb)
    }

    /// The disk block (from the filesystem's start, in `blocksize` units) of filesystem
    /// block number `fsbno` (AG number above `agblklog` bits of AG block), if inside.
    pub fn fsb_to_block(&self, fsbno: u64) -> Option<u64> {
        let agno = fsbno >> self.agblklog;
        let agbno = fsbno & ((1u64 << self.agblklog) - 1);
        if agno >= u64::from(self.agcount) || agbno >= u64::from(self.agblocks) {
            return None;
        }
        let b = agno * u64::from(self.agblocks) + agbno;
        (b < self.dblocks).then_some(b)
    }
}

/// What the mapper needs of an on-disk XFS inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XfsInode {
    pub ino: u64,
    pub mode: u16,
    pub format: u8,
    pub size: u64,
    pub nextents: u64,
    /// The data fork's bytes (the inode's literal area up to the attr fork).
    pub fork: Vec<u8>,
}

impl XfsInode {
    pub fn is_reg(&self) -> bool {
        self.mode & 0xF000 == 0x8000
    }
}

/// One data-fork extent: file blocks `startoff..startoff + blockcount` at disk block
/// `block` (already converted from the AG-relative start block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XfsExtent {
    pub startoff: u64,
    pub block: u64,
    pub blockcount: u64,
    pub unwritten: bool,
}

/// An XFS filesystem read through a [`BlockSource`] (blocks from the filesystem's start).
pub struct XfsFs<S: BlockSource> {
    source: S,
    sb: XfsSuperBlock,
    partition_start: u64,
}

impl<S: BlockSource> XfsFs<S> {
    /// `partition_start` is for errors and [`XfsFs::disk_offset`]: `source` reads
    /// blocks relative to the filesystem.
    pub fn new(source: S, partition_start: u64) -> Result<Self, OnDiskError> {
        let mut b = vec![0u8; 512];
        source.read_block(0, &mut b).map_err(|e| OnDiskError::Io {
            what: "XFS superblock",
            offset: partition_start,
            source: e,
        })?;
        let sb = XfsSuperBlock::parse_at(&b, Addr::Disk(partition_start))?;
        Ok(XfsFs {
            source,
            sb,
            partition_start,
        })
    }

    pub fn superblock(&self) -> &XfsSuperBlock {
        &self.sb
    }

    /// Disk byte offset of disk block `block` (from [`XfsSuperBlock::fsb_to_block`]).
    pub fn disk_offset(&self, block: u64) -> u64 {
        block
            .saturating_mul(u64::from(self.sb.blocksize))
            .saturating_add(self.partition_start)
    }

    fn read(&self, block: u64, what: &'static str) -> Result<Vec<u8>, OnDiskError> {
        let sb = &self.sb;
        read_fs_block(
            &self.source,
            block,
            sb.blocksize,
            sb.dblocks,
            self.partition_start,
            what,
        )
    }

    /// Reads inode `ino` (its AG, AG block and index from the number).
    pub fn read_inode(&self, ino: u64) -> Result<XfsInode, OnDiskError> {
        let sb = &self.sb;
        let bad = |why| OnDiskError::Inode { ino, why };
        let in_block = ino & ((1u64 << sb.inopblog) - 1);
        let fsbno = ino >> sb.inopblog;
        let block = sb
            .fsb_to_block(fsbno)
            .ok_or(bad("inode number outside the filesystem"))?;
        let b = self.read(block, "XFS inode block")?;
        let isz = u64::from(sb.inodesize);
        let off = in_block * isz;
        let at = Addr::Disk(self.disk_offset(block).saturating_add(off));
        let d = b
            .get(off as usize..(off + isz) as usize)
            .ok_or(bad("inode outside its block"))?;
        let r = Be::new(d, at, "xfs_dinode");
        if r.u16(0, "di_magic")? != XFS_DINODE_MAGIC {
            return Err(bad("bad dinode magic (want IN)"));
        }
        if r.u8(4, "di_version")? != 3 {
            return Err(bad("dinode version is not 3"));
        }
        if r.u64(0x98, "di_ino")? != ino {
            return Err(bad("di_ino names another inode"));
        }
        if r.u16(0x5A, "di_flags")? & XFS_DIFLAG_REALTIME != 0 {
            return Err(bad("realtime file: its data is on the realtime device"));
        }
        let flags2 = r.u64(0x78, "di_flags2")?;
        let nextents = if flags2 & XFS_DIFLAG2_NREXT64 != 0 {
            r.u64(0x18, "di_big_nextents")?
        } else {
            u64::from(r.u32(0x4C, "di_nextents")?)
        };
        let forkoff = u64::from(r.u8(0x52, "di_forkoff")?) * 8;
        let literal = isz - DINODE_CORE_V3;
        let fork_len = if forkoff == 0 { literal } else { forkoff };
        if fork_len > literal {
            return Err(bad("di_forkoff past the inode"));
        }
        Ok(XfsInode {
            ino,
            mode: r.u16(2, "di_mode")?,
            format: r.u8(5, "di_format")?,
            size: r.u64(0x38, "di_size")?,
            nextents,
            fork: d[DINODE_CORE_V3 as usize..(DINODE_CORE_V3 + fork_len) as usize].to_vec(),
        })
    }

    /// The data fork's extents, sorted and checked, whatever the fork's format.
    pub fn extents(&self, inode: &XfsInode) -> Result<Vec<XfsExtent>, BlockMapError> {
        let ino = inode.ino;
        let bad = |why| BlockMapError::Unmappable { ino, why };
        let field = |source| BlockMapError::Field { ino, source };
        let fork = Be::new(&inode.fork, Addr::Detached(0), "xfs data fork");
        let mut out = Vec::new();
        match inode.format {
            FORMAT_EXTENTS => {
                if inode.nextents.saturating_mul(16) > inode.fork.len() as u64 {
                    return Err(bad("di_nextents does not fit the data fork"));
                }
                for i in 0..inode.nextents {
                    out.push(self.record(&fork, i * 16, ino)?);
                }
            }
            FORMAT_BTREE => {
                let level = fork.u16(0, "bb_level").map_err(field)?;
                let numrecs = u64::from(fork.u16(2, "bb_numrecs").map_err(field)?);
                let maxrecs = (inode.fork.len() as u64).saturating_sub(BMDR_HDR) / 16;
                if level == 0 || level > MAX_BTREE_LEVEL || numrecs == 0 || numrecs > maxrecs {
                    return Err(bad("bad bmbt root in the data fork"));
                }
                let mut reads = 0u32;
                for i in 0..numrecs {
                    let ptr = fork
                        .u64(BMDR_HDR + maxrecs * 8 + i * 8, "bmbt root ptr")
                        .map_err(field)?;
                    self.descend(ino, ptr, level - 1, &mut reads, &mut out)?;
                }
            }
            _ => return Err(bad("data fork neither extents nor btree (local or device)")),
        }
        // Sorted by file offset and disjoint, as XFS keeps them.
        for w in out.windows(2) {
            if w[0].startoff + w[0].blockcount > w[1].startoff {
                return Err(bad("extents overlap or are out of order"));
            }
        }
        Ok(out)
    }

    /// Decodes the extent record at `off` of `r` and places its blocks on the disk.
    fn record(&self, r: &Be, off: u64, ino: u64) -> Result<XfsExtent, BlockMapError> {
        let field = |source| BlockMapError::Field { ino, source };
        let l0 = r.u64(off, "bmbt_rec l0").map_err(field)?;
        let l1 = r.u64(off + 8, "bmbt_rec l1").map_err(field)?;
        let startoff = (l0 >> 9) & ((1 << 54) - 1);
        let startblock = ((l0 & 0x1FF) << 43) | (l1 >> 21);
        let blockcount = l1 & ((1 << 21) - 1);
        let range = |what| BlockMapError::BlockRange {
            ino,
            pblk: startblock,
            what,
        };
        if blockcount == 0 {
            return Err(BlockMapError::Unmappable {
                ino,
                why: "extent of zero blocks",
            });
        }
        let block = self
            .sb
            .fsb_to_block(startblock)
            .ok_or_else(|| range("extent start"))?;
        // An extent stays inside its allocation group.
        let last = self
            .sb
            .fsb_to_block(startblock + blockcount - 1)
            .filter(|&l| l == block + blockcount - 1)
            .ok_or_else(|| range("extent end"))?;
        debug_assert!(last >= block);
        Ok(XfsExtent {
            startoff,
            block,
            blockcount,
            unwritten: l0 >> 63 == 1,
        })
    }

    /// Reads the bmbt block at filesystem block `ptr`, expected at `level`, and collects
    /// the extents under it.
    fn descend(
        &self,
        ino: u64,
        ptr: u64,
        level: u16,
        reads: &mut u32,
        out: &mut Vec<XfsExtent>,
    ) -> Result<(), BlockMapError> {
        let bad = |why| BlockMapError::ExtentNode {
            ino,
            at: super::NodeAt::Block(ptr),
            why,
        };
        let field = |source| BlockMapError::Field { ino, source };
        let block = self.sb.fsb_to_block(ptr).ok_or(BlockMapError::BlockRange {
            ino,
            pblk: ptr,
            what: "bmbt block",
        })?;
        if *reads >= DEFAULT_MAX_BLOCK_READS {
            return Err(BlockMapError::Budget {
                ino,
                limit: DEFAULT_MAX_BLOCK_READS,
            });
        }
        *reads += 1;
        let bytes = self.read(block, "XFS bmbt block").map_err(|e| match e {
            OnDiskError::Io { source, .. } => BlockMapError::Read {
                ino,
                pblk: block,
                source,
            },
            _ => bad("unreadable"),
        })?;
        let r = Be::new(
            &bytes,
            Addr::Disk(self.disk_offset(block)),
            "xfs_btree_block",
        );
        if r.u32(0, "bb_magic").map_err(field)? != XFS_BMAP_CRC_MAGIC {
            return Err(bad("bad bmbt block magic (want BMA3)"));
        }
        if r.u16(4, "bb_level").map_err(field)? != level {
            return Err(bad("bmbt block at the wrong level"));
        }
        let sectors = u64::from(self.sb.blocksize) / 512;
        if r.u64(24, "bb_blkno").map_err(field)? != block * sectors {
            return Err(bad("bb_blkno names another block"));
        }
        if r.u64(56, "bb_owner").map_err(field)? != ino {
            return Err(bad("bb_owner names another inode"));
        }
        let numrecs = u64::from(r.u16(6, "bb_numrecs").map_err(field)?);
        let maxrecs = (u64::from(self.sb.blocksize) - BTREE_LBLOCK_CRC_LEN) / 16;
        if numrecs == 0 || numrecs > maxrecs {
            return Err(bad("bb_numrecs out of range"));
        }
        for i in 0..numrecs {
            if level == 0 {
                if out.len() as u64 >= MAX_EXTENTS {
                    return Err(BlockMapError::Unmappable {
                        ino,
                        why: "more extents than pct maps",
                    });
                }
                out.push(self.record(&r, BTREE_LBLOCK_CRC_LEN + i * 16, ino)?);
            } else {
                let child = r
                    .u64(BTREE_LBLOCK_CRC_LEN + maxrecs * 8 + i * 8, "bmbt ptr")
                    .map_err(field)?;
                self.descend(ino, child, level - 1, reads, out)?;
            }
        }
        Ok(())
    }
}

/// A file's extents as [`BlockExtent`]s with the gaps between them as holes (what
/// [`super::BlockMapper`] answers for an XFS file). `extents` sorted and disjoint.
#[derive(Clone, Debug, Default)]
pub struct ExtentList {
    extents: Vec<BlockExtent>,
}

impl ExtentList {
    pub fn new(extents: &[XfsExtent]) -> ExtentList {
        ExtentList {
            extents: extents
                .iter()
                .map(|e| BlockExtent {
                    lblk: e.startoff,
                    len: e.blockcount,
                    kind: if e.unwritten {
                        MapKind::Unwritten { pblk: e.block }
                    } else {
                        MapKind::Mapped { pblk: e.block }
                    },
                })
                .collect(),
        }
    }

    /// What backs file block `lblk`: its extent, or the hole up to the next one.
    pub fn map(&self, lblk: u64) -> BlockExtent {
        let i = self.extents.partition_point(|e| e.lblk + e.len <= lblk);
        match self.extents.get(i) {
            Some(e) if e.lblk <= lblk => *e,
            Some(e) => BlockExtent {
                lblk,
                len: e.lblk - lblk,
                kind: MapKind::Hole,
            },
            None => BlockExtent {
                lblk,
                len: u64::MAX - lblk,
                kind: MapKind::Hole,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::pages::{MapOptions, PageMapper, PageState, Unrestorable};
    use crate::blockmap::source::DiskBytes;
    use crate::blockmap::{BlockMapper, Ext4Volume};

    const BS: usize = 4096;
    /// AGs of 12 blocks (not a power of two: AG-relative and disk blocks differ), 4 AGs.
    const AGBLOCKS: u64 = 12;
    const AGBLKLOG: u8 = 4;
    const DBLOCKS: u64 = 48;
    /// AG 1, AG block 2, inode 3 of the block: disk block 14.
    const INO: u64 = (1 << (AGBLKLOG + 3)) | (2 << 3) | 3;
    /// Where that inode lies in the image.
    const DINODE: usize = (AGBLOCKS as usize + 2) * BS + 3 * 512;
    /// Where the root's first pointer lies (after 20 keys: a 336-byte fork).
    const ROOT_PTR: usize = DINODE + 176 + 4 + 20 * 8;

    fn fsb(ag: u64, agbno: u64) -> u64 {
        ag << AGBLKLOG | agbno
    }

    fn put(img: &mut [u8], off: usize, v: &[u8]) {
        img[off..off + v.len()].copy_from_slice(v);
    }

    fn rec(startoff: u64, fsblock: u64, count: u64, unwritten: bool) -> [u8; 16] {
        let l0 = u64::from(unwritten) << 63 | startoff << 9 | fsblock >> 43;
        let l1 = (fsblock & ((1 << 43) - 1)) << 21 | count;
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&l0.to_be_bytes());
        r[8..].copy_from_slice(&l1.to_be_bytes());
        r
    }

    /// A v5 filesystem image with inode `INO`, a regular file of `size` bytes whose data
    /// fork (format `format`, `nextents`) is `fork`.
    fn image(format: u8, nextents: u32, fork: &[u8], size: u64) -> Vec<u8> {
        let mut img = vec![0u8; DBLOCKS as usize * BS];
        put(&mut img, 0, b"XFSB");
        put(&mut img, 0x04, &(BS as u32).to_be_bytes());
        put(&mut img, 0x08, &DBLOCKS.to_be_bytes());
        put(&mut img, 0x54, &(AGBLOCKS as u32).to_be_bytes());
        put(&mut img, 0x58, &4u32.to_be_bytes());
        put(&mut img, 0x64, &0xb4a5u16.to_be_bytes());
        put(&mut img, 0x68, &512u16.to_be_bytes());
        put(&mut img, 0x6A, &8u16.to_be_bytes());
        put(&mut img, 0x78, &[12, 9, 9, 3, AGBLKLOG]);
        let at = DINODE;
        put(&mut img, at, b"IN");
        put(&mut img, at + 2, &0o100644u16.to_be_bytes());
        put(&mut img, at + 4, &[3, format]);
        put(&mut img, at + 0x38, &size.to_be_bytes());
        put(&mut img, at + 0x4C, &nextents.to_be_bytes());
        put(&mut img, at + 0x98, &INO.to_be_bytes());
        put(&mut img, at + 176, fork);
        img
    }

    /// A bmbt block at `fsbno` of `level` holding `body` after its header.
    fn bmbt_block(img: &mut [u8], fsbno: u64, level: u16, numrecs: u16, body: &[u8]) {
        let b = (fsbno >> AGBLKLOG) * AGBLOCKS + (fsbno & 15);
        let at = b as usize * BS;
        put(img, at, b"BMA3");
        put(img, at + 4, &level.to_be_bytes());
        put(img, at + 6, &numrecs.to_be_bytes());
        put(img, at + 24, &(b * 8).to_be_bytes());
        put(img, at + 56, &INO.to_be_bytes());
        put(img, at + 72, body);
    }

    fn open(img: &[u8]) -> Result<XfsFs<DiskBytes<'_>>, OnDiskError> {
        XfsFs::new(
            DiskBytes {
                bytes: img,
                partition_start: 0,
            },
            0,
        )
    }

    fn extents_of(img: &[u8]) -> Result<Vec<XfsExtent>, String> {
        let fs = open(img).map_err(|e| e.to_string())?;
        let inode = fs.read_inode(INO).map_err(|e| e.to_string())?;
        fs.extents(&inode).map_err(|e| e.to_string())
    }

    /// Extents format: 3 extents, one unwritten, a hole between the first two.
    fn extents_image() -> Vec<u8> {
        let mut fork = Vec::new();
        fork.extend(rec(0, fsb(2, 1), 4, false));
        fork.extend(rec(8, fsb(3, 0), 2, true));
        fork.extend(rec(10, fsb(3, 5), 3, false));
        image(2, 3, &fork, 13 * BS as u64 - 100)
    }

    /// Btree format: a root of two pointers to two leaves of two extents each.
    fn btree_image() -> Vec<u8> {
        let maxrecs = (336 - 4) / 16;
        let mut fork = vec![0u8; 336];
        fork[..4].copy_from_slice(&[0, 1, 0, 2]);
        put(&mut fork, 4, &0u64.to_be_bytes());
        put(&mut fork, 12, &4u64.to_be_bytes());
        put(&mut fork, 4 + maxrecs * 8, &fsb(0, 9).to_be_bytes());
        put(&mut fork, 4 + maxrecs * 8 + 8, &fsb(0, 10).to_be_bytes());
        let mut img = image(3, 4, &fork, 8 * BS as u64);
        let leaf1 = [rec(0, fsb(2, 0), 2, false), rec(2, fsb(2, 4), 2, false)].concat();
        let leaf2 = [rec(4, fsb(3, 1), 3, false), rec(7, fsb(3, 8), 1, true)].concat();
        bmbt_block(&mut img, fsb(0, 9), 0, 2, &leaf1);
        bmbt_block(&mut img, fsb(0, 10), 0, 2, &leaf2);
        img
    }

    #[test]
    fn superblock_fields_are_checked() {
        let good = extents_image();
        let sb = *open(&good).unwrap().superblock();
        assert_eq!((sb.blocksize, sb.agblocks, sb.agblklog), (4096, 12, 4));
        let corrupt: [(usize, &[u8]); 7] = [
            (0, b"XFSC"),
            (0x64, &[0xb4, 0xa4]),             // version 4
            (0x04, &[0, 0, 0x20, 0]),          // 8 KiB blocks
            (0x7B, &[2]),                      // inopblog disagrees
            (0x7C, &[5]),                      // agblklog disagrees
            (0x08, &[0, 0, 0, 1, 0, 0, 0, 0]), // dblocks past the AGs
            (0x68, &[0, 128]),                 // 128-byte inodes
        ];
        for (off, bytes) in corrupt {
            let mut img = good.clone();
            put(&mut img, off, bytes);
            assert!(open(&img).is_err(), "corruption at {off:#x} accepted");
        }
    }

    #[test]
    fn extents_format_maps_written_extents_only() {
        let img = extents_image();
        let ext = extents_of(&img).unwrap();
        assert_eq!(
            ext[0],
            XfsExtent {
                startoff: 0,
                block: 2 * AGBLOCKS + 1,
                blockcount: 4,
                unwritten: false
            }
        );
        assert!(ext[1].unwritten);
        // Through the page rules: pages 0..4 at AG 2 block 1, a hole at 4..8, 8..10
        // unwritten, 10..13 mapped (the last one partial: 4 KiB blocks, so mapped).
        let vol = Ext4Volume {
            block_size: 4096,
            partition_start: 1 << 20,
            blocks_count: Some(DBLOCKS),
        };
        let blocks = BlockMapper::<DiskBytes>::from_list(ExtentList::new(&ext));
        let opts = MapOptions {
            tail_page: true,
            ..MapOptions::default()
        };
        let mut m = PageMapper::from_blocks(&vol, INO, 13 * 4096 - 100, blocks, opts).unwrap();
        let want_off = |b: u64| (1 << 20) + b * 4096;
        let want = [
            (
                1,
                PageState::Restorable {
                    disk_offset: want_off(2 * AGBLOCKS + 2),
                },
            ),
            (5, PageState::Unrestorable(Unrestorable::Hole)),
            (9, PageState::Unrestorable(Unrestorable::Unwritten)),
            (
                12,
                PageState::Restorable {
                    disk_offset: want_off(3 * AGBLOCKS + 7),
                },
            ),
            (13, PageState::Unrestorable(Unrestorable::BeyondEof)),
        ];
        for (page, state) in want {
            assert_eq!(m.page(page).unwrap(), state, "page {page}");
        }
        let fm = m.map_pages(0..13).unwrap();
        assert_eq!(fm.restorable_pages(), 7);
    }

    #[test]
    fn btree_format_walks_its_leaves() {
        let ext = extents_of(&btree_image()).unwrap();
        let got: Vec<_> = ext
            .iter()
            .map(|e| (e.startoff, e.block, e.blockcount, e.unwritten))
            .collect();
        assert_eq!(
            got,
            [
                (0, 24, 2, false),
                (2, 28, 2, false),
                (4, 37, 3, false),
                (7, 44, 1, true)
            ]
        );
    }

    #[test]
    fn corrupt_forks_and_blocks_are_refused() {
        // The first leaf, at AG 0 block 9.
        let leaf = 9 * BS;
        let cases: [(&str, usize, Vec<u8>); 15] = [
            ("realtime", DINODE + 0x5A, 1u16.to_be_bytes().into()),
            ("owner", leaf + 56, 7u64.to_be_bytes().into()),
            ("level", leaf + 4, 1u16.to_be_bytes().into()),
            ("blkno", leaf + 24, 1u64.to_be_bytes().into()),
            ("magic", leaf, b"BMAP".to_vec()),
            ("numrecs", leaf + 6, 0xffffu16.to_be_bytes().into()),
            ("ptr past AG", ROOT_PTR, fsb(0, 13).to_be_bytes().into()),
            ("ptr to AG 9", ROOT_PTR, fsb(9, 1).to_be_bytes().into()),
            ("root level", DINODE + 176, 40u16.to_be_bytes().into()),
            (
                "extent past AG",
                leaf + 72,
                rec(0, fsb(2, 10), 5, false).into(),
            ),
            (
                "empty extent",
                leaf + 72,
                rec(0, fsb(2, 0), 0, false).into(),
            ),
            ("overlap", leaf + 88, rec(1, fsb(2, 4), 2, false).into()),
            ("di_ino", DINODE + 0x98, 5u64.to_be_bytes().into()),
            ("forkoff", DINODE + 0x52, vec![200]),
            ("format local", DINODE + 5, vec![1]),
        ];
        assert!(extents_of(&btree_image()).is_ok());
        for (what, at, bytes) in cases {
            let mut img = btree_image();
            put(&mut img, at, &bytes);
            let r = extents_of(&img);
            assert!(r.is_err(), "{what}: accepted {r:?}");
        }
        // Extents format: more extents than the fork holds.
        let mut img = extents_image();
        put(&mut img, DINODE + 0x4C, &1000u32.to_be_bytes());
        assert!(extents_of(&img).is_err());
        // An inode number outside the filesystem.
        let img = extents_image();
        let fs = open(&img).unwrap();
        assert!(fs.read_inode(u64::MAX).is_err());
        assert!(fs.read_inode(9 << 7).is_err());
    }

    #[test]
    fn random_corruption_never_panics_and_keeps_answers_sane() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let hot = [DINODE, 9 * BS, 10 * BS];
        let (mut ok, mut refused) = (0, 0);
        for base in [btree_image(), extents_image()] {
            for _ in 0..3000 {
                let mut img = base.clone();
                for _ in 0..1 + next() % 4 {
                    let at = hot[(next() % 3) as usize] + (next() % 512) as usize;
                    img[at] = next() as u8;
                }
                match extents_of(&img) {
                    Ok(ext) => {
                        ok += 1;
                        for e in &ext {
                            assert!(e.blockcount > 0 && e.block + e.blockcount <= DBLOCKS);
                        }
                        for w in ext.windows(2) {
                            assert!(w[0].startoff + w[0].blockcount <= w[1].startoff);
                        }
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(ok > 0 && refused > 0, "{ok} accepted, {refused} refused");
    }
}
