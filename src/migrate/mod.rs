//! Migration transport: everything between the source QEMU and the destination QEMU.
//!
//! - [`stream`]: QEMU's own precopy migration stream (parse records, re-emit them).
//! - [`wire`]: pct's framed protocol between the pct sender and the pct receiver.
//!
//! The sender parses the stream QEMU writes, forwards everything verbatim except RAM
//! `PAGE` records it can replace by references, and the receiver rebuilds a standard
//! stream for the destination QEMU (DESIGN.md, invariants 1 and 2).

pub mod stream;
pub mod wire;
