//! Migrations that a VM manager drives, with pct in the middle and no monitor of its own:
//! the test plays libvirt on the QEMUs' only monitors, the way libvirt does it
//! (`migrate-incoming tcp:…` on the destination, `migrate tcp:…` on the source), and pct
//! runs as `pct-migrate proxy` on the source side and `pct-migrate receive
//! --qemu-incoming` on the destination side. Guest RAM is anonymous, libvirt's default.
//!
//! - the destination's RAM equals the source's at pause, pages were teleported, and the
//!   guest re-verifies its files at the destination; proxy and receiver talk TLS, with
//!   certificates from `pct-migrate keygen`, and each names the other;
//! - a receiver that cannot be reached fails the source QEMU's migration, and the guest
//!   runs on at the source: the outcome a manager expects of any failed migration;
//! - a link cut midway fails both QEMUs' migrations, both ends of pct report it at once,
//!   and the guest runs on at the source.
//!
//! tests/migrate_libvirt.rs runs the same with real libvirt daemons.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use support::lab::{have_qemu, Guest, GuestSpec};
use support::migrate::*;
use support::profile::lab_profile;

/// The source QEMU's migration status once final (`completed`, `failed`…).
fn wait_migration_final(g: &Guest, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let info = g.exec("query-migrate", Value::Null);
        let status = info["status"].as_str().unwrap_or("none");
        if matches!(status, "completed" | "failed" | "cancelled") {
            return info;
        }
        assert!(
            start.elapsed() < timeout,
            "migration still {status} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the source QEMU's migration to `uri` as libvirt does (no bandwidth cap).
fn migrate_as_libvirt(src: &Guest, uri: &str) {
    src.exec(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 40 }),
    );
    src.exec("migrate", json!({ "uri": uri }));
}

/// Has the destination QEMU listen for the stream on `qemu_port`, as libvirt's does after
/// `-incoming defer`, and starts `pct-migrate receive --qemu-incoming` there, listening on
/// `recv_port`; `link`: its `--tls-dir DIR` or `--insecure-plaintext`.
fn managed_receiver(
    dst: &Guest,
    disk: &Path,
    qemu_port: u16,
    recv_port: u16,
    link: &[&str],
) -> Pct {
    dst.exec(
        "migrate-incoming",
        json!({ "uri": format!("tcp:127.0.0.1:{qemu_port}") }),
    );
    let (listen, incoming) = (
        format!("127.0.0.1:{recv_port}"),
        format!("127.0.0.1:{qemu_port}"),
    );
    let mut args = vec![
        "receive",
        "--listen",
        &listen,
        "--qemu-incoming",
        &incoming,
        "--disk",
        disk.to_str().expect("path"),
        "--json",
    ];
    args.extend_from_slice(link);
    Pct::spawn("receiver", &args)
}

/// `pct-migrate proxy` listening on `port` for the source QEMU, sending to `to`, in
/// plaintext.
fn plaintext_proxy(port: u16, to: u16) -> Pct {
    let profile = lab_profile("cloud-amd64");
    Pct::spawn(
        "proxy",
        &[
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--to",
            &format!("127.0.0.1:{to}"),
            "--profile",
            profile.0.to_str().expect("path"),
            "--insecure-plaintext",
        ],
    )
}

#[test]
fn proxy_in_a_manager_driven_migration() {
    if !have_qemu() {
        return;
    }
    let mut spec = GuestSpec::new("apache").layout("mini", "plain");
    spec.anon_ram = true;
    let (src, mut dst, disk) = pair(&spec);
    let (qemu_port, recv_port, proxy_port) = (free_port(), free_port(), free_port());
    // TLS between proxy and receiver: the receiver is dialled as 127.0.0.1.
    let pki = tempfile::tempdir().expect("tmp");
    let tls = keygen(pki.path(), &["127.0.0.1", "src-host"]);
    let (recv_tls, proxy_tls) = (tls[0].clone(), tls[1].clone());
    let receiver = managed_receiver(&dst, &disk, qemu_port, recv_port, &["--tls-dir", &recv_tls]);
    let profile = lab_profile("cloud-amd64");
    let proxy = Pct::spawn(
        "proxy",
        &[
            "proxy",
            "--listen",
            &format!("127.0.0.1:{proxy_port}"),
            "--to",
            &format!("127.0.0.1:{recv_port}"),
            "--profile",
            profile.0.to_str().expect("path"),
            "--json",
            "--tls-dir",
            &proxy_tls,
        ],
    );
    wait_listening(None, proxy_port, Duration::from_secs(30));
    migrate_as_libvirt(&src, &format!("tcp:127.0.0.1:{proxy_port}"));
    let info = wait_migration_final(&src, Duration::from_secs(300));
    let proxy = proxy.wait(Duration::from_secs(120));
    let receiver = receiver.wait(Duration::from_secs(60));
    eprintln!(
        "source QEMU: {info}\nproxy: {}\n{}\nreceiver: {}\n{}{}",
        proxy.status,
        text(&proxy.stderr),
        receiver.status,
        text(&receiver.stdout),
        text(&receiver.stderr)
    );
    assert_eq!(info["status"], "completed", "{info}");
    assert!(proxy.status.success() && receiver.status.success());
    let s: Value = serde_json::from_slice(&proxy.stdout).expect("proxy's JSON summary");
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    assert!(
        text(&proxy.stderr).contains(&format!("process {}", src.pid())),
        "the proxy names the source QEMU's process"
    );
    // Each end names the other, from its certificate.
    assert!(
        text(&proxy.stderr).contains("receiver: CN=127.0.0.1, IP:127.0.0.1 (TLS 1.3"),
        "the proxy names the receiver"
    );
    assert!(
        text(&receiver.stderr).contains(": CN=src-host, DNS:src-host (TLS 1.3"),
        "the receiver names its sender"
    );
    let dst_info = wait_migration_final(&dst, Duration::from_secs(60));
    assert_eq!(dst_info["status"], "completed", "{dst_info}");
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    assert_identical_with(&src, &dst, &profile.1);

    let teleported = s["pages"]["teleported"].as_u64().expect("teleported");
    assert!(teleported > 9000, "only {teleported} pages teleported");
    assert_eq!(
        s["pages"]["verified"].as_u64().unwrap_or(0)
            + s["pages"]["fallen_back"].as_u64().unwrap_or(0),
        teleported
    );
    // QEMU 7.2 under TCG: the check ran over the stopped guest's RAM, read from QEMU's
    // process.
    assert_eq!(s["switchover_check"]["pages_checked"], 262_144, "{s}");
    // The map read only what the walkers needed of the 1 GiB of anonymous RAM.
    let copied = s["ram_copied_bytes"].as_u64().expect("ram_copied_bytes");
    assert!(copied > 0 && copied < (1 << 30) / 10, "{copied}");
    eprintln!(
        "manager-driven: {teleported} pages teleported, wire {} of stream {} bytes, \
         switchover check re-sent {}, {:.1} MB of guest RAM read into the proxy",
        s["wire"]["total"],
        s["stream_bytes"],
        s["switchover_check"]["pages_resent"],
        copied as f64 / 1e6
    );

    drop(src);
    dst.cont();
    let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}

