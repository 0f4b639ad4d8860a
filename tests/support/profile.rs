//! Kernels from the lab's fetch script, the lab kernels' profiles, pahole as the
//! independent oracle, and the reference data in `../shared`.

use super::{repo, run_ok};
use pct::profile::{build_profile, cache, BuildOptions, DebugFormat, Profile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// `$CARGO_MANIFEST_DIR/../shared`.
pub fn shared() -> PathBuf {
    repo().join("..").join("shared")
}

static FETCHED: OnceLock<Mutex<BTreeMap<String, Option<PathBuf>>>> = OnceLock::new();

/// The kernel directory for a flavour, fetched with tools/lab/fetch-kernel.sh if needed.
/// `None` (with a message) when it cannot be fetched here.
pub fn kernel_dir(flavour: &str) -> Option<PathBuf> {
    kernel_dir_of(flavour, "bookworm")
}

/// [`kernel_dir`] of another Debian suite's kernel (`trixie`, `bullseye`).
pub fn kernel_dir_of(flavour: &str, suite: &str) -> Option<PathBuf> {
    let m = FETCHED.get_or_init(|| Mutex::new(BTreeMap::new()));
    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{suite}/{flavour}");
    if let Some(d) = m.get(&key) {
        return d.clone();
    }
    let out = Command::new("bash")
        .arg(repo().join("tools/lab/fetch-kernel.sh"))
        .args([flavour, suite])
        .output();
    let dir = match out {
        Ok(o) if o.status.success() => {
            let d = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_owned());
            d.join("vmlinux").exists().then_some(d)
        }
        Ok(o) => {
            skip_or_fail(&format!(
                "tools/lab/fetch-kernel.sh {flavour} {suite} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            None
        }
        Err(e) => {
            skip_or_fail(&format!("cannot run tools/lab/fetch-kernel.sh: {e}"));
            None
        }
    };
    m.insert(key, dir.clone());
    dir
}

/// `$PCT_CACHE` (default /var/cache/pct), where the lab keeps what it downloads and builds.
pub fn pct_cache() -> PathBuf {
    std::env::var_os("PCT_CACHE").map_or_else(|| PathBuf::from("/var/cache/pct"), PathBuf::from)
}

/// The directory of cached lab profiles, `$PCT_CACHE/profiles` (shared with
/// tools/lab/lab-profile.sh).
pub fn lab_profiles_dir() -> PathBuf {
    pct_cache().join("profiles")
}

type Cell = Arc<OnceLock<(PathBuf, Profile)>>;
static LAB_PROFILES: OnceLock<Mutex<BTreeMap<String, Cell>>> = OnceLock::new();

/// The profile of the lab's kernel of `flavour` (the one fetch-kernel.sh resolves), and its
/// path: `$PCT_CACHE/profiles/<build-id>.json`, as tools/lab/lab-profile.sh makes it. Built
/// from the fetched vmlinux (with ext4.ko.debug where ext4 is a module) when the cache lacks
/// it or holds one older than the manifest or the profile builder (src/profile/), and
/// published atomically (temporary file, rename): tests and scripts running at the same time
/// share it. Once per flavour per process. Panics when the kernel cannot be fetched.
pub fn lab_profile(flavour: &str) -> (PathBuf, Profile) {
    lab_profile_of(flavour, "bookworm")
}

/// [`lab_profile`] of another Debian suite's kernel (`trixie`, `bullseye`).
pub fn lab_profile_of(flavour: &str, suite: &str) -> (PathBuf, Profile) {
    let cell = {
        let m = LAB_PROFILES.get_or_init(|| Mutex::new(BTreeMap::new()));
        let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(format!("{suite}/{flavour}")).or_default().clone()
    };
    cell.get_or_init(|| {
        let dir = kernel_dir_of(flavour, suite)
            .unwrap_or_else(|| panic!("the {suite} {flavour} kernel is not available"));
        cached_lab_profile(&dir)
    })
    .clone()
}

fn cached_lab_profile(kdir: &Path) -> (PathBuf, Profile) {
    let vmlinux = kdir.join("vmlinux");
    let map = pct::profile::elf::map_file(&vmlinux).unwrap_or_else(|e| panic!("{e}"));
    let build_id = pct::profile::elf::ElfImage::parse(&vmlinux, &map)
        .unwrap_or_else(|e| panic!("{e}"))
        .build_id()
        .unwrap_or_else(|| panic!("{} has no build-id", vmlinux.display()));
    drop(map);
    // The same cache layout as the user's profile cache: pct's own reader and writer.
    let dir = lab_profiles_dir();
    let current = cache::cache_path(&dir, &build_id).is_some_and(|p| is_current(&p));
    if let Some(found) = cache::find_cached(&dir, &build_id).filter(|_| current) {
        return found;
    }
    let ko = kdir.join("ext4.ko.debug");
    let opts = BuildOptions {
        modules: ko.exists().then_some(ko).into_iter().collect(),
        method: DebugFormat::Auto,
    };
    let p = build_profile(&vmlinux, &opts)
        .unwrap_or_else(|e| panic!("building the lab profile from {}: {e}", vmlinux.display()));
    let path = cache::store(&dir, &p).unwrap_or_else(|e| panic!("caching the lab profile: {e}"));
    (path, p)
}

/// Is the cached profile at `path` newer than the manifest and every file of the profile
/// builder (src/profile/)? (tools/lab/lab-profile.sh applies the same rule.)
fn is_current(path: &Path) -> bool {
    let Ok(cached) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return false;
    };
    let mut inputs = vec![repo().join("symbols/manifest.toml")];
    if let Ok(rd) = std::fs::read_dir(repo().join("src/profile")) {
        inputs.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
    }
    inputs.iter().all(|f| {
        std::fs::metadata(f)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t <= cached)
    })
}

