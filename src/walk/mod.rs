//! Walkers over the guest kernel's own data structures, named after the kernel helpers
//! they mirror (`list_for_each_entry`, `xa_for_each`, `page_to_pfn`), so that the
//! kernel source is their documentation.
//!
//! Every walk treats guest memory as hostile: pointers are bounds-checked by
//! [`Kernel::read`](crate::kernel::Kernel::read), lists and trees carry cycle guards
//! and iteration caps, and back-pointers are cross-checked to catch torn reads.

pub mod dentry;
pub mod fs;
pub mod list;
pub mod page;
pub mod page_scan;
pub mod radix_tree;
pub mod xarray;

use crate::kernel::LocateError;

/// Why a walk stopped early. Walks return what they found so far plus these.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Read(#[from] LocateError),
    #[error("{what}: {msg}")]
    Corrupt { what: String, msg: String },
    #[error("the profile lacks {0}")]
    ProfileLacks(String),
}

/// Little-endian field readers over a byte slice read from the guest.
pub(crate) fn u64_at(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    b.get(o..o + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .unwrap_or(0)
}
pub(crate) fn u32_at(b: &[u8], off: u64) -> u32 {
    let o = off as usize;
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .unwrap_or(0)
}
pub(crate) fn u16_at(b: &[u8], off: u64) -> u16 {
    let o = off as usize;
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .unwrap_or(0)
}
pub(crate) fn u8_at(b: &[u8], off: u64) -> u8 {
    b.get(off as usize).copied().unwrap_or(0)
}

/// A field offset the walk cannot do without.
pub(crate) fn need(p: &crate::profile::Profile, ty: &str, field: &str) -> Result<u64, WalkError> {
    p.offset(ty, field)
        .ok_or_else(|| WalkError::ProfileLacks(format!("{ty}.{field}")))
}
