//! Several guests leaving one host at once (`pct-migrate evacuate`): one pct source per VM,
//! each on its own thread with its own connection to the destination's receiver service
//! ([`super::service`]), which admits each by the VM it names. The VMs share the link as
//! their TCP connections share it: each connection's sender is paced by its own window
//! (`super::flow`), so none can queue ahead of the others, and TCP's congestion control
//! splits the bottleneck between them. A VM that fails ends alone; the others go on.

use super::source::{Notice, Source, SourceOptions};
use super::summary::Summary;
use crate::selfstat::rss_anon;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// What an evacuation did.
#[derive(Debug)]
pub struct Evacuation {
    /// Each VM's outcome, in the order given.
    pub vms: Vec<Evacuated>,
    /// The most anonymous memory this process held while the VMs migrated ([`rss_anon`],
    /// sampled every [`RSS_SAMPLE_EVERY`]): the sender's own memory, which the peak RSS
    /// ([`crate::selfstat::peak_rss`]) does not tell apart from the guests' RAM-file pages it mapped.
    pub peak_rss_anon: Option<u64>,
}

/// One VM's migration under way, for the RSS sampler's count: over when dropped, once,
/// whether the migration ended or its thread unwound.
struct Migrating<'a>(&'a AtomicUsize);

impl Drop for Migrating<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// How often [`evacuate`] samples [`rss_anon`].
pub const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Migrates every VM of `vms` to the receiver at `to`, all at once; `base` gives what they
/// share (profile, TLS, sender tunables), each VM its name and QMP socket.
pub fn evacuate(
    vms: &[Evacuee],
    base: &SourceOptions,
    to: &str,
    notify: &(dyn Fn(Event<'_>) + Sync),
) -> Evacuation {
    let start = Instant::now();
    let running = AtomicUsize::new(vms.len());
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = rss_anon();
            while running.load(Ordering::Acquire) > 0 {
                std::thread::sleep(RSS_SAMPLE_EVERY);
                peak = peak.max(rss_anon());
            }
            peak
        });
        let running = &running;
        let threads: Vec<_> = vms
            .iter()
            .map(|vm| {
                let opts = SourceOptions {
                    qmp: vm.qmp.clone(),
                    vm: vm.name.clone(),
                    ..base.clone()
                };
                s.spawn(move || {
                    let migrating = Migrating(running);
                    let tell = |n: Notice<'_>| notify(Event::Vm(&vm.name, n));
                    let result = Source::for_migration(opts, &tell).and_then(|src| src.migrate(to));
                    drop(migrating);
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
        let vms = threads
            .into_iter()
            .zip(vms)
            .map(|(t, vm)| {
                t.join().unwrap_or_else(|_| Evacuated {
                    vm: vm.name.clone(),
                    result: Err(anyhow::anyhow!("the migration's thread panicked")),
                    elapsed: start.elapsed(),
                })
            })
            .collect();
        Evacuation {
            vms,
            peak_rss_anon: sampler.join().unwrap_or(None),
        }
    })
}