/// A missing prerequisite (a kernel that could not be fetched, a fixture under
/// ../shared, volatility3) fails the test: tools/test.sh installs all of them, so a
/// skip would hide a broken install. `PCT_ALLOW_SKIP=1` turns it into a skip for
/// partial runs on a machine without them.
pub fn skip_or_fail(msg: &str) {
    if std::env::var_os("PCT_ALLOW_SKIP").is_some() {
        eprintln!("SKIP: {msg}");
    } else {
        panic!("{msg} (set PCT_ALLOW_SKIP=1 to skip instead)");
    }
}

/// One flattened member as pahole prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaholeField {
    pub offset: u64,
    pub size: u64,
    pub bit: Option<u64>,
}

/// A struct layout as pahole prints it: size and members by dotted path.
#[derive(Debug, Default, Clone)]
pub struct PaholeStruct {
    pub size: u64,
    pub fields: BTreeMap<String, PaholeField>,
}

/// Run `pahole -F <format> [--btf_base BASE] -C a,b,c FILE` and parse every printed
/// struct/union (`base`: the BTF that a split BTF `file` builds on).
pub fn pahole(
    file: &Path,
    format: &str,
    base: Option<&Path>,
    types: &[&str],
) -> BTreeMap<String, PaholeStruct> {
    let mut cmd = Command::new("pahole");
    cmd.arg("-F").arg(format);
    if let Some(b) = base {
        cmd.arg("--btf_base").arg(b);
    }
    cmd.arg("-C").arg(types.join(",")).arg(file);
    let out = run_ok(&mut cmd, "pahole (Debian package dwarves) failed");
    parse_pahole(&String::from_utf8_lossy(&out.stdout))
}

