//! Walkers over the guest kernel's own data structures, named after the kernel helpers
//! they mirror (`list_for_each_entry`, `xa_for_each`, `page_to_pfn`), so that the
//! kernel source is their documentation.
//!
//! Every walk treats guest memory as hostile: pointers are bounds-checked by
//! [`Kernel::read`](crate::kernel::Kernel::read), fields are read with
//! [`crate::memory::reader::LeSlice`] (a field outside what was read is a
//! [`WalkError::Field`] naming `struct.field` and its address, never a 0), lists and
//! trees carry cycle guards and iteration caps, and back-pointers are cross-checked to
//! catch torn reads.

pub mod buddy;
pub mod dentry;
pub mod fs;
pub mod list;
pub mod page;
pub mod page_scan;
pub mod radix_tree;
pub mod xarray;

use crate::kernel::LocateError;
pub(crate) use crate::memory::reader::{Addr, FieldError, LeSlice};

/// Why a walk stopped early. Walks return what they found so far plus these.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Read(#[from] LocateError),
    #[error("{what}: {msg}")]
    Corrupt { what: String, msg: String },
    #[error("the profile lacks {0}")]
    ProfileLacks(String),
    /// A field lies outside the bytes read for its struct (a profile whose offsets do
    /// not fit its sizes): an error, never a 0.
    #[error(transparent)]
    Field(#[from] FieldError),
}

/// A reader over bytes of struct `ty` read at kernel VA `va`.
pub(crate) fn at_va<'a>(bytes: &'a [u8], va: u64, ty: &'static str) -> LeSlice<'a> {
    LeSlice::new(bytes, Addr::Va(va), ty)
}

/// A field offset the walk cannot do without.
pub(crate) fn need(p: &crate::profile::Profile, ty: &str, field: &str) -> Result<u64, WalkError> {
    p.offset(ty, field)
        .ok_or_else(|| WalkError::ProfileLacks(format!("{ty}.{field}")))
}
