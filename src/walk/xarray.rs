//! `xa_for_each`: the XArray (≥ 4.20) that holds each address_space's page cache.
//!
//! Entry encoding (include/linux/xarray.h): bit 0 set = value entry (shadow, swap,
//! DAX: skipped); low bits `10` = internal entry: a node pointer (+2) when above 4096,
//! otherwise sibling/retry/zero markers (skipped). Anything else is a pointer to the
//! `struct page` of a folio.

use super::{need, u64_at, u8_at, WalkError};
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

/// Calls `f(index, entry)` for every present, non-value entry of the XArray whose
/// `xa_head` is `head`, in index order.
pub fn xa_for_each(
    k: &Kernel,
    head: u64,
    what: &str,
    mut f: impl FnMut(u64, u64) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let p = k.profile;
    let shift_off = need(p, "xa_node", "shift")?;
    let offset_off = need(p, "xa_node", "offset")?;
    let parent_off = need(p, "xa_node", "parent")?;
    let slots_off = need(p, "xa_node", "slots")?;
    let nslots = p
        .field("xa_node", "slots")
        .and_then(|f| f.count)
        .unwrap_or(64);
    if !nslots.is_power_of_two() || nslots > 1024 {
        return Err(WalkError::ProfileLacks(format!(
            "a sane xa_node.slots count (got {nslots})"
        )));
    }
    let chunk_shift = nslots.trailing_zeros() as u64;
    let node_size = slots_off + nslots * 8;
    let corrupt = |msg: String| WalkError::Corrupt {
        what: what.to_owned(),
        msg,
    };

    if head == 0 || is_value(head) || (is_internal(head) && !is_node(head)) {
        return Ok(());
    }
    if !is_node(head) {
        return f(0, head);
    }
    // Explicit stack of (node VA, parent VA, expected offset in parent, expected shift, base index).
    let mut nodes = 0usize;
    let top = head - 2;
    let top_bytes = k.read(top, node_size, what)?;
    let top_shift = u8_at(&top_bytes, shift_off) as u64;
    if top_shift % chunk_shift != 0 || top_shift > 60 {
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
        if let Some(o) = offset {
            if u8_at(&b, offset_off) as u64 != o || u64_at(&b, parent_off) != parent {
                return Err(corrupt(format!(
                    "node {node:#x}: parent/offset back-pointers disagree (tree changing?)"
                )));
            }
        }
        // Push children in reverse so the walk visits indices in increasing order.
        let mut children = Vec::new();
        for slot in 0..nslots {
            let e = u64_at(&b, slots_off + slot * 8);
            if e == 0 || is_value(e) {
                continue;
            }
            let index = base | (slot << shift);
            if is_node(e) {
                if shift < chunk_shift {
                    return Err(corrupt(format!(
                        "node {node:#x} at shift 0 points to another node"
                    )));
                }
                children.push((e - 2, node, Some(slot), shift - chunk_shift, index));
            } else if !is_internal(e) {
                // At shift > 0 this is a multi-index entry (a large folio).
                f(index, e)?;
            }
        }
        stack.extend(children.into_iter().rev());
    }
    Ok(())
}
