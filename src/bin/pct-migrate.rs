//! `pct-migrate`: live migration of a stock QEMU VM with page-cache teleportation.
//!
//! Source side (default command): drives the source QEMU over QMP, migrates it into a local
//! pct sender and sends pct frames to a receiver ([`pct::migrate::source`]). Destination
//! side (`receive`): accepts one sender, feeds the destination QEMU (started with
//! `-incoming defer`) a standard stream, and exits with the migration's status
//! ([`pct::migrate::destination`]); with `--config`, a service for many VMs
//! ([`pct::migrate::service`]). `evacuate`: several VMs at once to such a service
//! ([`pct::migrate::evacuate`]). `proxy`: the source side when libvirt drives the
//! migration ([`pct::migrate::proxy`]). `keygen`: certificates for the TLS link
//! ([`pct::migrate::tls::certs`]). This file parses the arguments and prints; see
//! docs/migration.md and docs/libvirt.md.

#[path = "pct-migrate/evacuate.rs"]
mod evacuate;
#[path = "pct-migrate/tools.rs"]
mod tools;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use pct::disk::DiskFormat;
use pct::migrate::destination::{self, DestinationOptions, DestinationQemu};
use pct::migrate::flow::{parse_rate, TokenBucket};
use pct::migrate::inspect::{inspect, InspectOptions};
use pct::migrate::link::Security;
use pct::migrate::proxy::{self, ProxyOptions};
use pct::migrate::receiver::ReceiverOptions;
use pct::migrate::sender::SenderOptions;
use pct::migrate::service::{self, config::ServiceConfig};
use pct::migrate::source::{CheckMode, Notice, Source, SourceOptions};
use pct::migrate::tls::certs::{self, HostSpec};
use pct::migrate::tls::Identity;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pct-migrate",
    version,
    about = "Live migration with page-cache teleportation",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    send: SendArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Destination side: accept one pct sender and feed the destination QEMU.
    Receive(ReceiveArgs),
    /// Source side of a migration libvirt drives: relay the source QEMU's stream to a pct
    /// receiver.
    Proxy(ProxyArgs),
    /// Migrate several VMs at once to one receiver service (`receive --config`), over one
    /// link.
    Evacuate(evacuate::EvacuateArgs),
    /// Make a CA and, for each host, a certificate signed by it: DIR/HOST is that host's
    /// --tls-dir.
    Keygen(KeygenArgs),
    /// Read a recorded stream (`--record-stream`): its figures, and where given pages occur.
    InspectStream(InspectArgs),
    /// Benchmark the receiver's restore path (read + verify) on a disk image.
    #[command(hide = true)]
    BenchRestore(tools::BenchArgs),
    /// Benchmark pct's relay (sender and receiver on loopback, no QEMU), with and without
    /// TLS.
    #[command(hide = true)]
    BenchLink(tools::BenchLinkArgs),
    /// Run one QMP command on a QEMU and print its return value as JSON.
    Qmp(tools::QmpArgs),
    /// Migrate with stock QEMU alone (no pct), as a peer to compare with; prints JSON.
    Stock(tools::StockArgs),
}

#[derive(Args)]
struct KeygenArgs {
    /// Where to write: DIR/ca.pem and DIR/ca-key.pem (the CA; if both exist already, that
    /// CA signs), and one directory DIR/HOST per host.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Each host: its DNS name or IP address as the other end dials it (`--to`), or
    /// several, comma-separated (the first names its directory).
    #[arg(required = true, value_name = "HOST[,NAME…]")]
    hosts: Vec<HostSpec>,
}

/// How the link between sender and receiver is protected (both ends take the same).
#[derive(Args)]
struct LinkArgs {
    /// This host's TLS directory (as `pct-migrate keygen` writes it, or your own PEM files:
    /// ca.pem, cert.pem, key.pem). The peer must present a certificate signed by ca.pem;
    /// the receiver's must also name the host the sender dials (--to).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// No TLS: the guest's whole memory crosses the link unencrypted and unauthenticated.
    /// For a lab network only.
    #[arg(long, conflicts_with = "tls_dir")]
    insecure_plaintext: bool,
}

