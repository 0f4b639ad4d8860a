//! Several guests leaving one host at once (`pct-migrate evacuate`): one pct source per VM,
//! each on its own thread with its own connection to the destination's receiver service
//! ([`super::service`]), which admits each by the VM it names. The VMs share the link as
//! their TCP connections share it: each connection's sender is paced by its own window
//! (`super::flow`), so none can queue ahead of the others, and TCP's congestion control
//! splits the bottleneck between them. A VM that fails ends alone; the others go on.

use super::source::{Notice, Source, SourceOptions};
use super::summary::Summary;
use anyhow::Result;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One VM to evacuate: its name at the receiver (`--vm`) and its QEMU's QMP socket.
#[derive(Debug, Clone)]
pub struct Evacuee {
    pub name: String,
    pub qmp: PathBuf,
}

/// How one VM's migration ended.
#[derive(Debug)]
pub struct Evacuated {
    pub vm: String,
    pub result: Result<Summary>,
    /// From the start of the evacuation to this VM's end.
    pub elapsed: Duration,
}

/// What an evacuation tells its caller, from the VMs' threads: a VM's own notices, and its
/// end.
#[derive(Debug)]
pub enum Event<'a> {
    Vm(&'a str, Notice<'a>),
    Done(&'a Evacuated),
}

/// Migrates every VM of `vms` to the receiver at `to`, all at once; `base` gives what they
/// share (profile, TLS, sender tunables), each VM its name and QMP socket. Returns each
/// VM's outcome, in the order given.
pub fn evacuate(
    vms: &[Evacuee],
    base: &SourceOptions,
    to: &str,
    notify: &(dyn Fn(Event<'_>) + Sync),
) -> Vec<Evacuated> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let threads: Vec<_> = vms
            .iter()
            .map(|vm| {
                let opts = SourceOptions {
                    qmp: vm.qmp.clone(),
                    vm: vm.name.clone(),
                    ..base.clone()
                };
                s.spawn(move || {
                    let tell = |n: Notice<'_>| notify(Event::Vm(&vm.name, n));
                    let result = Source::for_migration(opts, &tell).and_then(|src| src.migrate(to));
                    let done = Evacuated {
                        vm: vm.name.clone(),
                        result,
                        elapsed: start.elapsed(),
                    };
                    notify(Event::Done(&done));
                    done
                })
            })
            .collect();
        threads
            .into_iter()
            .zip(vms)
            .map(|(t, vm)| {
                t.join().unwrap_or_else(|_| Evacuated {
                    vm: vm.name.clone(),
                    result: Err(anyhow::anyhow!("the migration's thread panicked")),
                    elapsed: start.elapsed(),
                })
            })
            .collect()
    })
}

/// This process's peak resident set size so far (`VmHWM` in /proc/self/status), in bytes.
/// It counts the pages of guest RAM files the sources have mapped and read, which the page
/// cache holds anyway: [`rss_anon`] is the process's own memory.
pub fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// This process's anonymous resident memory now (`RssAnon`), in bytes.
pub fn rss_anon() -> Option<u64> {
    status_bytes("RssAnon:")
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
