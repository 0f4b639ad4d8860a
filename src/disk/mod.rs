//! The guest's disk as the host holds it, read at byte offsets: a raw image file, a block
//! device (DRBD, LVM, a SAN LUN; sized with `BLKGETSIZE64`), or a qcow2 image with its
//! backing chain, read through the `imago` image library. Every part of pct that reads the
//! guest disk (the receiver's restore, `scan --disk/--verify`, the cache map's on-disk
//! inodes, the sender's metadata blocks, the dry run) goes through [`Disk`].
//!
//! What it promises: [`Disk::read_exact_at`] fills the whole buffer with the disk's bytes or
//! fails, naming the disk, the offset and the length. A read past the disk's size is an
//! error, never zeros; so is a qcow2 cluster that lies past the end of its file (a
//! truncated image). A qcow2 image pct cannot read faithfully (encrypted, unknown
//! incompatible features, which imago refuses) is refused when it is opened.
//!
//! The format is given ([`DiskFormat::Raw`], [`DiskFormat::Qcow2`]) or probed
//! ([`DiskFormat::Auto`]: qcow2 if the file starts with `QFI\xfb`, else raw). Probing is
//! the well-known QEMU pitfall: a guest that owns a raw disk can write a qcow2 header into
//! its first sector, and a prober then takes the guest's bytes for image metadata and
//! follows the backing file the guest named. For a raw disk of a guest you do not trust,
//! say `raw`. (pct only reads, and the receiver emits nothing that the sender's hash did
//! not vouch for; but a guest-chosen backing file can still make pct open and read a host
//! file, or block on a FIFO.) The same holds for a qcow2 image's backing file when the
//! image does not record the backing format: imago then probes it.

