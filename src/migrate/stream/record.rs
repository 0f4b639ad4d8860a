//! A copy of the stream as pct saw it, for diagnosis (`pct-migrate --record-stream`): the
//! sender records the stream it forwards (the source QEMU's, plus any pages the switchover
//! check re-sent), the receiver what it gave the destination QEMU. The two files of one
//! migration must be equal byte for byte; `pct-migrate inspect-stream` reads either.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Appends stream bytes to a file.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Recorder {
    pub fn create(path: &Path) -> io::Result<Recorder> {
        let f = File::create(path).map_err(|e| with_path(e, "creating", path))?;
        Ok(Recorder {
            path: path.to_owned(),
            out: BufWriter::with_capacity(1 << 20, f),
        })
    }

    pub fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| with_path(e, "writing", &self.path))
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.out
            .flush()
            .map_err(|e| with_path(e, "writing", &self.path))
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{what} the stream record {}: {e}", path.display()),
    )
}
