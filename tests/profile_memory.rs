//! Profiles from a guest's memory alone (kallsyms and BTF, no vmlinux), on real Debian
//! guests of each 6.1 flavour: the profile equals the one built from the `-dbg` vmlinux
//! (plus ext4.ko's debug file) in every symbol, offset, size and enum value; pahole,
//! reading the BTF blobs pct found in memory, agrees; the blobs are byte for byte the
//! `.BTF` sections of vmlinux and ext4.ko; a scan gives the identical cache map with
//! either profile; and bad or hostile images give clear errors.

mod support;

use pct::introspect::{scan, ScanOptions};
use pct::kernel::btf::vmlinux_btf;
use pct::kernel::kallsyms::{FoundBy, Kallsyms};
use pct::kernel::select::{select_profile_in, Origin, Places};
use pct::kernel::self_profile::{build_profile_from_memory, build_profile_from_memory_with};
use pct::kernel::{find_vmcoreinfo, Location};
use pct::memory::GuestMemory;
use pct::profile::Profile;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use support::lab::{Guest, GuestSpec};
use support::profile::{
    compare_with_pahole, kernel_dir, kernel_dir_of, lab_profile, pahole, type_names,
};

/// Field-by-field comparison of a profile from memory with one from vmlinux; returns a
/// one-line account of what was compared. Symbol sizes: kallsyms has none, so only the
/// banner's (its text's length) is compared.
fn compare(mem: &Profile, elf: &Profile) -> String {
    let mut diffs = Vec::new();
    if mem.kernel != elf.kernel {
        diffs.push(format!("kernel: {:?} vs {:?}", mem.kernel, elf.kernel));
    }
    let mut symbols = 0;
    for (k, s) in &elf.symbols {
        match mem.symbols.get(k) {
            Some(m) if m.address == s.address && m.name == s.name => symbols += 1,
            other => diffs.push(format!("symbol {k}: {other:?} vs {s:?}")),
        }
    }
    for k in mem.symbols.keys().filter(|k| !elf.symbols.contains_key(*k)) {
        diffs.push(format!("symbol {k} only from memory"));
    }
    match (
        mem.symbols.get("linux_banner"),
        elf.symbols.get("linux_banner"),
    ) {
        (Some(m), Some(e)) if m.size == e.size => {}
        (m, e) => diffs.push(format!("linux_banner size: {m:?} vs {e:?}")),
    }
    let mut fields = 0;
    for (k, t) in &elf.types {
        let Some(m) = mem.types.get(k) else {
            diffs.push(format!("type {k} missing from memory"));
            continue;
        };
        if (m.name.as_ref(), &m.kind, m.size) != (t.name.as_ref(), &t.kind, t.size) {
            diffs.push(format!(
                "type {k}: {} {} vs {} {}",
                m.kind, m.size, t.kind, t.size
            ));
        }
        for (f, ef) in &t.fields {
            match m.fields.get(f) {
                Some(mf) if mf == ef => fields += 1,
                other => diffs.push(format!("{k}.{f}: {other:?} vs {ef:?}")),
            }
        }
        if m.fields.len() != t.fields.len() {
            diffs.push(format!(
                "{k}: {} fields vs {}",
                m.fields.len(),
                t.fields.len()
            ));
        }
    }
    if mem.types.len() != elf.types.len() {
        diffs.push(format!("{} types vs {}", mem.types.len(), elf.types.len()));
    }
    let mut values = 0;
    for (k, e) in &elf.enums {
        match mem.enums.get(k) {
            Some(m) if m == e => values += e.values.len(),
            other => diffs.push(format!("enum {k}: {other:?} vs {e:?}")),
        }
    }
    if mem.enums.len() != elf.enums.len() {
        diffs.push(format!("{} enums vs {}", mem.enums.len(), elf.enums.len()));
    }
    if mem.absent != elf.absent {
        diffs.push(format!("absent: {:?} vs {:?}", mem.absent, elf.absent));
    }
    assert!(
        diffs.is_empty(),
        "the profile from memory differs from the one from vmlinux:\n{}",
        diffs.join("\n")
    );
    format!(
        "{symbols} symbols, {} types with {fields} fields, {} enums with {values} values, {} absent entries: all equal",
        elf.types.len(),
        elf.enums.len(),
        elf.absent.len()
    )
}

