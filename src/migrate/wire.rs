//! pct's own protocol between the pct sender and the pct receiver (over TCP).
//!
//! Every frame is `type: u8 | length: be32 | payload`. Integers inside payloads are LEB128
//! varints unless said otherwise. Both ends open with [`Hello`] and use what they both
//! support ([`Hello::negotiate`]). Then the sender sends, in the order of QEMU's stream:
//!
//! - [`Frame::Data`]: stream bytes to forward verbatim (a batch of opaque segments), raw or
//!   zstd-compressed;
//! - [`Frame::PageRefs`]: a run of RAM `PAGE` records replaced by references. The receiver
//!   reads each page at its disk offset, checks the hash, and emits the `PAGE` records where
//!   the reference was. Runs are numbered implicitly (0, 1, 2… in send order) on both ends;
//! - [`Frame::End`] once QEMU's stream is complete.
//!
//! The receiver answers with [`Frame::FallbackRequest`] for pages whose hash did not match
//! (the sender replies [`Frame::FallbackData`] with the original bytes). When a run hash
//! fails, the receiver first asks for the run's per-page hashes ([`Frame::HashRequest`],
//! answered by [`Frame::PageHashes`], computed from the kept originals) and requests only
//! the pages that differ (version 2). It acks with [`Frame::Ack`] so
//! the sender can drop the originals it keeps, [`Frame::Complete`] when the destination QEMU
//! has everything (preceded by [`Frame::Report`], the receiver's statistics as JSON), and
//! [`Frame::Error`] on failure (either side).
//!
//! A page reference costs, beyond its hash, about one byte for its RAM offset and one for its
//! disk offset when consecutive, plus a few bytes per run; hashes are per page (a failure
//! costs one page) or per run (one hash for the run; a failure costs the run). The hash is
//! BLAKE3 truncated to `hash_len` bytes, a field of the frame. A failed run hash costs a
//! hash request, `hash_len` bytes per page of the run, and the pages that actually differ.

use super::stream::put_page;
use std::io::{Read, Write};

/// `PCTW`, first bytes of a hello payload.
pub const MAGIC: [u8; 4] = *b"PCTW";
/// This protocol's version. 2: per-page hashes on demand ([`Frame::HashRequest`],
/// [`Frame::PageHashes`]); peers must speak the same version.
pub const VERSION: u16 = 2;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 5;
/// Default and hard upper bound for a frame's payload.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Upper bound on the stream bytes one data frame carries once decompressed.
pub const MAX_RAW: usize = 16 << 20;
/// Upper bound on the pages of one reference run (and of one fallback).
pub const MAX_RUN_PAGES: usize = 4096;
/// Page size (x86).
pub const PAGE_SIZE: usize = 4096;
/// Disk offsets are sent in these units.
pub const SECTOR: u64 = 512;
/// Hash lengths allowed.
pub const HASH_LEN_MIN: u8 = 8;
pub const HASH_LEN_MAX: u8 = 32;
const MAX_ERROR_MESSAGE: usize = 4096;
/// Upper bound on a report frame's JSON.
const MAX_REPORT: usize = 64 << 10;

/// Frame type bytes.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const DATA: u8 = 0x02;
    pub const PAGE_REFS: u8 = 0x03;
    pub const FALLBACK_REQUEST: u8 = 0x04;
    pub const FALLBACK_DATA: u8 = 0x05;
    pub const ACK: u8 = 0x06;
    pub const END: u8 = 0x07;
    pub const COMPLETE: u8 = 0x08;
    pub const ERROR: u8 = 0x09;
    pub const REPORT: u8 = 0x0a;
    pub const HASH_REQUEST: u8 = 0x0b;
    pub const PAGE_HASHES: u8 = 0x0c;
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

/// How the bytes of a data or fallback frame are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Bytes, possibly compressed, with their length once decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub codec: Codec,
    pub raw_len: u32,
    pub bytes: Vec<u8>,
}

impl Payload {
    /// Raw bytes.
    pub fn raw(bytes: Vec<u8>) -> Payload {
        Payload {
            codec: Codec::Raw,
            raw_len: bytes.len() as u32,
            bytes,
        }
    }

