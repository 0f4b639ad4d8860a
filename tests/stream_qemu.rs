//! The stream codec against real QEMU streams: a `pc-i440fx-7.2` TCG guest running SeaBIOS
//! under the system's QEMU 7.2 (and one under QEMU 10 from bookworm-backports), RAM in a
//! /dev/shm file with a known pattern.

mod support;

use pct::migrate::stream::{
    encode_record, put_page, Decoder, ErrorKind, RamRecord, Record, SectionKind, StreamReader,
    PAGE_SIZE,
};
use serde_json::{json, Value};
use std::io::{BufWriter, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::OnceLock;
use std::time::Duration;
use support::lab::{have_qemu, Guest, GuestSpec};
use support::stream::*;

/// One real stream (to a file) and the source's guest RAM once the migration completed.
struct Captured {
    stream: Vec<u8>,
    ram: Vec<u8>,
}

/// Captured once per test binary; the VM and its files are gone when this returns.
fn captured() -> Option<&'static Captured> {
    static CAPTURED: OnceLock<Option<Captured>> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            if !have_qemu() {
                return None;
            }
            let (stream, ram) = capture_stream(Duration::from_millis(500));
            Some(Captured { stream, ram })
        })
        .as_ref()
}

/// How a page was last sent.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Last {
    Zero(u8),
    /// Offset of the page's data in the stream.
    Page(usize),
}

#[test]
fn real_stream_records_match_guest_ram() {
    let Some(cap) = captured() else { return };
    // Odd chunk size: records straddle reads all the time.
    let mut reader = StreamReader::new(&cap.stream[..]).with_chunk(4093);
    let pages_in_ram0 = (RAM_MB << 20) as usize / PAGE;
    let mut last: Vec<Option<Last>> = vec![None; pages_in_ram0];
    let (mut header, mut machine, mut blocks) = (None, None, Vec::new());
    let (mut ram_end_seen, mut first_full) = (false, None::<String>);
    let (mut continued, mut named) = (0u64, 0u64);
    while let Some(item) = reader.next_item().expect("decode real stream") {
        match item.record {
            Record::Header { version } => header = Some(version),
            Record::Configuration { machine: m, .. } => machine = Some(m.to_owned()),
            Record::Section(h) => {
                if h.kind == SectionKind::End {
                    ram_end_seen = true;
                }
                if h.kind == SectionKind::Full {
                    assert!(ram_end_seen, "device state before the RAM END section");
                    first_full = h.ident.map(|i| i.name.to_owned());
                }
            }
            Record::Ram(RamRecord::MemSize { blocks: b, .. }) => blocks = b.to_vec(),
            Record::Ram(RamRecord::Zero { page, fill }) if page.block_name == "ram0" => {
                last[(page.offset as usize) / PAGE] = Some(Last::Zero(fill));
            }
            Record::Ram(RamRecord::Page { page, .. }) if page.block_name == "ram0" => {
                let data_at = item.offset as usize + item.raw.len() - PAGE_SIZE;
                last[(page.offset as usize) / PAGE] = Some(Last::Page(data_at));
                if page.continued {
                    continued += 1;
                } else {
                    named += 1;
                }
            }
            Record::Ram(_) | Record::Footer { .. } | Record::Command { .. } => {}
            Record::DeviceState(_) => assert!(first_full.is_some()),
            Record::Eof | Record::VmDesc { .. } => panic!("EOF must be inside device state"),
        }
    }
    assert_eq!(header, Some(3));
    assert_eq!(machine.as_deref(), Some("pc-i440fx-7.2"));
    assert_eq!(blocks[0].name, "ram0");
    assert_eq!(blocks[0].used_length, RAM_MB << 20);
    assert!(blocks.iter().any(|b| b.name == "pc.bios"), "{blocks:?}");
    assert_eq!(first_full.as_deref(), Some("timer"));
    assert!(
        continued > 0 && named > 0,
        "continued {continued}, named {named}"
    );

    // Every page of ram0 was sent, and what was sent last is the final guest RAM.
    let (mut zero, mut data) = (0, 0);
    for (i, l) in last.iter().enumerate() {
        let want = &cap.ram[i * PAGE..(i + 1) * PAGE];
        match l.unwrap_or_else(|| panic!("ram0 page {i} never sent")) {
            Last::Zero(fill) => {
                assert!(want.iter().all(|&b| b == fill), "page {i} not {fill:#x}");
                zero += 1;
            }
            Last::Page(at) => {
                assert_eq!(&cap.stream[at..at + PAGE], want, "page {i} differs");
                data += 1;
            }
        }
    }
    // The pattern: random and 0xab pages must have gone as PAGE records.
    let pattern = [(RANDOM_AT, RANDOM_LEN), (FILL_AT, FILL_LEN)];
    for (at, len) in pattern {
        let pages = (at as usize / PAGE)..((at as usize + len) / PAGE);
        for (p, l) in last[pages.clone()].iter().enumerate() {
            assert!(matches!(l, Some(Last::Page(_))), "page {}", pages.start + p);
        }
    }
    assert!(zero > pages_in_ram0 / 2, "zero {zero}, data {data}");

    let stats = reader.decoder().stats().clone();
    assert_eq!(stats.total_bytes, cap.stream.len() as u64);
    assert!(stats.pages >= ((RANDOM_LEN + FILL_LEN) / PAGE) as u64);
    assert!(stats.device_bytes > 0);
    let trailer = reader.trailer().expect("trailer").clone();
    let desc: Value = serde_json::from_slice(&trailer.vmdesc.expect("vmdesc")).expect("json");
    assert_eq!(desc["page_size"], json!(4096));
    assert!(desc["devices"].as_array().is_some_and(|d| d.len() > 5));
    eprintln!(
        "stream {} bytes: {} PAGE ({} B), {} ZERO, {} B device state; ram0 {zero} zero / {data} data",
        stats.total_bytes, stats.pages, stats.page_bytes, stats.zero_pages, stats.device_bytes
    );
}

