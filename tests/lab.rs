//! The guest lab itself: every workload and every disk layout boots a real Debian
//! kernel under QEMU, reaches its ready marker, reports its page cache through the
//! in-guest oracle, and yields a memory dump that carries VMCOREINFO.

mod support;

use object::elf::PT_LOAD;
use object::read::elf::{ElfFile64, ProgramHeader};
use std::time::Duration;
use support::lab::{Guest, GuestSpec};
use support::oracle::{kpf, Oracle};
use support::profile::kernel_dir;
use support::repo;

/// Boots `spec`, checks the guest and a dump of it, and returns the guest's oracle.
fn boot_and_dump(spec: GuestSpec) -> (Guest, Oracle) {
    let label = format!(
        "{}/{}/{}",
        spec.workload,
        spec.fileset.unwrap_or("-"),
        spec.layout
    );
    let mut g = Guest::start(spec);
    let t = g.wait_ready();
    eprintln!(
        "lab: {label} ready {:.1} s after QEMU started",
        t.as_secs_f64()
    );

    let oracle = g.oracle();
    assert!(
        !oracle.files.is_empty(),
        "{label}: oracle reported no files"
    );

    // An ELF core from QEMU with the VMCOREINFO note (needs qemu_fw_cfg in the guest).
    g.stop();
    let core = g.path("core.elf");
    g.dump_elf(&core, false);
    let elf = std::fs::read(&core).expect("read core");
    assert_eq!(&elf[..4], b"\x7fELF", "{label}: dump is not ELF");
    let release = std::fs::read_to_string(
        kernel_dir("cloud-amd64")
            .expect("the lab kernel")
            .join("release"),
    )
    .unwrap();
    let needle = format!("OSRELEASE={}", release.trim());
    assert!(
        find(&elf, b"VMCOREINFO").is_some() && find(&elf, needle.as_bytes()).is_some(),
        "{label}: core lacks a VMCOREINFO note with {needle}"
    );

    // The raw RAM file is the guest's memory: its size is the configured RAM and
    // the ELF core's first PT_LOAD (guest-physical 0) holds the same bytes.
    let ram = std::fs::read(&g.ram_path).expect("read guest RAM file");
    assert_eq!(ram.len() as u64, g.spec.mem_mib as u64 * 1024 * 1024);
    let (off, filesz) = first_load(&elf);
    let n = filesz.min(64 << 20) as usize;
    assert!(
        elf[off as usize..off as usize + n] == ram[..n],
        "{label}: ELF core and RAM file disagree"
    );
    std::fs::remove_file(&core).unwrap();
    g.cont();
    (g, oracle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (file offset, file size) of the first PT_LOAD segment of an ELF64 core.
fn first_load(elf: &[u8]) -> (u64, u64) {
    let file = ElfFile64::<object::Endianness>::parse(elf).expect("parse the ELF core");
    let e = file.endian();
    let ph = file
        .elf_program_headers()
        .iter()
        .find(|ph| ph.p_type(e) == PT_LOAD)
        .expect("no PT_LOAD in core");
    assert_eq!(ph.p_paddr(e), 0, "first PT_LOAD is not at guest-physical 0");
    (ph.p_offset(e), ph.p_filesz(e))
}

/// Special files every lab disk carries behave as the lab promises.
fn check_specials(o: &Oracle, label: &str) {
    let dirty = o.file("/mnt/special/dirty").expect("dirty file in oracle");
    assert!(
        dirty.pages.iter().any(|p| p.flags & kpf::DIRTY != 0),
        "{label}: the file written after boot has no dirty page"
    );
    let tmp = o.file("/tmpfs/copy").expect("tmpfs file in oracle");
    assert!(!tmp.pages.is_empty());
    assert!(
        tmp.pages.iter().all(|p| p.flags & kpf::SWAPBACKED != 0),
        "{label}: tmpfs pages are not swap-backed"
    );
    // Block-mapped (non-extent) files cannot hold unwritten extents: no fallocate there.
    let mut files = vec!["/mnt/special/sparse", "/mnt/special/frag"];
    if label != "noextent" {
        files.push("/mnt/special/falloc");
    }
    for f in files {
        let f = o
            .file(f)
            .unwrap_or_else(|| panic!("{label}: {f} missing from oracle"));
        assert!(
            f.pages.iter().any(|p| p.is_clean_file_page()),
            "{label}: {} has no clean page",
            f.path
        );
    }
    assert!(
        o.files
            .iter()
            .any(|f| f.path.starts_with("/proc/") && f.pages.len() == 256),
        "{label}: the deleted-but-open file is not resident"
    );
}

#[test]
fn apache_guest() {
    let (mut g, o) = boot_and_dump(GuestSpec::new("apache"));
    let www: Vec<_> = o
        .files
        .iter()
        .filter(|f| f.path.starts_with("/mnt/www/"))
        .collect();
    assert_eq!(www.len(), 1024, "apache: not every web file reported");
    let clean: usize = www
        .iter()
        .map(|f| f.pages.iter().filter(|p| p.is_clean_file_page()).count())
        .sum();
    assert_eq!(
        clean,
        1024 * 75,
        "apache: every page of every web file should be cached and clean"
    );
    check_specials(&o, "apache");
    assert_eq!(
        g.command("verify", "PCT-VERIFY", Duration::from_secs(240)),
        "PCT-VERIFY-OK"
    );
}

#[test]
fn idle_guest() {
    let (_g, o) = boot_and_dump(GuestSpec::new("idle"));
    let www_pages: usize = o
        .files
        .iter()
        .filter(|f| f.path.starts_with("/mnt/www/"))
        .map(|f| f.pages.len())
        .sum();
    assert!(
        www_pages < 1000,
        "idle: web files should not be cached ({www_pages} pages)"
    );
    check_specials(&o, "idle");
}

#[test]
fn db_guest_keeps_writing() {
    let (mut g, o) = boot_and_dump(GuestSpec::new("db"));
    let data = o.file("/mnt/db/data").expect("db data file");
    assert!(
        data.pages.len() > 70_000,
        "db: data file mostly cached ({} pages)",
        data.pages.len()
    );
    // The load runs on: it reports every 100 random reads/writes (with fsync).
    let t = std::time::Instant::now();
    let skip = g.serial_log().len();
    let a = g.wait_serial(skip, "PCT-DB ops=", Duration::from_secs(120));
    let skip = g.serial_log().len();
    let b = g.wait_serial(skip, "PCT-DB ops=", Duration::from_secs(120));
    let ops = |l: &str| l.trim_start_matches("PCT-DB ops=").parse::<u64>().unwrap();
    assert!(
        ops(&b) > ops(&a),
        "db: the load does not progress ({a}, {b})"
    );
    eprintln!(
        "lab: db load {} -> {} in {:.1} s",
        ops(&a),
        ops(&b),
        t.elapsed().as_secs_f64()
    );
}

fn layout(layout: &'static str) {
    let (mut g, o) = boot_and_dump(GuestSpec::new("apache").layout("mini", layout));
    let www: usize = o
        .files
        .iter()
        .filter(|f| f.path.starts_with("/mnt/www/"))
        .count();
    assert_eq!(www, 128, "{layout}: web files");
    check_specials(&o, layout);
    assert_eq!(
        g.command("verify", "PCT-VERIFY", Duration::from_secs(120)),
        "PCT-VERIFY-OK"
    );
}

#[test]
fn layout_plain() {
    layout("plain")
}
#[test]
fn layout_partitioned() {
    layout("part")
}
#[test]
fn layout_1k_blocks() {
    layout("bs1k")
}
#[test]
fn layout_2k_blocks() {
    layout("bs2k")
}
#[test]
fn layout_no_extents() {
    layout("noextent")
}

#[test]
fn bad_environment_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("bash")
            .arg(repo().join("tools/lab/run-guest.sh"))
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--mem", "100000000"]);
    assert!(e.contains("/dev/shm has") && e.contains("MiB free"), "{e}");
    let e = run(&["--flavour", "arm64"]);
    assert!(e.contains("unknown kernel flavour 'arm64'"), "{e}");
    let e = run(&["--workload", "nosuch"]);
    assert!(e.contains("unknown workload"), "{e}");
}
