//! blockmap at the scale of the reference workload: the `web` lab image (1024 × 300 KB
//! files in /www: about 76,800 clean pages once read). Every page of every file is mapped;
//! the mapped disk bytes of each file must hash to the image's own /SHA256SUMS entry.
//! Prints how long mapping took and how many runs and metadata reads it needed.

mod support;

use pct::blockmap::{FileMap, MapOptions, PageMapper, PAGE_SIZE};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Instant;
use support::blockmap::*;

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

#[test]
fn web_fileset_every_page() {
    let img = image("web", "plain");
    let fs = open_fs(&img);
    let vol = fs.volume();
    let sums = String::from_utf8(cat(&img, "/SHA256SUMS")).expect("sums text");

    let t = Instant::now();
    let www = fs.inode_at("/www").expect("/www");
    let mut inodes = Vec::new();
    for e in fs.read_dir(&www).expect("read /www") {
        if e.name.starts_with(b"file") {
            let name = String::from_utf8(e.name.clone()).expect("name");
            inodes.push((name, fs.read_inode(e.inode).expect("inode").as_ext4_inode()));
        }
    }
    let read_inodes = t.elapsed();
    assert_eq!(inodes.len(), 1024);

    let t = Instant::now();
    let maps: Vec<FileMap> = inodes
        .iter()
        .map(|(_, inode)| {
            let pages = inode.i_size.div_ceil(PAGE_SIZE);
            PageMapper::new(&vol, inode, fs.source(), MapOptions::default())
                .expect("mapper")
                .map_pages(0..pages)
                .expect("map")
        })
        .collect();
    let mapping = t.elapsed();
    let pages: u64 = maps.iter().map(|m| m.restorable_pages()).sum();
    let runs: usize = maps.iter().map(|m| m.runs.len()).sum();
    let reads: u32 = maps.iter().map(|m| m.block_reads).sum();
    eprintln!(
        "web: {} inodes read in {read_inodes:?}; {pages} pages mapped in {mapping:?} \
         ({:.0} ns/page) as {runs} runs with {reads} metadata block reads",
        inodes.len(),
        mapping.as_nanos() as f64 / pages as f64
    );
    assert_eq!(pages, 1024 * 75);
    assert!(maps.iter().all(|m| m.unrestorable.is_empty()));

    // The disk bytes the runs name are the files: hash them against /SHA256SUMS.
    let disk = std::fs::File::open(&img).expect("image");
    let t = Instant::now();
    for ((name, inode), map) in inodes.iter().zip(&maps) {
        let mut bytes = vec![0u8; inode.i_size as usize];
        for r in &map.runs {
            let at = (r.page * PAGE_SIZE) as usize;
            disk.read_exact_at(&mut bytes[at..at + r.bytes() as usize], r.disk_offset)
                .expect("read run");
        }
        let want = format!("{}  www/{name}", sha256(&bytes));
        assert!(
            sums.lines().any(|l| l == want),
            "{name}: {want} not in SHA256SUMS"
        );
    }
    eprintln!("web: 1024 files verified by SHA-256 in {:?}", t.elapsed());
}
