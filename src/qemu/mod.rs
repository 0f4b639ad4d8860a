//! Everything pct asks of a running QEMU, one file per thing QEMU exposes:
//! - [`monitor`]: the QMP monitor itself (connect, commands, HMP passthrough, events);
//! - [`ram`]: guest RAM as a [`GuestMemory`](crate::memory::GuestMemory) view, from QEMU's
//!   memory backends and memory map, or copied out of the process for anonymous RAM;
//! - [`migration`]: migration control: capabilities, `migrate`/`migrate-incoming`, the
//!   migration channel's sockets, and typed states;
//! - [`channel`]: the migration channel's socket, Unix or TCP;
//! - [`process`]: a QEMU process seen from the host alone, without a monitor of pct's own
//!   (a VM manager owns it): its process id from a socket peer, its RAM's mapping, its
//!   accelerator and version;
//! - [`touched`]: which pages of guest RAM QEMU's process touched since a moment, from the
//!   host's page tables.

pub mod channel;
pub mod migration;
pub mod monitor;
pub mod process;
pub mod ram;
pub mod touched;

pub use channel::Channel;
pub use migration::{MigrationStatus, RunState};
pub use monitor::{Event, EventKind, Qmp, QmpError};