impl LinkArgs {
    /// The link's protection; without --tls-dir, a refusal unless --insecure-plaintext
    /// (then a loud warning).
    fn security(&self) -> Result<Security> {
        match (&self.tls_dir, self.insecure_plaintext) {
            (Some(dir), _) => Ok(Security::Tls(Arc::new(Identity::load(dir)?))),
            (None, true) => {
                eprintln!(
                    "pct-migrate: WARNING: --insecure-plaintext: the guest's whole memory (its \
                     keys, its users' data, everything in its RAM) will cross the link \
                     UNENCRYPTED, and the peer is NOT AUTHENTICATED: anyone on the path can \
                     read or alter it, and anyone who reaches the port can take the place of \
                     either end. Use it on a trusted lab network only; elsewhere use \
                     --tls-dir (see pct-migrate keygen)."
                );
                Ok(Security::Plaintext)
            }
            (None, false) => bail!(
                "refusing to migrate over an unprotected link: give --tls-dir DIR/HOST \
                 (certificates from `pct-migrate keygen --out DIR HOST…`), or \
                 --insecure-plaintext to send the guest's memory unencrypted and \
                 unauthenticated (a lab network only)"
            ),
        }
    }
}

#[derive(Args)]
struct InspectArgs {
    /// A QEMU precopy stream, as `--record-stream` writes it.
    file: PathBuf,
    /// List every record of this guest page frame (byte offset / 4096 in the RAM block):
    /// stream offset, kind and a hash of its bytes. Repeatable.
    #[arg(long, value_name = "PFN")]
    page: Vec<u64>,
    /// RAM block for --page [default: the largest].
    #[arg(long)]
    block: Option<String>,
    /// List the section headers (kind, id, stream offset) too.
    #[arg(long)]
    sections: bool,
    /// Compare the block's final content in the stream (each page's last record) with this
    /// raw RAM image (e.g. the source's memory-backend-file after the migration).
    #[arg(long, value_name = "RAM")]
    against: Option<PathBuf>,
}

/// Source side.
#[derive(Args)]
struct SendArgs {
    /// The source QEMU's QMP socket.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Print the forensic report and the predicted savings; do not migrate.
    #[arg(long)]
    dry_run: bool,
    /// Send the guest's free pages as they are (by default a page free in the guest's
    /// buddy allocator is sent as a zero page; one no longer free at the switchover is
    /// re-sent).
    #[arg(long)]
    no_free_elision: bool,
    /// The VM, as the receiver's service configuration names it (a receiver started with
    /// --config serves several; one started for a single migration takes any).
    #[arg(long, value_name = "NAME", value_parser = vm_name)]
    vm: Option<String>,
    #[command(flatten)]
    send: SenderArgs,
}

/// What every sending side takes: pct's own source (`--qmp`) and the proxy.
#[derive(Args)]
struct SenderArgs {
    /// Kernel profile (JSON) [default: the shipped profile matching the guest's build-id].
    #[arg(long)]
    profile: Option<PathBuf>,
    /// The pct receiver, HOST:PORT (with TLS, its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    #[command(flatten)]
    link: LinkArgs,
    /// Cap pct's sending rate, e.g. 50mbit, 6MB/s (for `evacuate`: all its VMs together).
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<String>,
    /// The source's copy of the guest disk (raw image, block device or qcow2): metadata
    /// blocks the guest has not cached.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// How to read --disk: raw, qcow2 (backing chain included), or auto: qcow2 if the file
    /// starts with qcow2's magic. Say raw for an untrusted guest's raw disk (a guest can
    /// write that magic into its first sector).
    #[arg(long, value_enum, default_value_t = DiskFormat::Auto, requires = "disk")]
    disk_format: DiskFormat,
    /// Send every page (no teleportation): pct as a plain transport, for comparison.
    #[arg(long)]
    no_teleport: bool,
    /// Send data uncompressed (with --no-teleport: pct's own overhead, for comparison).
    #[arg(long)]
    no_compress: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Keep a copy of the stream as pct forwards it in FILE (for diagnosis; as large as
    /// the stream).
    #[arg(long, value_name = "FILE")]
    record_stream: Option<PathBuf>,
    /// At switchover, compare every page the destination will hold with the stopped
    /// source's RAM and re-send those that differ (what QEMU's dirty tracking missed; QEMU
    /// before 9.0 misses writes under TCG). auto: on for TCG guests of QEMU before 9.0.
    #[arg(long, value_enum, default_value_t = CheckMode::Auto)]
    switchover_check: CheckMode,
}

fn vm_name(s: &str) -> Result<String, String> {
    match pct::migrate::wire::valid_vm_name(s) {
        true => Ok(s.to_owned()),
        false => Err(format!(
            "use 1 to {} letters, digits, `.`, `_` or `-`, not starting with `.` or `-`",
            pct::migrate::wire::MAX_VM_NAME
        )),
    }
}

impl SenderArgs {
    /// What pct's own source (`--qmp`) takes of these arguments, for the guest at `qmp`.
    fn source_options(
        &mut self,
        qmp: PathBuf,
        free_elision: bool,
        security: Security,
        vm: String,
    ) -> Result<SourceOptions> {
        Ok(SourceOptions {
            qmp,
            profile: self.profile.take(),
            disk: self.disk.take(),
            disk_format: self.disk_format,
            teleport: !self.no_teleport,
            free_elision,
            switchover_check: self.switchover_check,
            sender: self.sender_options()?,
            security,
            vm,
        })
    }