    /// zstd at `level` if that is smaller, raw otherwise.
    pub fn compress(data: &[u8], level: i32) -> Result<Payload, WireError> {
        if data.len() > MAX_RAW {
            return Err(WireError::TooLong {
                what: "data to compress",
                len: data.len() as u64,
                max: MAX_RAW as u64,
            });
        }
        let z = zstd::bulk::compress(data, level).map_err(|e| WireError::Zstd(e.to_string()))?;
        Ok(if z.len() < data.len() {
            Payload {
                codec: Codec::Zstd,
                raw_len: data.len() as u32,
                bytes: z,
            }
        } else {
            Payload::raw(data.to_vec())
        })
    }

    /// The original bytes (at most `raw_len`, which is bounded by [`MAX_RAW`]).
    pub fn decompress(&self) -> Result<Vec<u8>, WireError> {
        let out = match self.codec {
            Codec::Raw => self.bytes.clone(),
            Codec::Zstd => zstd::bulk::decompress(&self.bytes, self.raw_len as usize)
                .map_err(|e| WireError::Zstd(e.to_string()))?,
        };
        if out.len() != self.raw_len as usize {
            return Err(malformed(
                "data",
                format!("{} bytes decoded, {} announced", out.len(), self.raw_len),
            ));
        }
        Ok(out)
    }
}

/// One referenced page: where it goes in its RAM block, where it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Byte offset inside the RAM block (page aligned).
    pub offset: u64,
    /// Byte offset on the destination's disk (sector aligned).
    pub disk_offset: u64,
}

/// A run of consecutive `PAGE` records of one RAM block, replaced by references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRefs {
    /// Index of the RAM block in QEMU's `MEM_SIZE` list.
    pub block: u32,
    /// The first record carried the block name (the others are `CONTINUE`).
    pub first_named: bool,
    /// Increasing RAM offsets.
    pub pages: Vec<PageRef>,
    pub hash_len: u8,
    /// `pages.len()` hashes (per page) or one (per run), `hash_len` bytes each.
    pub hashes: Vec<u8>,
}

const REF_FIRST_NAMED: u8 = 1 << 0;
const REF_RUN_HASH: u8 = 1 << 1;

impl PageRefs {
    /// True if one hash covers the whole run.
    pub fn run_hash(&self) -> bool {
        self.hashes.len() == self.hash_len as usize && self.pages.len() > 1
    }

    /// Checks `data` (the pages as read from disk, in order) against the hashes; returns
    /// the indices of the pages that must be fetched from the sender (all of them for a
    /// failed run hash).
    pub fn verify(&self, data: &[&[u8]]) -> Vec<usize> {
        let n = self.pages.len();
        let len = self.hash_len as usize;
        if data.len() != n || data.iter().any(|d| d.len() != PAGE_SIZE) {
            return (0..n).collect();
        }
        if self.run_hash() {
            return if hash_run(data, len) == self.hashes {
                Vec::new()
            } else {
                (0..n).collect()
            };
        }
        (0..n)
            .filter(|&i| hash_page(data[i], len) != self.hashes[i * len..(i + 1) * len])
            .collect()
    }
}

impl PageRefs {
    /// Writes the run's `PAGE` records into a QEMU stream, as the source sent them: the
    /// first with the block name if `first_named`, the rest as `CONTINUE`. `pages` are the
    /// pages' bytes, in order.
    pub fn emit_records(
        &self,
        block_name: &str,
        pages: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        if pages.len() != self.pages.len() {
            return Err(malformed(
                "page refs",
                format!("{} pages for a run of {}", pages.len(), self.pages.len()),
            ));
        }
        for (i, (p, data)) in self.pages.iter().zip(pages).enumerate() {
            let name = (i == 0 && self.first_named).then_some(block_name);
            put_page(out, name, p.offset, data)
                .map_err(|e| malformed("page refs", e.to_string()))?;
        }
        Ok(())
    }
}

/// Groups the pages the sender replaces into runs, in stream order.
///
/// A run extends while the next referenced page is the very next record of the stream, in
/// the same block at a higher offset, and sent with `CONTINUE`. Call [`RunBuilder::flush`]
/// before forwarding any other record, so that order is preserved.
#[derive(Debug)]
pub struct RunBuilder {
    hash_len: u8,
    run_hash: bool,
    max_pages: usize,
    cur: Option<PageRefs>,
    hasher: blake3::Hasher,
}

