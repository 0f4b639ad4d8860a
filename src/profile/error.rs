//! Errors of the profile builder and readers: values with enough context to act on.

use std::path::PathBuf;

/// Everything that can go wrong while reading kernel debug data or profiles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: this is a compressed kernel image (bzImage/vmlinuz), not a vmlinux with debug \
         information; install the matching debug package (Debian: linux-image-<release>-dbg, \
         or `tools/lab/fetch-kernel.sh`) and pass /usr/lib/debug/boot/vmlinux-<release>"
    )]
    CompressedKernel { path: PathBuf },
    #[error("{path}: {msg}")]
    BadInput { path: PathBuf, msg: String },
    #[error("{path}: required {what} not found (tried: {tried}){hint}")]
    MissingRequired {
        path: PathBuf,
        what: String,
        tried: String,
        hint: String,
    },
    #[error("{path}: malformed BTF: {msg}")]
    Btf { path: PathBuf, msg: String },
    #[error("{path}: malformed DWARF: {msg}")]
    Dwarf { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Import { path: PathBuf, msg: String },
    #[error("symbol manifest: {0}")]
    Manifest(String),
    #[error("{path}: not a pct profile: {msg}")]
    Profile { path: PathBuf, msg: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Result alias for this module tree.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A parse failure deep inside a reader, before the caller attaches the file name.
#[derive(Debug, Clone)]
pub struct Malformed(pub String);

/// Shorthand for a reader-level result.
pub type RResult<T> = std::result::Result<T, Malformed>;

/// Build a [`Malformed`] from anything printable.
pub fn malformed(msg: impl std::fmt::Display) -> Malformed {
    Malformed(msg.to_string())
}
