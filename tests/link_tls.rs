//! The sender–receiver link with TLS, over loopback TCP, through pct's own link code (no
//! QEMU): certificates from `keygen`, a bulk transfer both ways with half-closes, the
//! refusals (a sender of another CA, a receiver whose certificate does not name the host
//! dialled, a peer without TLS), the command line's refusal of a plaintext link, and QEMU
//! streams relayed exactly through the real sender and receiver, TLS or not.

use pct::migrate::link::{self, Accepted, LinkStream, Security};
use pct::migrate::replay::{replay, synthetic_stream, Content, ReplayOptions};
use pct::migrate::tls::certs::{keygen, HostSpec};
use pct::migrate::tls::{Identity, TlsError};
use pct::migrate::wire::WireStats;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn hosts(names: &[&str]) -> Vec<HostSpec> {
    names.iter().map(|n| n.parse().expect("host")).collect()
}

/// A CA and host directories in `dir`.
fn ca(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    keygen(dir, &hosts(names)).expect("keygen").hosts
}

fn tls(dir: &Path) -> Security {
    Security::Tls(Arc::new(Identity::load(dir).expect("load TLS directory")))
}

/// The receiver's side: accepts on `l` within `timeout`, noting refusals.
fn accept(
    l: TcpListener,
    security: Security,
    timeout: Duration,
) -> (Result<Accepted, link::LinkError>, Vec<String>) {
    let mut refused = Vec::new();
    let mut note = |e: &TlsError| refused.push(e.to_string());
    let got = link::accept_peer(&l, &security, timeout, &mut note);
    (got, refused)
}

fn listen() -> (TcpListener, u16) {
    let l = link::listen("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// Deterministic bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `data` in uneven pieces, then half-closes.
fn send_all(mut s: LinkStream, data: &[u8]) {
    let mut at = 0;
    let mut k = 1usize;
    while at < data.len() {
        k = (k * 7 + 13) % 300_000 + 1;
        let n = k.min(data.len() - at);
        s.write_all(&data[at..at + n]).expect("write");
        at += n;
    }
    s.shutdown(Shutdown::Write).expect("half-close");
}

fn read_all(mut s: LinkStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read to the end");
    v
}

/// A TLS link between a receiver (`recv_dir`) and a sender (`send_dir`) dialling
/// 127.0.0.1, hellos exchanged.
fn tls_pair(recv_dir: &Path, send_dir: &Path) -> (LinkStream, LinkStream, Accepted2) {
    let (l, port) = listen();
    let security = tls(recv_dir);
    let receiving = std::thread::spawn(move || {
        let (got, refused) = accept(l, security, Duration::from_secs(20));
        let mut got = got.expect("accepted");
        assert!(refused.is_empty(), "{refused:?}");
        let mut stats = WireStats::default();
        link::hello_as_receiver(&mut got.link, &mut stats, Duration::from_secs(10), |_| {
            Ok(())
        })
        .expect("receiver's hello");
        got
    });
    let (mut s, peer) = link::dial(
        &format!("127.0.0.1:{port}"),
        &tls(send_dir),
        Duration::from_secs(10),
    )
    .expect("dial");
    let mut stats = WireStats::default();
    link::hello_as_sender(&mut s, "", &mut stats, Duration::from_secs(10)).expect("sender's hello");
    let got = receiving.join().expect("receiver thread");
    let peers = Accepted2 {
        receiver: peer.expect("TLS peer").subject,
        sender: got.peer.as_ref().expect("TLS peer").subject.clone(),
        suite: got.peer.as_ref().expect("TLS peer").suite.clone(),
    };
    (s, got.link, peers)
}

/// Who each end saw.
struct Accepted2 {
    receiver: String,
    sender: String,
    suite: String,
}

#[test]
fn bulk_both_ways_with_half_closes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);
    let (sender, receiver, peers) = tls_pair(&dirs[0], &dirs[1]);
    assert_eq!(peers.receiver, "CN=127.0.0.1, IP:127.0.0.1");
    assert_eq!(peers.sender, "CN=src-host, DNS:src-host");
    // TLS 1.3, with the hybrid post-quantum key exchange both ends prefer.
    assert!(peers.suite.starts_with("TLS13_"), "{}", peers.suite);
    assert!(peers.suite.ends_with(", X25519MLKEM768"), "{}", peers.suite);

    // 64 MiB each way at once: each end writes from one thread and reads from another, as
    // the sender and receiver do.
    const LEN: usize = 64 << 20;
    let (up, down) = (Arc::new(bytes(1, LEN)), Arc::new(bytes(2, LEN)));
    let threads = [
        (sender.try_clone().expect("clone"), up.clone()),
        (receiver.try_clone().expect("clone"), down.clone()),
    ]
    .map(|(s, data)| std::thread::spawn(move || send_all(s, &data)));
    let readers = [sender, receiver].map(|s| std::thread::spawn(move || read_all(s)));
    for t in threads {
        t.join().expect("writer");
    }
    let [at_sender, at_receiver] = readers.map(|t| t.join().expect("reader"));
    assert!(
        at_receiver.len() == LEN && at_receiver == *up,
        "sender → receiver"
    );
    assert!(
        at_sender.len() == LEN && at_sender == *down,
        "receiver → sender"
    );
}

