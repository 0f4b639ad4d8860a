//! The stream codec on hand-built streams: grammar corner cases, refusals with context,
//! truncation, and garbage (bit flips, random bytes) that must give errors, never panics.

mod support;

use pct::migrate::stream::{
    command, encode_record, put_page, put_zero, section_type, ConfigSubsection, Decoder, ErrorKind,
    RamBlock, RamRecord, Record, SectionHeader, SectionIdent, SectionKind, StreamError, PAGE_SIZE,
};
use support::rng;

fn put(out: &mut Vec<u8>, rec: Record<'_>) {
    encode_record(&rec, out).expect("encode");
}

fn start(id: u32, name: &str, version: u32) -> Record<'_> {
    Record::Section(SectionHeader {
        kind: SectionKind::Start,
        id,
        ident: Some(SectionIdent {
            name,
            instance: 0,
            version,
        }),
    })
}

fn full(id: u32, name: &str) -> Record<'_> {
    Record::Section(SectionHeader {
        kind: SectionKind::Full,
        id,
        ident: Some(SectionIdent {
            name,
            instance: 0,
            version: 1,
        }),
    })
}

fn part(kind: SectionKind, id: u32) -> Record<'static> {
    Record::Section(SectionHeader {
        kind,
        id,
        ident: None,
    })
}

fn blocks() -> Vec<RamBlock> {
    vec![
        RamBlock {
            name: "pc.ram".into(),
            used_length: 16 * PAGE_SIZE as u64,
            shared_addr: None,
        },
        RamBlock {
            name: "pc.bios".into(),
            used_length: 2 * PAGE_SIZE as u64,
            shared_addr: None,
        },
    ]
}

/// Header, configuration, `ram` START with MEM_SIZE.
fn prologue(out: &mut Vec<u8>) {
    put(out, Record::Header { version: 3 });
    put(
        out,
        Record::Configuration {
            machine: "pc-i440fx-7.2",
            subsections: &[],
        },
    );
    put(out, start(2, "ram", 4));
    let b = blocks();
    put(
        out,
        Record::Ram(RamRecord::MemSize {
            total: b.iter().map(|b| b.used_length).sum(),
            blocks: &b,
        }),
    );
    put(out, Record::Ram(RamRecord::Eos));
    put(out, Record::Footer { section_id: 2 });
}

/// Device state as QEMU lays it out, EOF and description.
fn epilogue(out: &mut Vec<u8>) {
    put(out, full(0, "timer"));
    out.extend_from_slice(&[0u8, 1, 2, 3, 0, 6, 0, 0]); // looks like EOF+desc, is not
    put(out, Record::Footer { section_id: 0 });
    put(out, full(4, "cpu"));
    out.extend_from_slice(&[0x7e, 0, 0, 0, 9, 0]);
    put(out, Record::Footer { section_id: 4 });
    put(out, Record::Eof);
    put(
        out,
        Record::VmDesc {
            json: br#"{"page_size": 4096, "devices": []}"#,
        },
    );
}

/// A complete stream: two iterations of pages, with CONTINUE and ZERO records.
fn stream() -> Vec<u8> {
    let mut s = Vec::new();
    prologue(&mut s);
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    put(&mut s, part(SectionKind::Part, 2));
    put_page(&mut s, Some("pc.ram"), 0, &page).unwrap();
    put_page(&mut s, None, 0x1000, &page).unwrap();
    put_zero(&mut s, None, 0x2000, 0).unwrap();
    put_zero(&mut s, Some("pc.bios"), 0x1000, 0).unwrap();
    put(&mut s, Record::Ram(RamRecord::Eos));
    put(&mut s, Record::Footer { section_id: 2 });
    put(&mut s, part(SectionKind::End, 2));
    put_page(&mut s, Some("pc.ram"), 0xf000, &page).unwrap();
    put(&mut s, Record::Ram(RamRecord::Eos));
    put(&mut s, Record::Footer { section_id: 2 });
    epilogue(&mut s);
    s
}

