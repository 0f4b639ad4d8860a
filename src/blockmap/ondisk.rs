//! A small reader of ext4 as it lies on the disk: the MBR partition table, the
//! superblock, group descriptors, inodes by number, and path lookup through directory
//! blocks. It lets the lab tests check the mapper against real images, and lets pct
//! resolve a file's block map from the disk image when the guest's profile lacks the
//! ext4 in-memory types.
//!
//! Facts used (all little-endian). MBR: sector 0, signature 0x55 0xAA at byte 510, four
//! 16-byte partition entries from byte 446 (type at +4, first LBA at +8, sectors at
//! +12). Superblock: 1024 bytes at byte 1024 of the filesystem; `s_magic` 0xEF53 at
//! 0x38. Group descriptors start in the block after `s_first_data_block`, 32 bytes each
//! (or `s_desc_size` with the 64bit feature), `bg_inode_table` lo at 0x08, hi at 0x28.
//! Inode `ino` is entry `(ino - 1) % s_inodes_per_group` of the inode table of group
//! `(ino - 1) / s_inodes_per_group`, `s_inode_size` bytes each. Directory blocks are
//! chains of `ext4_dir_entry_2` (`inode` u32, `rec_len` u16, `name_len` u8,
//! `file_type` u8, name); htree interior blocks read as one empty entry, so a linear
//! scan sees every name.

use super::error::OnDiskError;
use super::inode::{BlockMapper, Ext4Inode, Ext4Volume, EXT4_INLINE_DATA_FL};
use super::meta::MapKind;
use super::source::{BlockSource, ImageFile};
use crate::memory::reader::{Addr, LeSlice};
use std::path::Path;

/// One primary MBR partition entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrPartition {
    /// 1..=4, as in `/dev/sda1`.
    pub number: u8,
    pub kind: u8,
    pub start_lba: u32,
    pub sectors: u32,
}

impl MbrPartition {
    pub fn start_bytes(&self) -> u64 {
        u64::from(self.start_lba) * 512
    }
}

/// The non-empty primary partitions of an MBR held in `sector0` (512 bytes).
pub fn parse_mbr(sector0: &[u8]) -> Result<Vec<MbrPartition>, OnDiskError> {
    let s = sector0.get(..512).ok_or(OnDiskError::Mbr("short sector"))?;
    let s = LeSlice::new(s, Addr::Disk(0), "MBR");
    if s.array::<2>(510, "signature")? != [0x55, 0xAA] {
        return Err(OnDiskError::Mbr("no 0x55AA signature"));
    }
    let mut parts = Vec::new();
    for n in 0..4u8 {
        let e = s.sub(446 + 16 * u64::from(n), 16, "partition entry")?;
        let (kind, start_lba, sectors) = (
            e.u8(4, "type")?,
            e.u32(8, "first LBA")?,
            e.u32(12, "sectors")?,
        );
        if kind != 0 && sectors != 0 {
            parts.push(MbrPartition {
                number: n + 1,
                kind,
                start_lba,
                sectors,
            });
        }
    }
    Ok(parts)
}

pub const EXT4_SUPER_MAGIC: u16 = 0xEF53;
pub const EXT4_FEATURE_INCOMPAT_FILETYPE: u32 = 0x2;
pub const EXT4_FEATURE_INCOMPAT_META_BG: u32 = 0x10;
pub const EXT4_FEATURE_INCOMPAT_EXTENTS: u32 = 0x40;
pub const EXT4_FEATURE_INCOMPAT_64BIT: u32 = 0x80;
pub const EXT4_FEATURE_INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub const EXT4_ROOT_INO: u32 = 2;

/// The fields of `struct ext4_super_block` this reader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4SuperBlock {
    pub s_inodes_count: u32,
    /// `s_blocks_count_lo` | `s_blocks_count_hi` (64bit) << 32.
    pub s_blocks_count: u64,
    pub s_first_data_block: u32,
    pub s_log_block_size: u32,
    pub s_blocks_per_group: u32,
    pub s_inodes_per_group: u32,
    pub s_rev_level: u32,
    pub s_inode_size: u16,
    pub s_feature_incompat: u32,
    pub s_desc_size: u16,
}

impl Ext4SuperBlock {
    /// Parse and sanity-check the 1024 superblock bytes.
    pub fn parse(b: &[u8]) -> Result<Ext4SuperBlock, OnDiskError> {
        Self::parse_at(b, Addr::Detached(0))
    }