#[test]
fn half_close_then_reply() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);
    let (sender, receiver, _) = tls_pair(&dirs[0], &dirs[1]);
    // The sender says all it has and half-closes; the receiver reads to the end, and only
    // then answers on the direction still open.
    let question = bytes(3, 5 << 20);
    let answer = bytes(4, 3 << 20);
    let s2 = sender.try_clone().expect("clone");
    let q = question.clone();
    let asking = std::thread::spawn(move || send_all(s2, &q));
    let a = answer.clone();
    let answering = std::thread::spawn(move || {
        let mut r2 = receiver.try_clone().expect("clone");
        let got = read_all(receiver);
        // As the receiver's last frames: written, then sent before the process may exit.
        r2.write_all(&a).expect("answer");
        assert!(
            r2.finish_sending(Duration::from_secs(10)),
            "the pump sent it all"
        );
        got
    });
    asking.join().expect("asking");
    let heard = read_all(sender);
    assert!(answering.join().expect("answering") == question);
    assert!(heard == answer);
}

/// A receiver that goes away mid-stream: the sender's writes fail, they do not hang.
#[test]
fn a_peer_going_away_fails_the_other_end() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);
    let (mut sender, mut receiver, _) = tls_pair(&dirs[0], &dirs[1]);
    let data = bytes(5, 256 << 20);
    let writing = std::thread::spawn(move || {
        let r = sender.write_all(&data);
        (r, sender.tls_failure())
    });
    let mut first = vec![0u8; 1 << 20];
    receiver.read_exact(&mut first).expect("the first MiB");
    drop(receiver);
    let (r, why) = writing.join().expect("writer");
    eprintln!("sender: {r:?}, TLS: {why:?}");
    assert!(
        r.is_err(),
        "the sender's writes fail once the receiver is gone"
    );
}

#[test]
fn sender_of_another_ca_is_refused_with_who_and_why() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ours = ca(&tmp.path().join("ours"), &["127.0.0.1", "src-host"]);
    let theirs = ca(&tmp.path().join("theirs"), &["intruder"]);
    // The intruder trusts our CA (it knows the receiver) but holds a certificate of its
    // own CA: users may bring their own files, in the same layout.
    let intruder = tmp.path().join("intruder");
    std::fs::create_dir(&intruder).expect("mkdir");
    std::fs::copy(ours[0].join("ca.pem"), intruder.join("ca.pem")).expect("copy");
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(theirs[0].join(f), intruder.join(f)).expect("copy");
    }

    let (l, port) = listen();
    let security = tls(&ours[0]);
    let receiving = std::thread::spawn(move || accept(l, security, Duration::from_secs(20)));
    let to = format!("127.0.0.1:{port}");
    let (mut s, _) = link::dial(&to, &tls(&intruder), Duration::from_secs(10))
        .expect("TLS 1.3: the client's part of the handshake ends before the server's verdict");
    let mut stats = WireStats::default();
    let err = link::hello_as_sender(&mut s, "", &mut stats, Duration::from_secs(10))
        .expect_err("refused")
        .to_string();
    eprintln!("sender: {err}");
    assert!(
        err.contains("the receiver refused this end's certificate"),
        "{err}"
    );

    // The receiver waits on, and takes the right sender.
    let (_good, _) = link::dial(&to, &tls(&ours[1]), Duration::from_secs(10)).expect("dial");
    let (got, refused) = receiving.join().expect("receiver");
    let got = got.expect("the right sender is accepted");
    assert_eq!(
        got.peer.expect("TLS peer").subject,
        "CN=src-host, DNS:src-host"
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    let why = &refused[0];
    eprintln!("receiver: {why}");
    assert!(why.starts_with("refused sender 127.0.0.1:"), "{why}");
    assert!(why.contains("not signed by this receiver's CA"), "{why}");
    assert!(
        why.contains("it is CN=intruder, DNS:intruder, issued by CN=pct migration CA "),
        "{why}"
    );
}

