//! Migration transport: everything between the source QEMU and the destination QEMU.
//!
//! - [`stream`]: QEMU's own precopy migration stream (parse records, re-emit them).
//! - [`wire`]: pct's framed protocol between the pct sender and the pct receiver.
//! - [`link`]: the TCP connection and its hello exchange.
//! - [`tls`]: TLS 1.3 with mutual authentication on that connection, and its certificates.
//! - [`flow`]: bounded queues and rate caps, so QEMU paces itself by the WAN.
//! - [`refmap`]: the cache map translated into QEMU's RAM-block offsets.
//! - [`freemap`]: the guest's free pages in those offsets: which were elided, and the
//!   re-check with the guest stopped.
//! - [`sender`] / [`receiver`]: the two ends of the stream: pct frames out of QEMU's
//!   stream, QEMU's stream back out of pct frames.
//! - [`source`] / [`destination`]: one migration end to end on each host (QEMU through
//!   [`crate::qemu`], the sender or receiver, the session's last frames), as `pct-migrate`
//!   runs it.
//! - [`service`]: the destination side as a long-lived service: many migrations, each
//!   into a VM its configuration names, admitted by the sender's certificate.
//! - [`evacuate`]: several VMs to one receiver service at once, each with its own source.
//! - [`proxy`]: the source side when a VM manager (libvirt) drives the migration: pct
//!   listens where the source QEMU is told to connect, and finds the guest from the host.
//! - [`switchover`]: the check, with the guest stopped, that the stream holds its RAM as it
//!   is (re-sending what QEMU's dirty tracking missed).
//! - [`timeline`]: when each step of the switchover happened, on both ends (the downtime,
//!   broken down).
//! - [`summary`]: statistics of one migration, as text and JSON.
//! - [`predict`]: `--dry-run`, what a migration would cost now.
//! - [`inspect`]: reading a recorded stream after the fact.
//! - [`replay`]: a stream through the real sender and receiver on loopback, without QEMU
//!   (pct's relay throughput, TLS or not).
//!
//! The sender parses the stream QEMU writes, forwards everything verbatim except RAM
//! `PAGE` records it can replace by references, and the receiver rebuilds a standard
//! stream for the destination QEMU (docs/design.md, rules 1 and 2).

pub mod destination;
pub mod evacuate;
pub mod flow;
pub mod freemap;
pub mod inspect;
pub mod link;
pub mod predict;
pub mod proxy;
pub mod receiver;
pub mod refmap;
pub mod replay;
pub mod sender;
pub mod service;
pub mod source;
pub mod stream;
pub mod summary;
pub mod switchover;
pub mod timeline;
pub mod tls;
pub mod wire;
