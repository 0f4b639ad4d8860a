//! Bad inputs give a clear error and a non-zero exit, never a panic.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::profile::{kernel_dir, shared};

fn introspect(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pct-introspect"))
        .args(args)
        .output()
        .expect("run pct-introspect");
    let code = out.status.code().unwrap_or(-1);
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Expect exit status 1 (an error, not a panic's 101) and `needle` in the message.
fn expect_error(args: &[&std::ffi::OsStr], needle: &str) {
    let (code, err) = introspect(args);
    assert_eq!(code, 1, "expected a clean failure, got {code}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "error should mention {needle:?}: {err}"
    );
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pct-profile-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Writes `bytes` to the temporary file `name` and expects `build-profile` of it to fail
/// mentioning `needle`.
fn expect_refused(name: &str, bytes: &[u8], needle: &str) {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    expect_error(&build(&p), needle);
}

fn build(input: &Path) -> Vec<&std::ffi::OsStr> {
    vec![
        "build-profile".as_ref(),
        input.as_os_str(),
        "--stdout".as_ref(),
    ]
}

#[test]
fn bzimage_says_how_to_get_vmlinux() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    expect_error(&build(&dir.join("vmlinuz")), "-dbg");
}

#[test]
fn stripped_and_foreign_elves_are_refused() {
    // A stripped x86_64 executable from the host.
    let exe = Path::new("/bin/true");
    expect_error(&build(exe), "stripped");
    // The same file with e_machine set to AArch64.
    let mut bytes = std::fs::read(exe).unwrap();
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    expect_refused("aarch64.elf", &bytes, "x86_64");
    // 32-bit class.
    bytes[4] = 1;
    expect_refused("elf32.elf", &bytes, "32-bit");
    // Not an ELF at all, and empty.
    expect_refused("text", b"hello\n", "not an ELF");
    expect_refused("empty", b"", "empty");
}

#[test]
fn truncated_vmlinux_is_refused() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let data = std::fs::read(dir.join("vmlinux")).unwrap();
    for len in [40usize, 4096, 8 << 20] {
        expect_refused(&format!("vmlinux.{len}"), &data[..len], "truncated");
    }
}

#[test]
fn modules_without_debug_info_or_needed_types_are_refused() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let vmlinux = dir.join("vmlinux");
    // A shipped (stripped of DWARF) module.
    let ko = std::fs::read_dir(dir.join("modules/fs"))
        .ok()
        .and_then(|mut r| r.next())
        .and_then(|e| e.ok())
        .map(|e| e.path())
        .and_then(|d| {
            std::fs::read_dir(d)
                .ok()?
                .filter_map(|e| e.ok())
                .find(|e| e.path().extension().is_some_and(|x| x == "ko"))
        })
        .map(|e| e.path());
    if let Some(ko) = ko {
        let mut args = build(&vmlinux);
        args.push("--module".as_ref());
        args.push(ko.as_os_str());
        expect_error(&args, "no DWARF");
    }
    // vmlinux passed where a module is expected… and a module where vmlinux is expected.
    if let Some(generic) = kernel_dir("amd64") {
        let ext4 = generic.join("ext4.ko.debug");
        expect_error(&build(&ext4), "module");
        // The cloud kernel has ext4 built in: the module adds none of the missing types.
        let mut args = build(&vmlinux);
        args.push("--module".as_ref());
        args.push(ext4.as_os_str());
        expect_error(&args, "provides none");
    }
}

#[test]
fn corrupt_zips_are_refused() {
    let src = shared().join("volatility2-profiles/Debian608.zip");
    let Ok(data) = std::fs::read(&src) else {
        support::profile::skip_or_fail(&format!("{} missing", src.display()));
        return;
    };
    expect_refused("trunc-archive", &data[..data.len() / 2], "zip");
    let mut flipped = data.clone();
    for b in &mut flipped[1000..200_000] {
        *b ^= 0x5a;
    }
    expect_refused("flipped-archive", &flipped, "corrupt");
}

#[test]
fn garbage_isf_is_refused() {
    expect_refused("isf-garbage", b"{\"metadata\": 3", "json");
    expect_refused("isf-garbage-xz", b"\xfd7zXZ\x00garbage", "xz");
}
