//! The hello exchange that opens every session: what each end supports ([`Hello`]) and
//! what both then use ([`Session`]).

use super::frame::MAX_PAYLOAD;
use super::varint::Reader;
use super::{check_hash_len, malformed, WireError, PAGE_SIZE};

/// `PCTW`, first bytes of a hello payload.
pub const MAGIC: [u8; 4] = *b"PCTW";
/// This protocol's version. 2: per-page hashes on demand (`Frame::HashRequest`,
/// `Frame::PageHashes`); 3: acks count the stream frames the destination QEMU was given
/// (`Frame::Ack`'s `frames`, for the end-to-end window); 4: the sender's hello names the VM
/// it migrates ([`Hello::vm`]), and the receiver answers only once it has judged that hello.
/// Peers must speak the same version.
pub const VERSION: u16 = 4;

/// Longest VM name a hello carries.
pub const MAX_VM_NAME: usize = 64;

/// Whether `name` may name a VM: 1 to [`MAX_VM_NAME`] ASCII letters, digits, `.`, `_` or
/// `-`, not starting with `.` or `-` (libvirt's domain names are wider; a receiver's
/// configuration maps them). Checked on both ends, so that a name from the wire is safe to
/// print and to match.
pub fn valid_vm_name(name: &str) -> bool {
    (1..=MAX_VM_NAME).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

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
    /// From a sender: the VM it migrates, as the receiver's configuration names it (empty:
    /// a receiver that serves one migration, whatever the VM). From a receiver: empty.
    pub vm: String,
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
            vm: String::new(),
        }
    }

    /// A sender's hello for the VM named `vm` (empty: none named).
    pub fn for_vm(vm: &str) -> Hello {
        Hello {
            vm: vm.to_owned(),
            ..Hello::new(Role::Sender)
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
        // Names are checked when a hello is made (`valid_vm_name`), so this fits a byte.
        out.push(self.vm.len().min(MAX_VM_NAME) as u8);
        out.extend_from_slice(&self.vm.as_bytes()[..self.vm.len().min(MAX_VM_NAME)]);
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
        let caps = u32::from_be_bytes(r.array()?);
        let hash_alg = r.u8()?;
        let hash_len = check_hash_len(name, r.u8()?)?;
        let page_size = u32::from_be_bytes(r.array()?);
        let max_payload = u32::from_be_bytes(r.array()?);
        let len = usize::from(r.u8()?);
        let vm = r.take(len)?;
        let vm = match std::str::from_utf8(vm) {
            Ok(v) if v.is_empty() || valid_vm_name(v) => v.to_owned(),
            _ => {
                return Err(malformed(
                    name,
                    format!(
                        "VM name `{}` (letters, digits, `.`, `_`, `-`, at most {MAX_VM_NAME})",
                        crate::sanitize::sanitize(vm)
                    ),
                ))
            }
        };
        Ok(Hello {
            version,
            role,
            caps,
            hash_alg,
            hash_len,
            page_size,
            max_payload,
            vm,
        })
    }
}
