//! Stream codec + wire protocol together, on a real QEMU 7.2 stream: a minimal sender turns
//! it into frames (pages of a "cached" region become references), a minimal receiver
//! restores those pages from a disk image, falls back to the sender's originals where the
//! disk is stale, and must reproduce the source stream byte for byte.

mod support;

use pct::migrate::stream::{Decoder, RamRecord, Record, StreamReader};
use pct::migrate::wire::{
    caps, hash_page, hash_pages, read_frame, Frame, Hello, Payload, Role, RunBuilder, Session,
    WireStats, MAX_PAYLOAD,
};
use std::time::Duration;
use support::lab::have_qemu;
use support::stream::*;

/// Where the "cache map" puts ram0 pages on the disk image.
const DISK_SHIFT: u64 = 1 << 20;

fn cached(offset: u64) -> Option<u64> {
    let in_region = |at: u64, len: usize| (at..at + len as u64).contains(&offset);
    (in_region(RANDOM_AT, RANDOM_LEN) || in_region(FILL_AT, FILL_LEN)).then(|| offset + DISK_SHIFT)
}

struct Wire {
    bytes: Vec<u8>,
    stats: WireStats,
}

impl Wire {
    fn send(&mut self, f: &Frame) {
        let n = f.encode(&mut self.bytes).expect("encode frame");
        self.stats.count(f, n);
    }
}

/// The sender: frames for `stream`, and the original pages of every run (for fallback).
fn sender(stream: &[u8], session: &Session) -> (Wire, Vec<Vec<Vec<u8>>>) {
    let mut wire = Wire {
        bytes: Vec::new(),
        stats: WireStats::default(),
    };
    let mut runs = RunBuilder::new(session).with_max_pages(64);
    let (mut originals, mut cur) = (Vec::new(), Vec::new());
    let mut batch = Vec::new();
    let mut reader = StreamReader::new(stream).with_chunk(50_000);
    let flush_batch = |wire: &mut Wire, batch: &mut Vec<u8>| {
        if !batch.is_empty() {
            wire.send(&Frame::Data(Payload::compress(batch, 1).expect("zstd")));
            batch.clear();
        }
    };
    while let Some(item) = reader.next_item().expect("decode") {
        match item.record {
            Record::Ram(RamRecord::Page { page, data }) if page.block_name == "ram0" => {
                if let Some(disk) = cached(page.offset) {
                    flush_batch(&mut wire, &mut batch);
                    let block = page.block as u32;
                    if let Some(run) = runs.push(block, page.offset, page.continued, disk, data) {
                        wire.send(&Frame::PageRefs(run));
                        originals.push(std::mem::take(&mut cur));
                    }
                    cur.push(data.to_vec());
                    continue;
                }
            }
            _ => {}
        }
        if let Some(run) = runs.flush() {
            wire.send(&Frame::PageRefs(run));
            originals.push(std::mem::take(&mut cur));
        }
        batch.extend_from_slice(item.raw);
        if batch.len() >= 256 << 10 {
            flush_batch(&mut wire, &mut batch);
        }
    }
    if let Some(run) = runs.flush() {
        wire.send(&Frame::PageRefs(run));
        originals.push(std::mem::take(&mut cur));
    }
    flush_batch(&mut wire, &mut batch);
    wire.send(&Frame::End {
        stream_bytes: stream.len() as u64,
        runs: originals.len() as u64,
    });
    (wire, originals)
}

/// Encodes and decodes a frame, as if it crossed the network.
fn cross(f: Frame) -> Frame {
    let mut b = Vec::new();
    f.encode(&mut b).expect("encode");
    read_frame(&mut &b[..], MAX_PAYLOAD)
        .expect("decode")
        .expect("frame")
        .0
}

