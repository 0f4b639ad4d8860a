//! The disk reader (`pct::disk::Disk`) against real images: raw files, qcow2 images made by
//! `qemu-img` (standalone, overlays with rewritten clusters on raw and qcow2 backing files,
//! compressed clusters, an external data file), a loop block device, and images it must
//! refuse (encrypted, unknown incompatible features, zstd compression) or whose reads must
//! fail rather than return zeros (truncated, past the end).
//!
//! The oracle is QEMU itself: `qemu-img convert -O raw` of the same image, compared over the
//! whole disk. Needs qemu-img and qemu-io (Debian's qemu-utils); the loop device test needs
//! root.

mod support;

use pct::disk::{Disk, DiskFormat};
use std::io::ErrorKind;
use std::path::Path;
use support::disk::{qemu_img, qemu_io, Loop};
use support::rng;

const MIB: u64 = 1 << 20;

/// A raw file of `len` bytes: random pages, zero pages and a repeating text, so that both
/// compressible and incompressible clusters exist.
fn make_raw(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    let mut bytes = vec![0u8; len as usize];
    for (i, page) in bytes.chunks_mut(4096).enumerate() {
        match i % 5 {
            0 | 1 => page
                .chunks_mut(8)
                .for_each(|c| c.copy_from_slice(&r().to_le_bytes()[..c.len()])),
            2 => {}
            _ => page
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"pct teleports the page cache "[(i + j) % 29]),
        }
    }
    std::fs::write(path, &bytes).expect("write raw image");
    bytes
}

/// The whole disk through `Disk`, in reads of 1 MiB + 4 KiB (so reads straddle clusters).
fn read_all(disk: &Disk) -> Vec<u8> {
    let mut out = vec![0u8; disk.size() as usize];
    for (i, chunk) in out.chunks_mut((MIB + 4096) as usize).enumerate() {
        let off = i as u64 * (MIB + 4096);
        disk.read_exact_at(chunk, off)
            .unwrap_or_else(|e| panic!("read at {off}: {e}"));
    }
    out
}

/// `image` (of `format`) flattened by QEMU.
fn qemu_flat(dir: &Path, format: &str, image: &str) -> Vec<u8> {
    let flat = format!("{image}.flat");
    qemu_img(dir, &format!("convert -f {format} -O raw {image} {flat}"));
    std::fs::read(dir.join(&flat)).expect("read flattened image")
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").expect("temp dir")
}

#[test]
fn raw_file_reads_exactly_and_refuses_past_the_end() {
    let d = tmp();
    let p = d.path().join("disk.img");
    let want = make_raw(&p, 3 * MIB, 1);
    let disk = Disk::open(&p, DiskFormat::Auto).unwrap();
    assert_eq!(disk.format(), DiskFormat::Raw);
    assert_eq!(disk.size(), 3 * MIB);
    assert_same("raw", &read_all(&disk), &want);
    // The last page reads; one byte more does not, and says where and how much.
    let mut page = vec![0u8; 4096];
    disk.read_exact_at(&mut page, 3 * MIB - 4096).unwrap();
    let e = disk.read_exact_at(&mut page, 3 * MIB - 4095).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("disk.img") && msg.contains("4096 bytes") && msg.contains("offset 3141633"),
        "{msg}"
    );
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    assert!(disk.read_exact_at(&mut page, u64::MAX - 10).is_err());
}

