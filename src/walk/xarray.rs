//! `xa_for_each`: the XArray (≥ 4.20) that holds each address_space's page cache.
//!
//! Entry encoding (include/linux/xarray.h): bit 0 set = value entry (shadow, swap,
//! DAX: skipped); low bits `10` = internal entry: a node pointer (+2) when above 4096,
//! otherwise sibling/retry/zero markers. Anything else is a pointer to the `struct page`
//! of a folio. A folio of 2^order pages is one multi-index entry: its pointer in the slot
//! of its first index and sibling entries (`(slot << 2) | 2`, naming that slot) in the
//! following slots of the same node, or a single slot of a node at shift ≥ order; the
//! walk reports how many indices each entry covers.

use super::{at_va, need, WalkError};
use crate::kernel::Kernel;

/// Most nodes one tree may have (a 64-slot tree of depth 6 over 2^36 pages is far more
/// than any real file of a 1 TiB guest needs: this bounds hostile input).
pub const MAX_NODES: usize = 1 << 20;

fn is_internal(e: u64) -> bool {
    e & 3 == 2
}
fn is_node(e: u64) -> bool {
    is_internal(e) && e > 4096
}
fn is_value(e: u64) -> bool {
    e & 1 == 1
}
/// `xa_is_sibling`: an internal entry below `xa_mk_sibling(XA_CHUNK_SIZE - 1)`.
fn is_sibling(e: u64) -> bool {
    is_internal(e) && e >> 2 < 63
}

/// What a slot of a shift-indexed tree node holds.
pub(crate) enum Slot {
    /// Nothing to visit: empty, a value/exceptional entry, a retry marker.
    Skip,
    /// A sibling entry: this slot belongs to the multi-index entry in slot `.0`.
    Sibling(u64),
    /// A child node at this VA.
    Node(u64),
    /// An entry the tree stores: a `struct page` pointer.
    Page(u64),
}

/// The layout of a shift-indexed tree node (`xa_node`, or `radix_tree_node` since
/// 4.7) and how its entries are tagged.
pub(crate) struct ShiftTree {
    /// The node's struct name, for errors.
    pub ty: &'static str,
    pub shift_off: u64,
    pub offset_off: Option<u64>,
    pub parent_off: Option<u64>,
    pub slots_off: u64,
    pub nslots: u64,
    /// Decodes a slot's entry; gets the entry and the VA and size of its node.
    pub classify: fn(u64, u64, u64) -> Slot,
    /// The tree marks multi-index entries with [`Slot::Sibling`] entries, so each item's
    /// span is known (the XArray).
    pub siblings: bool,
}

/// What a tree walk's callback gets for one item: its first index, the entry (a
/// `struct page` pointer) and, where the tree records it, how many indices it covers.
pub type Visit<'f> = dyn FnMut(u64, u64, Option<u64>) -> Result<(), WalkError> + 'f;

