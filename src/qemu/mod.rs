//! Everything pct asks of a running QEMU, one file per thing QEMU exposes:
//! - [`monitor`]: the QMP monitor itself (connect, commands, HMP passthrough, events);
//! - [`ram`]: guest RAM as a [`GuestMemory`](crate::memory::GuestMemory) view, from QEMU's
//!   memory backends and memory map, or copied out of the process for anonymous RAM.

pub mod monitor;
pub mod ram;

pub use monitor::{Qmp, QmpError};
