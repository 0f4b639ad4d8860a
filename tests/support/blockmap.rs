//! Shared helpers of the blockmap tests: lab disk images (tools/lab/build-disk.sh) and
//! debugfs as the independent oracle (`cat`, `bmap`).

use super::{repo, run_ok};
use pct::blockmap::ondisk::{parse_mbr, Ext4Fs};
use pct::blockmap::ImageFile;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const LAYOUTS: [&str; 5] = ["plain", "part", "bs1k", "bs2k", "noextent"];

/// Path of the lab image FILESET/LAYOUT (built on first use, cached under $PCT_CACHE).
pub fn image(fileset: &str, layout: &str) -> PathBuf {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("tools/lab/build-disk.sh"))
        .args([fileset, layout]);
    let out = run_ok(&mut cmd, &format!("build-disk.sh {fileset} {layout}"));
    let path = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(path.lines().last().expect("image path").trim())
}

/// Byte offset of the filesystem: partition 1 of the MBR if there is one, else 0.
pub fn partition_start(img: &Path) -> u64 {
    let f = std::fs::File::open(img).expect("open image");
    let mut s = [0u8; 512];
    f.read_exact_at(&mut s, 0).expect("read sector 0");
    match parse_mbr(&s) {
        Ok(parts) if !parts.is_empty() => parts[0].start_bytes(),
        _ => 0,
    }
}

/// The image's filesystem opened with the on-disk reader.
pub fn open_fs(img: &Path) -> Ext4Fs<ImageFile> {
    Ext4Fs::open_image(img, partition_start(img)).expect("open ext4 filesystem")
}

/// debugfs's name for the filesystem (`IMG?offset=N` inside a partitioned disk).
fn spec(img: &Path) -> String {
    match partition_start(img) {
        0 => img.display().to_string(),
        o => format!("{}?offset={o}", img.display()),
    }
}

/// debugfs's stdout for a request.
pub fn debugfs(img: &Path, request: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(spec(img))
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    out.stdout
}

/// The file's bytes as debugfs reads them.
pub fn cat(img: &Path, path: &str) -> Vec<u8> {
    debugfs(img, &format!("cat {path}"))
}

/// debugfs `bmap PATH LBLK` for many blocks in one run: physical block, 0 for a hole.
pub fn bmap(img: &Path, path: &str, lblks: &[u64]) -> Vec<u64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmds = dir.path().join("cmds");
    let text: String = lblks.iter().map(|l| format!("bmap {path} {l}\n")).collect();
    std::fs::write(&cmds, text).expect("write debugfs commands");
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(&cmds)
        .arg(spec(img))
        .output()
        .expect("run debugfs");
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<u64> = text
        .lines()
        .filter(|l| !l.starts_with("debugfs"))
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bmap output {l:?}"))
        })
        .collect();
    assert_eq!(got.len(), lblks.len(), "debugfs bmap answers: {text}");
    got
}

/// Read `len` raw disk bytes at `offset`.
pub fn disk_bytes(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).expect("open image");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read image");
    b
}
