//! pct's own framed protocol between the pct sender and the pct receiver (over TCP). The
//! protocol itself (frames, their order, what each costs) is described in docs/migration.md,
//! "Wire protocol".
//!
//! - `handshake.rs`: the hello each end opens with and the session both agree on;
//! - `payload.rs`: the bytes of data and fallback frames, raw or zstd-compressed;
//! - `runs.rs`: reference runs ([`PageRefs`]), how the sender builds them ([`RunBuilder`]),
//!   how the receiver checks them, and their encoding;
//! - `hash.rs`: the BLAKE3 page and run hashes;
//! - `frame.rs`: the frames ([`Frame`]) and their codec;
//! - `varint.rs`: LEB128 varints and the bounds-checked payload reader;
//! - `stats.rs`: bytes on the wire by kind ([`WireStats`]).
//!
//! This file holds what they share: page and sector sizes, the bounds every decoder
//! enforces, and the error type.

mod frame;
mod handshake;
mod hash;
mod payload;
mod runs;
mod stats;
mod varint;

pub use frame::{
    frame_type, read_frame, write_frame, Frame, HEADER_LEN, MAX_PAYLOAD, MAX_RETURN_PATH,
};
pub use handshake::{
    caps, valid_vm_name, Hello, Role, Session, HASH_BLAKE3, MAGIC, MAX_VM_NAME, VERSION,
};
pub use hash::{hash_page, hash_pages, hash_run};
pub use payload::{Codec, Payload, MAX_RAW};
pub use runs::{PageRef, PageRefs, RunBuilder};
pub use stats::WireStats;

/// Upper bound on the pages of one reference run (and of one fallback).
pub const MAX_RUN_PAGES: usize = 4096;
/// Page size (x86).
pub const PAGE_SIZE: usize = 4096;
/// Disk offsets are sent in these units.
pub const SECTOR: u64 = 512;
/// Hash lengths allowed.
pub const HASH_LEN_MIN: u8 = 8;
pub const HASH_LEN_MAX: u8 = 32;

/// What can be wrong with a frame or a session.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame ends early: {0}")]
    Truncated(&'static str),
    #[error("{what} is {len}, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("not a pct peer (hello magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer speaks pct wire version {peer}, this build speaks {VERSION}")]
    Version { peer: u16 },
    #[error("malformed {frame} frame: {msg}")]
    Malformed { frame: &'static str, msg: String },
    #[error("peers disagree: {0}")]
    Mismatch(String),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("wire I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn malformed(frame: &'static str, msg: impl Into<String>) -> WireError {
    WireError::Malformed {
        frame,
        msg: msg.into(),
    }
}

fn check_hash_len(frame: &'static str, len: u8) -> Result<u8, WireError> {
    if (HASH_LEN_MIN..=HASH_LEN_MAX).contains(&len) {
        Ok(len)
    } else {
        Err(malformed(frame, format!("hash length {len}")))
    }
}
