//! Profiles built from real Debian kernels agree with pahole, field by field.

mod support;

use pct::profile::{build_profile, BuildOptions, DebugFormat};
use support::profile::{compare_with_pahole, kernel_dir, pahole, type_names};

fn build(
    dir: &std::path::Path,
    method: DebugFormat,
    modules: Vec<std::path::PathBuf>,
) -> pct::profile::Profile {
    build_profile(&dir.join("vmlinux"), &BuildOptions { modules, method })
        .unwrap_or_else(|e| panic!("build-profile failed: {e}"))
}

/// Builds the cloud kernel's profile with `method` and compares every field with
/// `pahole -F format`: (fields compared, types), `None` without the kernel.
fn compare_cloud_profile(method: DebugFormat, format: &str) -> Option<(usize, usize)> {
    let dir = kernel_dir("cloud-amd64")?;
    let p = build(&dir, method, vec![]);
    let names = type_names(&p);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ph = pahole(&dir.join("vmlinux"), format, None, &names);
    Some((compare_with_pahole(&p, &ph, None), names.len()))
}

#[test]
fn cloud_profile_dwarf_matches_pahole() {
    let Some((n, types)) = compare_cloud_profile(DebugFormat::Dwarf, "dwarf") else {
        return;
    };
    assert!(n > 80, "compared only {n} fields");
    eprintln!("compared {n} fields of {types} types with pahole -F dwarf");
}

#[test]
fn cloud_profile_btf_matches_pahole() {
    let Some((n, _)) = compare_cloud_profile(DebugFormat::Btf, "btf") else {
        return;
    };
    assert!(n > 80, "compared only {n} fields");
}

#[test]
fn btf_and_dwarf_profiles_agree() {
    let Some(dir) = kernel_dir("cloud-amd64") else {
        return;
    };
    let mut a = build(&dir, DebugFormat::Btf, vec![]);
    let mut b = build(&dir, DebugFormat::Dwarf, vec![]);
    assert_eq!(a.source.method, "btf");
    assert_eq!(b.source.method, "dwarf");
    a.source = Default::default();
    b.source = Default::default();
    assert_eq!(a, b, "BTF and DWARF give different profiles");
}

/// Every profile shipped in `profiles/` loads and names its kernel: release, and for those
/// built from a vmlinux, build-id, banner and the file name `build-profile` gives them.
/// Shipped profiles are a convenience: any number of them (none included) is fine.
#[test]
fn shipped_profiles_load_and_name_their_kernel() {
    let dir = support::repo().join("profiles");
    if !dir.exists() {
        return;
    }
    let mut build_ids = std::collections::BTreeMap::new();
    for (path, p) in pct::profile::list_profiles(&dir).unwrap() {
        let p = p.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let what = path.display();
        let release = p.kernel.release.as_deref();
        assert!(release.is_some_and(|r| !r.is_empty()), "{what}: no release");
        if p.source.method == "volatility2" {
            // Imports of Volatility 2 profiles carry no build-id and are named after the
            // profile they came from (tests/profile_vol2.rs checks them).
            assert!(p.kernel.build_id.is_none(), "{what}");
            continue;
        }
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some(pct::profile::default_file_name(&p).as_str()),
            "{what}: not the name build-profile gives it"
        );
        let id = p.kernel.build_id.clone();
        let id = id.unwrap_or_else(|| panic!("{what}: no build-id"));
        assert!(
            id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{what}: build-id {id}"
        );
        assert!(p.kernel.banner.is_some(), "{what}: no banner");
        if let Some(other) = build_ids.insert(id.clone(), path.clone()) {
            panic!("{what} and {} are for the same build {id}", other.display());
        }
        let m = pct::profile::find_matching_in(&dir, &id).unwrap();
        assert_eq!(
            m.map(|m| m.0).as_ref(),
            Some(&path),
            "{what}: not found by build-id"
        );
    }
}

