//! The bytes of data and fallback frames: raw or zstd-compressed ([`Payload`]), and their
//! encoding inside a frame (`codec | raw_len | bytes`).

use super::varint::{put_varint, Reader};
use super::{malformed, WireError};

/// Upper bound on the stream bytes one data frame carries once decompressed.
pub const MAX_RAW: usize = 16 << 20;

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

    /// Appends `codec | raw_len | bytes`.
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.push(self.codec as u8);
        put_varint(out, self.raw_len.into());
        out.extend_from_slice(&self.bytes);
    }

    /// Reads `codec | raw_len | bytes` up to the end of the payload; `want_raw`: the length
    /// it must decompress to.
    pub(super) fn read(r: &mut Reader<'_>, want_raw: Option<usize>) -> Result<Payload, WireError> {
        let codec = match r.u8()? {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            other => return Err(malformed(r.frame, format!("codec {other}"))),
        };
        let raw_len = r.varint()?;
        if raw_len > MAX_RAW as u64 {
            return Err(WireError::TooLong {
                what: "decompressed data",
                len: raw_len,
                max: MAX_RAW as u64,
            });
        }
        if want_raw.is_some_and(|w| w as u64 != raw_len) {
            return Err(malformed(r.frame, "length is not count pages"));
        }
        let bytes = r.rest().to_vec();
        if codec == Codec::Raw && bytes.len() as u64 != raw_len {
            return Err(malformed(r.frame, "raw length mismatch"));
        }
        Ok(Payload {
            codec,
            raw_len: raw_len as u32,
            bytes,
        })
    }
}
