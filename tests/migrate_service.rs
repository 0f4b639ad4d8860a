//! The receiver as a service (`pct-migrate receive --config FILE`), on real guests:
//!
//! - senders that name a VM they may not migrate, one not configured, or none are refused at
//!   their hello, each told why; their source guests never start migrating and run on;
//! - then two guests migrate at the same time through the one service, each into the VM
//!   its certificate may target: both destinations bit-identical to their sources at pause,
//!   pages teleported, each guest re-verifies its files there, and the service reports one
//!   JSON line per migration and stops after the two (`--sessions 2`).

mod support;

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use support::lab::{have_qemu, Guest, GuestSpec};
use support::migrate::*;
use support::profile::lab_profile;

/// A sender of `src` to the service at `to`, as `tls_dir`, naming `vm` (if any).
fn sender(src: &Guest, to: &str, tls_dir: &str, vm: Option<&str>) -> Pct {
    let profile = lab_profile("cloud-amd64").0;
    let qmp = src.qmp_path();
    let mut args = vec![
        "--profile",
        profile.to_str().expect("path"),
        "--qmp",
        qmp.to_str().expect("path"),
        "--to",
        to,
        "--tls-dir",
        tls_dir,
        "--json",
    ];
    if let Some(vm) = vm {
        args.extend(["--vm", vm]);
    }
    Pct::spawn("sender", &args)
}

fn write_config(path: &Path, port: u16, tls: &str, vms: &[(&str, &Guest, &Path, &str)]) {
    let mut text = format!("listen = \"127.0.0.1:{port}\"\ntls_dir = \"{tls}\"\n");
    for (name, dst, disk, sender) in vms {
        text += &format!(
            "\n[[vm]]\nname = \"{name}\"\nqmp = \"{}\"\ndisk = \"{}\"\nsenders = [\"{sender}\"]\n",
            dst.qmp_path().display(),
            disk.display()
        );
    }
    std::fs::write(path, text).expect("write the service's configuration");
}

#[test]
fn two_vms_through_one_service() {
    if !have_qemu() {
        return;
    }
    let spec = GuestSpec::new("apache").layout("mini", "plain");
    let (src_a, mut dst_a, disk_a) = pair(&spec);
    let (src_b, mut dst_b, disk_b) = pair(&spec);
    let pki = tempfile::tempdir().expect("tmp");
    let tls = keygen(pki.path(), &["127.0.0.1", "src-a", "src-b"]);
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let config = pki.path().join("receiver.toml");
    write_config(
        &config,
        port,
        &tls[0],
        &[
            ("web-a", &dst_a, &disk_a, "src-a"),
            ("web-b", &dst_b, &disk_b, "src-b"),
        ],
    );
    let service = Pct::spawn(
        "service",
        &[
            "receive",
            "--config",
            config.to_str().expect("path"),
            "--sessions",
            "2",
            "--json",
        ],
    );
    wait_listening(None, port, Duration::from_secs(30));

    // Refused at the hello, each with its reason, before the source QEMU is asked to
    // migrate.
    let refusals = [
        (
            &tls[2],
            Some("web-a"),
            "CN=src-b, DNS:src-b may not migrate VM `web-a`",
        ),
        (&tls[1], Some("web-z"), "no VM `web-z` is configured here"),
        (&tls[1], None, "name the one to migrate (--vm NAME)"),
    ];
    for (tls_dir, vm, why) in refusals {
        let t = Instant::now();
        let out = sender(&src_a, &to, tls_dir, vm).wait(Duration::from_secs(120));
        let detection = t.elapsed();
        let err = text(&out.stderr);
        eprintln!("sender naming {vm:?}: {}\n{err}", out.status);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("the receiver refused this migration: {why}")),
            "{err}"
        );
        assert_eq!(
            src_a.exec("query-migrate", Value::Null)["status"].as_str(),
            None,
            "the source QEMU was asked to migrate"
        );
        eprintln!(
            "| sender naming {} | refused at the hello, no migration started: \"{why}\" | {:.1} s |",
            vm.unwrap_or("no VM"),
            detection.as_secs_f64()
        );
    }
    assert_eq!(src_a.status(), "running");

    // Both at once.
    let a = sender(&src_a, &to, &tls[1], Some("web-a"));
    let b = sender(&src_b, &to, &tls[2], Some("web-b"));
    let (a, b) = (
        a.wait(Duration::from_secs(300)),
        b.wait(Duration::from_secs(300)),
    );
    let served = service.wait(Duration::from_secs(120));
    let log = text(&served.stderr);
    eprintln!(
        "sender a: {}\n{}\nsender b: {}\n{}\nservice: {}\n{log}",
        a.status,
        text(&a.stderr),
        b.status,
        text(&b.stderr),
        served.status
    );
    assert!(a.status.success() && b.status.success() && served.status.success());
    for line in [
        "refused the sender at 127.0.0.1:",
        "(CN=src-b, DNS:src-b): CN=src-b, DNS:src-b may not migrate VM `web-a`",
        "vm web-a: receiving from 127.0.0.1:",
        "vm web-b: receiving from 127.0.0.1:",
        "receiver service stopped: 2 received, 0 failed, 3 refused; peak RSS ",
    ] {
        assert!(log.contains(line), "{line:?} not in the service's log");
    }
    // One JSON line per migration, each naming its VM and its sender.
    let reports: Vec<Value> = text(&served.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (vm, who) in [("web-a", "CN=src-a"), ("web-b", "CN=src-b")] {
        let r = reports
            .iter()
            .find(|r| r["vm"] == vm)
            .unwrap_or_else(|| panic!("no report for {vm}"));
        assert!(
            r["sender"].as_str().is_some_and(|s| s.starts_with(who)),
            "{r}"
        );
        assert!(r["ref_pages"].as_u64().is_some_and(|n| n > 9000), "{r}");
    }
    let profile = lab_profile("cloud-amd64").1;
    for (src, dst, out) in [(&src_a, &mut dst_a, &a), (&src_b, &mut dst_b, &b)] {
        let s: Value = serde_json::from_slice(&out.stdout).expect("sender's JSON summary");
        let teleported = s["pages"]["teleported"].as_u64().expect("teleported");
        assert!(teleported > 9000, "only {teleported} pages teleported");
        assert_eq!(src.status(), "postmigrate");
        assert_identical_with(src, dst, &profile);
        eprintln!(
            "{}: {teleported} pages teleported, wire {} bytes",
            dst.qmp_path().display(),
            s["wire"]["total"]
        );
    }
    drop((src_a, src_b));
    for dst in [&mut dst_a, &mut dst_b] {
        dst.cont();
        let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
        assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
    }
}