impl RunBuilder {
    /// Runs hashed as `session` says (one hash per run if both ends have [`caps::RUN_HASH`]).
    pub fn new(session: &Session) -> RunBuilder {
        RunBuilder {
            hash_len: session.hash_len,
            run_hash: session.caps & caps::RUN_HASH != 0,
            max_pages: MAX_RUN_PAGES,
            cur: None,
            hasher: blake3::Hasher::new(),
        }
    }

    /// Caps the pages per run (at most [`MAX_RUN_PAGES`]).
    pub fn with_max_pages(mut self, n: usize) -> RunBuilder {
        self.max_pages = n.clamp(1, MAX_RUN_PAGES);
        self
    }

    /// Adds the page at `offset` of `block` (sent with `CONTINUE` if `continued`), found on
    /// disk at `disk_offset`. Returns the previous run if this page could not join it.
    pub fn push(
        &mut self,
        block: u32,
        offset: u64,
        continued: bool,
        disk_offset: u64,
        data: &[u8],
    ) -> Option<PageRefs> {
        let joins = self.cur.as_ref().is_some_and(|r| {
            continued
                && r.block == block
                && r.pages.len() < self.max_pages
                && r.pages.last().is_some_and(|p| offset > p.offset)
        });
        let done = if joins { None } else { self.flush() };
        let run = self.cur.get_or_insert_with(|| PageRefs {
            block,
            first_named: !continued,
            pages: Vec::new(),
            hash_len: self.hash_len,
            hashes: Vec::new(),
        });
        run.pages.push(PageRef {
            offset,
            disk_offset,
        });
        // In run mode a one-page run's hash is that page's hash: both are BLAKE3 of the
        // same bytes.
        if self.run_hash {
            self.hasher.update(data);
        } else {
            run.hashes
                .extend_from_slice(&hash_page(data, self.hash_len as usize));
        }
        done
    }

    /// Ends the current run, if any.
    pub fn flush(&mut self) -> Option<PageRefs> {
        let mut run = self.cur.take()?;
        if self.run_hash {
            run.hashes = self.hasher.finalize().as_bytes()[..self.hash_len as usize].to_vec();
        }
        self.hasher.reset();
        Some(run)
    }
}

/// BLAKE3 of one page, truncated to `len` bytes.
pub fn hash_page(data: &[u8], len: usize) -> Vec<u8> {
    blake3::hash(data).as_bytes()[..len.min(32)].to_vec()
}

/// BLAKE3 of each page, truncated to `len` bytes each, concatenated.
pub fn hash_pages(pages: &[u8], len: usize) -> Vec<u8> {
    pages
        .chunks(PAGE_SIZE)
        .flat_map(|p| hash_page(p, len))
        .collect()
}

/// BLAKE3 of the concatenated pages of a run, truncated to `len` bytes.
pub fn hash_run(pages: &[&[u8]], len: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    for p in pages {
        h.update(p);
    }
    h.finalize().as_bytes()[..len.min(32)].to_vec()
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// Stream bytes to forward verbatim.
    Data(Payload),
    PageRefs(PageRefs),
    /// Receiver → sender: send the original bytes of pages `first..first + count` of run
    /// `run`.
    FallbackRequest {
        run: u64,
        first: u32,
        count: u32,
    },
    /// Sender → receiver: those bytes (`count` pages).
    FallbackData {
        run: u64,
        first: u32,
        count: u32,
        data: Payload,
    },
    /// Receiver → sender: send the per-page hashes of pages `first..first + count` of run
    /// `run` (its run hash failed; the receiver then fetches only the pages that differ).
    HashRequest {
        run: u64,
        first: u32,
        count: u32,
    },
    /// Sender → receiver: BLAKE3 of each of those pages of the original bytes, truncated to
    /// `hash_len` bytes; `count * hash_len` bytes.
    PageHashes {
        run: u64,
        first: u32,
        count: u32,
        hash_len: u8,
        hashes: Vec<u8>,
    },
    /// Receiver → sender: runs `0..runs` are restored and emitted; drop their originals.
    Ack {
        runs: u64,
    },
    /// Sender → receiver: QEMU's stream ended after `stream_bytes` bytes and `runs` runs.
    End {
        stream_bytes: u64,
        runs: u64,
    },
    /// Receiver → sender: the destination QEMU got `stream_bytes` bytes.
    Complete {
        stream_bytes: u64,
    },
    Error {
        code: u16,
        message: String,
    },
    /// Receiver → sender, before `Complete`: the receiver's statistics, a JSON object.
    Report {
        json: String,
    },
}

