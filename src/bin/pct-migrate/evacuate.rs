//! `pct-migrate evacuate`: several VMs to one receiver service at once
//! ([`pct::migrate::evacuate`]); a progress bar per VM on a terminal, JSON lines with
//! `--json`, a table at the end.

use super::{vm_name, SenderArgs};
use anyhow::{anyhow, bail, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use pct::migrate::evacuate::{evacuate, Evacuated, Evacuation, Evacuee, Event};
use pct::migrate::source::Notice;
use pct::selfstat::{peak_rss, rss_anon};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct EvacuateArgs {
    /// A VM to migrate: its name at the receiver's service, `=`, its QEMU's QMP socket.
    /// Repeat for each VM; all migrate at once.
    #[arg(long = "vm", value_name = "NAME=QMP", required = true, value_parser = evacuee)]
    vms: Vec<Evacuee>,
    /// Send the guests' free pages as they are.
    #[arg(long)]
    no_free_elision: bool,
    #[command(flatten)]
    send: SenderArgs,
}

fn evacuee(s: &str) -> Result<Evacuee, String> {
    let (name, qmp) = s
        .split_once('=')
        .ok_or_else(|| "give NAME=QMP, e.g. web-1=/run/src/web-1.qmp".to_owned())?;
    Ok(Evacuee {
        name: vm_name(name)?,
        qmp: PathBuf::from(qmp),
    })
}

/// What is shown of one VM while it migrates.
struct Shown {
    bar: ProgressBar,
    /// When its last JSON progress line was printed.
    last_json: Option<Instant>,
}

pub fn evacuate_main(mut a: EvacuateArgs) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    if let Some(dup) = a.vms.iter().find(|v| !names.insert(v.name.clone())) {
        bail!("VM `{}` is given twice", dup.name);
    }
    let security = a.send.link.security()?;
    let to = a.send.to.take().ok_or_else(|| {
        anyhow!("--to HOST:PORT (the destination's receiver service) is required")
    })?;
    if a.send.record_stream.is_some() {
        bail!("--record-stream keeps one migration's stream: not with evacuate");
    }
    if a.send.disk.is_some() {
        bail!("--disk names one VM's disk: not with evacuate (each VM's metadata blocks then come from its RAM or its receiver)");
    }
    // Each VM's QMP socket and name are its own.
    let base =
        a.send
            .source_options(PathBuf::new(), !a.no_free_elision, security, String::new())?;
    let json = a.send.json;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>12.bold} {spinner} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let shown: Mutex<HashMap<String, Shown>> = Mutex::new(
        a.vms
            .iter()
            .map(|v| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(v.name.clone());
                bar.set_message("starting");
                bar.enable_steady_tick(Duration::from_millis(250));
                let s = Shown {
                    bar,
                    last_json: None,
                };
                (v.name.clone(), s)
            })
            .collect(),
    );
    let started = Instant::now();
    let notify = |e: Event<'_>| {
        let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            Event::Vm(vm, Notice::Progress(p)) => {
                let Some(s) = shown.get_mut(vm) else { return };
                s.bar.set_message(format!(
                    "{:<10} stream {:>8.1} MB  wire {:>7.1} MB  {:>6} pages by reference  {:>5.1} s",
                    p.status,
                    p.stream_bytes as f64 / 1e6,
                    p.wire_bytes as f64 / 1e6,
                    p.ref_pages,
                    p.elapsed.as_secs_f64()
                ));
                if json
                    && s.last_json
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    s.last_json = Some(Instant::now());
                    println!(
                        "{}",
                        json!({
                            "vm": vm, "event": "progress", "status": p.status,
                            "t_s": started.elapsed().as_secs_f64(),
                            "elapsed_s": p.elapsed.as_secs_f64(),
                            "stream_bytes": p.stream_bytes, "wire_bytes": p.wire_bytes,
                            "ref_pages": p.ref_pages,
                        })
                    );
                }
            }
            Event::Vm(_, Notice::ProgressEnd) => {}
            Event::Vm(vm, n) => multi.suspend(|| eprintln!("pct-migrate: {vm}: {n}")),
            Event::Done(d) => {
                if let Err(e) = &d.result {
                    let e = pct::errors::chain_text(e);
                    multi.suspend(|| eprintln!("pct-migrate: {}: error: {e}", d.vm));
                }
                if let Some(s) = shown.get(&d.vm) {
                    s.bar.finish_with_message(match &d.result {
                        Ok(sum) => format!(
                            "done in {:.1} s: {:.1} MB on the link for {:.1} MB of stream",
                            d.elapsed.as_secs_f64(),
                            sum.wire.total as f64 / 1e6,
                            sum.stream_bytes as f64 / 1e6
                        ),
                        Err(e) => format!("FAILED: {}", pct::errors::chain_text(e)),
                    });
                }
                if json {
                    println!("{}", done_json(d));
                }
            }
        }
    };
    let Evacuation {
        vms: done,
        peak_rss_anon,
    } = evacuate(&a.vms, &base, &to, &notify);
    let total = started.elapsed();
    let failed = done.iter().filter(|d| d.result.is_err()).count();
    let rss = Rss {
        peak: peak_rss(),
        peak_anon: peak_rss_anon,
        anon_at_end: rss_anon(),
    };
    if json {
        println!(
            "{}",
            json!({
                "event": "evacuated", "vms": done.len(), "failed": failed,
                "total_s": total.as_secs_f64(), "peak_rss_bytes": rss.peak,
                "peak_rss_anon_bytes": rss.peak_anon, "rss_anon_bytes_at_end": rss.anon_at_end,
            })
        );
    } else {
        print!("{}", table(&done, total, &rss));
    }
    match failed {
        0 => Ok(()),
        n => bail!("{n} of {} migrations failed", done.len()),
    }
}

