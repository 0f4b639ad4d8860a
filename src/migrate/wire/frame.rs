//! The frames ([`Frame`]) and their codec: the `type | length | payload` envelope, each
//! frame's payload layout (hello, payload and run payloads are coded by their own
//! modules), and reading and writing frames on a stream.

use super::handshake::Hello;
use super::payload::Payload;
use super::runs::PageRefs;
use super::varint::{put_varint, Reader};
use super::{check_hash_len, malformed, WireError, MAX_RUN_PAGES, PAGE_SIZE};
use std::io::{Read, Write};

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 5;
/// Default and hard upper bound for a frame's payload.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Upper bound on an error frame's message.
const MAX_ERROR_MESSAGE: usize = 4096;
/// Upper bound on a report frame's JSON.
const MAX_REPORT: usize = 64 << 10;
/// Upper bound on a return-path frame's bytes.
pub const MAX_RETURN_PATH: usize = 64 << 10;

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
    pub const RETURN_PATH: u8 = 0x0d;
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
    /// Receiver → sender: the destination QEMU has been given the stream frames (data
    /// frames and runs, in stream order) `0..frames`, runs `0..runs` among them: drop
    /// those runs' originals, and count the frames off the end-to-end window.
    Ack {
        runs: u64,
        frames: u64,
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
    /// Receiver → sender: bytes the destination QEMU wrote on its migration channel, QEMU's
    /// return path (its `SHUT` once it has loaded the stream), for the source QEMU.
    ReturnPath {
        data: Vec<u8>,
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
            Frame::ReturnPath { .. } => frame_type::RETURN_PATH,
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
            Frame::Hello(h) => h.encode_payload(out),
            Frame::Data(p) => p.put(out),
            Frame::PageRefs(r) => r.encode_payload(out)?,
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
                data.put(out);
            }
            Frame::Ack { runs, frames } => {
                put_varint(out, *runs);
                put_varint(out, *frames);
            }
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
            Frame::ReturnPath { data } => {
                if data.is_empty() || data.len() > MAX_RETURN_PATH {
                    return Err(malformed("return path", format!("{} bytes", data.len())));
                }
                out.extend_from_slice(data);
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
        let mut r = Reader::new(payload, name);
        let frame = match t {
            frame_type::HELLO => Frame::Hello(Hello::decode_payload(&mut r)?),
            frame_type::DATA => Frame::Data(Payload::read(&mut r, None)?),
            frame_type::PAGE_REFS => Frame::PageRefs(PageRefs::decode_payload(&mut r)?),
            frame_type::FALLBACK_REQUEST => {
                let (run, first, count) = run_pages(&mut r)?;
                Frame::FallbackRequest { run, first, count }
            }
            frame_type::FALLBACK_DATA => {
                let (run, first, count) = run_pages(&mut r)?;
                let data = Payload::read(&mut r, Some(count as usize * PAGE_SIZE))?;
                Frame::FallbackData {
                    run,
                    first,
                    count,
                    data,
                }
            }
            frame_type::HASH_REQUEST => {
                let (run, first, count) = run_pages(&mut r)?;
                Frame::HashRequest { run, first, count }
            }
            frame_type::PAGE_HASHES => {
                let (run, first, count) = run_pages(&mut r)?;
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
            frame_type::ACK => Frame::Ack {
                runs: r.varint()?,
                frames: r.varint()?,
            },
            frame_type::END => Frame::End {
                stream_bytes: r.varint()?,
                runs: r.varint()?,
            },
            frame_type::COMPLETE => Frame::Complete {
                stream_bytes: r.varint()?,
            },
            frame_type::ERROR => {
                let code = u16::from_be_bytes(r.array()?);
                let message = utf8_rest(&mut r, MAX_ERROR_MESSAGE, "message")?;
                Frame::Error { code, message }
            }
            frame_type::REPORT => Frame::Report {
                json: utf8_rest(&mut r, MAX_REPORT, "report")?,
            },
            frame_type::RETURN_PATH => {
                let data = r.rest();
                if data.is_empty() || data.len() > MAX_RETURN_PATH {
                    return Err(malformed("return path", format!("{} bytes", data.len())));
                }
                Frame::ReturnPath {
                    data: data.to_vec(),
                }
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
        frame_type::RETURN_PATH => "return path",
        _ => "unknown",
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

/// The rest of the frame as text of at most `max` bytes (`what` names it in errors).
fn utf8_rest(r: &mut Reader<'_>, max: usize, what: &str) -> Result<String, WireError> {
    let rest = r.rest();
    if rest.len() > max {
        return Err(malformed(r.frame, format!("{what} too long")));
    }
    std::str::from_utf8(rest)
        .map(str::to_owned)
        .map_err(|_| malformed(r.frame, format!("{what} is not UTF-8")))
}

/// A run number and a page range inside it (first page, count), checked.
fn run_pages(r: &mut Reader<'_>) -> Result<(u64, u32, u32), WireError> {
    let run = r.varint()?;
    let first = r.varint()?;
    let count = r.varint()?;
    // `count` is checked against the room left after `first`: `first + count` can
    // overflow (and, wrapped, pass).
    let max = MAX_RUN_PAGES as u64;
    if first >= max || count == 0 || count > max - first {
        return Err(malformed(
            r.frame,
            format!("pages {first}+{count} outside a run of at most {max} pages"),
        ));
    }
    Ok((run, first as u32, count as u32))
}