#[test]
fn real_stream_round_trips_byte_for_byte() {
    let Some(cap) = captured() else { return };
    for chunk in [1usize, 7, 4095, 4096 + 8 + 5, 1 << 16, cap.stream.len()] {
        let mut dec = Decoder::new();
        let (mut raw_out, mut enc_out) = (Vec::new(), Vec::new());
        for piece in cap.stream.chunks(chunk) {
            dec.feed(piece);
            while let Some(item) = dec.next_item().expect("decode") {
                raw_out.extend_from_slice(item.raw);
                let before = enc_out.len();
                encode_record(&item.record, &mut enc_out).expect("encode");
                assert_eq!(
                    &enc_out[before..],
                    item.raw,
                    "record at {} re-encodes differently: {:?}",
                    item.offset,
                    item.record
                );
            }
        }
        dec.finish().expect("complete stream");
        assert!(raw_out == cap.stream, "raw bytes differ (chunk {chunk})");
        assert!(enc_out == cap.stream, "encoding differs (chunk {chunk})");
    }
}

/// QEMU 10 (from bookworm-backports, beside the system's 7.2) on its own machine type
/// announces the switchover with a command (11) near the end of the stream: the codec
/// passes it through, and the whole stream re-encodes byte for byte.
#[test]
fn qemu10_stream_with_switchover_start_round_trips() {
    if !have_qemu() {
        return;
    }
    let out = support::run_ok(
        std::process::Command::new("bash").arg(support::repo().join("tools/lab/fetch-qemu.sh")),
        "tools/lab/fetch-qemu.sh",
    );
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let spec = GuestSpec {
        qemu: Some(prefix.into()),
        machine: Some("pc"),
        ..patterned_guest()
    };
    let (stream, _) = capture_stream_of(spec, Duration::from_millis(500));
    let mut dec = Decoder::new();
    dec.feed(&stream);
    let (mut commands, mut pages, mut again) = (Vec::new(), 0, Vec::new());
    while let Some(item) = dec.next_item().expect("decode a QEMU 10 stream") {
        match item.record {
            Record::Command { cmd, .. } => commands.push(cmd),
            Record::Ram(RamRecord::Page { .. }) => pages += 1,
            _ => {}
        }
        encode_record(&item.record, &mut again).expect("encode");
    }
    dec.finish().expect("complete stream");
    assert!(
        commands.contains(&pct::migrate::stream::command::SWITCHOVER_START),
        "no switchover-start command in QEMU 10's stream (commands {commands:?})"
    );
    assert!(pages > 0, "no PAGE records");
    assert!(
        again == stream,
        "the stream does not re-encode byte for byte"
    );
    eprintln!(
        "QEMU 10 stream: {} bytes, {pages} PAGE records, commands {commands:?}",
        stream.len()
    );
}

#[test]
fn real_stream_truncated_is_an_error() {
    let Some(cap) = captured() else { return };
    let len = cap.stream.len();
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((1..200).map(|i| len / 200 * i + i % 13));
    cuts.extend((len - 200)..len);
    for cut in cuts {
        let mut dec = Decoder::new();
        dec.feed(&cap.stream[..cut]);
        while dec.advance().unwrap_or_else(|e| panic!("cut {cut}: {e}")) {}
        let err = dec
            .finish()
            .expect_err(&format!("cut at {cut} of {len} accepted"));
        assert!(
            matches!(err.kind, ErrorKind::Truncated(_)),
            "cut {cut}: {err}"
        );
    }
}

