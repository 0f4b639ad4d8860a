//! ext4 extent trees (`EXT4_EXTENTS_FL`): zero-copy readers for `ext4_extent_header`,
//! `ext4_extent_idx` and `ext4_extent` over byte slices, node validation, and
//! `ExtentTree::map`, a root-to-leaf lookup in the manner of `ext4_find_extent` that
//! keeps the last leaf so a run of sorted lookups costs one descent per leaf.
//!
//! On-disk layout (all little-endian), a node is a 12-byte header then 12-byte entries:
//! header `eh_magic` u16 (0xF30A), `eh_entries` u16, `eh_max` u16, `eh_depth` u16,
//! `eh_generation` u32; index entry (depth > 0) `ei_block` u32, `ei_leaf_lo` u32,
//! `ei_leaf_hi` u16, unused u16; leaf entry (depth 0) `ee_block` u32, `ee_len` u16,
//! `ee_start_hi` u16, `ee_start_lo` u32. `ee_len > 32768` marks an unwritten extent of
//! `ee_len - 32768` blocks. The root lives in the inode's 60-byte `i_block`
//! (`ext4_inode_info.i_data` in memory), other nodes fill a block (minus a 4-byte
//! checksum tail).
//!
//! Validation: magic, `eh_entries <= eh_max`, `eh_max` fits the node, `eh_depth <= 5`,
//! each child exactly one level below its parent (so index blocks pointing at themselves
//! or upwards are rejected, and a lookup reads at most 5 blocks), entries sorted, extents
//! inside the logical range their parent index assigns them, physical blocks inside the
//! filesystem.

use super::error::{BlockMapError, NodeAt};
use super::meta::{BlockExtent, MapKind, MetaReader};
use super::source::BlockSource;
use crate::memory::reader::{FieldError, LeSlice};

pub const EXT4_EXT_MAGIC: u16 = 0xF30A;
/// Longest initialized extent; a larger `ee_len` means unwritten.
pub const EXT_INIT_MAX_LEN: u16 = 1 << 15;
pub const EXT4_MAX_EXTENT_DEPTH: u16 = 5;
const ENTRY: u64 = 12;
/// Logical block numbers are 32-bit: the tree covers `0..2^32`.
const LBLK_END: u64 = 1 << 32;

/// `struct ext4_extent_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4ExtentHeader {
    pub eh_magic: u16,
    pub eh_entries: u16,
    pub eh_max: u16,
    pub eh_depth: u16,
    pub eh_generation: u32,
}

impl Ext4ExtentHeader {
    /// The header at the start of `b` (bytes of unknown origin).
    pub fn parse(b: &[u8]) -> Result<Ext4ExtentHeader, FieldError> {
        Self::read(&LeSlice::detached(b, "ext4_extent_header"))
    }

    /// The header at the start of `r`.
    pub fn read(r: &LeSlice) -> Result<Ext4ExtentHeader, FieldError> {
        Ok(Ext4ExtentHeader {
            eh_magic: r.u16(0, "eh_magic")?,
            eh_entries: r.u16(2, "eh_entries")?,
            eh_max: r.u16(4, "eh_max")?,
            eh_depth: r.u16(6, "eh_depth")?,
            eh_generation: r.u32(8, "eh_generation")?,
        })
    }
}

/// `struct ext4_extent_idx`, with `ei_leaf_lo`/`ei_leaf_hi` joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4ExtentIdx {
    pub ei_block: u32,
    pub ei_leaf: u64,
}

impl Ext4ExtentIdx {
    /// The index entry at the start of `b` (bytes of unknown origin).
    pub fn parse(b: &[u8]) -> Result<Ext4ExtentIdx, FieldError> {
        Self::read(&LeSlice::detached(b, "ext4_extent_idx"))
    }

    /// The index entry at the start of `r`.
    pub fn read(r: &LeSlice) -> Result<Ext4ExtentIdx, FieldError> {
        Ok(Ext4ExtentIdx {
            ei_block: r.u32(0, "ei_block")?,
            ei_leaf: u64::from(r.u32(4, "ei_leaf_lo")?) | u64::from(r.u16(8, "ei_leaf_hi")?) << 32,
        })
    }
}

/// `struct ext4_extent`, with `ee_start_hi`/`ee_start_lo` joined; `ee_len` as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4Extent {
    pub ee_block: u32,
    pub ee_len: u16,
    pub ee_start: u64,
}

impl Ext4Extent {
    /// The extent at the start of `b` (bytes of unknown origin).
    pub fn parse(b: &[u8]) -> Result<Ext4Extent, FieldError> {
        Self::read(&LeSlice::detached(b, "ext4_extent"))
    }