impl Frame {
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello(_) => frame_type::HELLO,
            Frame::Data(_) => frame_type::DATA,
            Frame::PageRefs(_) => frame_type::PAGE_REFS,
            Frame::FallbackRequest { .. } => frame_type::FALLBACK_REQUEST,
            Frame::FallbackData { .. } => frame_type::FALLBACK_DATA,
            Frame::HashRequest { .. } => frame_type::HASH_REQUEST,
            Frame::PageHashes { .. } => frame_type::PAGE_HASHES,
            Frame::Ack { .. } => frame_type::ACK,
            Frame::End { .. } => frame_type::END,
            Frame::Complete { .. } => frame_type::COMPLETE,
            Frame::Error { .. } => frame_type::ERROR,
            Frame::Report { .. } => frame_type::REPORT,
        }
    }

    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// Appends header and payload to `out`; returns the frame's length on the wire.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<usize, WireError> {
        let start = out.len();
        out.push(self.type_byte());
        out.extend_from_slice(&[0; 4]);
        self.encode_payload(out)?;
        let len = out.len() - start - HEADER_LEN;
        if len > MAX_PAYLOAD {
            out.truncate(start);
            return Err(WireError::TooLong {
                what: "frame payload",
                len: len as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        out[start + 1..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(out.len() - start)
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Frame::Hello(h) => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&h.version.to_be_bytes());
                out.push(h.role as u8);
                out.extend_from_slice(&h.caps.to_be_bytes());
                out.push(h.hash_alg);
                out.push(h.hash_len);
                out.extend_from_slice(&h.page_size.to_be_bytes());
                out.extend_from_slice(&h.max_payload.to_be_bytes());
            }
            Frame::Data(p) => put_payload(out, p),
            Frame::PageRefs(r) => encode_refs(r, out)?,
            Frame::FallbackRequest { run, first, count }
            | Frame::HashRequest { run, first, count } => {
                put_varint(out, *run);
                put_varint(out, (*first).into());
                put_varint(out, (*count).into());
            }
            Frame::PageHashes {
                run,
                first,
                count,
                hash_len,
                hashes,
            } => {
                let name = "page hashes";
                check_hash_len(name, *hash_len)?;
                if *count == 0 || *first as usize + *count as usize > MAX_RUN_PAGES {
                    return Err(malformed(name, format!("pages {first}+{count}")));
                }
                if hashes.len() != *count as usize * *hash_len as usize {
                    return Err(malformed(name, "hash bytes do not match the page count"));
                }
                put_varint(out, *run);
                put_varint(out, (*first).into());
                put_varint(out, (*count).into());
                out.push(*hash_len);
                out.extend_from_slice(hashes);
            }
            Frame::FallbackData {
                run,
                first,
                count,
                data,
            } => {
                if data.raw_len as usize != *count as usize * PAGE_SIZE {
                    return Err(malformed("fallback data", "length is not count pages"));
                }
                put_varint(out, *run);
                put_varint(out, (*first).into());
                put_varint(out, (*count).into());
                put_payload(out, data);
            }
            Frame::Ack { runs } => put_varint(out, *runs),
            Frame::End { stream_bytes, runs } => {
                put_varint(out, *stream_bytes);
                put_varint(out, *runs);
            }
            Frame::Complete { stream_bytes } => put_varint(out, *stream_bytes),
            Frame::Error { code, message } => {
                out.extend_from_slice(&code.to_be_bytes());
                let mut end = message.len().min(MAX_ERROR_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
            Frame::Report { json } => {
                if json.len() > MAX_REPORT {
                    return Err(malformed("report", "report too long"));
                }
                out.extend_from_slice(json.as_bytes());
            }
        }
        Ok(())
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` if `buf` holds only part of it,
    /// else the frame and its length on the wire.
    pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let (t, len) = parse_header(buf[..HEADER_LEN].try_into().unwrap_or([0; 5]), max_payload)?;
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        Ok(Some((Frame::decode_payload(t, payload)?, HEADER_LEN + len)))
    }

    /// Decodes a payload of frame type `t`.
    pub fn decode_payload(t: u8, payload: &[u8]) -> Result<Frame, WireError> {
        let name = type_name(t);
        let mut r = Reader {
            b: payload,
            p: 0,
            frame: name,
        };
        let frame = match t {
            frame_type::HELLO => {
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
                let h = Hello {
                    version,
                    role,
                    caps: u32::from_be_bytes(r.array()?),
                    hash_alg: r.u8()?,
                    hash_len: check_hash_len(name, r.u8()?)?,
                    page_size: u32::from_be_bytes(r.array()?),
                    max_payload: u32::from_be_bytes(r.array()?),
                };
                Frame::Hello(h)
            }
            frame_type::DATA => Frame::Data(r.payload(None)?),
            frame_type::PAGE_REFS => Frame::PageRefs(decode_refs(&mut r)?),
            frame_type::FALLBACK_REQUEST => {
                let run = r.varint()?;
                let (first, count) = r.page_range()?;
                Frame::FallbackRequest { run, first, count }
            }
            frame_type::FALLBACK_DATA => {
                let run = r.varint()?;
                let (first, count) = r.page_range()?;
                let data = r.payload(Some(count as usize * PAGE_SIZE))?;
                Frame::FallbackData {
                    run,
                    first,
                    count,
                    data,
                }
            }
            frame_type::HASH_REQUEST => {
                let run = r.varint()?;
                let (first, count) = r.page_range()?;
                Frame::HashRequest { run, first, count }
            }
            frame_type::PAGE_HASHES => {
                let run = r.varint()?;
                let (first, count) = r.page_range()?;
                let hash_len = check_hash_len(name, r.u8()?)?;
                let hashes = r.take(count as usize * hash_len as usize)?.to_vec();
                Frame::PageHashes {
                    run,
                    first,
                    count,
                    hash_len,
                    hashes,
                }
            }
            frame_type::ACK => Frame::Ack { runs: r.varint()? },
            frame_type::END => Frame::End {
                stream_bytes: r.varint()?,
                runs: r.varint()?,
            },
            frame_type::COMPLETE => Frame::Complete {
                stream_bytes: r.varint()?,
            },
            frame_type::ERROR => {
                let code = u16::from_be_bytes(r.array()?);
                let rest = r.rest();
                if rest.len() > MAX_ERROR_MESSAGE {
                    return Err(malformed(name, "message too long"));
                }
                let message = std::str::from_utf8(rest)
                    .map_err(|_| malformed(name, "message is not UTF-8"))?
                    .to_owned();
                Frame::Error { code, message }
            }
            frame_type::REPORT => {
                let rest = r.rest();
                if rest.len() > MAX_REPORT {
                    return Err(malformed(name, "report too long"));
                }
                let json = std::str::from_utf8(rest)
                    .map_err(|_| malformed(name, "report is not UTF-8"))?
                    .to_owned();
                Frame::Report { json }
            }
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

fn type_name(t: u8) -> &'static str {
    match t {
        frame_type::HELLO => "hello",
        frame_type::DATA => "data",
        frame_type::PAGE_REFS => "page refs",
        frame_type::FALLBACK_REQUEST => "fallback request",
        frame_type::FALLBACK_DATA => "fallback data",
        frame_type::HASH_REQUEST => "hash request",
        frame_type::PAGE_HASHES => "page hashes",
        frame_type::ACK => "ack",
        frame_type::END => "end",
        frame_type::COMPLETE => "complete",
        frame_type::ERROR => "error",
        frame_type::REPORT => "report",
        _ => "unknown",
    }
}

fn check_hash_len(frame: &'static str, len: u8) -> Result<u8, WireError> {
    if (HASH_LEN_MIN..=HASH_LEN_MAX).contains(&len) {
        Ok(len)
    } else {
        Err(malformed(frame, format!("hash length {len}")))
    }
}

fn parse_header(h: [u8; 5], max_payload: usize) -> Result<(u8, usize), WireError> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let max = max_payload.min(MAX_PAYLOAD);
    if len > max {
        return Err(WireError::TooLong {
            what: "frame payload",
            len: len as u64,
            max: max as u64,
        });
    }
    Ok((h[0], len))
}

/// Reads one frame; `Ok(None)` at a clean end of input (between frames).
pub fn read_frame<R: Read + ?Sized>(
    r: &mut R,
    max_payload: usize,
) -> Result<Option<(Frame, usize)>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated("frame header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (t, len) = parse_header(h, max_payload)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated("frame payload"),
        _ => WireError::Io(e),
    })?;
    Ok(Some((
        Frame::decode_payload(t, &payload)?,
        HEADER_LEN + len,
    )))
}

/// Writes one frame; returns its length on the wire.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<usize, WireError> {
    let mut buf = Vec::new();
    let n = frame.encode(&mut buf)?;
    w.write_all(&buf)?;
    Ok(n)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_payload(out: &mut Vec<u8>, p: &Payload) {
    out.push(p.codec as u8);
    put_varint(out, p.raw_len.into());
    out.extend_from_slice(&p.bytes);
}

/// `block | flags | hash_len | count | first page | (gap - 1)* | disk deltas | hashes`.
fn encode_refs(r: &PageRefs, out: &mut Vec<u8>) -> Result<(), WireError> {
    let name = "page refs";
    let n = r.pages.len();
    if n == 0 || n > MAX_RUN_PAGES {
        return Err(malformed(name, format!("{n} pages")));
    }
    check_hash_len(name, r.hash_len)?;
    let len = r.hash_len as usize;
    let run_hash = r.hashes.len() == len && n > 1;
    if !run_hash && r.hashes.len() != n * len {
        return Err(malformed(name, "hash bytes do not match the page count"));
    }
    put_varint(out, r.block.into());
    let mut flags = 0;
    if r.first_named {
        flags |= REF_FIRST_NAMED;
    }
    if run_hash {
        flags |= REF_RUN_HASH;
    }
    out.push(flags);
    out.push(r.hash_len);
    put_varint(out, n as u64);
    let page = PAGE_SIZE as u64;
    let mut prev: Option<u64> = None;
    for p in &r.pages {
        if p.offset % page != 0 {
            return Err(malformed(
                name,
                format!("RAM offset {:#x} unaligned", p.offset),
            ));
        }
        match prev {
            None => put_varint(out, p.offset / page),
            Some(q) if p.offset > q => put_varint(out, (p.offset - q) / page - 1),
            Some(_) => return Err(malformed(name, "RAM offsets not increasing")),
        }
        prev = Some(p.offset);
    }
    let mut expect: i64 = 0;
    for p in &r.pages {
        if p.disk_offset % SECTOR != 0 || p.disk_offset > i64::MAX as u64 / 2 {
            return Err(malformed(name, format!("disk offset {:#x}", p.disk_offset)));
        }
        let sector = (p.disk_offset / SECTOR) as i64;
        put_varint(out, zigzag(sector - expect));
        expect = sector + (PAGE_SIZE as u64 / SECTOR) as i64;
    }
    out.extend_from_slice(&r.hashes);
    Ok(())
}

fn decode_refs(r: &mut Reader<'_>) -> Result<PageRefs, WireError> {
    let name = r.frame;
    let block = u32::try_from(r.varint()?).map_err(|_| malformed(name, "block index"))?;
    let flags = r.u8()?;
    if flags & !(REF_FIRST_NAMED | REF_RUN_HASH) != 0 {
        return Err(malformed(name, format!("flags {flags:#x}")));
    }
    let hash_len = check_hash_len(name, r.u8()?)?;
    let n = r.varint()?;
    if n == 0 || n > MAX_RUN_PAGES as u64 {
        return Err(malformed(name, format!("{n} pages")));
    }
    let n = n as usize;
    let run_hash = flags & REF_RUN_HASH != 0;
    if run_hash && n == 1 {
        return Err(malformed(name, "run hash on a single page"));
    }
    let page = PAGE_SIZE as u64;
    let mut pages = Vec::with_capacity(n);
    let mut offset = 0u64;
    for i in 0..n {
        let v = r.varint()?;
        let next = if i == 0 {
            v.checked_mul(page)
        } else {
            v.checked_add(1)
                .and_then(|g| g.checked_mul(page))
                .and_then(|d| offset.checked_add(d))
        };
        offset = next.ok_or_else(|| malformed(name, "RAM offset overflows"))?;
        pages.push(PageRef {
            offset,
            disk_offset: 0,
        });
    }
    let mut expect: i64 = 0;
    for p in &mut pages {
        let sector = expect
            .checked_add(unzigzag(r.varint()?))
            .filter(|s| (0..i64::MAX / 1024).contains(s))
            .ok_or_else(|| malformed(name, "disk offset out of range"))?;
        p.disk_offset = sector as u64 * SECTOR;
        expect = sector + (PAGE_SIZE as u64 / SECTOR) as i64;
    }
    let hash_bytes = if run_hash { 1 } else { n } * hash_len as usize;
    let hashes = r.take(hash_bytes)?.to_vec();
    Ok(PageRefs {
        block,
        first_named: flags & REF_FIRST_NAMED != 0,
        pages,
        hash_len,
        hashes,
    })
}

/// Bounds-checked reader over one payload.
struct Reader<'b> {
    b: &'b [u8],
    p: usize,
    frame: &'static str,
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8], WireError> {
        if self.b.len() - self.p < n {
            return Err(WireError::Truncated(self.frame));
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(malformed(self.frame, "varint overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed(self.frame, "varint longer than 10 bytes"))
    }

    /// `first` and `count` pages, bounded.
    fn page_range(&mut self) -> Result<(u32, u32), WireError> {
        let first = self.varint()?;
        let count = self.varint()?;
        if first >= MAX_RUN_PAGES as u64 || count == 0 || first + count > MAX_RUN_PAGES as u64 {
            return Err(malformed(self.frame, format!("pages {first}+{count}")));
        }
        Ok((first as u32, count as u32))
    }

    /// `codec | raw_len | bytes` up to the end of the payload.
    fn payload(&mut self, want_raw: Option<usize>) -> Result<Payload, WireError> {
        let codec = match self.u8()? {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            other => return Err(malformed(self.frame, format!("codec {other}"))),
        };
        let raw_len = self.varint()?;
        if raw_len > MAX_RAW as u64 {
            return Err(WireError::TooLong {
                what: "decompressed data",
                len: raw_len,
                max: MAX_RAW as u64,
            });
        }
        if want_raw.is_some_and(|w| w as u64 != raw_len) {
            return Err(malformed(self.frame, "length is not count pages"));
        }
        let bytes = self.rest().to_vec();
        if codec == Codec::Raw && bytes.len() as u64 != raw_len {
            return Err(malformed(self.frame, "raw length mismatch"));
        }
        Ok(Payload {
            codec,
            raw_len: raw_len as u32,
            bytes,
        })
    }

    fn rest(&mut self) -> &'b [u8] {
        let s = &self.b[self.p..];
        self.p = self.b.len();
        s
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.p != self.b.len() {
            return Err(malformed(
                self.frame,
                format!("{} trailing bytes", self.b.len() - self.p),
            ));
        }
        Ok(())
    }
}

/// Bytes on the wire by kind, for one direction or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireStats {
    pub frames: u64,
    /// Stream bytes carried by data frames, before compression.
    pub passthrough_raw: u64,
    /// Data frames on the wire (headers included).
    pub passthrough_wire: u64,
    /// Pages sent as references, and their frames on the wire.
    pub ref_pages: u64,
    pub ref_wire: u64,
    /// Of `ref_wire`, the hash bytes.
    pub ref_hash_bytes: u64,
    /// Pages re-sent after a failed check, and fallback frames on the wire (both kinds).
    pub fallback_pages: u64,
    pub fallback_wire: u64,
    /// Hello, ack, end, complete, error, report, and the per-page hash exchange after a
    /// failed run hash (hash requests and page hashes).
    pub control_wire: u64,
}

impl WireStats {
    /// Counts `frame`, which took `wire_len` bytes.
    pub fn count(&mut self, frame: &Frame, wire_len: usize) {
        let n = wire_len as u64;
        self.frames += 1;
        match frame {
            Frame::Data(p) => {
                self.passthrough_raw += u64::from(p.raw_len);
                self.passthrough_wire += n;
            }
            Frame::PageRefs(r) => {
                self.ref_pages += r.pages.len() as u64;
                self.ref_hash_bytes += r.hashes.len() as u64;
                self.ref_wire += n;
            }
            Frame::FallbackRequest { .. } => self.fallback_wire += n,
            Frame::FallbackData { count, .. } => {
                self.fallback_pages += u64::from(*count);
                self.fallback_wire += n;
            }
            Frame::Hello(_)
            | Frame::HashRequest { .. }
            | Frame::PageHashes { .. }
            | Frame::Ack { .. }
            | Frame::End { .. }
            | Frame::Complete { .. }
            | Frame::Error { .. }
            | Frame::Report { .. } => self.control_wire += n,
        }
    }

    /// All bytes counted.
    pub fn wire_total(&self) -> u64 {
        self.passthrough_wire + self.ref_wire + self.fallback_wire + self.control_wire
    }
}