    fn sender_options(&mut self) -> Result<SenderOptions> {
        let bandwidth = self.bandwidth.as_deref().map(parse_rate).transpose();
        Ok(SenderOptions {
            bandwidth: bandwidth
                .map_err(|e| anyhow!(e))?
                .map(|rate| Arc::new(TokenBucket::new(rate))),
            zstd_level: if self.no_compress { None } else { Some(1) },
            record: self.record_stream.take(),
            ..SenderOptions::default()
        })
    }
}

/// Source side of a migration that a VM manager (libvirt) drives: listen where the source
/// QEMU is told to migrate (`virsh migrate --migrateuri tcp://127.0.0.1:PORT`), and carry
/// its stream to a pct receiver. pct needs no monitor of its own: it finds the QEMU process
/// from the connection and reads its RAM through /proc. See docs/libvirt.md.
#[derive(Args)]
struct ProxyArgs {
    /// Where the source QEMU will connect, HOST:PORT (e.g. 127.0.0.1:49152).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// The source QEMU's process id [default: the process that connects].
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to wait for the source QEMU to connect.
    #[arg(long, default_value_t = 600)]
    accept_timeout: u64,
    /// The VM, as the receiver's service configuration names it (a receiver started with
    /// --config serves several; one started for a single migration takes any).
    #[arg(long, value_name = "NAME", value_parser = vm_name)]
    vm: Option<String>,
    #[command(flatten)]
    send: SenderArgs,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Serve many migrations, each into a VM that FILE (TOML) names with its QEMU, its disk
    /// and the senders allowed to migrate it; runs until SIGINT or SIGTERM. See
    /// docs/migration.md, "The receiver service".
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "qmp", "qemu_incoming", "disk", "record_stream", "accept_timeout"])]
    config: Option<PathBuf>,
    /// With --config: exit once this many migrations have ended (received or failed).
    #[arg(long, value_name = "N", requires = "config")]
    sessions: Option<u64>,
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "config")]
    listen: Option<String>,
    #[command(flatten)]
    link: LinkArgs,
    /// The destination QEMU's QMP socket (QEMU started with -incoming defer): pct starts
    /// the incoming migration and waits for QEMU to load it.
    #[arg(
        long,
        required_unless_present_any = ["qemu_incoming", "config"],
        conflicts_with = "qemu_incoming"
    )]
    qmp: Option<PathBuf>,
    /// Where the destination QEMU listens for the stream, HOST:PORT, when a VM manager
    /// (libvirt) drives it: pct connects there and writes the stream (see docs/libvirt.md).
    #[arg(long, value_name = "HOST:PORT")]
    qemu_incoming: Option<String>,
    /// The destination's copy of the guest disk (raw image, block device or qcow2).
    #[arg(long, required_unless_present = "config")]
    disk: Option<PathBuf>,
    /// How to read --disk: raw, qcow2 (backing chain included), or auto: qcow2 if the file
    /// starts with qcow2's magic. Say raw for an untrusted guest's raw disk (a guest can
    /// write that magic into its first sector).
    #[arg(long, value_enum, default_value_t = DiskFormat::Auto, requires = "disk")]
    disk_format: DiskFormat,
    /// Seconds to wait for the sender.
    #[arg(long)]
    accept_timeout: Option<u64>,
    /// Print the summary as JSON on stdout (with --config: one line per migration).
    #[arg(long)]
    json: bool,
    /// Keep a copy of the stream given to the destination QEMU in FILE (for diagnosis;
    /// equal to the sender's record when all went well).
    #[arg(long, value_name = "FILE")]
    record_stream: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Receive(a)) => receive_main(a),
        Some(Cmd::Proxy(a)) => proxy_main(a),
        Some(Cmd::Evacuate(a)) => evacuate::evacuate_main(a),
        Some(Cmd::Keygen(a)) => keygen_main(a),
        Some(Cmd::InspectStream(a)) => inspect_main(a),
        Some(Cmd::BenchRestore(a)) => tools::bench_main(a),
        Some(Cmd::BenchLink(a)) => tools::bench_link_main(a),
        Some(Cmd::Qmp(a)) => tools::qmp_main(a),
        Some(Cmd::Stock(a)) => tools::stock_main(a),
        None => send_main(cli.send),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pct-migrate: error: {}", pct::errors::chain_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// Prints what the source side reports; the progress line only on a terminal.