/// Source → codec (every page re-encoded with its block name, so the bytes differ) →
/// destination QEMU, live over unix sockets; the destination's RAM must equal the source's.
#[test]
fn rewritten_stream_is_accepted_by_destination_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let src_sock = dir.path().join("src.sock");
    let dst_sock = dir.path().join("dst.sock");
    let dst = Guest::start(GuestSpec {
        incoming: true,
        ..firmware_guest()
    });
    dst.exec(
        "migrate-incoming",
        json!({ "uri": format!("unix:{}", dst_sock.display()) }),
    );
    let src = patterned_source(Duration::from_millis(500));
    let listener = UnixListener::bind(&src_sock).expect("bind");
    src.migrate(&format!("unix:{}", src_sock.display()));
    let (from_src, _) = listener.accept().expect("accept source");
    from_src
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let to_dst = UnixStream::connect(&dst_sock).expect("connect destination");
    let mut out = BufWriter::new(to_dst);

    let mut reader = StreamReader::new(from_src).with_chunk(64 << 10);
    let (mut rewritten, mut in_bytes, mut out_bytes) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    while let Some(item) = reader.next_item().expect("decode live stream") {
        buf.clear();
        in_bytes += item.raw.len() as u64;
        match item.record {
            Record::Ram(RamRecord::Page { page, data }) => {
                put_page(&mut buf, Some(page.block_name), page.offset, data).expect("page");
                rewritten += u64::from(page.continued);
            }
            rec => encode_record(&rec, &mut buf).expect("encode"),
        }
        out_bytes += buf.len() as u64;
        out.write_all(&buf).expect("write to destination");
    }
    out.flush().expect("flush");
    drop(out);
    src.wait_migration(Duration::from_secs(60));
    dst.wait_migration(Duration::from_secs(60));
    assert!(rewritten > 0, "no CONTINUE page was rewritten");
    assert!(out_bytes > in_bytes);

    let a = std::fs::read(&src.ram_path).expect("source RAM");
    let b = std::fs::read(&dst.ram_path).expect("destination RAM");
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "destination RAM differs");
    eprintln!("{in_bytes} B in, {out_bytes} B out, {rewritten} CONTINUE pages named");
}

/// A stream from a paused patterned guest (with `uuid`) with migration capabilities `caps`
/// switched on; with `complete` false, only what QEMU wrote in the first second.
fn capture_with(caps: &[&str], uuid: Option<&'static str>, complete: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("stream.bin");
    let vm = Guest::start(GuestSpec {
        uuid,
        ..patterned_guest()
    });
    let caps: Vec<Value> = caps
        .iter()
        .map(|c| json!({ "capability": c, "state": true }))
        .collect();
    vm.exec("migrate-set-capabilities", json!({ "capabilities": caps }));
    vm.migrate(&format!("exec:cat > {}", out.display()));
    if complete {
        vm.wait_migration(Duration::from_secs(120));
    } else {
        std::thread::sleep(Duration::from_secs(1));
    }
    std::fs::read(&out).expect("read stream")
}

fn decode_all(stream: &[u8]) -> Result<Vec<u8>, pct::migrate::stream::StreamError> {
    let mut reader = StreamReader::new(stream).with_chunk(10_000);
    let mut out = Vec::new();
    while let Some(item) = reader.next_item()? {
        encode_record(&item.record, &mut out).expect("encode");
    }
    Ok(out)
}

/// `x-ignore-shared` adds each block's address to MEM_SIZE and a capabilities subsection;
/// `validate-uuid` adds the uuid subsection. Both decode and round-trip.
#[test]
fn real_stream_with_configuration_subsections() {
    if !have_qemu() {
        return;
    }
    let uuid = "6c0cd5b5-6d3c-4d6b-9f0a-3a1d6a0e5c11";
    let s = capture_with(&["x-ignore-shared", "validate-uuid"], Some(uuid), true);
    assert!(decode_all(&s).expect("decode") == s);
    let mut reader = StreamReader::new(&s[..]);
    let mut subs = Vec::new();
    while let Some(item) = reader.next_item().expect("decode") {
        if let Record::Configuration { subsections, .. } = item.record {
            subs = subsections.to_vec();
        }
    }
    let names: Vec<&str> = subs.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        ["configuration/capabilities", "configuration/uuid"],
        "{subs:?}"
    );
    let blocks = reader.decoder().blocks();
    assert!(blocks.iter().all(|b| b.shared_addr.is_some()), "{blocks:?}");
    // ram0 is shared (share=on): with x-ignore-shared none of its pages is sent.
    assert!(reader.decoder().stats().pages < (RANDOM_LEN / PAGE) as u64);
}

/// Capabilities that change the RAM encoding are refused by name.
#[test]
fn real_stream_with_unsupported_capabilities_is_refused() {
    if !have_qemu() {
        return;
    }
    // Postcopy does not complete over `exec:` (no return path), but announces itself first.
    for (cap, complete) in [("compress", true), ("postcopy-ram", false)] {
        let s = capture_with(&[cap], None, complete);
        let err = decode_all(&s).expect_err(cap);
        match &err.kind {
            ErrorKind::Capability { capability, .. } => assert_eq!(*capability, cap, "{err}"),
            _ => panic!("{cap}: {err}"),
        }
        eprintln!("{cap}: {err}");
    }
}