/// Walks the nodes of a shift-indexed tree from `top` down, calling `f(index, item)`
/// in index order. Each node's `shift` must be its parent's minus the chunk shift and,
/// where the layout has them, `offset`/`parent` must point back to where it hangs.
pub(crate) fn walk_shift_tree(
    k: &Kernel,
    top: u64,
    t: &ShiftTree,
    what: &str,
    f: &mut Visit,
) -> Result<(), WalkError> {
    if !t.nslots.is_power_of_two() || !(4..=1024).contains(&t.nslots) {
        return Err(WalkError::ProfileLacks(format!(
            "a sane tree node slots count (got {})",
            t.nslots
        )));
    }
    let chunk_shift = t.nslots.trailing_zeros() as u64;
    let node_size = t.slots_off + t.nslots * 8;
    let corrupt = |msg: String| WalkError::Corrupt {
        what: what.to_owned(),
        msg,
    };
    let top_shift =
        u64::from(at_va(&k.read(top, node_size, what)?, top, t.ty).u8(t.shift_off, "shift")?);
    if top_shift % chunk_shift != 0 || top_shift >= 64 {
        return Err(corrupt(format!("root node {top:#x} has shift {top_shift}")));
    }
    // Explicit stack of (node VA, parent VA, expected offset in parent, expected shift, base index).
    let mut stack = vec![(top, 0u64, None::<u64>, top_shift, 0u64)];
    let mut nodes = 0usize;
    while let Some((node, parent, offset, shift, base)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(corrupt(format!("more than {MAX_NODES} nodes")));
        }
        let bytes = k.read(node, node_size, what)?;
        let b = at_va(&bytes, node, t.ty);
        let got = u64::from(b.u8(t.shift_off, "shift")?);
        if got != shift {
            return Err(corrupt(format!(
                "node {node:#x}: shift {got} where {shift} was expected"
            )));
        }
        if let (Some(o), Some(oo), Some(po)) = (offset, t.offset_off, t.parent_off) {
            if u64::from(b.u8(oo, "offset")?) != o || b.u64(po, "parent")? != parent {
                return Err(corrupt(format!(
                    "node {node:#x}: parent/offset back-pointers disagree (tree changing?)"
                )));
            }
        }
        // Push children in reverse so the walk visits indices in increasing order.
        let mut children = Vec::new();
        let slots = (0..t.nslots)
            .map(|slot| {
                let e = b.u64(t.slots_off + slot * 8, "slots")?;
                Ok((t.classify)(e, node, node_size))
            })
            .collect::<Result<Vec<_>, WalkError>>()?;
        for (slot, entry) in (0u64..).zip(&slots) {
            let index = base | (slot << shift);
            match *entry {
                Slot::Skip | Slot::Sibling(_) => {}
                Slot::Node(child) => {
                    if shift < chunk_shift {
                        return Err(corrupt(format!(
                            "node {node:#x} at shift 0 points to another node"
                        )));
                    }
                    children.push((child, node, Some(slot), shift - chunk_shift, index));
                }
                // A multi-index entry (a large folio) spans its sibling slots, each
                // covering 2^shift indices.
                Slot::Page(e) => {
                    let siblings = slots[slot as usize + 1..]
                        .iter()
                        .take_while(|s| matches!(s, Slot::Sibling(to) if *to == slot))
                        .count() as u64;
                    let span = t.siblings.then_some((1 + siblings) << shift);
                    f(index, e, span)?
                }
            }
        }
        stack.extend(children.into_iter().rev());
    }
    Ok(())
}

fn classify(e: u64, _node: u64, _size: u64) -> Slot {
    if e == 0 || is_value(e) {
        Slot::Skip
    } else if is_node(e) {
        Slot::Node(e - 2)
    } else if is_sibling(e) {
        Slot::Sibling(e >> 2)
    } else if is_internal(e) {
        Slot::Skip
    } else {
        Slot::Page(e)
    }
}

/// Calls `f(index, entry, span)` for every present, non-value entry of the XArray whose
/// `xa_head` is `head`, in index order; `span` is the number of indices the entry covers.
pub fn xa_for_each(
    k: &Kernel,
    head: u64,
    what: &str,
    mut f: impl FnMut(u64, u64, Option<u64>) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let p = k.profile;
    let tree = ShiftTree {
        ty: "xa_node",
        shift_off: need(p, "xa_node", "shift")?,
        offset_off: Some(need(p, "xa_node", "offset")?),
        parent_off: Some(need(p, "xa_node", "parent")?),
        slots_off: need(p, "xa_node", "slots")?,
        nslots: p
            .field("xa_node", "slots")
            .and_then(|f| f.count)
            .unwrap_or(64),
        classify,
        siblings: true,
    };
    match classify(head, 0, 0) {
        Slot::Skip | Slot::Sibling(_) => Ok(()),
        // A lone entry in the head covers index 0 only.
        Slot::Page(e) => f(0, e, Some(1)),
        Slot::Node(top) => walk_shift_tree(k, top, &tree, what, &mut f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_told_apart() {
        let is = |e: u64, want: &str| {
            let got = match classify(e, 0, 0) {
                Slot::Skip => "skip".to_owned(),
                Slot::Sibling(s) => format!("sibling {s}"),
                Slot::Node(n) => format!("node {n:#x}"),
                Slot::Page(p) => format!("page {p:#x}"),
            };
            assert_eq!(got, want, "entry {e:#x}");
        };
        is(0, "skip");
        // xa_mk_sibling(slot) = slot << 2 | 2, for slots 0..=62.
        is(1 << 2 | 2, "sibling 1");
        is(62 << 2 | 2, "sibling 62");
        // Retry (256) and zero (257) entries, and values (bit 0): nothing to visit.
        is(256 << 2 | 2, "skip");
        is(257 << 2 | 2, "skip");
        is(0x1234_5679, "skip");
        is(0xffff_8880_0123_4002, "node 0xffff888001234000");
        is(0xffff_ea00_0004_0000, "page 0xffffea0000040000");
    }
}