#[test]
fn qcow2_reads_what_qemu_reads() {
    let d = tmp();
    make_raw(&d.path().join("base.raw"), 6 * MIB, 2);
    qemu_img(d.path(), "convert -f raw -O qcow2 base.raw d.qcow2");
    let disk = Disk::open(d.path().join("d.qcow2"), DiskFormat::Auto).unwrap();
    assert_eq!(disk.format(), DiskFormat::Qcow2);
    assert_eq!(disk.size(), 6 * MIB);
    assert_same(
        "qcow2",
        &read_all(&disk),
        &qemu_flat(d.path(), "qcow2", "d.qcow2"),
    );
    let mut page = vec![0u8; 4096];
    let e = disk.read_exact_at(&mut page, 6 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
}

/// Rewrites clusters of an overlay: whole clusters, a page inside one (copy-on-write of the
/// rest from the backing file), a range across a cluster boundary, and zeroes a range.
fn rewrite_some(dir: &Path, overlay: &str) {
    qemu_io(
        dir,
        "qcow2",
        overlay,
        &[
            "write -P 0xab 1M 128k",
            "write -P 0x5c 2052k 4k",
            "write -P 0x11 3068k 8k",
            "write -z 4M 64k",
        ],
    );
}

#[test]
fn qcow2_overlay_on_raw_backing_with_rewritten_clusters() {
    let d = tmp();
    let base = make_raw(&d.path().join("base.raw"), 6 * MIB, 3);
    // Larger than its backing file: the tail reads as zeros.
    qemu_img(d.path(), "create -f qcow2 -b base.raw -F raw ov.qcow2 8M");
    rewrite_some(d.path(), "ov.qcow2");
    let disk = Disk::open(d.path().join("ov.qcow2"), DiskFormat::Qcow2).unwrap();
    assert!(
        disk.description().contains("base.raw"),
        "{}",
        disk.description()
    );
    let got = read_all(&disk);
    assert_same(
        "overlay on raw",
        &got,
        &qemu_flat(d.path(), "qcow2", "ov.qcow2"),
    );
    // And the test can fail: the overlay differs from its backing file where rewritten.
    assert_ne!(
        &got[MIB as usize..MIB as usize + 4096],
        &base[MIB as usize..MIB as usize + 4096]
    );
    assert_eq!(&got[..MIB as usize], &base[..MIB as usize]);
}

#[test]
fn qcow2_chain_of_three_with_relative_backing_names() {
    let d = tmp();
    make_raw(&d.path().join("base.raw"), 6 * MIB, 4);
    qemu_img(d.path(), "convert -f raw -O qcow2 base.raw base.qcow2");
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    // Backing names are relative to the image that names them.
    qemu_img(&sub, "create -f qcow2 -b ../base.qcow2 -F qcow2 mid.qcow2");
    qemu_io(&sub, "qcow2", "mid.qcow2", &["write -P 0x77 512k 64k"]);
    qemu_img(&sub, "create -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2");
    rewrite_some(&sub, "top.qcow2");
    // Opened from elsewhere: the chain still resolves from the images' directories.
    let disk = Disk::open(sub.join("top.qcow2"), DiskFormat::Auto).unwrap();
    let desc = disk.description();
    assert!(
        desc.contains("mid.qcow2") && desc.contains("base.qcow2"),
        "{desc}"
    );
    assert_same(
        "chain",
        &read_all(&disk),
        &qemu_flat(&sub, "qcow2", "top.qcow2"),
    );
}

#[test]
fn compressed_clusters_read_as_qemu_reads_them() {
    let d = tmp();
    make_raw(&d.path().join("base.raw"), 4 * MIB, 5);
    qemu_img(d.path(), "convert -c -f raw -O qcow2 base.raw c.qcow2");
    // Compression happened: the image is smaller than the data it holds.
    let len = std::fs::metadata(d.path().join("c.qcow2")).unwrap().len();
    assert!(len < 3 * MIB, "compressed image is {len} bytes");
    let disk = Disk::open(d.path().join("c.qcow2"), DiskFormat::Auto).unwrap();
    assert_same(
        "compressed",
        &read_all(&disk),
        &qemu_flat(d.path(), "qcow2", "c.qcow2"),
    );
}

#[test]
fn zstd_compressed_qcow2_is_refused_clearly() {
    let d = tmp();
    make_raw(&d.path().join("base.raw"), MIB, 6);
    qemu_img(
        d.path(),
        "convert -c -f raw -O qcow2 -o compression_type=zstd base.raw z.qcow2",
    );
    let e = Disk::open(d.path().join("z.qcow2"), DiskFormat::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("z.qcow2"), "{e}");
}

#[test]
fn external_data_file_is_followed() {
    let d = tmp();
    qemu_img(
        d.path(),
        "create -f qcow2 -o data_file=data.raw ext.qcow2 2M",
    );
    qemu_io(
        d.path(),
        "qcow2",
        "ext.qcow2",
        &["write -P 0x42 64k 192k", "write -P 0x43 1M 4k"],
    );
    let disk = Disk::open(d.path().join("ext.qcow2"), DiskFormat::Auto).unwrap();
    let got = read_all(&disk);
    assert_same(
        "external data file",
        &got,
        &qemu_flat(d.path(), "qcow2", "ext.qcow2"),
    );
    assert_eq!(got[64 * 1024], 0x42);
}

#[test]
fn encrypted_qcow2_is_refused_clearly() {
    let d = tmp();
    qemu_img(d.path(), "create -f qcow2 --object secret,id=s0,data=pct-test -o encrypt.format=luks,encrypt.key-secret=s0 e.qcow2 2M");
    let e = Disk::open(d.path().join("e.qcow2"), DiskFormat::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("encrypted") && e.to_string().contains("e.qcow2"),
        "{e}"
    );
    // An encrypted backing file under a plain overlay is refused too.
    qemu_img(
        d.path(),
        "create -f qcow2 -u -b e.qcow2 -F qcow2 ov.qcow2 2M",
    );
    let e = Disk::open(d.path().join("ov.qcow2"), DiskFormat::Auto).unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let d = tmp();
    qemu_img(d.path(), "create -f qcow2 f.qcow2 1M");
    let p = d.path().join("f.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    // incompatible_features (be64 at byte 72): bit 40, which no qcow2 defines.
    bytes[74] |= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let e = Disk::open(&p, DiskFormat::Qcow2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("incompatible"), "{e}");
}

#[test]
fn truncated_qcow2_reads_fail_instead_of_zeros() {
    let d = tmp();
    let want = make_raw(&d.path().join("base.raw"), 4 * MIB, 7);
    qemu_img(d.path(), "convert -f raw -O qcow2 base.raw t.qcow2");
    let p = d.path().join("t.qcow2");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let disk = Disk::open(&p, DiskFormat::Auto).unwrap();
    let (mut ok, mut failed) = (0, 0);
    let mut page = vec![0u8; 4096];
    for i in 0..disk.size() / 4096 {
        let off = i * 4096;
        match disk.read_exact_at(&mut page, off) {
            // Whatever reads, reads right (zero pages included: they are zero in the data).
            Ok(()) => {
                assert_eq!(
                    page[..],
                    want[off as usize..off as usize + 4096],
                    "page {i}"
                );
                ok += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("t.qcow2"), "{e}");
                failed += 1;
            }
        }
    }
    eprintln!("truncated image: {ok} pages read right, {failed} refused");
    assert!(ok > 0 && failed > 0, "{ok} read, {failed} refused");
    // Every non-zero page past the cut is refused; a whole-disk read fails.
    let mut all = vec![0u8; disk.size() as usize];
    assert!(disk.read_exact_at(&mut all, 0).is_err());
}

#[test]
fn probing_takes_a_qcow2_header_in_a_raw_disk_for_an_image_and_raw_does_not() {
    let d = tmp();
    let p = d.path().join("guest-wrote-this.img");
    let mut bytes = make_raw(&p, MIB, 8);
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&p, &bytes).unwrap();
    // `auto` believes the guest's bytes (and fails here, on garbage metadata) ...
    assert!(Disk::open(&p, DiskFormat::Auto).is_err());
    // ... `raw` reads the disk as it is.
    let disk = Disk::open(&p, DiskFormat::Raw).unwrap();
    assert_same("raw with a qcow2 magic", &read_all(&disk), &bytes);
}

#[test]
fn loop_block_device_is_sized_by_its_ioctl() {
    let d = tmp();
    let p = d.path().join("disk.img");
    let want = make_raw(&p, 5 * MIB + 8192, 9);
    let dev = Loop::attach(&p);
    let f = std::fs::File::open(&dev.0).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        0,
        "a block device's metadata has no length"
    );
    assert_eq!(pct::disk::block_device_size(&f).unwrap(), 5 * MIB + 8192);
    let disk = Disk::open(&dev.0, DiskFormat::Raw).unwrap();
    assert_eq!(disk.size(), 5 * MIB + 8192);
    assert!(
        disk.description().contains("block device"),
        "{}",
        disk.description()
    );
    assert_same("loop device", &read_all(&disk), &want);
    let mut page = vec![0u8; 4096];
    assert!(disk.read_exact_at(&mut page, 5 * MIB + 8192 - 100).is_err());
}