/// Decodes all of `data` fed in `chunk`-sized pieces, then finishes; checks that every
/// record re-encodes to its raw bytes.
fn decode(data: &[u8], chunk: usize) -> Result<(Vec<String>, Vec<u8>), StreamError> {
    let mut dec = Decoder::new();
    let (mut kinds, mut raw) = (Vec::new(), Vec::new());
    for piece in data.chunks(chunk.max(1)) {
        dec.feed(piece);
        while let Some(item) = dec.next_item()? {
            // Whatever the decoder accepts, the encoder reproduces exactly.
            let mut again = Vec::new();
            encode_record(&item.record, &mut again).expect("re-encode");
            assert_eq!(again, item.raw, "record at {}", item.offset);
            raw.extend_from_slice(item.raw);
            kinds.push(kind(&item.record));
        }
    }
    dec.finish()?;
    Ok((kinds, raw))
}

fn kind(r: &Record<'_>) -> String {
    match r {
        Record::Section(h) => format!("{:?}", h.kind),
        Record::Ram(RamRecord::MemSize { .. }) => "MemSize".into(),
        Record::Ram(RamRecord::Page { page, .. }) => format!("Page{}", page.offset),
        Record::Ram(RamRecord::Zero { page, .. }) => format!("Zero{}", page.offset),
        Record::Ram(RamRecord::Eos) => "Eos".into(),
        Record::DeviceState(_) => "Device".into(),
        other => format!("{other:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("")
            .into(),
    }
}

fn decode_err(data: &[u8]) -> StreamError {
    match decode(data, data.len()) {
        Ok(_) => panic!("stream accepted"),
        Err(e) => e,
    }
}

#[test]
fn synthetic_stream_decodes_at_any_chunking() {
    let s = stream();
    let (kinds, raw) = decode(&s, s.len()).expect("decode");
    assert_eq!(raw, s);
    let expect = [
        "Header",
        "Configuration",
        "Start",
        "MemSize",
        "Eos",
        "Footer",
        "Part",
        "Page0",
        "Page4096",
        "Zero8192",
        "Zero4096",
        "Eos",
        "Footer",
        "End",
        "Page61440",
        "Eos",
        "Footer",
        "Full",
        "Device",
    ];
    assert_eq!(kinds, expect);
    for chunk in [1, 2, 3, 5, 8, 13, 4096, 4105] {
        let (_, raw) = decode(&s, chunk).expect("decode");
        assert_eq!(raw, s, "chunk {chunk}");
    }
}

/// QEMU 10 announces the switchover with a command (11, no arguments) between the last
/// iterations and the END sections: it passes through as it came.
#[test]
fn switchover_start_command_passes_through() {
    let mut s = Vec::new();
    prologue(&mut s);
    put(
        &mut s,
        Record::Command {
            cmd: command::SWITCHOVER_START,
            data: &[],
        },
    );
    put(&mut s, part(SectionKind::End, 2));
    put(&mut s, Record::Ram(RamRecord::Eos));
    put(&mut s, Record::Footer { section_id: 2 });
    epilogue(&mut s);
    let (kinds, raw) = decode(&s, 3).expect("decode");
    assert_eq!(raw, s);
    assert!(kinds.iter().any(|k| k == "Command"), "{kinds:?}");
    // An unknown command is still refused, naming its number.
    let mut bad = Vec::new();
    prologue(&mut bad);
    put(&mut bad, Record::Command { cmd: 12, data: &[] });
    let e = decode_err(&bad).to_string();
    assert!(e.contains("unknown command 12"), "{e}");
}

#[test]
fn trailer_found_behind_device_state() {
    let s = stream();
    let mut dec = Decoder::new();
    dec.feed(&s);
    while dec.advance().unwrap() {}
    let t = dec.finish().unwrap();
    let eof = t.eof_offset.unwrap() as usize;
    assert_eq!(s[eof], section_type::EOF);
    assert_eq!(
        t.vmdesc.as_deref(),
        Some(&br#"{"page_size": 4096, "devices": []}"#[..])
    );
    assert_eq!(t.device_state.unwrap().end, s.len() as u64);
}

#[test]
fn stream_without_device_state_yields_eof_and_vmdesc_records() {
    let mut s = Vec::new();
    prologue(&mut s);
    put(&mut s, Record::Eof);
    put(&mut s, Record::VmDesc { json: b"{}" });
    let (kinds, raw) = decode(&s, 3).unwrap();
    assert_eq!(raw, s);
    assert_eq!(&kinds[kinds.len() - 2..], ["Eof", "VmDesc"]);
    // Nothing may follow the description.
    s.push(0);
    assert!(matches!(decode_err(&s).kind, ErrorKind::Malformed(_)));
}

#[test]
fn configuration_subsections_round_trip() {
    let subs = [
        ConfigSubsection::Capabilities {
            version: 1,
            names: vec!["x-ignore-shared".into()],
        },
        ConfigSubsection::Uuid {
            version: 1,
            uuid: [7; 16],
        },
    ];
    let mut s = Vec::new();
    put(&mut s, Record::Header { version: 3 });
    put(
        &mut s,
        Record::Configuration {
            machine: "pc-q35-7.2",
            subsections: &subs,
        },
    );
    put(&mut s, start(2, "ram", 4));
    let b = vec![RamBlock {
        name: "pc.ram".into(),
        used_length: 0x2000,
        shared_addr: Some(0),
    }];
    put(
        &mut s,
        Record::Ram(RamRecord::MemSize {
            total: 0x2000,
            blocks: &b,
        }),
    );
    put(&mut s, Record::Ram(RamRecord::Eos));
    put(&mut s, Record::Eof);
    put(&mut s, Record::VmDesc { json: b"{}" });
    let mut dec = Decoder::new();
    dec.feed(&s);
    let mut seen = 0;
    while let Some(item) = dec.next_item().unwrap() {
        if let Record::Configuration { subsections, .. } = item.record {
            assert_eq!(subsections, &subs);
            seen += 1;
        }
    }
    dec.finish().unwrap();
    assert_eq!(seen, 1);
    assert_eq!(dec.blocks(), &b[..]);
    assert_eq!(dec.machine(), Some("pc-q35-7.2"));
}

/// Stream = prologue + `ram` PART + `body` bytes.
fn in_ram(body: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    prologue(&mut s);
    put(&mut s, part(SectionKind::Part, 2));
    s.extend_from_slice(body);
    s
}

fn word(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

#[test]
fn unsupported_capabilities_are_named() {
    let cap = |body: Vec<u8>| match decode_err(&in_ram(&body)).kind {
        ErrorKind::Capability { capability, .. } => capability,
        other => panic!("{other}"),
    };
    assert_eq!(cap(word(0x40 | 0x20)), "xbzrle");
    assert_eq!(cap(word(0x100)), "compress");
    assert_eq!(cap(word(0x200)), "multifd");

    let mut s = Vec::new();
    put(&mut s, Record::Header { version: 3 });
    put(
        &mut s,
        Record::Command {
            cmd: 3,
            data: &[0; 16],
        },
    );
    let e = decode_err(&s);
    assert!(
        matches!(
            e.kind,
            ErrorKind::Capability {
                capability: "postcopy-ram",
                ..
            }
        ),
        "{e}"
    );
    for (name, want) in [("block", "block"), ("dirty-bitmap", "dirty-bitmaps")] {
        let mut s = Vec::new();
        put(&mut s, Record::Header { version: 3 });
        put(&mut s, start(5, name, 1));
        match decode_err(&s).kind {
            ErrorKind::Capability { capability, .. } => assert_eq!(capability, want),
            other => panic!("{other}"),
        }
    }
    let mut s = Vec::new();
    put(&mut s, Record::Header { version: 3 });
    put(&mut s, start(5, "0000:00:05.0/vfio", 1));
    let e = decode_err(&s);
    assert!(matches!(e.kind, ErrorKind::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("vfio"), "{e}");
}

#[test]
fn errors_carry_offset_and_section() {
    let prefix_len = in_ram(&[]).len() as u64;
    // A page for a block MEM_SIZE never announced.
    let mut body = word(0x08);
    body.push(5);
    body.extend_from_slice(b"ghost");
    let e = decode_err(&in_ram(&body));
    assert_eq!(e.context.offset, prefix_len);
    assert_eq!(e.context.section, Some((2, "ram".to_owned())));
    let msg = e.to_string();
    assert!(
        msg.contains("ghost") && msg.contains("section 2 `ram`"),
        "{msg}"
    );

    // Page past the end of its block.
    let mut body = Vec::new();
    put_zero(&mut body, Some("pc.bios"), 0x2000, 0).unwrap();
    assert!(decode_err(&in_ram(&body)).to_string().contains("outside"));
    // CONTINUE with no previous block.
    assert!(decode_err(&in_ram(&word(0x02 | 0x20)))
        .to_string()
        .contains("CONTINUE"));
    // Two kinds at once, an obsolete flag, a flagless word.
    for w in [0x0a, 0x01, 0x1000] {
        let e = decode_err(&in_ram(&word(w)));
        assert!(matches!(e.kind, ErrorKind::Malformed(_)), "{w:#x}: {e}");
    }
    // PART of a section never started.
    let mut s = Vec::new();
    prologue(&mut s);
    put(&mut s, part(SectionKind::Part, 9));
    assert!(decode_err(&s).to_string().contains("never started"));
    // Footer naming another section.
    let mut s = in_ram(&word(0x10));
    put(&mut s, Record::Footer { section_id: 3 });
    assert!(decode_err(&s).to_string().contains("footer"));
}

#[test]
fn header_and_length_checks() {
    let e = decode_err(b"QEVN\0\0\0\x03");
    assert!(matches!(e.kind, ErrorKind::BadMagic(_)));
    let e = decode_err(b"QEVM\0\0\0\x02");
    assert!(matches!(e.kind, ErrorKind::BadVersion(2)));
    // Machine name length beyond bound.
    let mut s = b"QEVM\0\0\0\x03\x07".to_vec();
    s.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode_err(&s).kind, ErrorKind::TooLong { .. }));
    // Description length beyond bound.
    let mut s = Vec::new();
    prologue(&mut s);
    s.push(0);
    s.push(6);
    s.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode_err(&s).kind, ErrorKind::TooLong { .. }));
    // MEM_SIZE whose blocks do not add up to the total.
    let mut s = Vec::new();
    put(&mut s, Record::Header { version: 3 });
    put(&mut s, start(2, "ram", 4));
    s.extend_from_slice(&word(0x3000 | 0x04));
    s.push(1);
    s.push(b'a');
    s.extend_from_slice(&0x4000u64.to_be_bytes());
    assert!(matches!(decode_err(&s).kind, ErrorKind::Malformed(_)));
    // Non-UTF-8 block name.
    let mut s = Vec::new();
    put(&mut s, Record::Header { version: 3 });
    put(&mut s, start(2, "ram", 4));
    s.extend_from_slice(&word(0x1000 | 0x04));
    s.extend_from_slice(&[1, 0xff]);
    s.extend_from_slice(&0x1000u64.to_be_bytes());
    assert!(decode_err(&s).to_string().contains("UTF-8"));
}