/// No receiver where the proxy is to send: the source QEMU's migration fails and the guest
/// runs on at the source, as after any failed migration; the proxy says why.
#[test]
fn proxy_failure_leaves_the_source_running() {
    if !have_qemu() {
        return;
    }
    let mut spec = GuestSpec::new("idle").layout("mini", "plain");
    spec.anon_ram = true;
    let mut src = Guest::start(spec);
    src.wait_ready();
    let (nobody, proxy_port) = (free_port(), free_port());
    let proxy = plaintext_proxy(proxy_port, nobody);
    wait_listening(None, proxy_port, Duration::from_secs(30));
    migrate_as_libvirt(&src, &format!("tcp:127.0.0.1:{proxy_port}"));
    let proxy = proxy.wait(Duration::from_secs(120));
    let info = wait_migration_final(&src, Duration::from_secs(60));
    let err = text(&proxy.stderr);
    eprintln!("source QEMU: {info}\nproxy: {}\n{err}", proxy.status);
    assert!(!proxy.status.success());
    assert!(err.contains(&format!("127.0.0.1:{nobody}")), "{err}");
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.status(), "running");
    let line = src.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}

/// The link between proxy and receiver cut a third of the way in: the source QEMU's
/// migration fails and the guest runs on at the source, and both ends of pct report at once.
/// The receiver must not wait for the destination QEMU, which waits for the rest of the
/// stream: it closes QEMU's channel, so QEMU's load fails too.
#[test]
fn link_cut_in_a_manager_driven_migration() {
    if !have_qemu() {
        return;
    }
    let mut spec = GuestSpec::new("apache").layout("mini", "plain");
    spec.anon_ram = true;
    let (mut src, mut dst, disk) = pair(&spec);
    let (qemu_port, recv_port, proxy_port) = (free_port(), free_port(), free_port());
    let receiver = managed_receiver(&dst, &disk, qemu_port, recv_port, &["--insecure-plaintext"]);
    wait_listening(None, recv_port, Duration::from_secs(30));
    let relay = Relay::new(Some(8 << 20));
    let via = relay.via()(recv_port);
    let proxy = plaintext_proxy(proxy_port, via);
    wait_listening(None, proxy_port, Duration::from_secs(30));
    migrate_as_libvirt(&src, &format!("tcp:127.0.0.1:{proxy_port}"));
    let start = Instant::now();
    while !relay.was_cut.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the relay forwarded only {} bytes",
            relay.forwarded.load(std::sync::atomic::Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = Instant::now();
    let receiver = receiver.wait(Duration::from_secs(60));
    let receiver_after = cut.elapsed();
    let proxy = proxy.wait(Duration::from_secs(60));
    let proxy_after = cut.elapsed();
    let info = wait_migration_final(&src, Duration::from_secs(60));
    // A QEMU whose incoming migration fails exits (QEMU before 9.0 always; later ones by
    // default, `exit-on-error`).
    let dst_exit = dst.wait_exit(Duration::from_secs(30));
    eprintln!(
        "source QEMU: {info}\ndestination QEMU: {dst_exit:?}\nproxy ({proxy_after:?} after \
         the cut): {}\n{}\nreceiver ({receiver_after:?} after the cut): {}\n{}",
        proxy.status,
        text(&proxy.stderr),
        receiver.status,
        text(&receiver.stderr)
    );
    assert!(!receiver.status.success() && !proxy.status.success());
    assert!(
        receiver_after < Duration::from_secs(20),
        "the receiver took {receiver_after:?} to report the cut"
    );
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        dst_exit.is_some_and(|s| !s.success()),
        "the destination QEMU is still there, or exited 0: {dst_exit:?}\n{}",
        dst.log_tail()
    );
    assert_eq!(src.status(), "running");
    let line = src.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}
