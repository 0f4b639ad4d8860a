//! pct's wire protocol: every frame round-trips, hellos negotiate, reference runs stay
//! within the overhead budget, hashes verify, and garbage gives errors, never panics.

mod support;

use pct::migrate::wire::{
    caps, hash_page, hash_run, read_frame, valid_vm_name, write_frame, Codec, Frame, Hello,
    PageRef, PageRefs, Payload, Role, WireError, WireStats, HEADER_LEN, MAX_PAYLOAD, MAX_VM_NAME,
    PAGE_SIZE,
};
use support::rng;

fn round_trip(f: &Frame) -> usize {
    let mut buf = Vec::new();
    let n = f.encode(&mut buf).expect("encode");
    assert_eq!(n, buf.len());
    // Whole buffer.
    let (g, used) = Frame::decode(&buf, MAX_PAYLOAD)
        .expect("decode")
        .expect("complete");
    assert_eq!(&g, f);
    assert_eq!(used, n);
    // Every strict prefix is incomplete, never an error or a wrong frame.
    for cut in 0..buf.len() {
        assert!(
            Frame::decode(&buf[..cut], MAX_PAYLOAD)
                .expect("prefix")
                .is_none(),
            "{} prefix {cut}",
            f.name()
        );
    }
    // Through a reader, followed by a clean end.
    let mut r = &buf[..];
    let (g, used) = read_frame(&mut r, MAX_PAYLOAD)
        .expect("read")
        .expect("frame");
    assert_eq!((&g, used), (f, n));
    assert!(read_frame(&mut r, MAX_PAYLOAD).expect("eof").is_none());
    n
}

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn refs(n: usize, per_run: bool, scattered: bool) -> (PageRefs, Vec<Vec<u8>>) {
    let data: Vec<Vec<u8>> = (0..n).map(|i| page(i as u8)).collect();
    let views: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
    let hashes = if per_run {
        hash_run(&views, 16)
    } else {
        views.iter().flat_map(|d| hash_page(d, 16)).collect()
    };
    let pages = (0..n as u64)
        .map(|i| PageRef {
            // Mostly consecutive in RAM, one gap.
            offset: 0x1234_5000 + i * 4096 + if i >= n as u64 / 2 { 0x3000 } else { 0 },
            disk_offset: if scattered {
                (i * 7_919_993 % 100_000_000) * 4096 + 512
            } else {
                (40 << 30) + i * 4096
            },
        })
        .collect();
    let r = PageRefs {
        block: 3,
        first_named: true,
        pages,
        hash_len: 16,
        hashes,
    };
    (r, data)
}

#[test]
fn every_frame_round_trips() {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let frames = vec![
        Frame::Hello(Hello::new(Role::Sender)),
        Frame::Hello(Hello::new(Role::Receiver)),
        Frame::Data(Payload::raw(b"QEVM\0\0\0\x03".to_vec())),
        Frame::Data(Payload::compress(&data, 1).unwrap()),
        Frame::Data(Payload::raw(Vec::new())),
        Frame::PageRefs(refs(1, false, false).0),
        Frame::PageRefs(refs(64, false, false).0),
        Frame::PageRefs(refs(64, true, true).0),
        Frame::FallbackRequest {
            run: 1 << 40,
            first: 3,
            count: 5,
        },
        Frame::FallbackData {
            run: 7,
            first: 0,
            count: 2,
            data: Payload::compress(&[page(1), page(2)].concat(), 3).unwrap(),
        },
        Frame::HashRequest {
            run: 9,
            first: 0,
            count: 32,
        },
        Frame::PageHashes {
            run: 9,
            first: 0,
            count: 3,
            hash_len: 16,
            hashes: (0..48).collect(),
        },
        Frame::Ack {
            runs: 12345,
            frames: 23456,
        },
        Frame::End {
            stream_bytes: u64::MAX,
            runs: 0,
        },
        Frame::Complete {
            stream_bytes: 415_000_000,
        },
        Frame::Error {
            code: 7,
            message: "hash mismatch ☹".into(),
        },
        Frame::Report {
            json: r#"{"verified_pages":76959}"#.into(),
        },
    ];
    for f in &frames {
        round_trip(f);
    }
    if let Frame::Data(p) = &frames[3] {
        assert_eq!(p.codec, Codec::Zstd);
        assert!(p.bytes.len() < data.len() / 10);
        assert_eq!(p.decompress().unwrap(), data);
    }
}

