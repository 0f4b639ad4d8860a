//! `dentry_path`: a file's name, from its inode's first alias dentry up through
//! `d_parent` to the filesystem root (like the kernel's `dentry_path_raw`).

use super::at_va;
use crate::kernel::Kernel;
use crate::sanitize::sanitize;

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
        let b = k
            .read(dentry, (d_name + 16).max(d_parent + 8), "dentry")
            .ok()?;
        let d = at_va(&b, dentry, "dentry");
        let parent = d.u64(d_parent, "d_parent").ok()?;
        if parent == dentry || parent == 0 {
            parts.reverse();
            return Some(format!("/{}", parts.join("/")));
        }
        let len = u64::from(d.u32(d_name + q_len, "d_name.len").ok()?).min(MAX_NAME);
        let name = k
            .read(
                d.u64(d_name + q_name, "d_name.name").ok()?,
                len,
                "dentry name",
            )
            .ok()?;
        parts.push(sanitize(&name).replace('/', "\\x2f"));
        dentry = parent;
    }
    None
}
