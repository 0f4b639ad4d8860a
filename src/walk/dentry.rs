//! `dentry_path`: a file's name, from its inode's first alias dentry up through
//! `d_parent` to the filesystem root (like the kernel's `dentry_path_raw`).

use super::fs::sanitize;
use super::{u32_at, u64_at};
use crate::kernel::Kernel;

const MAX_DEPTH: usize = 64;
const MAX_NAME: u64 = 255;

/// The path of `inode` inside its filesystem, sanitised for terminals; None when the
/// inode has no dentry (deleted, or evicted from the dentry cache) or it is unreadable.
pub fn dentry_path(k: &Kernel, inode: u64) -> Option<String> {
    let p = k.profile;
    let i_dentry = p.offset("inode", "i_dentry")?;
    let d_alias = p.offset("dentry", "d_alias")?;
    let d_parent = p.offset("dentry", "d_parent")?;
    let d_name = p.offset("dentry", "d_name")?;
    let q_len = p.offset("qstr", "len")?;
    let q_name = p.offset("qstr", "name")?;
    let first = k.read_u64(inode + i_dentry, "inode.i_dentry").ok()?;
    if first == 0 {
        return None;
    }
    let mut dentry = first.wrapping_sub(d_alias);
    let mut parts = Vec::new();
    for _ in 0..MAX_DEPTH {
        let d = k.read(dentry, d_name + 16, "dentry").ok()?;
        let parent = u64_at(&d, d_parent);
        if parent == dentry || parent == 0 {
            parts.reverse();
            return Some(format!("/{}", parts.join("/")));
        }
        let len = (u32_at(&d, d_name + q_len) as u64).min(MAX_NAME);
        let name = k
            .read(u64_at(&d, d_name + q_name), len, "dentry name")
            .ok()?;
        parts.push(sanitize(&name).replace('/', "\\x2f"));
        dentry = parent;
    }
    None
}
