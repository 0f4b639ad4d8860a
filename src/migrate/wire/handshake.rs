//! The hello exchange that opens every session: what each end supports ([`Hello`]) and
//! what both then use ([`Session`]).

use super::frame::MAX_PAYLOAD;
use super::varint::Reader;
use super::{check_hash_len, malformed, WireError, PAGE_SIZE};

/// `PCTW`, first bytes of a hello payload.
pub const MAGIC: [u8; 4] = *b"PCTW";
/// This protocol's version. 2: per-page hashes on demand (`Frame::HashRequest`,
/// `Frame::PageHashes`); 3: acks count the stream frames the destination QEMU was given
/// (`Frame::Ack`'s `frames`, for the end-to-end window). Peers must speak the same version.
pub const VERSION: u16 = 3;

/// Capability bits of [`Hello`].
pub mod caps {
    /// zstd-compressed data and fallback frames.
    pub const ZSTD: u32 = 1 << 0;
    /// One hash per reference run.
    pub const RUN_HASH: u32 = 1 << 1;
    pub const ALL: u32 = ZSTD | RUN_HASH;
}

/// Hash algorithm ids.
pub const HASH_BLAKE3: u8 = 1;

/// Which end a hello comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender = 1,
    Receiver = 2,
}

/// The first frame from each end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// [`caps`] bits.
    pub caps: u32,
    pub hash_alg: u8,
    /// Hash bytes this end wants per hash (the smaller of the two is used).
    pub hash_len: u8,
    pub page_size: u32,
    /// Largest payload this end accepts.
    pub max_payload: u32,
}

/// What both ends agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub caps: u32,
    pub hash_len: u8,
    pub max_payload: u32,
}

impl Hello {
    /// This build's hello.
    pub fn new(role: Role) -> Hello {
        Hello {
            version: VERSION,
            role,
            caps: caps::ALL,
            hash_alg: HASH_BLAKE3,
            hash_len: 16,
            page_size: PAGE_SIZE as u32,
            max_payload: MAX_PAYLOAD as u32,
        }
    }

    /// Checks the peer's hello against ours and settles the session parameters.
    pub fn negotiate(&self, peer: &Hello) -> Result<Session, WireError> {
        if peer.version != self.version {
            return Err(WireError::Version { peer: peer.version });
        }
        if peer.role == self.role {
            return Err(WireError::Mismatch(format!(
                "both ends are {:?}",
                self.role
            )));
        }
        if peer.page_size != self.page_size {
            return Err(WireError::Mismatch(format!(
                "page size {} here, {} there",
                self.page_size, peer.page_size
            )));
        }
        if peer.hash_alg != self.hash_alg {
            return Err(WireError::Mismatch(format!(
                "hash algorithm {} here, {} there",
                self.hash_alg, peer.hash_alg
            )));
        }
        Ok(Session {
            caps: self.caps & peer.caps,
            hash_len: self.hash_len.min(peer.hash_len),
            max_payload: self.max_payload.min(peer.max_payload),
        })
    }
}

impl Hello {
    /// Appends the hello payload.
    pub(super) fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(self.role as u8);
        out.extend_from_slice(&self.caps.to_be_bytes());
        out.push(self.hash_alg);
        out.push(self.hash_len);
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.max_payload.to_be_bytes());
    }

    /// Reads a hello payload.
    pub(super) fn decode_payload(r: &mut Reader<'_>) -> Result<Hello, WireError> {
        let name = r.frame;
        let magic: [u8; 4] = r.array()?;
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_be_bytes(r.array()?);
        if version != VERSION {
            return Err(WireError::Version { peer: version });
        }
        let role = match r.u8()? {
            1 => Role::Sender,
            2 => Role::Receiver,
            other => return Err(malformed(name, format!("role {other}"))),
        };
        Ok(Hello {
            version,
            role,
            caps: u32::from_be_bytes(r.array()?),
            hash_alg: r.u8()?,
            hash_len: check_hash_len(name, r.u8()?)?,
            page_size: u32::from_be_bytes(r.array()?),
            max_payload: u32::from_be_bytes(r.array()?),
        })
    }
}
