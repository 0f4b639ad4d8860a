//! `pct-introspect`: build kernel profiles and inspect a guest's page cache from outside.
//!
//! Subcommands:
//! - `build-profile INPUT`: a vmlinux (with `--module` for types that live in modules), a
//!   Volatility 2 profile zip, or a Volatility 3 ISF (`.json`, `.json.xz`) → pct profile JSON;
//!   `build-profile --from-memory (--memory IMG | --qmp SOCK)`: the same from a guest's memory.
//! - `profiles`: list the shipped profiles, or pick the one matching a banner/build-id.
//! - `scan`: the forensic dry-run over a guest's memory (see `scan.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

#[path = "pct-introspect/scan.rs"]
mod scan;
use pct::kernel::self_profile::build_profile_from_memory_with;
use pct::profile::{self, BuildOptions, DebugFormat, Profile};

#[derive(Parser)]
#[command(
    name = "pct-introspect",
    version,
    about = "Agentless page-cache introspection of Linux guests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a profile from a vmlinux with debug info (or import a Volatility 2/3 profile).
    BuildProfile(BuildArgs),
    /// List shipped profiles, or find the one matching a memory image's banner or build-id.
    Profiles(ProfilesArgs),
    /// Forensic dry-run: what page cache a guest holds and what the destination could restore.
    Scan(scan::ScanArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["input", "from_memory"])))]
struct BuildArgs {
    /// vmlinux (ELF with .BTF and/or DWARF), Volatility 2 profile (.zip) or ISF (.json[.xz]).
    input: Option<PathBuf>,
    /// Build from a guest's memory alone (its kallsyms and BTF), no vmlinux needed:
    /// give --memory IMG or --qmp SOCK.
    #[arg(long, conflicts_with_all = ["input", "modules", "method", "export_isf"])]
    from_memory: bool,
    /// With --from-memory: a raw RAM file or a `dump-guest-memory` ELF core.
    #[arg(long, requires = "from_memory", conflicts_with = "qmp")]
    memory: Option<PathBuf>,
    /// With --from-memory: a live QEMU's QMP socket.
    #[arg(long, requires = "from_memory")]
    qmp: Option<PathBuf>,
    /// With --from-memory: also write the BTF found in memory to DIR (vmlinux.btf and one
    /// <module>.btf each), for pahole or bpftool.
    #[arg(long, value_name = "DIR", requires = "from_memory")]
    dump_btf: Option<PathBuf>,
    /// Kernel module (or its -dbg debug file) providing types vmlinux lacks, e.g. ext4.ko.
    #[arg(long = "module", value_name = "KO")]
    modules: Vec<PathBuf>,
    /// Output file [default: profiles/<distribution>-<release>.json].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Type information to read from vmlinux.
    #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
    method: MethodArg,
    /// Also write the profile as a Volatility 3 ISF (.json or .json.xz not supported: plain JSON).
    #[arg(long, value_name = "FILE")]
    export_isf: Option<PathBuf>,
    /// Print the profile to stdout instead of writing a file.
    #[arg(long, conflicts_with = "output")]
    stdout: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// BTF when present, DWARF for what it lacks.
    Auto,
    Btf,
    Dwarf,
}

#[derive(clap::Args)]
struct ProfilesArgs {
    /// Directory of profiles [default: $PCT_PROFILES or the source tree's profiles/].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Pick the profile matching this banner (`Linux version …`) or build-id (hex).
    #[arg(long, value_name = "BANNER|BUILD_ID")]
    memory_banner: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::BuildProfile(a) => build(a),
        Cmd::Profiles(a) => profiles(a).map_err(|e| e.to_string()),
        Cmd::Scan(a) => {
            return scan::run(a).unwrap_or_else(|e| {
                eprintln!("pct-introspect scan: error: {e}");
                ExitCode::FAILURE
            })
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pct-introspect: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build(a: BuildArgs) -> Result<ExitCode, String> {
    let t0 = Instant::now();
    let method = match a.method {
        MethodArg::Auto => DebugFormat::Auto,
        MethodArg::Btf => DebugFormat::Btf,
        MethodArg::Dwarf => DebugFormat::Dwarf,
    };
    let p: Profile = match (&a.input, a.from_memory) {
        (Some(input), false) => profile::import_any(
            input,
            &BuildOptions {
                modules: a.modules.clone(),
                method,
            },
        )
        .map_err(|e| e.to_string())?,
        _ => {
            let mem = scan::open_memory(a.memory.as_deref(), a.qmp.as_deref())?;
            build_profile_from_memory_with(&mem, a.dump_btf.as_deref())
                .map_err(|e| format!("building a profile from {}: {e}", mem.description()))?
                .0
        }
    };
    let elapsed = t0.elapsed();
    let json = p.to_json();
    if a.stdout {
        print!("{json}");
    } else {
        let out = a
            .output
            .unwrap_or_else(|| Path::new("profiles").join(profile::default_file_name(&p)));
        std::fs::write(&out, &json).map_err(|e| format!("writing {}: {e}", out.display()))?;
        eprintln!(
            "wrote {} ({} bytes): release {}, build-id {}, {} symbols, {} types, {} enums, {} absent, via {} in {:.3} s",
            out.display(),
            json.len(),
            p.kernel.release.as_deref().unwrap_or("?"),
            p.kernel.build_id.as_deref().unwrap_or("-"),
            p.symbols.len(),
            p.types.len(),
            p.enums.len(),
            p.absent.len(),
            p.source.method,
            elapsed.as_secs_f64()
        );
    }
    if let Some(isf) = a.export_isf {
        let text = profile::isf::export(&p);
        std::fs::write(&isf, text).map_err(|e| format!("writing {}: {e}", isf.display()))?;
        eprintln!("wrote {}", isf.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn profiles(a: ProfilesArgs) -> Result<ExitCode, profile::Error> {
    let dir = a.dir.unwrap_or_else(profile::profiles_dir);
    if let Some(key) = a.memory_banner {
        return match profile::find_matching_in(&dir, &key)? {
            Some((path, p, q)) => {
                println!(
                    "{}\t{}\t{}\tmatched by {:?}",
                    path.display(),
                    p.kernel.release.as_deref().unwrap_or("?"),
                    p.kernel.build_id.as_deref().unwrap_or("-"),
                    q
                );
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("pct-introspect: no profile in {} matches", dir.display());
                Ok(ExitCode::FAILURE)
            }
        };
    }
    for (path, p) in profile::list_profiles(&dir)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        match p {
            Ok(p) => println!(
                "{name}\trelease={}\tbuild-id={}\tmethod={}",
                p.kernel.release.as_deref().unwrap_or("?"),
                p.kernel.build_id.as_deref().unwrap_or("-"),
                p.source.method
            ),
            Err(e) => println!("{name}\tunreadable: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