    /// Like [`parse`](Self::parse), for bytes read at `at` (named in errors).
    pub fn parse_at(b: &[u8], at: Addr) -> Result<Ext4SuperBlock, OnDiskError> {
        let b = b.get(..1024).ok_or(OnDiskError::SuperBlock("short"))?;
        let b = LeSlice::new(b, at, "ext4_super_block");
        if b.u16(0x38, "s_magic")? != EXT4_SUPER_MAGIC {
            return Err(OnDiskError::SuperBlock("bad magic (want 0xEF53)"));
        }
        let incompat = b.u32(0x60, "s_feature_incompat")?;
        let is64 = incompat & EXT4_FEATURE_INCOMPAT_64BIT != 0;
        let rev = b.u32(0x4C, "s_rev_level")?;
        let sb = Ext4SuperBlock {
            s_inodes_count: b.u32(0x0, "s_inodes_count")?,
            s_blocks_count: u64::from(b.u32(0x4, "s_blocks_count_lo")?)
                | if is64 {
                    u64::from(b.u32(0x150, "s_blocks_count_hi")?) << 32
                } else {
                    0
                },
            s_first_data_block: b.u32(0x14, "s_first_data_block")?,
            s_log_block_size: b.u32(0x18, "s_log_block_size")?,
            s_blocks_per_group: b.u32(0x20, "s_blocks_per_group")?,
            s_inodes_per_group: b.u32(0x28, "s_inodes_per_group")?,
            s_rev_level: rev,
            s_inode_size: if rev == 0 {
                128
            } else {
                b.u16(0x58, "s_inode_size")?
            },
            s_feature_incompat: incompat,
            s_desc_size: b.u16(0xFE, "s_desc_size")?,
        };
        if sb.s_log_block_size > 2 {
            return Err(OnDiskError::Unsupported("block size above 4096"));
        }
        if sb.s_inodes_per_group == 0 || sb.s_blocks_per_group == 0 {
            return Err(OnDiskError::SuperBlock("zero inodes or blocks per group"));
        }
        let isz = sb.s_inode_size;
        if isz < 128 || !isz.is_power_of_two() || u32::from(isz) > sb.block_size() {
            return Err(OnDiskError::SuperBlock("bad s_inode_size"));
        }
        let dsz = sb.desc_size();
        if dsz < 32 || dsz > sb.block_size() || !dsz.is_power_of_two() {
            return Err(OnDiskError::SuperBlock("bad s_desc_size"));
        }
        if incompat & EXT4_FEATURE_INCOMPAT_META_BG != 0 {
            return Err(OnDiskError::Unsupported("meta_bg"));
        }
        Ok(sb)
    }

    pub fn block_size(&self) -> u32 {
        1024 << self.s_log_block_size
    }

    pub fn desc_size(&self) -> u32 {
        if self.s_feature_incompat & EXT4_FEATURE_INCOMPAT_64BIT != 0 {
            u32::from(self.s_desc_size)
        } else {
            32
        }
    }

    pub fn group_count(&self) -> u64 {
        self.s_blocks_count
            .saturating_sub(u64::from(self.s_first_data_block))
            .div_ceil(u64::from(self.s_blocks_per_group))
    }
}

/// The fields of an on-disk `struct ext4_inode` the mapper and the lookup need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnDiskInode {
    pub ino: u32,
    pub i_mode: u16,
    pub i_links_count: u16,
    pub i_flags: u32,
    /// `i_size_lo` | `i_size_high` << 32.
    pub i_size: u64,
    pub i_block: [u8; 60],
}

impl OnDiskInode {
    pub fn is_dir(&self) -> bool {
        self.i_mode & 0xF000 == 0x4000
    }

    pub fn is_reg(&self) -> bool {
        self.i_mode & 0xF000 == 0x8000
    }

    pub fn as_ext4_inode(&self) -> Ext4Inode {
        Ext4Inode {
            ino: u64::from(self.ino),
            i_flags: self.i_flags,
            i_size: self.i_size,
            i_block: self.i_block,
        }
    }
}

/// One directory entry (`ext4_dir_entry_2`), name as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub inode: u32,
    pub file_type: u8,
    pub name: Vec<u8>,
}

