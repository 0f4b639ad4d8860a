//! Everything pct asks of a running QEMU, one file per thing QEMU exposes:
//! - [`monitor`]: the QMP monitor itself (connect, commands, HMP passthrough, events);
//! - [`ram`]: guest RAM as a [`GuestMemory`](crate::memory::GuestMemory) view, from QEMU's
//!   memory backends and memory map, or copied out of the process for anonymous RAM;
//! - [`migration`]: migration control: capabilities, `migrate`/`migrate-incoming`, the
//!   migration channel's sockets, and typed states;
//! - [`touched`]: which pages of guest RAM QEMU's process touched since a moment, from the
//!   host's page tables.

pub mod migration;
pub mod monitor;
pub mod ram;
pub mod touched;

pub use migration::{MigrationStatus, RunState};
pub use monitor::{Event, EventKind, Qmp, QmpError};