    /// The extent at the start of `r`.
    pub fn read(r: &LeSlice) -> Result<Ext4Extent, FieldError> {
        Ok(Ext4Extent {
            ee_block: r.u32(0, "ee_block")?,
            ee_len: r.u16(4, "ee_len")?,
            ee_start: u64::from(r.u16(6, "ee_start_hi")?) << 32
                | u64::from(r.u32(8, "ee_start_lo")?),
        })
    }

    pub fn is_unwritten(&self) -> bool {
        self.ee_len > EXT_INIT_MAX_LEN
    }

    /// Length in blocks (0 only for a corrupt extent).
    pub fn len(&self) -> u64 {
        u64::from(if self.is_unwritten() {
            self.ee_len - EXT_INIT_MAX_LEN
        } else {
            self.ee_len
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A node (root or block) whose header has been validated; entries are read on demand.
#[derive(Clone, Copy, Debug)]
pub struct ExtentNode<'a> {
    pub header: Ext4ExtentHeader,
    bytes: LeSlice<'a>,
}

impl<'a> ExtentNode<'a> {
    /// Validate the header of a node held in `bytes` (60 bytes for the root, a block
    /// otherwise). `depth`: the depth the parent says this node must have.
    pub fn check(bytes: &'a [u8], depth: Option<u16>) -> Result<ExtentNode<'a>, &'static str> {
        let bytes = LeSlice::detached(bytes, "extent tree node");
        let h = Ext4ExtentHeader::read(&bytes).map_err(|_| "node shorter than its header")?;
        if h.eh_magic != EXT4_EXT_MAGIC {
            return Err("bad magic (want 0xF30A)");
        }
        let room = (bytes.len() as u64 - ENTRY) / ENTRY;
        if h.eh_max == 0 || u64::from(h.eh_max) > room {
            return Err("eh_max does not fit the node");
        }
        if h.eh_entries > h.eh_max {
            return Err("eh_entries > eh_max");
        }
        if h.eh_depth > EXT4_MAX_EXTENT_DEPTH {
            return Err("eh_depth > 5");
        }
        if depth.is_some_and(|d| d != h.eh_depth) {
            return Err("eh_depth is not one below the parent's");
        }
        if h.eh_depth > 0 && h.eh_entries == 0 {
            return Err("index node without entries");
        }
        Ok(ExtentNode { header: h, bytes })
    }

    pub fn entries(&self) -> usize {
        usize::from(self.header.eh_entries)
    }

    /// Entry `i` (in bounds for `i < eh_entries <= eh_max <= room`, checked in `check`).
    fn entry(&self, i: usize) -> Result<LeSlice<'a>, FieldError> {
        self.bytes
            .sub(ENTRY * (i as u64 + 1), ENTRY, "extent entry")
    }

    pub fn index(&self, i: usize) -> Option<Ext4ExtentIdx> {
        (self.header.eh_depth > 0 && i < self.entries())
            .then(|| Ext4ExtentIdx::read(&self.entry(i).ok()?).ok())
            .flatten()
    }

    pub fn extent(&self, i: usize) -> Option<Ext4Extent> {
        (self.header.eh_depth == 0 && i < self.entries())
            .then(|| Ext4Extent::read(&self.entry(i).ok()?).ok())
            .flatten()
    }

    /// Number of leading entries whose first logical block is `<= lblk` (binary search;
    /// the entries are sorted, see `check_entries`).
    fn upto(&self, lblk: u64) -> Result<usize, FieldError> {
        // `ei_block` and `ee_block` alike: the first field of either entry.
        let first = |i: usize| self.entry(i)?.u32(0, "ee_block").map(u64::from);
        let (mut lo, mut hi) = (0, self.entries());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if first(mid)? <= lblk {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// The extent tree of one inode, with the last leaf visited kept for the next lookup.
pub(crate) struct ExtentTree<'s, S: BlockSource + ?Sized> {
    rd: MetaReader<'s, S>,
    root: [u8; 60],
    /// The last leaf (a copy of the root when the tree has depth 0), the logical range
    /// `lo..hi` its parents assign it, and where it came from.
    leaf: Vec<u8>,
    leaf_lo: u64,
    leaf_hi: u64,
    leaf_at: Option<NodeAt>,
    spare: Vec<u8>,
}

impl<'s, S: BlockSource + ?Sized> ExtentTree<'s, S> {
    pub fn new(rd: MetaReader<'s, S>, i_block: &[u8; 60]) -> Result<Self, BlockMapError> {
        let tree = ExtentTree {
            rd,
            root: *i_block,
            leaf: Vec::new(),
            leaf_lo: 0,
            leaf_hi: 0,
            leaf_at: None,
            spare: Vec::new(),
        };
        ExtentNode::check(&tree.root, None).map_err(|why| tree.bad(NodeAt::Root, why))?;
        Ok(tree)
    }

    fn bad(&self, at: NodeAt, why: &'static str) -> BlockMapError {
        BlockMapError::ExtentNode {
            ino: self.rd.ino,
            at,
            why,
        }
    }

    pub fn reads(&self) -> u32 {
        self.rd.reads()
    }

    /// What backs logical block `lblk` and how far that goes.
    pub fn map(&mut self, lblk: u64) -> Result<BlockExtent, BlockMapError> {
        if lblk >= LBLK_END {
            return Ok(BlockExtent {
                lblk,
                len: 1,
                kind: MapKind::Hole,
            });
        }
        let cached = self.leaf_at.is_some() && self.leaf_lo <= lblk && lblk < self.leaf_hi;
        if !cached {
            self.find_leaf(lblk)?;
        }
        let at = self.leaf_at.unwrap_or(NodeAt::Root);
        let leaf = ExtentNode::check(&self.leaf, Some(0)).map_err(|w| self.bad(at, w))?;
        let n = leaf
            .upto(lblk)
            .map_err(|_| self.bad(at, "entry outside the node"))?;
        if n > 0 {
            if let Some(ex) = leaf.extent(n - 1) {
                let start = u64::from(ex.ee_block);
                if lblk < start + ex.len() {
                    let pblk = ex.ee_start + (lblk - start);
                    return Ok(BlockExtent {
                        lblk,
                        len: start + ex.len() - lblk,
                        kind: if ex.is_unwritten() {
                            MapKind::Unwritten { pblk }
                        } else {
                            MapKind::Mapped { pblk }
                        },
                    });
                }
            }
        }
        let end = leaf
            .extent(n)
            .map_or(self.leaf_hi, |ex| u64::from(ex.ee_block));
        Ok(BlockExtent {
            lblk,
            len: end.saturating_sub(lblk).max(1),
            kind: MapKind::Hole,
        })
    }

    /// Descend from the root to the leaf responsible for `lblk`, validating every node.
    fn find_leaf(&mut self, lblk: u64) -> Result<(), BlockMapError> {
        self.leaf_at = None;
        let mut cur = std::mem::take(&mut self.leaf);
        cur.clear();
        cur.extend_from_slice(&self.root);
        let mut at = NodeAt::Root;
        let (mut lo, mut hi) = (0u64, LBLK_END);
        let mut want_depth = None;
        let mut next = std::mem::take(&mut self.spare);
        loop {
            let node = ExtentNode::check(&cur, want_depth).map_err(|w| self.bad(at, w))?;
            self.check_entries(&node, at, lo, hi)?;
            let depth = node.header.eh_depth;
            if depth == 0 {
                break;
            }
            // The last index starting at or before lblk; the first if lblk precedes all.
            let i = node
                .upto(lblk)
                .map_err(|_| self.bad(at, "entry outside the node"))?
                .saturating_sub(1);
            let idx = node
                .index(i)
                .ok_or_else(|| self.bad(at, "index entry missing"))?;
            let child_lo = if i == 0 { lo } else { u64::from(idx.ei_block) };
            let child_hi = node.index(i + 1).map_or(hi, |n| u64::from(n.ei_block));
            self.rd.read(idx.ei_leaf, "extent tree block", &mut next)?;
            std::mem::swap(&mut cur, &mut next);
            at = NodeAt::Block(idx.ei_leaf);
            (lo, hi) = (child_lo, child_hi);
            want_depth = Some(depth - 1);
        }
        self.spare = next;
        self.leaf = cur;
        self.leaf_lo = lo;
        self.leaf_hi = hi;
        self.leaf_at = Some(at);
        Ok(())
    }

    /// Entries sorted, inside `lo..hi`, pointing inside the filesystem.
    fn check_entries(
        &self,
        node: &ExtentNode,
        at: NodeAt,
        lo: u64,
        hi: u64,
    ) -> Result<(), BlockMapError> {
        let mut prev_end: Option<u64> = None;
        for i in 0..node.entries() {
            if node.header.eh_depth > 0 {
                let idx = node
                    .index(i)
                    .ok_or_else(|| self.bad(at, "index entry missing"))?;
                let b = u64::from(idx.ei_block);
                if prev_end.is_some_and(|p| b < p) || (i > 0 && b < lo) || b >= hi {
                    return Err(self.bad(at, "index entries unsorted or outside their range"));
                }
                prev_end = Some(b + 1);
                self.rd.check_range(idx.ei_leaf, 1, "extent index target")?;
            } else {
                let ex = node
                    .extent(i)
                    .ok_or_else(|| self.bad(at, "extent entry missing"))?;
                let b = u64::from(ex.ee_block);
                if ex.is_empty() {
                    return Err(self.bad(at, "zero-length extent"));
                }
                let end = b + ex.len();
                if prev_end.is_some_and(|p| b < p) || b < lo || end > hi {
                    return Err(self.bad(at, "extents overlap, unsorted or outside their range"));
                }
                prev_end = Some(end);
                self.rd.check_range(ex.ee_start, ex.len(), "extent")?;
            }
        }
        Ok(())
    }
}