/// Reads filesystem block `pblk` of `block_size` bytes from `source`, refusing blocks at or
/// past `blocks_count`; errors name `what` and its disk byte (`partition_start` added).
pub(crate) fn read_fs_block<S: BlockSource>(
    source: &S,
    pblk: u64,
    block_size: u32,
    blocks_count: u64,
    partition_start: u64,
    what: &'static str,
) -> Result<Vec<u8>, OnDiskError> {
    let mut buf = vec![0u8; block_size as usize];
    let offset = pblk
        .saturating_mul(u64::from(block_size))
        .saturating_add(partition_start);
    let io = |source| OnDiskError::Io {
        what,
        offset,
        source,
    };
    if pblk >= blocks_count {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "block past the filesystem",
        )));
    }
    source.read_block(pblk, &mut buf).map_err(io)?;
    Ok(buf)
}

/// Largest directory this reader scans (bounds work on a corrupt `i_size`).
const MAX_DIR_BYTES: u64 = 64 << 20;

/// An ext4 filesystem read through a [`BlockSource`].
pub struct Ext4Fs<S: BlockSource> {
    source: S,
    sb: Ext4SuperBlock,
    partition_start: u64,
}

impl Ext4Fs<ImageFile> {
    /// Open the filesystem `partition_start` bytes into the disk image at `path`.
    pub fn open_image(path: impl AsRef<Path>, partition_start: u64) -> Result<Self, OnDiskError> {
        let img = ImageFile::open(path, partition_start).map_err(|source| OnDiskError::Io {
            what: "disk image",
            offset: 0,
            source,
        })?;
        Ext4Fs::new(img, partition_start)
    }
}

impl<S: BlockSource> Ext4Fs<S> {
    /// `partition_start` is only recorded (for [`Ext4Fs::volume`]): `source` reads blocks
    /// relative to the filesystem.
    pub fn new(source: S, partition_start: u64) -> Result<Self, OnDiskError> {
        let mut sb = vec![0u8; 1024];
        // With 1024-byte "blocks", block 1 is the superblock at byte 1024.
        source
            .read_block(1, &mut sb)
            .map_err(|source| OnDiskError::Io {
                what: "superblock",
                offset: partition_start + 1024,
                source,
            })?;
        let sb = Ext4SuperBlock::parse_at(&sb, Addr::Disk(partition_start.saturating_add(1024)))?;
        Ok(Ext4Fs {
            source,
            sb,
            partition_start,
        })
    }

