//! `list_for_each_entry`: circular doubly-linked `struct list_head` lists.

use super::{at_va, WalkError};
use crate::kernel::Kernel;
use std::collections::HashSet;

/// Calls `f` with the VA of each container on the list headed at `head`, where the
/// `list_head` sits `link_off` bytes into the container. Stops at the head, on a cycle
/// that does not pass through the head, on a broken `prev` back-pointer, or after `cap`
/// entries (an error: the list is corrupt or being modified).
pub fn list_for_each_entry(
    k: &Kernel,
    head: u64,
    link_off: u64,
    cap: usize,
    what: &str,
    mut f: impl FnMut(u64) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let corrupt = |msg: String| WalkError::Corrupt {
        what: what.to_owned(),
        msg,
    };
    let mut prev = head;
    let mut cur = k.read_u64(head, what)?;
    let mut seen = HashSet::new();
    while cur != head {
        if seen.len() >= cap {
            return Err(corrupt(format!("more than {cap} entries")));
        }
        if !seen.insert(cur) {
            return Err(corrupt(format!("cycle at {cur:#x}")));
        }
        let b = k.read(cur, 16, what)?;
        let node = at_va(&b, cur, "list_head");
        if node.u64(8, "prev")? != prev {
            return Err(corrupt(format!(
                "entry {cur:#x}: prev does not point back to {prev:#x} (list changing?)"
            )));
        }
        f(cur.wrapping_sub(link_off))?;
        prev = cur;
        cur = node.u64(0, "next")?;
    }
    Ok(())
}
