//! `radix_tree_for_each_slot`: the page-cache radix tree of kernels before 4.20, in its
//! three generations (see DESIGN.md):
//!
//! - *height* (< 3.15) and *path* (3.15–4.6): the root records the tree's height; the
//!   root pointer is tagged as indirect (bit 0) when it points at a node; a node's
//!   slots hold child nodes above level 1 and items at level 1.
//! - *shift* (4.7–4.19): every internal pointer is tagged (low bits `01`), nodes carry
//!   `shift`, `offset` and `parent` like XArray nodes; sibling entries (multi-order
//!   items) are internal pointers into the parent's own slots.
//!
//! Exceptional entries (low bits `10`: shadow, swap, DAX) are skipped in every generation.

use super::{u32_at, u64_at, u8_at, WalkError};
use crate::kernel::Kernel;
use crate::profile::PageCacheTree;

/// Most nodes one tree may have (bounds hostile input).
pub const MAX_NODES: usize = 1 << 20;
/// 64-bit indices need at most ceil(64 / 6) levels of 64-slot nodes.
const MAX_HEIGHT: u64 = 11;

const TAG_MASK: u64 = 3;
const EXCEPTIONAL: u64 = 2;

/// Calls `f(index, entry)` for every item of the radix tree whose `radix_tree_root`
/// is at `root`, in index order.
pub fn radix_tree_for_each(
    k: &Kernel,
    root: u64,
    what: &str,
    mut f: impl FnMut(u64, u64) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let p = k.profile;
    let gen = p
        .page_cache_tree()
        .ok_or_else(|| WalkError::ProfileLacks("radix_tree_node height/path/shift".into()))?;
    let lacks = |s: &str| WalkError::ProfileLacks(s.to_owned());
    let rnode_off = p
        .offset("radix_tree_root", "rnode")
        .ok_or_else(|| lacks("radix_tree_root.rnode"))?;
    let slots_off = p
        .offset("radix_tree_node", "slots")
        .ok_or_else(|| lacks("radix_tree_node.slots"))?;
    let nslots = p.tree_slots().unwrap_or(64);
    if !nslots.is_power_of_two() || !(4..=1024).contains(&nslots) {
        return Err(lacks(&format!(
            "a sane radix_tree_node.slots count (got {nslots})"
        )));
    }
    let map_shift = nslots.trailing_zeros() as u64;
    let node_size = slots_off + nslots * 8;
    let corrupt = |msg: String| WalkError::Corrupt {
        what: what.to_owned(),
        msg,
    };
    let r = k.read(root, rnode_off + 8, what)?;
    let rnode = u64_at(&r, rnode_off);
    if rnode == 0 {
        return Ok(());
    }
    let mut nodes = 0usize;
    match gen {
        PageCacheTree::XArray => Err(lacks("a radix-tree profile (this one describes an XArray)")),
        PageCacheTree::RadixShift => {
            let shift_off = p
                .offset("radix_tree_node", "shift")
                .ok_or_else(|| lacks("radix_tree_node.shift"))?;
            let offset_off = p.offset("radix_tree_node", "offset");
            let parent_off = p.offset("radix_tree_node", "parent");
            if rnode & TAG_MASK != 1 {
                return if rnode & TAG_MASK == 0 {
                    f(0, rnode)
                } else {
                    Ok(())
                };
            }
            let top = rnode & !TAG_MASK;
            let top_shift = u8_at(&k.read(top, node_size, what)?, shift_off) as u64;
            if top_shift % map_shift != 0 || top_shift >= 64 {
                return Err(corrupt(format!("root node {top:#x} has shift {top_shift}")));
            }
            let mut stack = vec![(top, 0u64, None::<u64>, top_shift, 0u64)];
            while let Some((node, parent, offset, shift, base)) = stack.pop() {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(corrupt(format!("more than {MAX_NODES} nodes")));
                }
                let b = k.read(node, node_size, what)?;
                if u8_at(&b, shift_off) as u64 != shift {
                    return Err(corrupt(format!(
                        "node {node:#x}: shift {} where {shift} was expected",
                        u8_at(&b, shift_off)
                    )));
                }
                if let (Some(o), Some(oo), Some(po)) = (offset, offset_off, parent_off) {
                    if u8_at(&b, oo) as u64 != o || u64_at(&b, po) != parent {
                        return Err(corrupt(format!(
                            "node {node:#x}: parent/offset back-pointers disagree (tree changing?)"
                        )));
                    }
                }
                let mut children = Vec::new();
                for slot in 0..nslots {
                    let e = u64_at(&b, slots_off + slot * 8);
                    let index = base | (slot << shift);
                    match e & TAG_MASK {
                        _ if e == 0 => {}
                        1 => {
                            let child = e & !TAG_MASK;
                            let sibling = child >= node && child < node + node_size;
                            if child == 0 || sibling {
                                continue; // retry marker, or a sibling of a multi-order item
                            }
                            if shift < map_shift {
                                return Err(corrupt(format!(
                                    "node {node:#x} at shift 0 points to another node"
                                )));
                            }
                            children.push((child, node, Some(slot), shift - map_shift, index));
                        }
                        0 => f(index, e)?,
                        _ => {} // exceptional
                    }
                }
                stack.extend(children.into_iter().rev());
            }
            Ok(())
        }
        PageCacheTree::RadixHeight | PageCacheTree::RadixPath => {
            let height_off = p
                .offset("radix_tree_root", "height")
                .ok_or_else(|| lacks("radix_tree_root.height"))?;
            let height = u32_at(&r, height_off) as u64;
            if height > MAX_HEIGHT {
                return Err(corrupt(format!("root height {height}")));
            }
            if height == 0 {
                return if rnode & TAG_MASK == 0 {
                    f(0, rnode)
                } else {
                    Ok(())
                };
            }
            // The node's own level: `height`, or the low byte of `path`.
            let (level_off, level_mask) = match gen {
                PageCacheTree::RadixHeight => {
                    (p.offset("radix_tree_node", "height"), u64::from(u32::MAX))
                }
                _ => (p.offset("radix_tree_node", "path"), 0xff),
            };
            let mut stack = vec![(rnode & !1, height, 0u64)];
            while let Some((node, level, prefix)) = stack.pop() {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(corrupt(format!("more than {MAX_NODES} nodes")));
                }
                let b = k.read(node, node_size, what)?;
                if let Some(lo) = level_off {
                    let got = u64::from(u32_at(&b, lo)) & level_mask;
                    if got != level {
                        return Err(corrupt(format!(
                            "node {node:#x}: level {got} where {level} was expected"
                        )));
                    }
                }
                let mut children = Vec::new();
                for slot in 0..nslots {
                    let e = u64_at(&b, slots_off + slot * 8);
                    if e == 0 {
                        continue;
                    }
                    let index = (prefix << map_shift) | slot;
                    if level > 1 {
                        children.push((e & !1, level - 1, index));
                    } else if e & TAG_MASK != EXCEPTIONAL {
                        f(index, e)?;
                    }
                }
                stack.extend(children.into_iter().rev());
            }
            Ok(())
        }
    }
}
