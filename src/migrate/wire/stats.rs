//! Bytes on the wire by kind ([`WireStats`]), counted frame by frame at both ends.

use super::frame::Frame;

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
            | Frame::Report { .. }
            | Frame::ReturnPath { .. } => self.control_wire += n,
        }
    }

    /// All bytes counted.
    pub fn wire_total(&self) -> u64 {
        self.passthrough_wire + self.ref_wire + self.fallback_wire + self.control_wire
    }
}