/// The lab's profile of a flavour's fetched kernel (support::profile::lab_profile, the
/// one the lab tests, the demo and the benches use) equals a fresh build, is found in the
/// cache by build-id and by banner, and agrees with pahole: vmlinux's types with its BTF,
/// ext4's with ext4.ko's DWARF where ext4 is a module.
fn check_lab_profile(flavour: &str) {
    let Some(dir) = kernel_dir(flavour) else {
        return;
    };
    let ko = dir.join("ext4.ko.debug");
    let modular = ko.exists();
    let mut fresh = build(
        &dir,
        DebugFormat::Auto,
        modular.then(|| ko.clone()).into_iter().collect(),
    );
    let (path, mut lab) = support::profile::lab_profile(flavour);
    assert_eq!(
        lab.kernel.release.as_deref(),
        Some(std::fs::read_to_string(dir.join("release")).unwrap().trim())
    );
    fresh.source.generator.clear();
    lab.source.generator.clear();
    assert_eq!(lab, fresh, "{}: stale", path.display());
    let cache = support::profile::lab_profiles_dir();
    for (key, q) in [
        (
            lab.kernel.build_id.as_deref(),
            pct::profile::MatchQuality::BuildId,
        ),
        (
            lab.kernel.banner.as_deref(),
            pct::profile::MatchQuality::Banner,
        ),
    ] {
        let m = pct::profile::find_matching_in(&cache, key.expect("build-id and banner"))
            .unwrap()
            .expect("the lab profile is found in the cache");
        assert_eq!((&m.0, m.2), (&path, q));
    }

    let vmlinux_types: Vec<&str> = lab
        .types
        .keys()
        .map(String::as_str)
        .filter(|k| !modular || *k != "ext4_inode_info")
        .collect();
    let names = type_names(&lab);
    let names: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !modular || *n != "ext4_inode_info")
        .collect();
    let n = compare_with_pahole(
        &lab,
        &pahole(&dir.join("vmlinux"), "btf", None, &names),
        Some(&vmlinux_types),
    );
    assert!(n > 80, "{flavour}: compared only {n} fields");
    if modular {
        assert!(lab
            .source
            .inputs
            .iter()
            .any(|i| i.contains("ext4.ko.debug")));
        let ph = pahole(&ko, "dwarf", None, &["ext4_inode_info"]);
        let n = compare_with_pahole(&lab, &ph, Some(&["ext4_inode_info"]));
        assert!(
            n >= 3,
            "{flavour}: compared only {n} ext4_inode_info fields"
        );
    }
}

#[test]
fn lab_cloud_profile_is_current_and_matches_pahole() {
    check_lab_profile("cloud-amd64");
}

#[test]
fn lab_amd64_profile_is_current_and_matches_pahole() {
    check_lab_profile("amd64");
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
fn lab_rt_profile_is_current_and_matches_pahole() {
    if rt_dir().is_some() {
        check_lab_profile("rt-amd64");
    }
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
            method: DebugFormat::Btf,
        },
    )
    .expect_err("ext4_inode_info is not in the generic flavour's vmlinux");
    let msg = err.to_string();
    assert!(
        msg.contains("ext4_inode_info") && msg.contains("--module"),
        "{msg}"
    );

    let p = build(&dir, DebugFormat::Auto, vec![ko.clone()]);
    assert!(p.source.inputs.iter().any(|i| i.contains("ext4.ko.debug")));
    let ph = pahole(&ko, "dwarf", None, &["ext4_inode_info"]);
    let n = compare_with_pahole(&p, &ph, Some(&["ext4_inode_info"]));
    assert!(n >= 3);
    // The rest of the generic flavour's vmlinux, against pahole (BTF) too.
    let names = type_names(&p);
    let names: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "ext4_inode_info")
        .collect();
    let ph = pahole(&dir.join("vmlinux"), "btf", None, &names);
    let others: Vec<&str> = p
        .types
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "ext4_inode_info")
        .collect();
    compare_with_pahole(&p, &ph, Some(&others));
}