fn print_notice(n: Notice<'_>, tty: bool) {
    match n {
        Notice::Progress(_) if tty => eprint!("\r{n}"),
        Notice::ProgressEnd if tty => eprintln!(),
        Notice::Progress(_) | Notice::ProgressEnd => {}
        _ => eprintln!("pct-migrate: {n}"),
    }
}

fn send_main(mut a: SendArgs) -> Result<()> {
    let qmp = a.qmp.ok_or_else(|| anyhow!("--qmp SRC.sock is required"))?;
    // A dry run opens no link.
    let security = match a.dry_run {
        true => Security::Plaintext,
        false => a.send.link.security()?,
    };
    let vm = a.vm.take().unwrap_or_default();
    let opts = a
        .send
        .source_options(qmp, !a.no_free_elision, security, vm)?;
    let tty = std::io::stderr().is_terminal();
    let notify = move |n: Notice<'_>| print_notice(n, tty);
    if a.dry_run {
        let d = Source::for_dry_run(opts, &notify)?.predict()?;
        match a.send.json {
            true => println!("{}", serde_json::to_string_pretty(&d.to_json()?)?),
            false => print!("{}", d.to_text()),
        }
        return Ok(());
    }
    let src = Source::for_migration(opts, &notify)?;
    let to = a
        .send
        .to
        .ok_or_else(|| anyhow!("--to HOST:PORT is required"))?;
    let s = src.migrate(&to)?;
    match a.send.json {
        true => println!("{}", serde_json::to_string_pretty(&s)?),
        false => print!("{}", s.to_text()),
    }
    Ok(())
}

fn proxy_main(mut a: ProxyArgs) -> Result<()> {
    let security = a.send.link.security()?;
    let to = a
        .send
        .to
        .take()
        .ok_or_else(|| anyhow!("--to HOST:PORT is required"))?;
    let opts = ProxyOptions {
        listen: a.listen,
        pid: a.pid,
        profile: a.send.profile.take(),
        disk: a.send.disk.take(),
        disk_format: a.send.disk_format,
        teleport: !a.send.no_teleport,
        switchover_check: a.send.switchover_check,
        accept_timeout: Duration::from_secs(a.accept_timeout),
        sender: a.send.sender_options()?,
        security,
        vm: a.vm.take().unwrap_or_default(),
    };
    let tty = std::io::stderr().is_terminal();
    let notify = move |n: Notice<'_>| print_notice(n, tty);
    let s = proxy::relay(&opts, &to, &notify, |addr| {
        eprintln!("pct-migrate: proxy listening on {addr} for the source QEMU")
    })?;
    match a.send.json {
        true => println!("{}", serde_json::to_string_pretty(&s)?),
        false => print!("{}", s.to_text()),
    }
    Ok(())
}