/// Connections that are no sender (a port scan) are refused; the receiver waits on.
#[test]
fn a_port_scan_does_not_stop_the_receiver() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);
    let (l, port) = listen();
    let security = tls(&dirs[0]);
    let receiving = std::thread::spawn(move || accept(l, security, Duration::from_secs(20)));
    for garbage in [&b""[..], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut probe = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        probe.write_all(garbage).expect("probe");
        drop(probe);
    }
    let (_good, _) = link::dial(
        &format!("127.0.0.1:{port}"),
        &tls(&dirs[1]),
        Duration::from_secs(10),
    )
    .expect("dial");
    let (got, refused) = receiving.join().expect("receiver");
    eprintln!("receiver: {refused:?}");
    assert!(got.is_ok(), "the sender after the probes is accepted");
    assert_eq!(refused.len(), 2, "{refused:?}");
}

#[test]
fn receiver_not_named_as_dialled_is_refused_by_the_sender() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["otherhost", "src-host"]);
    let (l, port) = listen();
    let security = tls(&dirs[0]);
    let receiving = std::thread::spawn(move || accept(l, security, Duration::from_secs(3)));
    let err = link::dial(
        &format!("127.0.0.1:{port}"),
        &tls(&dirs[1]),
        Duration::from_secs(10),
    )
    .expect_err("the receiver's certificate names otherhost, not 127.0.0.1")
    .to_string();
    eprintln!("sender: {err}");
    assert!(
        err.contains("the receiver's certificate does not name the host in --to"),
        "{err}"
    );
    assert!(
        err.contains("127.0.0.1") && err.contains("otherhost"),
        "{err}"
    );
    let (got, refused) = receiving.join().expect("receiver");
    assert!(matches!(got, Err(link::LinkError::AcceptTimeout { .. })));
    eprintln!("receiver: {refused:?}");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("the sender refused this end's certificate"),
        "{refused:?}"
    );
}

#[test]
fn tls_and_plaintext_ends_do_not_mix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);

    // A plaintext sender at a TLS receiver: refused at the handshake, the receiver says so.
    let (l, port) = listen();
    let security = tls(&dirs[0]);
    let receiving = std::thread::spawn(move || accept(l, security, Duration::from_secs(3)));
    let to = format!("127.0.0.1:{port}");
    let (mut s, _) = link::dial(&to, &Security::Plaintext, Duration::from_secs(10)).expect("tcp");
    let mut stats = WireStats::default();
    let err =
        link::hello_as_sender(&mut s, "", &mut stats, Duration::from_secs(10)).expect_err("no TLS");
    eprintln!("plaintext sender: {err}");
    let (_, refused) = receiving.join().expect("receiver");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("does not speak TLS"), "{refused:?}");

    // A TLS sender at a plaintext receiver: each end says what is wrong.
    let (l, port) = listen();
    let receiving = std::thread::spawn(move || {
        let (got, _) = accept(l, Security::Plaintext, Duration::from_secs(10));
        let mut got = got.expect("tcp");
        let mut stats = WireStats::default();
        link::hello_as_receiver(&mut got.link, &mut stats, Duration::from_secs(10), |_| {
            Ok(())
        })
    });
    let err = link::dial(
        &format!("127.0.0.1:{port}"),
        &tls(&dirs[1]),
        Duration::from_secs(10),
    )
    .expect_err("no TLS")
    .to_string();
    eprintln!("TLS sender: {err}");
    assert!(err.contains("does not speak TLS"), "{err}");
    let err = receiving
        .join()
        .expect("receiver")
        .expect_err("no pct hello")
        .to_string();
    eprintln!("plaintext receiver: {err}");
    assert!(err.contains("--tls-dir"), "{err}");
}

fn pct_migrate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pct-migrate"))
        .args(args)
        .output()
        .expect("run pct-migrate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plaintext_is_refused_at_the_command_line() {
    let commands: [&[&str]; 3] = [
        &["--qmp", "/nonexistent/qmp.sock", "--to", "127.0.0.1:1"],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:1",
            "--accept-timeout",
            "1",
        ],
        &[
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--disk",
            "/nonexistent/disk.img",
        ],
    ];
    for args in commands {
        let (ok, err) = pct_migrate(args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("refusing to migrate over an unprotected link")
                && err.contains("--tls-dir")
                && err.contains("--insecure-plaintext"),
            "{args:?}: {err}"
        );
        // With the flag it starts, says loudly what it means, and fails further on.
        let mut args = args.to_vec();
        args.push("--insecure-plaintext");
        let (ok, err) = pct_migrate(&args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("WARNING") && err.contains("UNENCRYPTED"),
            "{err}"
        );
        assert!(!err.contains("refusing"), "{err}");
    }
    let (ok, err) = pct_migrate(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--qmp",
        "/x",
        "--disk",
        "/x",
        "--insecure-plaintext",
        "--tls-dir",
        "/x",
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

#[test]
fn keygen_writes_the_layout() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("pki");
    let out_s = out.to_str().expect("utf-8");
    let (ok, err) = pct_migrate(&["keygen", "--out", out_s, "dst,10.0.0.2", "src"]);
    assert!(ok, "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("ca-key.pem")), 0o600);
    for h in ["dst", "src"] {
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            assert!(out.join(h).join(f).is_file(), "{h}/{f}");
        }
        assert_eq!(mode(&out.join(h).join("key.pem")), 0o600);
        assert_eq!(
            std::fs::read(out.join(h).join("ca.pem")).expect("read"),
            std::fs::read(out.join("ca.pem")).expect("read")
        );
    }
    let dst = Identity::load(&out.join("dst")).expect("load");
    assert_eq!(dst.subject(), "CN=dst, DNS:dst, IP:10.0.0.2");
    // The same CA signs later hosts; an existing host is not overwritten.
    let (ok, err) = pct_migrate(&["keygen", "--out", out_s, "later"]);
    assert!(ok, "{err}");
    let (ok, err) = pct_migrate(&["keygen", "--out", out_s, "src"]);
    assert!(!ok && err.contains("exists already"), "{err}");
    let (ok, _) = pct_migrate(&["keygen", "--out", out_s, "../escape"]);
    assert!(!ok);
}