#[test]
fn every_truncation_is_an_error() {
    let s = stream();
    for cut in 0..s.len() {
        let e = match decode(&s[..cut], 4096) {
            Ok(_) => panic!("prefix of {cut} bytes accepted"),
            Err(e) => e,
        };
        assert!(matches!(e.kind, ErrorKind::Truncated(_)), "cut {cut}: {e}");
    }
}

#[test]
fn decoder_is_poisoned_after_an_error() {
    let mut dec = Decoder::new();
    dec.feed(b"XXXXXXXXXXXX");
    assert!(dec.advance().is_err());
    dec.feed(b"QEVM\0\0\0\x03");
    assert!(matches!(
        dec.advance().unwrap_err().kind,
        ErrorKind::Poisoned
    ));
}

#[test]
fn garbage_never_panics() {
    let s = stream();
    // Every single-byte corruption of the valid stream, and random multi-byte ones.
    for i in 0..s.len() {
        for v in [0x00, 0xff, s[i] ^ 0x20] {
            let mut g = s.clone();
            g[i] = v;
            let _ = decode(&g, 977);
        }
    }
    let mut r = rng(42);
    for _ in 0..2000 {
        let mut g = s.clone();
        for _ in 0..(r() % 8 + 1) {
            let i = (r() as usize) % g.len();
            g[i] = r() as u8;
        }
        let cut = (r() as usize) % (g.len() + 1);
        let _ = decode(&g[..cut], (r() % 5000 + 1) as usize);
    }
    // Random bytes, with and without a valid header in front.
    for n in 0..500 {
        let mut g: Vec<u8> = if n % 2 == 0 {
            b"QEVM\0\0\0\x03".to_vec()
        } else {
            Vec::new()
        };
        g.extend((0..(r() % 20000)).map(|_| r() as u8));
        assert!(decode(&g, 4096).is_err(), "random stream {n} accepted");
    }
}
