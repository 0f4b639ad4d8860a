//! The load test: three 1 GiB guests and one 4 GiB guest leave one host at the same time
//! (`pct-migrate evacuate`) through one receiver service, over one 100 Mbit/s tbf link
//! between two network namespaces. It asserts that every destination is bit-identical to
//! its own source at pause (so nothing was mixed up between sessions), that each service
//! report names the right VM and sender, and that each guest re-verifies its files at its
//! destination. It prints per-VM total time, the fairness ratio (slowest to fastest
//! throughput while all four run) and the peak RSS of both ends.
//!
//! Eight TCG guests on this project's 2-core machines take about 2 minutes and 16 GiB, so
//! the test is ignored unless asked for:
//!
//! `cargo test --release --test migrate_load -- --ignored --nocapture`
//!
//! With `PCT_LOAD_SENDER_FLAGS="--no-teleport"` every guest sends its whole RAM, so that the
//! link limits the four and its sharing shows.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::lab::{have_qemu, Guest, GuestSpec};
use support::migrate::*;
use support::profile::lab_profile;

#[test]
#[ignore = "eight guests, 16 GiB: cargo test --release --test migrate_load -- --ignored"]
fn four_guests_over_one_100_mbit_link() {
    assert!(
        have_qemu(),
        "the load test needs QEMU (bash tools/lab/ensure-host.sh)"
    );
    // The 4 GiB guest's RAM is anonymous (read through /proc/PID/mem): /dev/shm holds the
    // three others' RAM files, both ends.
    let mut big = GuestSpec::new("apache").layout("mini", "plain");
    big.mem_mib = 4096;
    big.anon_ram = true;
    let small = GuestSpec::new("apache").layout("mini", "plain");
    let specs = [
        ("vm-1", small.clone()),
        ("vm-2", small.clone()),
        ("vm-3", small),
        ("vm-big", big),
    ];
    let mut pairs: Vec<(&str, Guest, Guest, std::path::PathBuf)> = specs
        .iter()
        .map(|(name, spec)| {
            let (src, dst, disk) = pair(spec);
            (*name, src, dst, disk)
        })
        .collect();

    let name = format!("ld{}", std::process::id() % 100_000);
    let netns = NetnsLink::up(&name, "100mbit");
    let pki = tempfile::tempdir().expect("tmp");
    let tls = keygen(pki.path(), &["10.77.0.2", "src-host"]);
    let port = free_port();
    let mut config = format!("listen = \"10.77.0.2:{port}\"\ntls_dir = \"{}\"\n", tls[0]);
    for (vm, _, dst, disk) in &pairs {
        config += &format!(
            "\n[[vm]]\nname = \"{vm}\"\nqmp = \"{}\"\ndisk = \"{}\"\nsenders = [\"src-host\"]\n",
            dst.qmp_path().display(),
            disk.display()
        );
    }
    let config_path = pki.path().join("receiver.toml");
    std::fs::write(&config_path, config).expect("configuration");
    let service = Pct::spawn_in(
        &format!("{name}-b"),
        "service",
        &[
            "receive",
            "--config",
            config_path.to_str().expect("path"),
            "--sessions",
            "4",
            "--json",
        ],
    );
    wait_listening(Some(&format!("{name}-b")), port, Duration::from_secs(30));
    let profile = lab_profile("cloud-amd64");
    let vm_args: Vec<String> = pairs
        .iter()
        .map(|(vm, src, _, _)| format!("{vm}={}", src.qmp_path().display()))
        .collect();
    let to = format!("10.77.0.2:{port}");
    let mut args = vec![
        "evacuate",
        "--to",
        &to,
        "--tls-dir",
        &tls[1],
        "--profile",
        profile.0.to_str().expect("path"),
        "--json",
    ];
    for v in &vm_args {
        args.extend(["--vm", v.as_str()]);
    }
    // PCT_LOAD_SENDER_FLAGS="--no-teleport" makes every VM send its whole RAM, so that the
    // link, not the CPU, limits them: the sharing of the link then shows.
    let flags = std::env::var("PCT_LOAD_SENDER_FLAGS").unwrap_or_default();
    args.extend(flags.split_whitespace());
    let evacuation =
        Pct::spawn_in(&format!("{name}-a"), "evacuate", &args).wait(Duration::from_secs(1500));
    let link_bytes = netns.sent("a");
    let (events, reports, log) = finish_evacuation(evacuation, service);
    let done: Vec<&Value> = events.iter().filter(|e| e["event"] == "done").collect();
    assert_eq!(done.len(), 4);
    // Each VM's progress: (seconds since the evacuation started, stream bytes, link bytes).
    let progress = |vm: &str| -> Vec<(f64, f64, f64)> {
        events
            .iter()
            .filter(|e| e["vm"] == vm && e["event"] == "progress")
            .filter_map(|e| {
                Some((
                    e["t_s"].as_f64()?,
                    e["stream_bytes"].as_f64()?,
                    e["wire_bytes"].as_f64()?,
                ))
            })
            .collect()
    };
    // While all four migrate: from the last one's first stream byte to the first one's end.
    let started = |vm: &str| {
        progress(vm)
            .iter()
            .find(|p| p.1 > 0.0)
            .map_or(f64::INFINITY, |p| p.0)
    };
    let ended = |vm: &str| {
        done.iter()
            .find(|d| d["vm"] == vm)
            .and_then(|d| d["elapsed_s"].as_f64())
            .unwrap_or(0.0)
    };
    let names: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let from = names.iter().map(|v| started(v)).fold(0.0f64, f64::max);
    let to = names.iter().map(|v| ended(v)).fold(f64::INFINITY, f64::min);
    // Bytes moved between two times, from the progress lines around them.
    let moved = |vm: &str, a: f64, b: f64, link: bool| -> f64 {
        let at = |t: f64| {
            progress(vm)
                .iter()
                .rev()
                .find(|p| p.0 <= t)
                .map_or(0.0, |p| if link { p.2 } else { p.1 })
        };
        at(b) - at(a)
    };
    // Each VM's own throughput, from its first stream byte to its end.
    let rate = |vm: &str, link: bool| -> f64 {
        let (a, b) = (started(vm), ended(vm));
        moved(vm, a, b, link) / (b - a)
    };
    assert_eq!(reports.len(), 4, "{reports:?}");
    let lab = lab_profile("cloud-amd64").1;
    let mut rows = Vec::new();
    for (vm, src, dst, _) in &pairs {
        let d = done
            .iter()
            .find(|d| d["vm"] == *vm)
            .unwrap_or_else(|| panic!("no summary for {vm}"));
        let s = &d["summary"];
        let r = reports
            .iter()
            .find(|r| r["vm"] == *vm)
            .unwrap_or_else(|| panic!("no service report for {vm}"));
        assert!(r["sender"]
            .as_str()
            .is_some_and(|s| s.starts_with("CN=src-host")));
        // The receiver restored exactly the references this VM's sender sent.
        assert_eq!(r["ref_pages"], s["pages"]["teleported"], "{vm}: {r}");
        assert_eq!(
            r["stream_bytes"], s["destination_stream_bytes"],
            "{vm}: {r}"
        );
        assert_eq!(src.status(), "postmigrate");
        assert_identical_with(src, dst, &lab);
        rows.push(format!(
            "| {vm} | {} MiB | {:.1} s | {:.1} MB | {:.1} MB | {} | {:.1} / {:.2} MB/s |",
            dst.spec.mem_mib,
            d["elapsed_s"].as_f64().unwrap_or(0.0),
            s["stream_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            s["wire"]["total"].as_f64().unwrap_or(0.0) / 1e6,
            s["pages"]["teleported"],
            rate(vm, false) / 1e6,
            rate(vm, true) / 1e6,
        ));
    }
    let spread = |r: Vec<f64>| {
        let (lo, hi) = r.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
        lo / hi
    };
    let overlap = match to > from + 1.0 {
        true => format!(
            "all four migrated together for {:.1} s: fairness (slowest / fastest throughput \
             then) {:.2} of stream, {:.2} on the link",
            to - from,
            spread(names.iter().map(|v| moved(v, from, to, false)).collect()),
            spread(names.iter().map(|v| moved(v, from, to, true)).collect()),
        ),
        false => format!(
            "the four never migrated together for a whole second (the last started at \
             {from:.1} s, the first ended at {to:.1} s)"
        ),
    };
    let last = events.last().expect("events");
    let peak_anon = last["peak_rss_anon_bytes"].as_u64().unwrap_or(0);
    let service_rss = log
        .lines()
        .find_map(|l| l.split_once("peak RSS ").map(|(_, r)| r.to_owned()))
        .unwrap_or_default();
    eprintln!("| VM | RAM | total time | stream | on the link | pages teleported | stream / link throughput, first stream byte to end |");
    eprintln!("|---|---|---|---|---|---|---|");
    for r in &rows {
        eprintln!("{r}");
    }
    eprintln!(
        "LOAD: all four in {:.1} s, {:.1} MB through the link (tbf 100 Mbit/s); {overlap}; \
         each VM's own throughput, slowest / fastest: {:.2} of stream, {:.2} on the link; \
         sender's own memory (anonymous RSS) peak {:.0} MB, {:.0} MB at the end, peak RSS \
         with the guest RAM files it mapped {:.0} MB; receiver service peak RSS {service_rss}",
        last["total_s"].as_f64().unwrap_or(0.0),
        link_bytes as f64 / 1e6,
        spread(names.iter().map(|v| rate(v, false)).collect()),
        spread(names.iter().map(|v| rate(v, true)).collect()),
        peak_anon as f64 / 1e6,
        last["rss_anon_bytes_at_end"].as_f64().unwrap_or(0.0) / 1e6,
        last["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    // Bounded: the sender holds no copy of any guest's RAM, the anonymous one included.
    let guest_ram: u64 = pairs
        .iter()
        .map(|p| u64::from(p.2.spec.mem_mib) << 20)
        .sum();
    assert!(
        peak_anon > 0 && peak_anon < guest_ram / 10,
        "the sender's anonymous memory peaked at {peak_anon} bytes, for {guest_ram} of guest RAM"
    );
    for (_, src, _, _) in &mut pairs {
        src.stop();
    }
    for (vm, _, dst, _) in &mut pairs {
        dst.cont();
        let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(300));
        assert!(line.starts_with("PCT-VERIFY-OK"), "{vm}: {line}");
    }
}