/// Name of a declared member in a pahole line's declaration part (before the `;`).
fn member_name(decl: &str) -> Option<String> {
    let mut d = decl.trim();
    if let Some(i) = d.find("__attribute__") {
        d = d[..i].trim();
    }
    if let Some(i) = d.find("(*") {
        // function pointer: `void (*name)(args)`
        let rest = &d[i + 2..];
        let end = rest.find(')')?;
        return Some(rest[..end].trim().to_owned());
    }
    if let Some(i) = d.rfind(':') {
        d = d[..i].trim(); // bitfield width
    }
    while d.ends_with(']') {
        d = d[..d.rfind('[')?].trim();
    }
    let name = d.rsplit(|c: char| c.is_whitespace() || c == '*').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// `/* 24: 0  4 */` or `/*     0     8 */` → (offset, bit, size).
fn comment_numbers(c: &str) -> Option<(u64, Option<u64>, u64)> {
    let toks: Vec<&str> = c.split_whitespace().collect();
    match toks.as_slice() {
        [off, size] => Some((off.parse().ok()?, None, size.parse().ok()?)),
        [off, bit, size] if off.ends_with(':') => Some((
            off.trim_end_matches(':').parse().ok()?,
            Some(bit.parse().ok()?),
            size.parse().ok()?,
        )),
        _ => None,
    }
}

pub fn parse_pahole(text: &str) -> BTreeMap<String, PaholeStruct> {
    let mut out = BTreeMap::new();
    // Frames of (members) for nested anonymous/named aggregates.
    let mut stack: Vec<Vec<(String, PaholeField)>> = Vec::new();
    let mut current: Option<(String, PaholeStruct)> = None;
    for line in text.lines() {
        let t = line.trim();
        if current.is_none() {
            for kw in ["struct ", "union "] {
                if let Some(rest) = line.strip_prefix(kw) {
                    if let Some(name) = rest.strip_suffix(" {") {
                        current = Some((name.to_owned(), PaholeStruct::default()));
                        stack = vec![Vec::new()];
                    }
                }
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix("/* size: ") {
            if stack.len() == 1 {
                if let (Some((_, s)), Some(n)) = (current.as_mut(), rest.split(',').next()) {
                    s.size = n.trim().parse().unwrap_or(0);
                }
            }
            continue;
        }
        if line.starts_with('}') {
            let (name, mut s) = current.take().expect("inside a struct");
            for (k, f) in stack.pop().unwrap_or_default() {
                s.fields.entry(k).or_insert(f);
            }
            out.insert(name, s);
            continue;
        }
        if t.ends_with('{') {
            stack.push(Vec::new());
            continue;
        }
        let Some(ci) = t.find("/*") else { continue };
        let (decl, comment) = (&t[..ci], &t[ci + 2..]);
        let Some(semi) = decl.rfind(';') else {
            continue;
        };
        let decl = &decl[..semi];
        let Some((off, bit, size)) = comment_numbers(comment.trim_end_matches("*/")) else {
            continue;
        };
        let field = PaholeField {
            offset: off,
            size,
            bit,
        };
        if decl.starts_with('}') {
            // end of a nested aggregate: named → prefix its members, anonymous → merge up
            let members = stack.pop().unwrap_or_default();
            let name = member_name(decl.trim_start_matches('}'));
            let top = stack.last_mut().expect("nested frame has a parent");
            match name {
                Some(n) => {
                    top.push((n.clone(), field));
                    for (k, f) in members {
                        top.push((format!("{n}.{k}"), f));
                    }
                }
                None => top.extend(members),
            }
            continue;
        }
        if let Some(n) = member_name(decl) {
            stack.last_mut().expect("frame").push((n, field));
        }
    }
    out
}

/// Compare every field of every type in `profile` against pahole's layouts; returns the
/// number of fields compared.
pub fn compare_with_pahole(
    profile: &pct::profile::Profile,
    pahole: &BTreeMap<String, PaholeStruct>,
    only: Option<&[&str]>,
) -> usize {
    let mut compared = 0;
    let mut errors = Vec::new();
    for (key, layout) in &profile.types {
        if only.is_some_and(|o| !o.contains(&key.as_str())) {
            continue;
        }
        let name = layout.name.as_deref().unwrap_or(key);
        let Some(ps) = pahole.get(name) else {
            errors.push(format!("pahole printed no layout for {name}"));
            continue;
        };
        if ps.size != layout.size {
            errors.push(format!(
                "sizeof({name}): profile {} pahole {}",
                layout.size, ps.size
            ));
        }
        for (fkey, f) in &layout.fields {
            let path = f.name.as_deref().unwrap_or(fkey);
            match ps.fields.get(path) {
                None => errors.push(format!("{name}.{path}: not in pahole output")),
                Some(pf) => {
                    if pf.offset != f.offset || pf.size != f.size {
                        errors.push(format!(
                            "{name}.{path}: profile offset {} size {}, pahole offset {} size {}",
                            f.offset, f.size, pf.offset, pf.size
                        ));
                    }
                    if let (Some(bit), Some(pbit)) = (f.bit_offset, pf.bit) {
                        if bit != f.offset * 8 + pbit {
                            errors
                                .push(format!("{name}.{path}: bit offset {bit} vs pahole {pbit}"));
                        }
                    }
                    compared += 1;
                }
            }
        }
    }
    assert!(
        errors.is_empty(),
        "profile disagrees with pahole:\n{}",
        errors.join("\n")
    );
    compared
}

/// Names (as the kernel spells them) of the types in a profile.
pub fn type_names(profile: &pct::profile::Profile) -> Vec<String> {
    profile
        .types
        .iter()
        .map(|(k, t)| t.name.clone().unwrap_or_else(|| k.clone()))
        .collect()
}