#[test]
fn hello_negotiation() {
    let s = Hello::new(Role::Sender);
    let mut r = Hello::new(Role::Receiver);
    r.hash_len = 12;
    r.caps = caps::ZSTD;
    let a = s.negotiate(&r).unwrap();
    assert_eq!(a, r.negotiate(&s).unwrap());
    assert_eq!((a.hash_len, a.caps), (12, caps::ZSTD));
    assert!(matches!(
        s.negotiate(&s),
        Err(WireError::Mismatch(_)) // two senders
    ));
    let mut old = r.clone();
    old.version = 0;
    assert!(matches!(
        s.negotiate(&old),
        Err(WireError::Version { peer: 0 })
    ));
    let mut big = r.clone();
    big.page_size = 2 << 20;
    assert!(s.negotiate(&big).is_err());
    // A hello with the wrong magic is refused at decode.
    let mut buf = Vec::new();
    Frame::Hello(s).encode(&mut buf).unwrap();
    buf[HEADER_LEN] = b'X';
    assert!(matches!(
        Frame::decode(&buf, MAX_PAYLOAD),
        Err(WireError::BadMagic(_))
    ));
}

/// A sender's hello names its VM (protocol 4); the name is checked where it is decoded,
/// so a receiver never matches or prints a hostile one.
#[test]
fn hello_names_the_vm() {
    let named = Hello::for_vm("web-1.prod_a");
    round_trip(&Frame::Hello(named.clone()));
    round_trip(&Frame::Hello(Hello::for_vm("")));
    let mut long = "v".repeat(MAX_VM_NAME);
    assert!(valid_vm_name(&long));
    long.push('v');
    assert!(!valid_vm_name(&long));
    for bad in ["", "-rf", ".hidden", "a b", "a/b", "vm\u{1b}[2J", "é"] {
        assert!(!valid_vm_name(bad), "{bad:?}");
    }
    // On the wire: the name is the last field, a length byte then the bytes.
    let mut buf = Vec::new();
    Frame::Hello(named).encode(&mut buf).unwrap();
    let at = buf.len() - "web-1.prod_a".len();
    buf[at] = 0x1b;
    let e = Frame::decode(&buf, MAX_PAYLOAD).unwrap_err().to_string();
    assert!(e.contains("VM name `\\x1beb-1.prod_a`"), "{e}");
    // A length past the payload is a truncation.
    buf[at - 1] = 200;
    assert!(Frame::decode(&buf, MAX_PAYLOAD).is_err());
}

/// Beyond the hashes, a run of consecutive pages costs ≤ 4 bytes per page.
#[test]
fn reference_overhead_per_page() {
    for n in [16usize, 64, 512] {
        let (r, _) = refs(n, false, false);
        let wire = round_trip(&Frame::PageRefs(r.clone()));
        let overhead = (wire - r.hashes.len()) as f64 / n as f64;
        eprintln!("{n} pages, per-page hash: {overhead:.2} B/page beyond hashes");
        assert!(overhead <= 4.0, "{overhead}");
        let (r, _) = refs(n, true, false);
        let wire = round_trip(&Frame::PageRefs(r));
        let all_in = wire as f64 / n as f64;
        eprintln!("{n} pages, run hash: {all_in:.2} B/page all in");
        assert!(all_in <= 4.0 || n < 32, "{all_in}");
        let (r, _) = refs(n, false, true);
        let wire = round_trip(&Frame::PageRefs(r.clone()));
        let overhead = (wire - r.hashes.len()) as f64 / n as f64;
        eprintln!("{n} pages, scattered on disk: {overhead:.2} B/page beyond hashes");
        assert!(overhead <= 8.0, "{overhead}");
    }
}