/// The receiver: rebuilds the stream; pages come from `disk`, or from `originals` via
/// fallback frames when the hash does not match (after a failed run hash, only the pages
/// whose per-page hash, asked for with a hash request, differs). Returns the stream,
/// fallback pages and hash requests.
fn receiver(wire: &[u8], disk: &[u8], originals: &[Vec<Vec<u8>>]) -> (Vec<u8>, u64, u64) {
    let mut out = Vec::new();
    // Decoding what we emit gives the RAM block names (and validates the output).
    let mut check = Decoder::new();
    let (mut fed, mut run_no, mut fallback_pages, mut hash_requests) = (0, 0u64, 0u64, 0u64);
    let mut r = wire;
    while let Some((frame, _)) = read_frame(&mut r, MAX_PAYLOAD).expect("frame") {
        match frame {
            Frame::Data(p) => out.extend_from_slice(&p.decompress().expect("data")),
            Frame::PageRefs(refs) => {
                let mut pages: Vec<Vec<u8>> = refs
                    .pages
                    .iter()
                    .map(|p| disk[p.disk_offset as usize..][..PAGE].to_vec())
                    .collect();
                let views: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
                let mut bad = refs.verify(&views);
                let mut page_hashes = None;
                if refs.run_hash() && !bad.is_empty() {
                    hash_requests += 1;
                    let req = cross(Frame::HashRequest {
                        run: run_no,
                        first: 0,
                        count: refs.pages.len() as u32,
                    });
                    let Frame::HashRequest { run, first, count } = req else {
                        panic!("{req:?}")
                    };
                    let orig = originals[run as usize][first as usize..][..count as usize].concat();
                    let reply = cross(Frame::PageHashes {
                        run,
                        first,
                        count,
                        hash_len: refs.hash_len,
                        hashes: hash_pages(&orig, refs.hash_len as usize),
                    });
                    let Frame::PageHashes { hashes, .. } = reply else {
                        panic!("{reply:?}")
                    };
                    let len = refs.hash_len as usize;
                    bad.retain(|&i| hash_page(&pages[i], len) != hashes[i * len..(i + 1) * len]);
                    page_hashes = Some(hashes);
                }
                for i in bad {
                    let req = cross(Frame::FallbackRequest {
                        run: run_no,
                        first: i as u32,
                        count: 1,
                    });
                    let Frame::FallbackRequest { run, first, .. } = req else {
                        panic!("{req:?}")
                    };
                    let orig = &originals[run as usize][first as usize];
                    let reply = cross(Frame::FallbackData {
                        run,
                        first,
                        count: 1,
                        data: Payload::compress(orig, 1).expect("zstd"),
                    });
                    let Frame::FallbackData { data, .. } = reply else {
                        panic!("{reply:?}")
                    };
                    pages[i] = data.decompress().expect("fallback");
                    if let Some(h) = &page_hashes {
                        let len = refs.hash_len as usize;
                        assert_eq!(hash_page(&pages[i], len), h[i * len..(i + 1) * len]);
                    }
                    fallback_pages += 1;
                }
                let views: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
                assert!(refs.verify(&views).is_empty(), "run {run_no} still fails");
                check.feed(&out[fed..]);
                fed = out.len();
                while check.advance().expect("emitted stream") {}
                let name = check.blocks()[refs.block as usize].name.clone();
                let views: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
                refs.emit_records(&name, &views, &mut out).expect("emit");
                run_no += 1;
            }
            Frame::End { stream_bytes, runs } => {
                assert_eq!((stream_bytes, runs), (out.len() as u64, run_no));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    check.feed(&out[fed..]);
    while check.advance().expect("emitted stream") {}
    check.finish().expect("emitted stream complete");
    (out, fallback_pages, hash_requests)
}

#[test]
fn real_stream_through_sender_and_receiver_is_identical() {
    if !have_qemu() {
        return;
    }
    let (stream, ram) = capture_stream(Duration::from_millis(300));

    // The destination's disk holds the cached pages, two of them stale.
    let mut disk = vec![0u8; ram.len() + DISK_SHIFT as usize];
    disk[DISK_SHIFT as usize..].copy_from_slice(&ram);
    let stale = [RANDOM_AT + 5 * PAGE as u64, FILL_AT + 3 * PAGE as u64];
    for s in stale {
        disk[(s + DISK_SHIFT) as usize + 17] ^= 0x55;
    }

    for run_hash in [false, true] {
        let mut hello = Hello::new(Role::Sender);
        if !run_hash {
            hello.caps &= !caps::RUN_HASH;
        }
        let session = hello.negotiate(&Hello::new(Role::Receiver)).unwrap();
        let (wire, originals) = sender(&stream, &session);
        let (rebuilt, fallback, hash_requests) = receiver(&wire.bytes, &disk, &originals);
        assert!(
            rebuilt == stream,
            "rebuilt stream differs (run hash {run_hash})"
        );
        let s = &wire.stats;
        let cached_pages = ((RANDOM_LEN + FILL_LEN) / PAGE) as u64;
        assert!(s.ref_pages >= cached_pages, "{s:?}");
        // Only the two stale pages are re-sent, also when a run hash failed.
        assert_eq!(fallback, 2);
        if run_hash {
            assert!((1..=2).contains(&hash_requests), "{hash_requests}");
        } else {
            assert_eq!(hash_requests, 0);
        }
        assert!(s.wire_total() + s.ref_pages * 4000 < stream.len() as u64);
        eprintln!(
            "run hash {run_hash}: stream {} B -> wire {} B (data {} B for {} B raw, \
             refs {} B for {} pages incl. {} B hashes, control {} B); {} runs, {fallback} \
             fallback pages, {hash_requests} hash requests",
            stream.len(),
            s.wire_total(),
            s.passthrough_wire,
            s.passthrough_raw,
            s.ref_wire,
            s.ref_pages,
            s.ref_hash_bytes,
            s.control_wire,
            originals.len()
        );
    }
}
