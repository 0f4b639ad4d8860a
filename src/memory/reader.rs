//! [`LeSlice`]: the one reader of fields out of bytes that came from the guest, its RAM
//! or its disk. In the manner of gimli's `EndianSlice`: a zero-copy little-endian view
//! over a byte slice, which also knows where the bytes came from ([`Addr`]) and what
//! they are (a struct name), so that a field that does not lie inside what was read is
//! a [`FieldError`] naming `struct.field` and the address it should have been at,
//! never a silent 0 and never a panic.
//!
//! ```ignore
//! let b = k.read(inode, o.inode_size, "inode")?;
//! let r = LeSlice::new(&b, Addr::Va(inode), "inode");
//! let mapping = r.u64(o.i_mapping, "i_mapping")?; // FieldError: "inode.i_mapping at guest VA …"
//! ```

use std::fmt;

/// Where a byte slice (or a field in it) came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A guest kernel virtual address.
    Va(u64),
    /// A guest-physical address.
    Gpa(u64),
    /// A byte offset on the guest's disk (partition start included).
    Disk(u64),
    /// An offset into bytes already copied out of wherever they were read (an inode's
    /// 60-byte `i_block`, a test's buffer): there is no address to tell.
    Detached(u64),
}

impl Addr {
    /// The address `off` bytes further on.
    pub fn plus(self, off: u64) -> Addr {
        match self {
            Addr::Va(a) => Addr::Va(a.wrapping_add(off)),
            Addr::Gpa(a) => Addr::Gpa(a.wrapping_add(off)),
            Addr::Disk(a) => Addr::Disk(a.wrapping_add(off)),
            Addr::Detached(a) => Addr::Detached(a.wrapping_add(off)),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Va(a) => write!(f, "guest VA {a:#x}"),
            Addr::Gpa(a) => write!(f, "guest-physical {a:#x}"),
            Addr::Disk(a) => write!(f, "disk byte {a}"),
            Addr::Detached(a) => write!(f, "offset {a:#x} of a copied buffer"),
        }
    }
}

/// A field that does not lie (wholly) inside the bytes that were read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// The struct the bytes are (`inode`), or a description of them.
    pub ty: &'static str,
    /// The field (`i_mapping`); empty when `ty` says it all.
    pub field: &'static str,
    /// Where the field starts.
    pub at: Addr,
    /// Bytes the field needs.
    pub need: u64,
    /// Bytes of it that were read (0 when it starts past the end).
    pub have: u64,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ty)?;
        if !self.field.is_empty() {
            write!(f, ".{}", self.field)?;
        }
        write!(
            f,
            " at {}: short read ({} bytes needed, {} read)",
            self.at, self.need, self.have
        )
    }
}

/// A zero-copy little-endian reader over bytes of struct `ty` read at `at`.
#[derive(Clone, Copy, Debug)]
pub struct LeSlice<'a> {
    bytes: &'a [u8],
    at: Addr,
    ty: &'static str,
}

impl<'a> LeSlice<'a> {
    pub fn new(bytes: &'a [u8], at: Addr, ty: &'static str) -> LeSlice<'a> {
        LeSlice { bytes, at, ty }
    }

    /// Bytes whose origin is not known here (offsets are reported relative to them).
    pub fn detached(bytes: &'a [u8], ty: &'static str) -> LeSlice<'a> {
        Self::new(bytes, Addr::Detached(0), ty)
    }

    /// All the bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Where the first byte came from.
    pub fn addr(&self) -> Addr {
        self.at
    }

    /// What the bytes are.
    pub fn ty(&self) -> &'static str {
        self.ty
    }

    /// The error for `len` bytes of `field` at `off`.
    pub fn error(&self, off: u64, len: u64, field: &'static str) -> FieldError {
        let have = (self.bytes.len() as u64).saturating_sub(off).min(len);
        FieldError {
            ty: self.ty,
            field,
            at: self.at.plus(off),
            need: len,
            have,
        }
    }

    /// `len` bytes of `field` at offset `off`, without copying.
    pub fn slice(&self, off: u64, len: u64, field: &'static str) -> Result<&'a [u8], FieldError> {
        usize::try_from(off)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| self.bytes.get(o..o.checked_add(l)?))
            .ok_or_else(|| self.error(off, len, field))
    }

    /// A reader over `len` bytes at `off`: an embedded struct `ty`.
    pub fn sub(&self, off: u64, len: u64, ty: &'static str) -> Result<LeSlice<'a>, FieldError> {
        let bytes = self.slice(off, len, ty)?;
        Ok(LeSlice {
            bytes,
            at: self.at.plus(off),
            ty,
        })
    }

    /// The `N` bytes of `field` at `off`, copied.
    pub fn array<const N: usize>(
        &self,
        off: u64,
        field: &'static str,
    ) -> Result<[u8; N], FieldError> {
        let s = self.slice(off, N as u64, field)?;
        Ok(s.try_into().expect("slice of N bytes"))
    }

    pub fn u8(&self, off: u64, field: &'static str) -> Result<u8, FieldError> {
        self.array::<1>(off, field).map(|[b]| b)
    }

    pub fn u16(&self, off: u64, field: &'static str) -> Result<u16, FieldError> {
        self.array(off, field).map(u16::from_le_bytes)
    }

    pub fn u32(&self, off: u64, field: &'static str) -> Result<u32, FieldError> {
        self.array(off, field).map(u32::from_le_bytes)
    }

    pub fn u64(&self, off: u64, field: &'static str) -> Result<u64, FieldError> {
        self.array(off, field).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_short_reads() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        let r = LeSlice::new(&b, Addr::Va(0x1000), "thing");
        assert_eq!(r.u8(0, "a"), Ok(1));
        assert_eq!(r.u16(1, "b"), Ok(0x0302));
        assert_eq!(r.u32(0, "c"), Ok(0x0403_0201));
        assert_eq!(r.u64(1, "d"), Ok(0x0908_0706_0504_0302));
        let e = r.u64(4, "tail").unwrap_err();
        assert_eq!(e.at, Addr::Va(0x1004));
        assert_eq!((e.need, e.have), (8, 5));
        assert_eq!(
            e.to_string(),
            "thing.tail at guest VA 0x1004: short read (8 bytes needed, 5 read)"
        );
        let e = r.u32(u64::MAX, "far").unwrap_err();
        assert_eq!(e.have, 0);
        let s = r.sub(4, 4, "inner").unwrap();
        assert_eq!(s.addr(), Addr::Va(0x1004));
        assert_eq!(s.u32(0, "x"), Ok(0x0807_0605));
        let e = s.u16(3, "y").unwrap_err();
        assert_eq!(
            e.to_string(),
            "inner.y at guest VA 0x1007: short read (2 bytes needed, 1 read)"
        );
        let d = LeSlice::detached(&b[..2], "copy");
        assert_eq!(
            d.u32(0, "").unwrap_err().to_string(),
            "copy at offset 0x0 of a copied buffer: short read (4 bytes needed, 2 read)"
        );
    }
}