#[test]
fn hashes_verify_per_page_and_per_run() {
    let (r, mut data) = refs(8, false, false);
    let v: Vec<&[u8]> = data.iter().map(|p| &p[..]).collect();
    assert!(r.verify(&v).is_empty());
    data[5][100] ^= 1;
    let v: Vec<&[u8]> = data.iter().map(|p| &p[..]).collect();
    assert_eq!(r.verify(&v), vec![5]);

    let (r, mut data) = refs(8, true, false);
    assert!(r.run_hash());
    data[2][0] ^= 1;
    let v: Vec<&[u8]> = data.iter().map(|p| &p[..]).collect();
    assert_eq!(r.verify(&v), (0..8).collect::<Vec<_>>());
    // Wrong page count or size: everything falls back.
    assert_eq!(r.verify(&v[..3]).len(), 8);
}

#[test]
fn invalid_frames_are_refused_on_encode() {
    let (mut r, _) = refs(4, false, false);
    r.pages[2].offset = r.pages[1].offset; // not increasing
    assert!(Frame::PageRefs(r).encode(&mut Vec::new()).is_err());
    let (mut r, _) = refs(4, false, false);
    r.hashes.pop();
    assert!(Frame::PageRefs(r).encode(&mut Vec::new()).is_err());
    let (mut r, _) = refs(4, false, false);
    r.pages[0].disk_offset += 1; // not sector aligned
    assert!(Frame::PageRefs(r).encode(&mut Vec::new()).is_err());
    let bad = Frame::FallbackData {
        run: 0,
        first: 0,
        count: 2,
        data: Payload::raw(vec![0; 4096]),
    };
    assert!(bad.encode(&mut Vec::new()).is_err());
    let bad = Frame::PageHashes {
        run: 0,
        first: 0,
        count: 2,
        hash_len: 16,
        hashes: vec![0; 31],
    };
    assert!(bad.encode(&mut Vec::new()).is_err());
    let bad = Frame::PageHashes {
        run: 0,
        first: 0,
        count: 1,
        hash_len: 4,
        hashes: vec![0; 4],
    };
    assert!(bad.encode(&mut Vec::new()).is_err());
}

#[test]
fn page_hashes_narrow_a_failed_run_hash() {
    let (r, data) = refs(8, true, true);
    assert!(r.run_hash());
    let pages: Vec<u8> = data.concat();
    // The sender's per-page hashes of its originals, as a page hashes frame carries them.
    let hashes = pct::migrate::wire::hash_pages(&pages, 16);
    assert_eq!(hashes.len(), 8 * 16);
    let reply = Frame::PageHashes {
        run: 0,
        first: 0,
        count: 8,
        hash_len: 16,
        hashes: hashes.clone(),
    };
    let mut buf = Vec::new();
    let n = reply.encode(&mut buf).unwrap();
    assert_eq!(n, 5 + 1 + 1 + 1 + 1 + 8 * 16);
    // One stale page on "disk": the run hash fails, the page hashes single it out.
    let mut disk = data.clone();
    disk[5][100] ^= 1;
    let views: Vec<&[u8]> = disk.iter().map(|p| &p[..]).collect();
    assert_eq!(r.verify(&views), (0..8).collect::<Vec<_>>());
    let differ: Vec<usize> = (0..8)
        .filter(|&i| hash_page(&disk[i], 16) != hashes[i * 16..(i + 1) * 16])
        .collect();
    assert_eq!(differ, vec![5]);
    // Truncated or oversized hash bytes are refused on decode.
    let mut cut = buf.clone();
    cut.truncate(buf.len() - 1);
    let len = (cut.len() - 5) as u32;
    cut[1..5].copy_from_slice(&len.to_be_bytes());
    assert!(Frame::decode(&cut, MAX_PAYLOAD).is_err());
    let mut long = buf.clone();
    long.push(0);
    let len = (long.len() - 5) as u32;
    long[1..5].copy_from_slice(&len.to_be_bytes());
    assert!(Frame::decode(&long, MAX_PAYLOAD).is_err());
}

