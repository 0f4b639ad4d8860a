//! The receiver as a service (`pct-migrate receive --config FILE`), on real guests:
//!
//! - senders that name a VM they may not migrate, one not configured, or none are refused at
//!   their hello, each told why; their source guests never start migrating and run on;
//! - then `pct-migrate evacuate` migrates both guests at the same time through the one
//!   service, under one `--bandwidth` cap for both: both destinations bit-identical to
//!   their sources at pause, pages teleported, the cap held by their sum, each guest
//!   re-verifies its files there; the evacuation reports per-VM JSON lines and
//!   its peak RSS, and the service one JSON line per migration, stopping after the two
//!   (`--sessions 2`).

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
    for (name, dst, disk, senders) in vms {
        text += &format!(
            "\n[[vm]]\nname = \"{name}\"\nqmp = \"{}\"\ndisk = \"{}\"\nsenders = {senders}\n",
            dst.qmp_path().display(),
            disk.display()
        );
    }
    std::fs::write(path, text).expect("write the service's configuration");
}

#[test]
fn an_evacuation_through_one_service() {
    if !have_qemu() {
        return;
    }
    let spec = GuestSpec::new("apache").layout("mini", "plain");
    let (mut src_a, mut dst_a, disk_a) = pair(&spec);
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
            ("web-a", &dst_a, &disk_a, r#"["src-a"]"#),
            ("web-b", &dst_b, &disk_b, r#"["src-b", "src-a"]"#),
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
        (
            &tls[1],
            None,
            "this receiver serves several VMs: name the one to migrate (--vm NAME)",
        ),
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
    // The source guest runs on, unchanged.
    assert_eq!(src_a.status(), "running");
    let line = src_a.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");

    // Both at once, from one host.
    let profile_path = lab_profile("cloud-amd64").0;
    let (qmp_a, qmp_b) = (src_a.qmp_path(), src_b.qmp_path());
    let (vm_a, vm_b) = (
        format!("web-a={}", qmp_a.display()),
        format!("web-b={}", qmp_b.display()),
    );
    let evacuation = Pct::spawn(
        "evacuate",
        &[
            "evacuate",
            "--vm",
            &vm_a,
            "--vm",
            &vm_b,
            "--to",
            &to,
            "--tls-dir",
            &tls[1],
            "--profile",
            profile_path.to_str().expect("path"),
            "--bandwidth",
            "16mbit",
            "--json",
        ],
    )
    .wait(Duration::from_secs(400));
    let (events, reports, log) = finish_evacuation(evacuation, service);
    for line in [
        "refused the sender at 127.0.0.1:",
        "(CN=src-b, DNS:src-b): CN=src-b, DNS:src-b may not migrate VM `web-a`",
        "vm web-a: receiving from 127.0.0.1:",
        "vm web-b: receiving from 127.0.0.1:",
        "receiver service stopped: 2 received, 0 failed, 3 refused; peak RSS ",
    ] {
        assert!(log.contains(line), "{line:?} not in the service's log");
    }
    // The evacuation: progress lines for each VM, then each VM's summary, then the whole.
    let done = |vm: &str| -> Value {
        events
            .iter()
            .find(|e| e["vm"] == vm && e["event"] == "done")
            .unwrap_or_else(|| panic!("no summary for {vm}"))["summary"]
            .clone()
    };
    for vm in ["web-a", "web-b"] {
        assert!(
            events
                .iter()
                .any(|e| e["vm"] == vm && e["event"] == "progress"),
            "no progress for {vm}"
        );
    }
    let last = events.last().expect("events");
    eprintln!("evacuation: {last}");
    // `--bandwidth` caps the two VMs together: 2 MB/s over the whole evacuation at most
    // (its setup included, so a cap per VM would show about 3 MB/s here).
    let wire: u64 = ["web-a", "web-b"]
        .iter()
        .map(|vm| done(vm)["wire"]["total"].as_u64().expect("wire bytes"))
        .sum();
    let rate = wire as f64 / last["total_s"].as_f64().expect("total_s");
    eprintln!("evacuation: {wire} bytes on the link, {rate:.0} B/s under a 2 MB/s cap");
    assert!(
        rate <= 2_100_000.0,
        "{rate:.0} B/s: the cap is not on the sum"
    );
    assert_eq!(
        (last["event"].as_str(), last["failed"].as_u64()),
        (Some("evacuated"), Some(0))
    );
    assert!(
        last["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "{last}"
    );
    // The service: one JSON line per migration, each naming its VM and its sender.
    assert_eq!(reports.len(), 2, "{reports:?}");
    for vm in ["web-a", "web-b"] {
        let r = reports
            .iter()
            .find(|r| r["vm"] == vm)
            .unwrap_or_else(|| panic!("no report for {vm}"));
        assert!(
            r["sender"]
                .as_str()
                .is_some_and(|s| s.starts_with("CN=src-a")),
            "{r}"
        );
        assert!(r["ref_pages"].as_u64().is_some_and(|n| n > 9000), "{r}");
    }
    let profile = lab_profile("cloud-amd64").1;
    for (src, dst, vm) in [(&src_a, &mut dst_a, "web-a"), (&src_b, &mut dst_b, "web-b")] {
        let s = done(vm);
        let teleported = s["pages"]["teleported"].as_u64().expect("teleported");
        assert!(teleported > 9000, "only {teleported} pages teleported");
        assert_eq!(src.status(), "postmigrate");
        assert_identical_with(src, dst, &profile);
        eprintln!(
            "{vm}: {teleported} pages teleported, wire {} bytes, {} s",
            s["wire"]["total"], s["time"]["total_s"]
        );
    }
    drop((src_a, src_b));
    for dst in [&mut dst_a, &mut dst_b] {
        dst.cont();
        let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
        assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
    }
}
