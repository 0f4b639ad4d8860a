//! Profiles built from real Debian kernels agree with pahole, field by field.

mod profile_common;

use pct::profile::{build_profile, BuildOptions, Method};
use profile_common::{compare_with_pahole, kernel_dir, pahole, type_names};

fn build(
    dir: &std::path::Path,
    method: Method,
    modules: Vec<std::path::PathBuf>,
) -> pct::profile::Profile {
    build_profile(&dir.join("vmlinux"), &BuildOptions { modules, method })
        .unwrap_or_else(|e| panic!("build-profile failed: {e}"))
}

#[test]
fn cloud_profile_dwarf_matches_pahole() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let p = build(&dir, Method::Dwarf, vec![]);
    let names = type_names(&p);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ph = pahole(&dir.join("vmlinux"), "dwarf", &names);
    let n = compare_with_pahole(&p, &ph, None);
    assert!(n > 80, "compared only {n} fields");
    eprintln!(
        "compared {n} fields of {} types with pahole -F dwarf",
        names.len()
    );
}

#[test]
fn cloud_profile_btf_matches_pahole() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let p = build(&dir, Method::Btf, vec![]);
    let names = type_names(&p);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ph = pahole(&dir.join("vmlinux"), "btf", &names);
    let n = compare_with_pahole(&p, &ph, None);
    assert!(n > 80, "compared only {n} fields");
}

#[test]
fn btf_and_dwarf_profiles_agree() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let mut a = build(&dir, Method::Btf, vec![]);
    let mut b = build(&dir, Method::Dwarf, vec![]);
    assert_eq!(a.source.method, "btf");
    assert_eq!(b.source.method, "dwarf");
    a.source = Default::default();
    b.source = Default::default();
    assert_eq!(a, b, "BTF and DWARF give different profiles");
}

/// The shipped profile for a kernel equals a fresh build (all but the generator line), and
/// `find_matching` picks it by build-id and by banner.
fn check_shipped(dir: &std::path::Path, modules: Vec<std::path::PathBuf>) {
    let p = build(dir, Method::Auto, modules);
    let profiles = profile_common::repo().join("profiles");
    let path = profiles.join(pct::profile::default_file_name(&p));
    let shipped = pct::profile::Profile::load(&path)
        .unwrap_or_else(|e| panic!("shipped profile {}: {e}", path.display()));
    assert_eq!(
        shipped.kernel, p.kernel,
        "kernel identity differs from the fetched vmlinux"
    );
    assert_eq!(
        shipped.types,
        p.types,
        "{}: stale, rebuild it",
        path.display()
    );
    assert_eq!(shipped.symbols, p.symbols);
    assert_eq!(shipped.enums, p.enums);
    assert_eq!(shipped.absent, p.absent);
    let m = pct::profile::find_matching_in(&profiles, p.kernel.build_id.as_deref().unwrap())
        .unwrap()
        .expect("shipped profile found by build-id");
    assert_eq!(
        (m.0, m.2),
        (path.clone(), pct::profile::MatchQuality::BuildId)
    );
    let m = pct::profile::find_matching_in(&profiles, p.kernel.banner.as_deref().unwrap())
        .unwrap()
        .expect("shipped profile found by banner");
    assert_eq!((m.0, m.2), (path, pct::profile::MatchQuality::Banner));
}

#[test]
fn shipped_cloud_profile_is_current() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    check_shipped(&dir, vec![]);
}

#[test]
fn shipped_amd64_profile_is_current() {
    let Some(dir) = kernel_dir("amd64") else {
        return;
    };
    check_shipped(&dir, vec![dir.join("ext4.ko.debug")]);
}

/// The rt flavour is a ~1 GB download: checked when it is already in the cache, or when
/// PCT_TEST_RT=1 asks for the fetch.
fn rt_dir() -> Option<std::path::PathBuf> {
    let cache = std::env::var("PCT_CACHE").unwrap_or_else(|_| "/var/cache/pct".into());
    let cached = std::fs::read_dir(std::path::Path::new(&cache).join("kernels"))
        .ok()?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with("-rt-amd64"));
    if !cached && std::env::var_os("PCT_TEST_RT").is_none() {
        eprintln!("SKIP: rt-amd64 kernel not fetched (PCT_TEST_RT=1 fetches it)");
        return None;
    }
    kernel_dir("rt-amd64")
}

#[test]
fn rt_profile_matches_pahole_and_is_shipped() {
    let Some(dir) = rt_dir() else { return };
    let ko = dir.join("ext4.ko.debug");
    let p = build(&dir, Method::Auto, vec![ko.clone()]);
    let names = type_names(&p);
    let names: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "ext4_inode_info")
        .collect();
    let others: Vec<&str> = p
        .types
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "ext4_inode_info")
        .collect();
    compare_with_pahole(
        &p,
        &pahole(&dir.join("vmlinux"), "btf", &names),
        Some(&others),
    );
    let ph = pahole(&ko, "dwarf", &["ext4_inode_info"]);
    compare_with_pahole(&p, &ph, Some(&["ext4_inode_info"]));
    check_shipped(&dir, vec![ko]);
}

#[test]
fn ext4_module_types_match_pahole() {
    let Some(dir) = kernel_dir("amd64") else {
        return;
    };
    let ko = dir.join("ext4.ko.debug");
    assert!(ko.exists(), "fetch-kernel.sh amd64 provides ext4.ko.debug");
    // Without the module the required ext4 type is missing, and the error says what to do.
    let err = build_profile(
        &dir.join("vmlinux"),
        &BuildOptions {
            modules: vec![],
            method: Method::Btf,
        },
    )
    .expect_err("ext4_inode_info is not in the generic flavour's vmlinux");
    let msg = err.to_string();
    assert!(
        msg.contains("ext4_inode_info") && msg.contains("--module"),
        "{msg}"
    );

    let p = build(&dir, Method::Auto, vec![ko.clone()]);
    assert!(p.source.inputs.iter().any(|i| i.contains("ext4.ko.debug")));
    let ph = pahole(&ko, "dwarf", &["ext4_inode_info"]);
    let n = compare_with_pahole(&p, &ph, Some(&["ext4_inode_info"]));
    assert!(n >= 3);
    // The rest of the generic flavour's vmlinux, against pahole (BTF) too.
    let names = type_names(&p);
    let names: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "ext4_inode_info")
        .collect();
    let ph = pahole(&dir.join("vmlinux"), "btf", &names);
    let others: Vec<&str> = p
        .types
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "ext4_inode_info")
        .collect();
    compare_with_pahole(&p, &ph, Some(&others));
}
