//! Disk images for the tests of pct's disk reader: `qemu-img` and `qemu-io` (Debian's
//! qemu-utils) in a directory, and loop block devices that are detached when dropped.

use super::run_ok;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `qemu-img ARGS`, run in `dir` (relative backing names resolve from there); `args` are
/// split at whitespace (no argument of these tests holds a space).
pub fn qemu_img(dir: &Path, args: &str) {
    run_ok(
        Command::new("qemu-img")
            .current_dir(dir)
            .args(args.split_whitespace()),
        &format!("qemu-img {args}"),
    );
}

/// `qemu-io -f FORMAT -c CMD... IMAGE` in `dir` (the format given, so nothing is probed).
pub fn qemu_io(dir: &Path, format: &str, image: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(image), &format!("qemu-io {image}"));
    // qemu-io reports a failed command on stdout and still exits 0.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {image}: {text}");
}

/// A read-only loop block device over a file (`losetup`, as root), detached when dropped,
/// also when a test fails.
pub struct Loop(pub PathBuf);

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(file),
            "losetup",
        );
        let dev = String::from_utf8(out.stdout).expect("losetup prints a path");
        Loop(PathBuf::from(dev.trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
