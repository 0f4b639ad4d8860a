//! `radix_tree_for_each_slot`: the page-cache radix tree of kernels before 4.20, in its
//! three generations (as `symbols/manifest.toml` lists them):
//!
//! - *height* (< 3.15) and *path* (3.15–4.6): the root records the tree's height; the
//!   root pointer is tagged as indirect (bit 0) when it points at a node; a node's
//!   slots hold child nodes above level 1 and items at level 1.
//! - *shift* (4.7–4.19): every internal pointer is tagged (low bits `01`), nodes carry
//!   `shift`, `offset` and `parent` like XArray nodes; sibling entries (multi-order
//!   items) are internal pointers into the parent's own slots.
//!
//! Exceptional entries (low bits `10`: shadow, swap, DAX) are skipped in every generation.

use super::xarray::{walk_shift_tree, ShiftTree, Slot, MAX_NODES};
use super::{at_va, WalkError};
use crate::kernel::Kernel;
use crate::profile::PageCacheTree;

/// 64-bit indices need at most ceil(64 / 6) levels of 64-slot nodes.
const MAX_HEIGHT: u64 = 11;

const TAG_MASK: u64 = 3;
const EXCEPTIONAL: u64 = 2;

/// Entries of the shift generation: internal pointers tagged `01` (a node, or, when
/// they point into the node's own slots, a sibling of a multi-order item; 0 is the
/// retry marker), exceptional entries tagged `10`.
fn classify_shift(e: u64, node: u64, node_size: u64) -> Slot {
    match e & TAG_MASK {
        _ if e == 0 => Slot::Skip,
        0 => Slot::Page(e),
        1 => {
            let child = e & !TAG_MASK;
            if child == 0 || (child >= node && child < node + node_size) {
                Slot::Skip
            } else {
                Slot::Node(child)
            }
        }
        _ => Slot::Skip,
    }
}

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
    // `height` (before 4.7) lies before `rnode`, but read as far as either goes.
    let root_len = p
        .offset("radix_tree_root", "height")
        .map_or(0, |h| h + 4)
        .max(rnode_off + 8);
    let root_bytes = k.read(root, root_len, what)?;
    let r = at_va(&root_bytes, root, "radix_tree_root");
    let rnode = r.u64(rnode_off, "rnode")?;
    if rnode == 0 {
        return Ok(());
    }
    let mut nodes = 0usize;
    match gen {
        PageCacheTree::XArray => Err(lacks("a radix-tree profile (this one describes an XArray)")),
        PageCacheTree::RadixShift => {
            let tree = ShiftTree {
                ty: "radix_tree_node",
                shift_off: p
                    .offset("radix_tree_node", "shift")
                    .ok_or_else(|| lacks("radix_tree_node.shift"))?,
                offset_off: p.offset("radix_tree_node", "offset"),
                parent_off: p.offset("radix_tree_node", "parent"),
                slots_off,
                nslots,
                classify: classify_shift,
                siblings: false,
            };
            match classify_shift(rnode, 0, 0) {
                Slot::Skip | Slot::Sibling(_) => Ok(()),
                Slot::Page(e) => f(0, e),
                Slot::Node(top) => walk_shift_tree(k, top, &tree, what, &mut |i, e, _| f(i, e)),
            }
        }
        PageCacheTree::RadixHeight | PageCacheTree::RadixPath => {
            let height_off = p
                .offset("radix_tree_root", "height")
                .ok_or_else(|| lacks("radix_tree_root.height"))?;
            let height = u64::from(r.u32(height_off, "height")?);
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
                let bytes = k.read(node, node_size, what)?;
                let b = at_va(&bytes, node, "radix_tree_node");
                if let Some(lo) = level_off {
                    let got = u64::from(b.u32(lo, "height/path")?) & level_mask;
                    if got != level {
                        return Err(corrupt(format!(
                            "node {node:#x}: level {got} where {level} was expected"
                        )));
                    }
                }
                let mut children = Vec::new();
                for slot in 0..nslots {
                    let e = b.u64(slots_off + slot * 8, "slots")?;
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