/// Equal but for `source` (which names the memory image read); no profile dump on failure.
fn assert_same(a: &Profile, b: &Profile, what: &str) {
    let strip = |p: &Profile| Profile {
        source: Default::default(),
        ..p.clone()
    };
    assert!(strip(a) == strip(b), "{what}: the profiles differ");
}

/// The raw `.BTF` section of an ELF file.
fn btf_section(path: &Path) -> Vec<u8> {
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = object::File::parse(&*data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sec = file
        .section_by_name(".BTF")
        .unwrap_or_else(|| panic!("{} has no .BTF", path.display()));
    sec.data().expect(".BTF data").to_vec()
}

fn check_flavour(flavour: &'static str) {
    let (_, elf_profile) = lab_profile(flavour);
    let kdir = kernel_dir(flavour).expect("the lab kernel");
    check_kernel(flavour, None, kdir, elf_profile, FoundBy::Vmcoreinfo);
}

/// [`check_flavour`] for `kdir`, the kernel of `suite`, against `elf_profile`, its profile
/// from vmlinux.
fn check_kernel(
    flavour: &'static str,
    suite: Option<&'static str>,
    kdir: std::path::PathBuf,
    elf_profile: Profile,
    kallsyms_found_by: FoundBy,
) {
    let mut spec = GuestSpec::new("apache").layout("mini", "plain");
    spec.flavour = flavour;
    spec.suite = suite;
    let mut g = Guest::start(spec);
    g.wait_ready();
    g.stop();
    let mem = GuestMemory::open(&g.ram_path).expect("guest RAM");

    let dump = tempfile::tempdir().expect("temporary directory");
    let t = Instant::now();
    let (p, stats) =
        build_profile_from_memory_with(&mem, Some(dump.path())).unwrap_or_else(|e| panic!("{e}"));
    let took = t.elapsed();
    assert_eq!(p.source.method, "btf-memory");
    assert_eq!(stats.kallsyms_found_by, kallsyms_found_by);
    let account = compare(&p, &elf_profile);
    eprintln!(
        "{flavour}: built from memory in {:.0} ms ({} symbols decoded, {} bytes of vmlinux BTF, \
         modules {:?}); against the vmlinux profile: {account}",
        took.as_secs_f64() * 1e3,
        stats.symbols_decoded,
        stats.vmlinux_btf_bytes,
        stats.modules
    );

    // The blobs pct read are the kernel's own .BTF sections, byte for byte.
    let vmlinux_btf = dump.path().join("vmlinux.btf");
    assert!(
        std::fs::read(&vmlinux_btf).expect("vmlinux.btf") == btf_section(&kdir.join("vmlinux")),
        "the BTF read from memory is not vmlinux's .BTF section"
    );
    let ext4_ko = kdir.join("modules/fs/ext4/ext4.ko");
    let modular = ext4_ko.exists();
    if modular {
        assert!(
            std::fs::read(dump.path().join("ext4.btf")).expect("ext4.btf") == btf_section(&ext4_ko),
            "ext4's BTF read from memory is not ext4.ko's .BTF section"
        );
        assert!(
            p.source.inputs.iter().any(|i| i.contains("module ext4")),
            "{:?}",
            p.source.inputs
        );
    }

    // pahole, reading those blobs, agrees with the profile.
    let names = type_names(&p);
    let (in_ext4, in_vmlinux): (Vec<&str>, Vec<&str>) = names
        .iter()
        .map(String::as_str)
        .partition(|n| modular && n.starts_with("ext4_"));
    let keys_of = |names: &[&str]| -> Vec<String> {
        p.types
            .iter()
            .filter(|(k, t)| names.contains(&t.name.as_deref().unwrap_or(k)))
            .map(|(k, _)| k.clone())
            .collect()
    };
    let ph = pahole(&vmlinux_btf, "btf", None, &in_vmlinux);
    let vk = keys_of(&in_vmlinux);
    let vk: Vec<&str> = vk.iter().map(String::as_str).collect();
    let mut n = compare_with_pahole(&p, &ph, Some(&vk));
    if modular {
        let ph = pahole(
            &dump.path().join("ext4.btf"),
            "btf",
            Some(&vmlinux_btf),
            &in_ext4,
        );
        let ek = keys_of(&in_ext4);
        let ek: Vec<&str> = ek.iter().map(String::as_str).collect();
        n += compare_with_pahole(&p, &ph, Some(&ek));
    }
    assert!(n > 80, "compared only {n} fields with pahole");
    eprintln!("{flavour}: pahole on the BTF found in memory agrees on {n} fields");

    // The same cache map with either profile.
    let disk =
        pct::disk::Disk::open(g.path("disk.img"), pct::disk::DiskFormat::Raw).expect("disk image");
    let opts = ScanOptions {
        cross_check: false,
        verify: true,
        ..ScanOptions::default()
    };
    let (a, ra) = scan(&mem, &p, Some(&disk), opts).unwrap_or_else(|e| panic!("{e}"));
    let (b, _) = scan(&mem, &elf_profile, Some(&disk), opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(a.runs.len() > 100, "only {} runs", a.runs.len());
    assert_eq!(a.runs, b.runs, "the cache maps differ");
    let v = ra.verify.expect("verified");
    assert_eq!(v.mismatching_pages, 0);
    eprintln!(
        "{flavour}: identical cache maps with either profile: {} runs, {} bytes, all verified",
        a.runs.len(),
        a.bytes()
    );
}

#[test]
fn cloud_amd64_profile_from_memory_equals_vmlinux_profile() {
    check_flavour("cloud-amd64");
}

#[test]
fn amd64_profile_from_memory_with_modular_ext4_equals_vmlinux_profile() {
    check_flavour("amd64");
}

#[test]
fn rt_amd64_profile_from_memory_equals_vmlinux_profile() {
    check_flavour("rt-amd64");
}

/// Another Debian release's cloud kernel, whose release names `marker`.
fn check_release(suite: &'static str, marker: &str, found_by: FoundBy) {
    let kdir = kernel_dir_of("cloud-amd64", suite).expect("the kernel");
    let elf = pct::profile::build_profile(&kdir.join("vmlinux"), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let release = elf.kernel.release.clone().unwrap_or_default();
    assert!(release.contains(marker), "{release}");
    check_kernel("cloud-amd64", Some(suite), kdir, elf, found_by);
}

/// Debian 13's kernel (6.12 from trixie): no profile ships for it, and none is needed.
#[test]
fn debian13_cloud_profile_from_memory_equals_vmlinux_profile() {
    check_release("trixie", "+deb13", FoundBy::Vmcoreinfo);
}

/// Debian 11's kernel (5.10 from bullseye): its VMCOREINFO names no kallsyms tables, so
/// pct finds them by their structure.
#[test]
fn debian11_cloud_profile_from_memory_with_kallsyms_found_by_structure() {
    check_release("bullseye", "5.10.", FoundBy::Structure);
}

/// A private, writable copy of a guest's RAM to corrupt.
struct Copy {
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
}

impl Copy {
    fn of(src: &Path) -> Copy {
        let file = tempfile::Builder::new()
            .prefix("pct-test-ram-")
            .tempfile()
            .expect("temporary file");
        std::fs::copy(src, file.path()).expect("copy guest RAM");
        let path = file.path().to_owned();
        Copy { _file: file, path }
    }

    fn edit(&self, f: impl FnOnce(&mut [u8])) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .expect("open copy");
        // SAFETY: the file is this test's own temporary copy; nothing else maps it.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("map copy");
        f(&mut map);
        map.flush().expect("flush");
    }

    fn build(&self) -> Result<Profile, String> {
        let mem = GuestMemory::open(&self.path).map_err(|e| e.to_string())?;
        build_profile_from_memory(&mem)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The ranges of every VMCOREINFO note text in a raw image (RAM may hold stale or partial
/// copies besides the kernel's own note).
fn vmcoreinfo_ranges(ram: &[u8]) -> Vec<std::ops::Range<usize>> {
    let marker = b"VMCOREINFO\0\0OSRELEASE=";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&ram[from..], marker) {
        let at = from + i + 12;
        let len = ram[at..]
            .iter()
            .take(64 << 10)
            .position(|&b| b == 0)
            .unwrap_or(0);
        out.push(at..at + len);
        from = at;
    }
    assert!(!out.is_empty(), "no VMCOREINFO in RAM");
    out
}

/// The range of the kernel's own note: the first that says where the kernel is.
fn vmcoreinfo_range(ram: &[u8]) -> std::ops::Range<usize> {
    vmcoreinfo_ranges(ram)
        .into_iter()
        .find(|r| {
            let t = &ram[r.clone()];
            find(t, b"KERNELOFFSET=").is_some() && find(t, b"NUMBER(phys_base)=").is_some()
        })
        .expect("a complete VMCOREINFO note in RAM")
}

/// Renames the `SYMBOL(kallsyms_…)` entries of every VMCOREINFO copy, so that pct must find
/// the tables itself.
fn hide_kallsyms_from_vmcoreinfo(ram: &mut [u8]) {
    let mut hidden = 0;
    for r in vmcoreinfo_ranges(ram) {
        let text = &mut ram[r];
        while let Some(i) = find(text, b"SYMBOL(kallsyms_") {
            text[i + 7] = b'x';
            hidden += 1;
        }
    }
    assert!(hidden >= 6, "VMCOREINFO named {hidden} kallsyms tables");
}

/// One booted cloud guest serves the structural search, profile selection, both CLIs, and
/// every bad-input case (each on a fresh private copy of its RAM).
#[test]
fn kallsyms_structure_selection_and_bad_images() {
    let (lab_path, elf_profile) = lab_profile("cloud-amd64");
    let mut g = Guest::start(GuestSpec::new("apache").layout("mini", "plain"));
    g.wait_ready();
    let live = GuestMemory::open(&g.ram_path).expect("guest RAM");
    let from_memory = build_profile_from_memory(&live)
        .unwrap_or_else(|e| panic!("{e}"))
        .0;

    // pct-migrate --dry-run on the live guest, without --profile: it builds one from memory.
    let empty = tempfile::tempdir().expect("temporary directory");
    let cache = tempfile::tempdir().expect("temporary directory");
    let out = Command::new(env!("CARGO_BIN_EXE_pct-migrate"))
        .arg("--qmp")
        .arg(g.path("qmp-pct.sock"))
        .arg("--dry-run")
        .env("PCT_PROFILES", empty.path())
        .env("PCT_PROFILE_CACHE", cache.path())
        .output()
        .expect("run pct-migrate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pct-migrate --dry-run: {err}");
    assert!(
        err.contains("using profile built from the guest's memory"),
        "{err}"
    );
    let build_id = elf_profile.kernel.build_id.clone().expect("build-id");
    let cached = cache.path().join(format!("{build_id}.json"));
    assert!(cached.exists(), "no {} after the dry run", cached.display());

    g.stop();
    let copy = Copy::of(&g.ram_path);
    drop(g);

    // Tables found by their structure: the same profile.
    copy.edit(hide_kallsyms_from_vmcoreinfo);
    let mem = GuestMemory::open(&copy.path).expect("copy");
    let (p, stats) = build_profile_from_memory(&mem).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.kallsyms_found_by, FoundBy::Structure);
    eprintln!("kallsyms found by structure: {}", compare(&p, &elf_profile));
    drop(mem);

    // Selection: built from memory and cached; then the cache; then a shipped profile.
    let shipped = tempfile::tempdir().expect("temporary directory");
    let cache = tempfile::tempdir().expect("temporary directory");
    let places = Places {
        shipped: Some(shipped.path().to_owned()),
        cache: Some(cache.path().to_owned()),
    };
    let mem = GuestMemory::open(&copy.path).expect("copy");
    let s = select_profile_in(&mem, None, &places).unwrap_or_else(|e| panic!("{e}"));
    let Origin::FromMemory {
        cached_at: Some(at),
        ..
    } = &s.origin
    else {
        panic!("first selection: {}", s.origin)
    };
    assert_eq!(at, &cache.path().join(format!("{build_id}.json")));
    assert_same(&s.profile, &from_memory, "selected from memory");
    let s = select_profile_in(&mem, None, &places).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(s.origin, Origin::Cached { .. }), "{}", s.origin);
    assert_same(&s.profile, &from_memory, "selected from the cache");
    std::fs::copy(&lab_path, shipped.path().join("some-kernel.json")).expect("copy profile");
    let s = select_profile_in(&mem, None, &places).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(s.origin, Origin::Shipped { .. }), "{}", s.origin);
    assert!(
        s.profile == elf_profile,
        "the shipped profile was not the one selected"
    );
    drop(mem);

    // pct-introspect scan without --profile: from memory, then from the cache; the same
    // report as with the vmlinux profile.
    let cache = tempfile::tempdir().expect("temporary directory");
    let scan_cli = |profile: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pct-introspect"));
        cmd.arg("scan").arg("--memory").arg(&copy.path);
        if let Some(p) = profile {
            cmd.arg("--profile").arg(p);
        }
        cmd.args(["--format", "json"])
            .env("PCT_PROFILES", empty.path())
            .env("PCT_PROFILE_CACHE", cache.path());
        let out = cmd.output().expect("run pct-introspect scan");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "scan: {err}");
        let mut report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("JSON report");
        for k in ["timings_ms", "rss_anon_kib"] {
            report.as_object_mut().expect("object").remove(k);
        }
        (report, err)
    };
    let (first, err) = scan_cli(None);
    assert!(err.contains("built from the guest's memory"), "{err}");
    let (second, err) = scan_cli(None);
    assert!(
        err.contains("(cached, built from this kernel's memory"),
        "{err}"
    );
    let (given, _) = scan_cli(Some(&lab_path));
    assert_eq!(first, given, "scan reports differ between profiles");
    assert_eq!(second, given);

    // Bad images: each gives a clear error, never a panic. Addresses come from pct's own
    // kallsyms reader on the copy (its tables found by structure, as checked above).
    let (pa, ipa) = {
        let mem = GuestMemory::open(&copy.path).expect("copy");
        let (info, method) = find_vmcoreinfo(&mem)
            .expect("reading RAM")
            .expect("VMCOREINFO");
        let loc = Location::from_vmcoreinfo(&info, method).expect("location");
        let k = Kallsyms::read(&mem, &loc, &info).unwrap_or_else(|e| panic!("{e}"));
        let e = vmlinux_btf(&mem, &loc, None, None)
            .expect_err("no __start_BTF")
            .to_string();
        assert!(
            e.contains("no BTF")
                && e.contains("CONFIG_DEBUG_INFO_BTF")
                && e.contains("build-profile"),
            "{e}"
        );
        let pa = |va: u64| loc.va_to_pa(&mem, va).expect("mapped") as usize;
        (
            pa(k.lookup_name("__start_BTF").expect("__start_BTF")),
            pa(k.tables.token_index),
        )
    };

    // The vmlinux BTF fails validation: a bad magic, then a section past the end.
    let mut saved = [0u8; 24];
    copy.edit(|ram| {
        saved.copy_from_slice(&ram[pa..pa + 24]);
        ram[pa] ^= 0xff;
    });
    let e = copy.build().expect_err("a bad BTF magic must fail");
    assert!(
        e.contains("vmlinux BTF") && e.contains("fails validation") && e.contains("magic"),
        "{e}"
    );
    copy.edit(|ram| {
        ram[pa..pa + 24].copy_from_slice(&saved);
        ram[pa + 12..pa + 16].copy_from_slice(&0x7fff_0000u32.to_le_bytes()); // type_len
    });
    let e = copy
        .build()
        .expect_err("an oversized BTF type section must fail");
    assert!(
        e.contains("fails validation") && e.contains("past the end"),
        "{e}"
    );
    copy.edit(|ram| ram[pa..pa + 24].copy_from_slice(&saved));
    assert!(
        copy.build().is_ok(),
        "restoring the BTF header did not restore the image"
    );

    // No kallsyms anywhere: hidden from VMCOREINFO and the token index wiped.
    let mut saved_ix = vec![0u8; 512];
    copy.edit(|ram| {
        saved_ix.copy_from_slice(&ram[ipa..ipa + 512]);
        ram[ipa..ipa + 512].fill(0);
    });
    let e = copy.build().expect_err("no kallsyms must fail");
    assert!(
        e.contains("kallsyms") && e.contains("not found") && e.contains("build-profile"),
        "{e}"
    );
    copy.edit(|ram| ram[ipa..ipa + 512].copy_from_slice(&saved_ix));

    // No VMCOREINFO: random bytes.
    let junk = tempfile::NamedTempFile::new().expect("temporary file");
    let mut bytes = vec![0u8; 64 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(junk.path(), &bytes).expect("write junk");
    let mem = GuestMemory::open(junk.path()).expect("junk opens as raw RAM");
    let e = build_profile_from_memory(&mem)
        .expect_err("random bytes")
        .to_string();
    assert!(e.contains("VMCOREINFO") && e.contains("--profile"), "{e}");

    // A truncated dump: the note survives, the kernel image does not. The note's page is
    // wherever the kernel allocated it, above the kernel image as often as below: a copy
    // of it at 64 KiB (page-aligned, as the kernel places it) survives a cut at 4 MiB and a
    // bit, below the kernel's lowest load address (16 MiB).
    let short = tempfile::NamedTempFile::new().expect("temporary file");
    let mut head = std::fs::read(&copy.path).expect("read copy");
    let note = vmcoreinfo_range(&head);
    // The note's header (namesz, descsz, type) and its name, "VMCOREINFO\0\0", precede the
    // text.
    let whole = note.start - 24..note.end;
    let low = 0x1_0000;
    head.copy_within(whole.clone(), low);
    let cut = (low + whole.len() + (4 << 20)) & !4095;
    std::fs::write(short.path(), &head[..cut]).expect("write truncated copy");
    drop(head);
    let mem = GuestMemory::open(short.path()).expect("truncated copy opens");
    let e = build_profile_from_memory(&mem)
        .expect_err("truncated")
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    eprintln!("truncated at {cut:#x}: {e}");
}