fn done_json(d: &Evacuated) -> serde_json::Value {
    match &d.result {
        Ok(s) => json!({
            "vm": d.vm, "event": "done", "elapsed_s": d.elapsed.as_secs_f64(), "summary": s,
        }),
        Err(e) => json!({
            "vm": d.vm, "event": "failed", "elapsed_s": d.elapsed.as_secs_f64(),
            "error": pct::errors::chain_text(e),
        }),
    }
}

/// This process's memory, as the evacuation ends.
struct Rss {
    peak: Option<u64>,
    peak_anon: Option<u64>,
    anon_at_end: Option<u64>,
}

fn table(done: &[Evacuated], total: Duration, rss: &Rss) -> String {
    let mut t = format!(
        "{:<16} {:>8} {:>12} {:>12} {:>10} {:>12}\n",
        "vm", "result", "stream MB", "link MB", "time s", "downtime ms"
    );
    for d in done {
        match &d.result {
            Ok(s) => {
                t += &format!(
                    "{:<16} {:>8} {:>12.1} {:>12.1} {:>10.1} {:>12}\n",
                    d.vm,
                    "ok",
                    s.stream_bytes as f64 / 1e6,
                    s.wire.total as f64 / 1e6,
                    d.elapsed.as_secs_f64(),
                    s.time
                        .downtime_end_to_end_ms
                        .map_or_else(|| "-".into(), |ms| format!("{ms:.0}"))
                );
            }
            Err(e) => {
                t += &format!(
                    "{:<16} {:>8} {}\n",
                    d.vm,
                    "FAILED",
                    pct::errors::chain_text(e)
                )
            }
        }
    }
    let mb = |b: Option<u64>| {
        b.map_or_else(|| "unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
    };
    t += &format!(
        "{} VMs in {:.1} s; this sender's own memory (anonymous RSS) peaked at {} and is {} at the end; peak RSS with the guest RAM files it mapped {}\n",
        done.len(),
        total.as_secs_f64(),
        mb(rss.peak_anon),
        mb(rss.anon_at_end),
        mb(rss.peak),
    );
    t
}