/// QEMU streams through the real sender and receiver: exact, with and without TLS and
/// zstd.
#[test]
fn streams_relay_exactly_through_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dirs = ca(tmp.path(), &["127.0.0.1", "src-host"]);
    let stream = Arc::new(synthetic_stream(24 << 20, Content::Mixed).expect("stream"));
    for (sec_r, sec_s) in [
        (tls(&dirs[0]), tls(&dirs[1])),
        (Security::Plaintext, Security::Plaintext),
    ] {
        for zstd in [None, Some(1)] {
            let opts = ReplayOptions {
                sender_security: sec_s.clone(),
                receiver_security: sec_r.clone(),
                host: "127.0.0.1".into(),
                sender: pct::migrate::sender::SenderOptions {
                    zstd_level: zstd,
                    ..Default::default()
                },
                receiver: Default::default(),
                verify: true,
            };
            let r = replay(stream.clone(), &opts).expect("replay");
            eprintln!(
                "{:?} zstd {zstd:?}: {:.0} MB/s, wire {} bytes",
                r.peers,
                r.mb_per_s(),
                r.wire_bytes
            );
            assert_eq!(r.identical, Some(true));
            assert_eq!(r.out_bytes, stream.len() as u64);
            assert!(r.refused.is_empty());
        }
    }
}

/// The receiver judges the sender's hello before it answers (protocol 4): it sees the VM
/// the sender names and who the sender is (its certificate's names, one by one), and a
/// refusal reaches the sender as the receiver's own words, sanitized.
#[test]
fn hello_admission() {
    let d = tempfile::tempdir().expect("tmp");
    let dirs = ca(d.path(), &["127.0.0.1", "src-a,src-a.example"]);
    for (vm, admit, want) in [
        ("web-1", true, None),
        (
            "web-2",
            false,
            Some("src-a may not migrate VM `web-2` \\x1b[2J"),
        ),
    ] {
        let (l, port) = listen();
        let security = tls(&dirs[0]);
        let receiving = std::thread::spawn(move || {
            let (got, _) = accept(l, security, Duration::from_secs(10));
            let mut got = got.expect("accepted");
            let names = got.peer.as_ref().expect("TLS peer").names.clone();
            let mut stats = WireStats::default();
            link::hello_as_receiver(&mut got.link, &mut stats, Duration::from_secs(10), |h| {
                assert!(names.has("src-a") && names.has("src-a.example") && !names.has("src"));
                match admit {
                    true => Ok(h.vm.clone()),
                    // A hostile receiver's words are escaped on the sender's terminal.
                    false => Err(format!("src-a may not migrate VM `{}` \x1b[2J", h.vm)),
                }
            })
            .map(|(_, vm)| vm)
        });
        let (mut s, _) = link::dial(
            &format!("127.0.0.1:{port}"),
            &tls(&dirs[1]),
            Duration::from_secs(10),
        )
        .expect("dial");
        let mut stats = WireStats::default();
        let sent = link::hello_as_sender(&mut s, vm, &mut stats, Duration::from_secs(10));
        let judged = receiving.join().expect("receiver thread");
        match want {
            None => {
                sent.expect("admitted");
                assert_eq!(judged.expect("admitted"), vm);
            }
            Some(why) => {
                let err = sent.expect_err("refused").to_string();
                eprintln!("sender: {err}");
                assert_eq!(err, format!("the receiver refused this migration: {why}"));
                assert!(judged
                    .expect_err("refused")
                    .to_string()
                    .starts_with("refused: "));
            }
        }
    }
}