/// Hostile guest data where the from-memory build reads it: 60 rounds of random 8-byte
/// writes into the kallsyms tables, the BTF blobs of vmlinux and the modules, and the
/// VMCOREINFO text of a real amd64 guest (ext4 a module). Each round gives a profile or an
/// error, within a few seconds, never a panic.
#[test]
fn hostile_kallsyms_and_btf_give_errors_not_panics() {
    let mut spec = GuestSpec::new("idle");
    spec.flavour = "amd64";
    let mut g = Guest::start(spec);
    g.wait_ready();
    g.stop();
    let file = std::fs::File::open(&g.ram_path).expect("guest RAM");
    let mem = GuestMemory::open(&g.ram_path).expect("guest RAM");

    // Physical ranges worth corrupting, found by pct's own readers on the intact image.
    let (info, method) = find_vmcoreinfo(&mem)
        .expect("reading RAM")
        .expect("VMCOREINFO");
    let loc = Location::from_vmcoreinfo(&info, method).expect("location");
    let k = Kallsyms::read(&mem, &loc, &info).unwrap_or_else(|e| panic!("{e}"));
    let pa = |va: u64| loc.va_to_pa(&mem, va).expect("mapped") as usize;
    let t = k.tables;
    let start_btf = k.lookup_name("__start_BTF").expect("__start_BTF");
    let mut targets: Vec<(usize, usize)> = vec![
        (pa(t.token_table), 1024),
        (pa(t.token_index), 512),
        (pa(t.names), 64 << 10),
        (pa(t.offsets), 64 << 10),
        (pa(t.num_syms), 8),
        (pa(start_btf), 4096),
        (pa(start_btf + (1 << 20)), 4096),
    ];
    let vmci = {
        // SAFETY: read-only view of this test's guest RAM.
        let ro = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        vmcoreinfo_range(&ro)
    };
    targets.push((vmci.start, vmci.len()));
    let base = {
        let btf = vmlinux_btf(&mem, &loc, Some(start_btf), k.lookup_name("__stop_BTF"))
            .expect("vmlinux BTF")
            .1;
        pct::profile::btf::Btf::parse_blob(std::borrow::Cow::Owned(btf), None).expect("BTF")
    };
    let modules = pct::kernel::btf::module_btfs(
        &mem,
        &loc,
        &base,
        k.lookup_name("btf_modules").expect("btf_modules"),
    )
    .expect("module BTF");
    for m in modules.iter().filter(|m| m.name == "ext4") {
        targets.push((pa(m.va), 4096));
    }
    drop((base, k, mem));

    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut ok, mut err) = (0, 0);
    for round in 0..60 {
        // SAFETY: a private copy-on-write mapping: the writes stay in this process.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.expect("map");
        for _ in 0..(1 + rnd() % 8) {
            let (start, len) = targets[(rnd() % targets.len() as u64) as usize];
            let off = start + (rnd() as usize % len.max(8)) / 8 * 8;
            if let Some(dst) = map.get_mut(off..off + 8) {
                dst.copy_from_slice(&rnd().to_le_bytes());
            }
        }
        let mem = GuestMemory::from_map(map.make_read_only().expect("read-only"), "hostile")
            .expect("image");
        let t = Instant::now();
        match build_profile_from_memory(&mem) {
            Ok(_) => ok += 1,
            Err(e) => {
                err += 1;
                if round < 8 {
                    eprintln!("round {round}: {e}");
                }
            }
        }
        assert!(
            t.elapsed().as_secs() < 10,
            "round {round} took {:?}",
            t.elapsed()
        );
    }
    eprintln!("hostile rounds: {ok} profiles, {err} errors, no panic");
    assert!(
        err > 0,
        "no corruption was noticed: the rounds did not reach the readers"
    );
}