use imago::format::gate::ImplicitOpenGate;
use imago::format::Format;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The first bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How to interpret the disk file: `--disk-format raw|qcow2|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The file (or block device) holds the disk's bytes as they are.
    Raw,
    /// A qcow2 image, backing chain included.
    Qcow2,
    /// qcow2 if the file starts with the qcow2 magic, else raw (see the module comment for
    /// why that is unsafe with an untrusted guest's raw disk).
    #[default]
    Auto,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Auto => "auto",
        })
    }
}

/// What went wrong with a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("opening the disk {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("the disk {path} cannot be read by pct: {why}")]
    Unsupported { path: PathBuf, why: String },
    #[error("reading {len} bytes at offset {offset} of the disk {path}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: io::Error,
    },
}

impl DiskError {
    /// The underlying I/O error's kind (`Unsupported` for a refused image).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            DiskError::Open { source, .. } | DiskError::Read { source, .. } => source.kind(),
            DiskError::Unsupported { .. } => io::ErrorKind::Unsupported,
        }
    }
}

impl From<DiskError> for io::Error {
    fn from(e: DiskError) -> io::Error {
        io::Error::new(e.kind(), e.to_string())
    }
}

enum Inner {
    Raw(File),
    Qcow2(FormatAccess<imago::file::File>),
}

/// The guest's disk, opened read-only.
pub struct Disk {
    path: PathBuf,
    size: u64,
    inner: Inner,
    /// What was opened: the format, the kind of file, the backing chain.
    description: String,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("description", &self.description)
            .finish()
    }
}

impl Disk {
    /// Opens the disk at `path` read-only, as `format` says (probing for `Auto`).
    pub fn open(path: impl AsRef<Path>, format: DiskFormat) -> Result<Disk, DiskError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        let format = match format {
            DiskFormat::Auto => match starts_with_qcow2_magic(&file).map_err(open_err)? {
                true => DiskFormat::Qcow2,
                false => DiskFormat::Raw,
            },
            f => f,
        };
        match format {
            DiskFormat::Qcow2 => {
                drop(file);
                Disk::open_qcow2(path)
            }
            _ => {
                let (size, what) = raw_size(&file).map_err(open_err)?;
                Ok(Disk {
                    description: format!("raw {what}, {size} bytes"),
                    path,
                    size,
                    inner: Inner::Raw(file),
                })
            }
        }
    }

    fn open_qcow2(path: PathBuf) -> Result<Disk, DiskError> {
        let gate = ChainGate::default();
        let chain = gate.chain.clone();
        check_qcow2_header(&path)?;
        let opened = imago::qcow2::Qcow2::<imago::file::File>::builder_path(&path)
            .write(false)
            .open(gate)
            .map_err(|e| match e.kind() {
                io::ErrorKind::Unsupported | io::ErrorKind::InvalidData => DiskError::Unsupported {
                    path: path.clone(),
                    why: e.to_string(),
                },
                _ => DiskError::Open {
                    path: path.clone(),
                    source: e,
                },
            })?;
        let access = FormatAccess::new(opened);
        let size = access.size();
        let backing: Vec<String> = lock(&chain).clone();
        let description = match backing.is_empty() {
            true => format!("qcow2, {size} bytes"),
            false => format!("qcow2, {size} bytes, backing {}", backing.join(" → ")),
        };
        Ok(Disk {
            path,
            size,
            inner: Inner::Qcow2(access),
            description,
        })
    }

    /// The disk's size in bytes (the guest's view: a qcow2 image's virtual size).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format that was opened (never `Auto`).
    pub fn format(&self) -> DiskFormat {
        match self.inner {
            Inner::Raw(_) => DiskFormat::Raw,
            Inner::Qcow2(_) => DiskFormat::Qcow2,
        }
    }

    /// One line: format, kind of file, size, backing chain.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Fills `buf` with the disk's bytes at `offset`, entirely, or fails. A read that does
    /// not lie wholly inside the disk is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let len = buf.len();
        let err = |source| DiskError::Read {
            path: self.path.clone(),
            offset,
            len,
            source,
        };
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("past the end of the disk ({} bytes)", self.size),
            )));
        }
        let got = match &self.inner {
            Inner::Raw(f) => f.read_exact_at(buf, offset),
            Inner::Qcow2(a) => {
                check_allocated(a, offset, len as u64).and_then(|()| a.read(buf, offset))
            }
        };
        got.map_err(err)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn starts_with_qcow2_magic(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The size of a raw disk: the file's length, or a block device's size from the kernel
/// (its `metadata().len()` is 0). Also says which it was.
fn raw_size(file: &File) -> io::Result<(u64, &'static str)> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        return Ok((block_device_size(file)?, "block device"));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a regular file nor a block device",
        ));
    }
    Ok((meta.len(), "file"))
}

/// `ioctl(BLKGETSIZE64)`: a block device's size in bytes.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 is _IOR(0x12, 114, size_t) in <linux/fs.h>; the kernel writes a u64.
    const BLKGETSIZE64: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<usize>(0x12, 114);
    // SAFETY: BLKGETSIZE64 is a getter ioctl whose argument is a pointer to a u64 the kernel
    // fills in; `Getter` passes exactly such a pointer (to its own `MaybeUninit<u64>`) and
    // reads the u64 back only when the ioctl succeeded. `file` is an open descriptor for the
    // duration of the call.
    let size = unsafe {
        let get = rustix::ioctl::Getter::<BLKGETSIZE64, u64>::new();
        rustix::ioctl::ioctl(file, get)
    }?;
    Ok(size)
}

/// Byte 32 of a qcow2 header: 0 none, 1 AES, 2 LUKS.
const CRYPT_METHOD_OFFSET: u64 = 32;

/// Refuses what imago would read wrongly instead of refusing: an encrypted image (imago
/// reads its clusters as plain data, i.e. the ciphertext).
fn check_qcow2_header(path: &Path) -> Result<(), DiskError> {
    let open_err = |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(open_err)?;
    let mut head = [0u8; 36];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| DiskError::Unsupported {
            path: path.to_path_buf(),
            why: format!("not a qcow2 image: its header cannot be read ({e})"),
        })?;
    if head[..4] != QCOW2_MAGIC {
        return Err(DiskError::Unsupported {
            path: path.to_path_buf(),
            why: "not a qcow2 image (no QFI\\xfb magic)".into(),
        });
    }
    let at = CRYPT_METHOD_OFFSET as usize;
    let crypt = u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if crypt != 0 {
        let what = match crypt {
            1 => "AES".to_string(),
            2 => "LUKS".to_string(),
            n => format!("method {n}"),
        };
        return Err(DiskError::Unsupported {
            path: path.to_path_buf(),
            why: format!("encrypted qcow2 ({what}) is not supported"),
        });
    }
    Ok(())
}

/// Checks that every part of `[offset, offset + len)` that a qcow2 chain stores as plain
/// data lies inside its file: imago, like a file read, returns zeros past a file's end, so
/// a truncated image would otherwise read as zeros. Zero and unallocated ranges are zeros
/// by the format; compressed clusters are checked by decompression (a cut-off stream does
/// not inflate to a whole cluster).
fn check_allocated(
    access: &FormatAccess<imago::file::File>,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let (mapping, n) = access.get_mapping(at, end - at)?;
        match mapping {
            Mapping::Raw {
                storage,
                offset: host,
                ..
            } => {
                let file_len = storage.size()?;
                if host.checked_add(n).is_none_or(|e| e > file_len) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "guest bytes {at}..{} are stored at {host}..{} of {storage}, past its end ({file_len} bytes): a truncated image?",
                            at + n,
                            host.saturating_add(n)
                        ),
                    ));
                }
            }
            Mapping::Zero { .. } | Mapping::Special { .. } => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("guest offset {at} is past the end of the image"),
                ))
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("no mapping for guest offset {at}"),
            ));
        }
        at += n;
    }
    Ok(())
}

/// Opens a qcow2 image's backing chain (and external data file) as the image says, checking
/// each qcow2 layer's header as the top one is, and recording what it opened.
#[derive(Clone, Default)]
struct ChainGate {
    chain: Arc<Mutex<Vec<String>>>,
}

impl ImplicitOpenGate<imago::file::File> for ChainGate {
    fn open_format<F: FormatDriverBuilder<imago::file::File>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<imago::file::File>> {
        let path = builder.get_image_path();
        if F::FORMAT == Format::Qcow2 {
            if let Some(p) = &path {
                check_qcow2_header(p)?;
            }
        }
        let name = path.map_or_else(|| "?".into(), |p| p.display().to_string());
        let format = match F::FORMAT {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            _ => "other",
        };
        lock(&self.chain).push(format!("{name} ({format})"));
        Ok(FormatAccess::new(builder.open(self.clone())?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<imago::file::File> {
        imago::file::File::open(opts)
    }
}
