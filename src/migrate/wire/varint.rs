//! The integer encodings inside frame payloads (LEB128 varints, zigzag for signed deltas)
//! and the bounds-checked [`Reader`] every payload decoder reads through.

use super::{malformed, WireError};

/// Appends `v` as a LEB128 varint.
pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
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

/// Signed to unsigned, small magnitudes small.
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(super) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bounds-checked reader over one payload.
pub(super) struct Reader<'b> {
    b: &'b [u8],
    p: usize,
    /// The frame being read, for error messages.
    pub(super) frame: &'static str,
}

impl<'b> Reader<'b> {
    pub(super) fn new(b: &'b [u8], frame: &'static str) -> Reader<'b> {
        Reader { b, p: 0, frame }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'b [u8], WireError> {
        if self.b.len() - self.p < n {
            return Err(WireError::Truncated(self.frame));
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(malformed(self.frame, "varint overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                // A zero last byte after others only pads the value: refused, so that
                // every accepted varint is the one `put_varint` writes (one encoding per
                // frame, as the receiver's fuzz target checks).
                if i > 0 && b == 0 {
                    return Err(malformed(
                        self.frame,
                        format!("varint {v} not in its shortest form ({} bytes)", i + 1),
                    ));
                }
                return Ok(v);
            }
        }
        Err(malformed(self.frame, "varint longer than 10 bytes"))
    }

    pub(super) fn rest(&mut self) -> &'b [u8] {
        let s = &self.b[self.p..];
        self.p = self.b.len();
        s
    }

    pub(super) fn finish(&self) -> Result<(), WireError> {
        if self.p != self.b.len() {
            return Err(malformed(
                self.frame,
                format!("{} trailing bytes", self.b.len() - self.p),
            ));
        }
        Ok(())
    }
}
