//! Block-mapped inodes (no `EXT4_EXTENTS_FL`, the ext2/ext3 scheme): `i_block[0..12]`
//! point at the first 12 data blocks, `i_block[12]` (`EXT4_IND_BLOCK`) at a block of
//! pointers, `i_block[13]` (`EXT4_DIND_BLOCK`) at a block of pointers to such blocks,
//! `i_block[14]` (`EXT4_TIND_BLOCK`) one level more. Pointers are le32; 0 is a hole.
//!
//! `IndirectMap::map` resolves a logical block like `ext4_ind_map_blocks` (path
//! computation as in `ext4_block_to_path`), keeps one cached block per level so sorted
//! lookups re-read nothing, and reports runs: contiguous pointers in the same pointer
//! array become one mapped run, zero pointers (or a zero pointer to a whole subtree) one
//! hole. The depth is fixed (at most 3 block reads per lookup), so self-referencing
//! pointer blocks cost nothing more than garbage.

use super::error::BlockMapError;
use super::meta::{BlockExtent, MapKind, MetaReader};
use super::source::BlockSource;
use crate::memory::reader::{FieldError, LeSlice};

pub const EXT4_NDIR_BLOCKS: usize = 12;
pub const EXT4_IND_BLOCK: usize = 12;
pub const EXT4_DIND_BLOCK: usize = 13;
pub const EXT4_TIND_BLOCK: usize = 14;
pub const EXT4_N_BLOCKS: usize = 15;

/// Pointer `i` of a pointer array (`i_block`, or an indirect block).
fn le32_at(b: &[u8], i: usize, what: &'static str) -> Result<u32, FieldError> {
    LeSlice::detached(b, what).u32(4 * i as u64, "block pointer")
}

/// Where logical block `lblk` sits: the `i_block` slot then one offset per indirect level
/// (`n` entries used), or `None` past the triple-indirect range.
fn ext4_block_to_path(lblk: u64, ppb: u64) -> Option<([u64; 4], usize)> {
    let direct = EXT4_NDIR_BLOCKS as u64;
    if lblk < direct {
        return Some(([lblk, 0, 0, 0], 1));
    }
    let mut n = lblk - direct;
    if n < ppb {
        return Some(([EXT4_IND_BLOCK as u64, n, 0, 0], 2));
    }
    n -= ppb;
    if n < ppb * ppb {
        return Some(([EXT4_DIND_BLOCK as u64, n / ppb, n % ppb, 0], 3));
    }
    n -= ppb * ppb;
    if n < ppb * ppb * ppb {
        let path = [
            EXT4_TIND_BLOCK as u64,
            n / (ppb * ppb),
            (n / ppb) % ppb,
            n % ppb,
        ];
        return Some((path, 4));
    }
    None
}

/// The direct/indirect block map of one inode.
pub(crate) struct IndirectMap<'s, S: BlockSource + ?Sized> {
    rd: MetaReader<'s, S>,
    i_block: [u8; 60],
    /// Last block read at indirection level 1, 2, 3: (pblk, bytes).
    cache: [(u64, Vec<u8>); 3],
}

impl<'s, S: BlockSource + ?Sized> IndirectMap<'s, S> {
    pub fn new(rd: MetaReader<'s, S>, i_block: &[u8; 60]) -> Self {
        IndirectMap {
            rd,
            i_block: *i_block,
            cache: Default::default(),
        }
    }

    pub fn reads(&self) -> u32 {
        self.rd.reads()
    }

    fn ppb(&self) -> u64 {
        (self.rd.block_size / 4) as u64
    }

    pub fn map(&mut self, lblk: u64) -> Result<BlockExtent, BlockMapError> {
        let ppb = self.ppb();
        let hole = |len: u64| BlockExtent {
            lblk,
            len: len.max(1),
            kind: MapKind::Hole,
        };
        let Some((path, depth)) = ext4_block_to_path(lblk, ppb) else {
            return Ok(hole(1));
        };
        // Blocks covered by one entry at level `l` of this path.
        let span = |l: usize| ppb.pow((depth - 1 - l) as u32);
        // Position of lblk inside the subtree an entry at level `l` covers.
        let pos_in = |l: usize| (l + 1..depth).map(|j| path[j] * span(j)).sum::<u64>();

        let ino = self.rd.ino;
        let field = |e| BlockMapError::Field { ino, source: e };
        let mut ptr = le32_at(&self.i_block, path[0] as usize, "i_block").map_err(field)?;
        for (level, &offset) in path.iter().enumerate().take(depth).skip(1) {
            if ptr == 0 {
                return Ok(hole(span(level - 1) - pos_in(level - 1)));
            }
            let pblk = u64::from(ptr);
            let slot = &mut self.cache[level - 1];
            if slot.0 != pblk || slot.1.is_empty() {
                let mut buf = std::mem::take(&mut slot.1);
                slot.0 = 0;
                self.rd.read(pblk, "indirect block", &mut buf)?;
                self.cache[level - 1] = (pblk, buf);
            }
            let block = &self.cache[level - 1].1;
            ptr = le32_at(block, offset as usize, "indirect block").map_err(|_| {
                BlockMapError::Indirect {
                    ino,
                    lblk,
                    why: "pointer offset beyond the block",
                }
            })?;
        }
        // The array holding the data pointer, and the run starting at it.
        let (array, what, first, end): (&[u8], _, usize, usize) = if depth == 1 {
            (&self.i_block, "i_block", path[0] as usize, EXT4_NDIR_BLOCKS)
        } else {
            (
                &self.cache[depth - 2].1,
                "indirect block",
                path[depth - 1] as usize,
                ppb as usize,
            )
        };
        let mut len = 1u64;
        for i in first + 1..end {
            let p = le32_at(array, i, what).map_err(field)?;
            let continues = if ptr == 0 {
                p == 0
            } else {
                u64::from(p) == u64::from(ptr) + len
            };
            if !continues {
                break;
            }
            len += 1;
        }
        if ptr == 0 {
            return Ok(hole(len));
        }
        self.rd.check_range(u64::from(ptr), len, "data block")?;
        Ok(BlockExtent {
            lblk,
            len,
            kind: MapKind::Mapped {
                pblk: u64::from(ptr),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ext4_block_to_path;

    #[test]
    fn paths() {
        assert_eq!(ext4_block_to_path(11, 256), Some(([11, 0, 0, 0], 1)));
        assert_eq!(ext4_block_to_path(12, 256), Some(([12, 0, 0, 0], 2)));
        assert_eq!(ext4_block_to_path(12 + 256, 256), Some(([13, 0, 0, 0], 3)));
        assert_eq!(
            ext4_block_to_path(12 + 256 + 65536 + 257, 256),
            Some(([14, 0, 1, 1], 4))
        );
        assert_eq!(ext4_block_to_path(12 + 256 + 65536 + (1 << 24), 256), None);
    }
}