#[test]
fn header_bounds_and_truncation() {
    // Announced payload beyond the limit: refused before reading it.
    let mut buf = vec![0x02];
    buf.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Frame::decode(&buf, MAX_PAYLOAD),
        Err(WireError::TooLong { .. })
    ));
    assert!(matches!(
        read_frame(&mut &buf[..], MAX_PAYLOAD),
        Err(WireError::TooLong { .. })
    ));
    // A smaller negotiated limit applies.
    let mut ok = Vec::new();
    Frame::Data(Payload::raw(vec![1; 100]))
        .encode(&mut ok)
        .unwrap();
    assert!(Frame::decode(&ok, 50).is_err());
    // Unknown type.
    assert!(matches!(
        Frame::decode(&[0x55, 0, 0, 0, 0], MAX_PAYLOAD),
        Err(WireError::UnknownType(0x55))
    ));
    // Trailing bytes inside a payload.
    let mut f = Vec::new();
    Frame::Ack { runs: 1, frames: 2 }.encode(&mut f).unwrap();
    f[4] += 1;
    f.push(0);
    assert!(Frame::decode(&f, MAX_PAYLOAD).is_err());
    // EOF inside a frame.
    assert!(matches!(
        read_frame(&mut &ok[..ok.len() - 1], MAX_PAYLOAD),
        Err(WireError::Truncated(_))
    ));
    // zstd bomb: announced raw length bounds the output.
    let big = vec![0u8; 1 << 20];
    let mut p = Payload::compress(&big, 1).unwrap();
    p.raw_len = 1000;
    assert!(p.decompress().is_err());
}

#[test]
fn stats_split_bytes_by_kind() {
    let mut s = WireStats::default();
    let mut out = Vec::new();
    let frames = [
        Frame::Hello(Hello::new(Role::Sender)),
        Frame::Data(Payload::compress(&vec![7u8; 50_000], 1).unwrap()),
        Frame::PageRefs(refs(32, false, false).0),
        Frame::FallbackData {
            run: 0,
            first: 0,
            count: 1,
            data: Payload::raw(page(0)),
        },
        Frame::End {
            stream_bytes: 1,
            runs: 1,
        },
        Frame::HashRequest {
            run: 0,
            first: 0,
            count: 32,
        },
        Frame::PageHashes {
            run: 0,
            first: 0,
            count: 32,
            hash_len: 16,
            hashes: vec![0; 32 * 16],
        },
    ];
    let mut control = 0;
    for f in &frames {
        let n = write_frame(&mut out, f).unwrap();
        s.count(f, n);
        if matches!(
            f,
            Frame::Hello(_)
                | Frame::End { .. }
                | Frame::HashRequest { .. }
                | Frame::PageHashes { .. }
        ) {
            control += n as u64;
        }
    }
    assert_eq!(s.wire_total(), out.len() as u64);
    assert_eq!(s.frames, 7);
    // The hash exchange is protocol, not fallback: no page was re-sent by it.
    assert_eq!(s.control_wire, control);
    assert_eq!(s.passthrough_raw, 50_000);
    assert!(s.passthrough_wire < 1000);
    assert_eq!((s.ref_pages, s.ref_hash_bytes), (32, 32 * 16));
    assert_eq!(s.fallback_pages, 1);
}