    pub fn superblock(&self) -> &Ext4SuperBlock {
        &self.sb
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn volume(&self) -> Ext4Volume {
        Ext4Volume {
            block_size: self.sb.block_size(),
            partition_start: self.partition_start,
            blocks_count: Some(self.sb.s_blocks_count),
        }
    }

    /// Where block `pblk` lies on the disk.
    fn block_addr(&self, pblk: u64) -> Addr {
        Addr::Disk(
            pblk.saturating_mul(u64::from(self.sb.block_size()))
                .saturating_add(self.partition_start),
        )
    }

    fn read_block(&self, pblk: u64, what: &'static str) -> Result<Vec<u8>, OnDiskError> {
        read_fs_block(
            &self.source,
            pblk,
            self.sb.block_size(),
            self.sb.s_blocks_count,
            self.partition_start,
            what,
        )
    }

    /// `bg_inode_table` of group `group`.
    pub fn inode_table(&self, group: u64) -> Result<u64, OnDiskError> {
        if group >= self.sb.group_count() {
            return Err(OnDiskError::GroupDesc {
                group,
                why: "no such group",
            });
        }
        let bs = u64::from(self.sb.block_size());
        let dsz = u64::from(self.sb.desc_size());
        let bad = |why| OnDiskError::GroupDesc { group, why };
        let byte = group.checked_mul(dsz).ok_or(bad("offset overflows"))?;
        let blk = u64::from(self.sb.s_first_data_block) + 1 + byte / bs;
        let b = self.read_block(blk, "group descriptor")?;
        let b = LeSlice::new(&b, self.block_addr(blk), "group descriptor block");
        let d = b.sub(byte % bs, dsz, "ext4_group_desc")?;
        let hi = if dsz >= 64 {
            u64::from(d.u32(0x28, "bg_inode_table_hi")?)
        } else {
            0
        };
        let table = u64::from(d.u32(0x08, "bg_inode_table_lo")?) | hi << 32;
        if table == 0 || table >= self.sb.s_blocks_count {
            return Err(OnDiskError::GroupDesc {
                group,
                why: "inode table outside the filesystem",
            });
        }
        Ok(table)
    }

    /// Read inode `ino` from its group's inode table.
    pub fn read_inode(&self, ino: u32) -> Result<OnDiskInode, OnDiskError> {
        let bad = |why| OnDiskError::Inode {
            ino: u64::from(ino),
            why,
        };
        if ino == 0 || ino > self.sb.s_inodes_count {
            return Err(bad("no such inode number"));
        }
        let ipg = u64::from(self.sb.s_inodes_per_group);
        let (group, index) = (u64::from(ino - 1) / ipg, u64::from(ino - 1) % ipg);
        let bs = u64::from(self.sb.block_size());
        let isz = u64::from(self.sb.s_inode_size);
        let byte = index * isz;
        let blk = self
            .inode_table(group)?
            .checked_add(byte / bs)
            .ok_or(bad("inode table overflows"))?;
        let b = self.read_block(blk, "inode table")?;
        let b = LeSlice::new(&b, self.block_addr(blk), "inode table block");
        let r = b.sub(byte % bs, 128, "ext4_inode")?;
        Ok(OnDiskInode {
            ino,
            i_mode: r.u16(0x0, "i_mode")?,
            i_links_count: r.u16(0x1A, "i_links_count")?,
            i_flags: r.u32(0x20, "i_flags")?,
            i_size: u64::from(r.u32(0x4, "i_size_lo")?)
                | u64::from(r.u32(0x6C, "i_size_high")?) << 32,
            i_block: r.array(0x28, "i_block")?,
        })
    }

    /// All entries of directory `dir` (`.` and `..` included), in on-disk order.
    pub fn read_dir(&self, dir: &OnDiskInode) -> Result<Vec<DirEntry>, OnDiskError> {
        let ino = u64::from(dir.ino);
        let bad = |why| OnDiskError::Dir { ino, why };
        if !dir.is_dir() {
            return Err(bad("not a directory"));
        }
        if dir.i_flags & EXT4_INLINE_DATA_FL != 0 {
            return Err(OnDiskError::Unsupported("inline-data directory"));
        }
        if dir.i_size > MAX_DIR_BYTES {
            return Err(bad("directory larger than 64 MiB"));
        }
        let with_type = self.sb.s_feature_incompat & EXT4_FEATURE_INCOMPAT_FILETYPE != 0;
        let bs = u64::from(self.sb.block_size());
        let mut map = BlockMapper::new(&self.volume(), &dir.as_ext4_inode(), &self.source)?;
        let mut out = Vec::new();
        for lblk in 0..dir.i_size.div_ceil(bs) {
            let pblk = match map.map(lblk)?.kind {
                MapKind::Mapped { pblk } => pblk,
                _ => continue,
            };
            let b = self.read_block(pblk, "directory block")?;
            let b = LeSlice::new(&b, self.block_addr(pblk), "directory block");
            let mut at = 0u64;
            while at + 8 <= b.len() as u64 {
                let e = b.sub(at, 8, "ext4_dir_entry_2")?;
                let inode = e.u32(0, "inode")?;
                let rec_len = u64::from(e.u16(4, "rec_len")?);
                let (name_len, file_type) = if with_type {
                    (u64::from(e.u8(6, "name_len")?), e.u8(7, "file_type")?)
                } else {
                    (u64::from(e.u16(6, "name_len")?), 0)
                };
                if rec_len < 8
                    || rec_len % 4 != 0
                    || at + rec_len > b.len() as u64
                    || 8 + name_len > rec_len
                {
                    return Err(bad("corrupt directory entry"));
                }
                if inode != 0 && name_len > 0 {
                    out.push(DirEntry {
                        inode,
                        file_type,
                        name: b.slice(at + 8, name_len, "entry name")?.to_vec(),
                    });
                }
                at += rec_len;
            }
        }
        Ok(out)
    }

    /// Resolve an absolute path (`/a/b`) to an inode number, from the root directory.
    pub fn lookup(&self, path: &str) -> Result<u32, OnDiskError> {
        let mut ino = EXT4_ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let dir = self.read_inode(ino)?;
            ino = self
                .read_dir(&dir)?
                .into_iter()
                .find(|e| e.name == part.as_bytes())
                .map(|e| e.inode)
                .ok_or_else(|| OnDiskError::NotFound {
                    path: path.to_string(),
                })?;
        }
        Ok(ino)
    }

    /// Read inode `path` names.
    pub fn inode_at(&self, path: &str) -> Result<OnDiskInode, OnDiskError> {
        self.read_inode(self.lookup(path)?)
    }
}