fn receive_main(a: ReceiveArgs) -> Result<()> {
    if let Some(config) = &a.config {
        return serve_main(config, &a);
    }
    let security = a.link.security()?;
    let qemu = match (a.qmp, a.qemu_incoming) {
        (Some(qmp), _) => DestinationQemu::Qmp(qmp),
        (None, Some(addr)) => DestinationQemu::Incoming(addr),
        (None, None) => return Err(anyhow!("--qmp or --qemu-incoming is required")),
    };
    let opts = DestinationOptions {
        listen: a
            .listen
            .ok_or_else(|| anyhow!("--listen HOST:PORT is required"))?,
        security,
        qemu,
        disk: a.disk.ok_or_else(|| anyhow!("--disk is required"))?,
        disk_format: a.disk_format,
        accept_timeout: Duration::from_secs(a.accept_timeout.unwrap_or(600)),
        receiver: ReceiverOptions {
            record: a.record_stream,
            ..ReceiverOptions::default()
        },
    };
    let got = destination::receive(&opts, &|n| eprintln!("pct-migrate: {n}"))?;
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&got.to_json()?)?),
        false => print!("{}", got.to_text(&opts.disk)),
    }
    Ok(())
}

/// `receive --config`: the receiver service. Each event is a line on stderr; with --json,
/// each migration's end is also a JSON line on stdout.
fn serve_main(config: &std::path::Path, a: &ReceiveArgs) -> Result<()> {
    let cfg = ServiceConfig::load(config)?;
    // The command line's --tls-dir or --insecure-plaintext, else the file's.
    let link = match (&a.link.tls_dir, a.link.insecure_plaintext) {
        (None, false) => LinkArgs {
            tls_dir: cfg.tls_dir.clone(),
            insecure_plaintext: cfg.insecure_plaintext,
        },
        (tls_dir, insecure_plaintext) => LinkArgs {
            tls_dir: tls_dir.clone(),
            insecure_plaintext,
        },
    };
    let security = link.security()?;
    if matches!(security, Security::Plaintext) {
        eprintln!(
            "pct-migrate: WARNING: no sender is authenticated, so any sender that reaches \
             {} may migrate into any VM of {}",
            cfg.listen,
            config.display()
        );
    }
    let json = a.json;
    let notify = move |e: service::Event<'_>| {
        eprintln!("pct-migrate: {e}");
        if let (
            true,
            service::Event::Finished {
                vm, who, result, ..
            },
        ) = (json, &e)
        {
            let mut v = match result {
                Ok(r) => r.to_json().unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": pct::errors::chain_text(e) }),
            };
            v["vm"] = (*vm).into();
            v["sender"] = (*who).into();
            println!("{v}");
        }
    };
    let served = service::serve(
        cfg,
        security,
        ReceiverOptions::default(),
        a.sessions,
        Arc::new(notify),
    )?;
    let rss = pct::selfstat::peak_rss()
        .map_or_else(|| "unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6));
    eprintln!(
        "pct-migrate: receiver service stopped: {} received, {} failed, {} refused; peak RSS {rss}",
        served.received, served.failed, served.refused
    );
    match served.failed {
        0 => Ok(()),
        n => bail!("{n} migration(s) failed"),
    }
}

fn keygen_main(a: KeygenArgs) -> Result<()> {
    let issued = certs::keygen(&a.out, &a.hosts)?;
    match issued.new_ca {
        true => println!(
            "new CA: {} (its key: {}; keep it off the migration hosts)",
            issued.ca.display(),
            a.out.join(certs::CA_KEY_FILE).display()
        ),
        false => println!("signed by the existing CA {}", issued.ca.display()),
    }
    for dir in &issued.hosts {
        println!("--tls-dir {}", dir.display());
    }
    Ok(())
}

fn inspect_main(a: InspectArgs) -> Result<()> {
    let opts = InspectOptions {
        pages: a.page,
        block: a.block,
        sections: a.sections,
        last_records: a.against.is_some(),
    };
    let found = inspect(&a.file, &opts)?;
    print!("{}", found.to_text());
    if let Some(ram) = &a.against {
        print!("{}", found.compare(ram)?.to_text());
    }
    Ok(())
}