#[test]
fn garbage_never_panics() {
    let mut r = rng(7);
    // Random payloads under every type byte.
    for t in 0..=255u8 {
        for _ in 0..40 {
            let len = (r() % 300) as usize;
            let payload: Vec<u8> = (0..len).map(|_| r() as u8).collect();
            if let Ok(Frame::Data(p) | Frame::FallbackData { data: p, .. }) =
                Frame::decode_payload(t, &payload)
            {
                let _ = p.decompress();
            }
        }
    }
    // Every single-byte corruption of valid frames.
    let mut valid = Vec::new();
    for f in [
        Frame::Hello(Hello::new(Role::Receiver)),
        Frame::PageRefs(refs(5, false, true).0),
        Frame::FallbackData {
            run: 1,
            first: 1,
            count: 1,
            data: Payload::compress(&page(9), 1).unwrap(),
        },
        Frame::Error {
            code: 1,
            message: "x".into(),
        },
    ] {
        f.encode(&mut valid).unwrap();
    }
    for i in 0..valid.len() {
        for v in [0u8, 0xff, valid[i] ^ 0x80] {
            let mut g = valid.clone();
            g[i] = v;
            let mut rd = &g[..];
            while let Ok(Some((f, _))) = read_frame(&mut rd, MAX_PAYLOAD) {
                if let Frame::Data(p) | Frame::FallbackData { data: p, .. } = f {
                    let _ = p.decompress();
                }
            }
        }
    }
    // Random byte streams.
    for _ in 0..300 {
        let g: Vec<u8> = (0..(r() % 5000)).map(|_| r() as u8).collect();
        let mut rd = &g[..];
        while let Ok(Some(_)) = read_frame(&mut rd, MAX_PAYLOAD) {}
    }
}

/// Inputs `fuzz/fuzz_targets/receiver_wire.rs` found, kept in `tests/fixtures/receiver_wire/`
/// (first byte: the fuzz target's selector; then the bytes a receiver read). Each must be
/// refused with the error named here, by the buffered decoder and by `read_frame` alike.
#[test]
fn receiver_wire_regressions() {
    let cases: [(&str, &str); 2] = [
        // A data frame whose decompressed length 8 came as the two-byte varint `88 00`:
        // accepted, it re-encoded to a different, shorter frame.
        (
            "padded-varint",
            "varint 8 not in its shortest form (2 bytes)",
        ),
        // Page hashes for pages 71 + (2^64 - 1) of a run: the bound check added first and
        // count, which overflowed (a panic with overflow checks; without, a wrapped sum
        // that passed the check and a truncated count).
        (
            "page-count-overflow",
            "pages 71+18446744073709551615 outside a run of at most 4096 pages",
        ),
    ];
    for (name, want) in cases {
        let path = format!(
            "{}/tests/fixtures/receiver_wire/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let input = std::fs::read(&path).expect("fixture");
        let wire = &input[1..];
        let e = Frame::decode(wire, MAX_PAYLOAD).expect_err(name);
        assert!(e.to_string().contains(want), "{name}: {e}");
        let e = read_frame(&mut &wire[..], MAX_PAYLOAD).expect_err(name);
        assert!(e.to_string().contains(want), "{name}: {e}");
    }
}

/// Varints: every value's `put_varint` form decodes; padded forms are refused.
#[test]
fn varints_have_one_encoding() {
    for v in [0u64, 1, 127, 128, 300, 1 << 35, 1 << 62] {
        let f = Frame::Complete { stream_bytes: v };
        let mut b = Vec::new();
        f.encode(&mut b).expect("encode");
        assert_eq!(
            Frame::decode(&b, MAX_PAYLOAD)
                .expect("decode")
                .expect("whole")
                .0,
            f
        );
        // The same value with a zero byte appended to its varint.
        let last = b.len() - 1;
        b[last] |= 0x80;
        b.push(0);
        b[4] += 1;
        let e = Frame::decode(&b, MAX_PAYLOAD).expect_err("padded");
        assert!(e.to_string().contains("shortest form"), "{v}: {e}");
    }
}

/// A sender's side of a short session, as the receiver reads it: hello, the start of a
/// QEMU stream (`ram` section with `MEM_SIZE`), a reference run of zero pages, a run whose
/// pages differ from zeros, fallback data and page hashes, the rest of the stream, `End`.
fn receiver_session() -> Vec<u8> {
    use pct::migrate::stream::{
        encode_record, RamBlock, RamRecord, Record, SectionHeader, SectionIdent, SectionKind,
    };
    let put = |out: &mut Vec<u8>, rec: Record<'_>| encode_record(&rec, out).expect("record");
    let blocks = vec![RamBlock {
        name: "pc.ram".into(),
        used_length: 64 * PAGE_SIZE as u64,
        shared_addr: None,
    }];
    let mut head = Vec::new();
    put(&mut head, Record::Header { version: 3 });
    let ram = |kind, ident| Record::Section(SectionHeader { kind, id: 2, ident });
    let ident = SectionIdent {
        name: "ram",
        instance: 0,
        version: 4,
    };
    put(&mut head, ram(SectionKind::Start, Some(ident)));
    put(
        &mut head,
        Record::Ram(RamRecord::MemSize {
            total: blocks[0].used_length,
            blocks: &blocks,
        }),
    );
    put(&mut head, Record::Ram(RamRecord::Eos));
    put(&mut head, Record::Footer { section_id: 2 });
    put(&mut head, ram(SectionKind::Part, None));
    let mut tail = Vec::new();
    put(&mut tail, Record::Ram(RamRecord::Eos));
    put(&mut tail, Record::Footer { section_id: 2 });
    put(&mut tail, Record::Eof);

    let zero = vec![0u8; PAGE_SIZE];
    let run = |first_named, n: u64, data: &[u8]| PageRefs {
        block: 0,
        first_named,
        pages: (0..n)
            .map(|i| PageRef {
                offset: (i * 2) * PAGE_SIZE as u64,
                disk_offset: (1 << 20) + i * PAGE_SIZE as u64,
            })
            .collect(),
        hash_len: 16,
        hashes: hash_run(&vec![data; n as usize], 16),
    };
    let mut stream_bytes = (head.len() + tail.len()) as u64;
    let mut wire = Vec::new();
    let frames = [
        Frame::Hello(Hello::new(Role::Sender)),
        Frame::Data(Payload::compress(&head, 1).expect("zstd")),
        Frame::PageRefs(run(true, 3, &zero)),
        Frame::PageRefs(run(false, 2, &page(4))),
        Frame::PageHashes {
            run: 1,
            first: 0,
            count: 2,
            hash_len: 16,
            hashes: [hash_page(&page(4), 16), hash_page(&zero, 16)].concat(),
        },
        Frame::FallbackData {
            run: 1,
            first: 0,
            count: 1,
            data: Payload::compress(&page(4), 1).expect("zstd"),
        },
        Frame::Data(Payload::raw(tail)),
    ];
    for f in &frames {
        f.encode(&mut wire).expect("encode");
        if let Frame::PageRefs(r) = f {
            let views: Vec<&[u8]> = vec![&zero[..]; r.pages.len()];
            let mut out = Vec::new();
            let name = if r.first_named { "pc.ram" } else { "" };
            r.emit_records(name, &views, &mut out).expect("records");
            stream_bytes += out.len() as u64;
        }
    }
    Frame::End {
        stream_bytes,
        runs: 2,
    }
    .encode(&mut wire)
    .expect("end");
    wire
}

/// Writes the seed corpus of `fuzz/fuzz_targets/receiver_wire.rs` (its first byte picks the
/// read size and whether a hello comes first): the session above whole, at two read sizes,
/// and each frame alone.
#[test]
#[ignore = "writes fuzz/corpus/receiver_wire: cargo test --test wire_frames -- --ignored"]
fn write_receiver_wire_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/receiver_wire");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let session = receiver_session();
    let mut seeds = vec![
        [&[0x3f], &session[..]].concat(),
        [&[0x00], &session[..]].concat(),
    ];
    let mut r = &session[..];
    while let Some((f, _)) = read_frame(&mut r, MAX_PAYLOAD).expect("seed frame") {
        let mut one = vec![if matches!(f, Frame::Hello(_)) {
            0x05
        } else {
            0x85
        }];
        f.encode(&mut one).expect("encode");
        seeds.push(one);
    }
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("write seed");
    }
}
