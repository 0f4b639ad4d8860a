//! Volatility 3 ISF: importing dwarf2json's ISF of a Debian 6.1 cloud kernel gives the same
//! layouts as pct's own build of that kernel; exporting gives an ISF that Volatility 3 loads
//! with the same offsets.

mod support;

use std::process::Command;

use pct::profile::{isf, Profile};
use support::profile::{lab_profile, shared};
use support::{repo, run_ok};

/// The ISF fixture, dwarf2json's output for one Debian cloud-amd64 kernel build.
const ISF: &str = "isf/debian-6.1.0-56-cloud-amd64.json.xz";

/// The profile pct built (`pct-introspect build-profile`, from the -dbg vmlinux) of the same
/// kernel build the ISF fixture describes: a fixed test fixture, so the comparison does not
/// depend on the shipped profiles nor on which kernel Debian serves today. The ISF carries no
/// build-id: the test matches the two by release and banner.
fn isf_kernel_profile() -> Profile {
    Profile::load(&repo().join("tests/fixtures/isf-kernel.profile.json")).unwrap()
}

/// Symbols pct's profile builder looks up that it did not yet when the fixture was built
/// (its kernel's -dbg package is no longer served, so it cannot be rebuilt): the import may
/// carry them and the fixture cannot, so they are left out of the comparison. Every other
/// symbol must agree, in both directions.
const NEWER_THAN_FIXTURE: &[&str] = &["init_on_free", "_page_poisoning_enabled"];

/// Struct fields pct's profile builder looks up since the fixture was built, as
/// `type.field` (the large-folio fields, 6.10's `bd_mapping`): left out in the same way.
const FIELDS_NEWER_THAN_FIXTURE: &[&str] = &[
    "folio._flags_1",
    "folio._folio_order",
    "folio._folio_nr_pages",
    "page.compound_order",
    "block_device.bd_mapping",
];

/// A profile pct builds today: the lab kernel's (None, with a message, when it cannot be
/// fetched here).
fn built_profile() -> Option<Profile> {
    support::profile::kernel_dir("cloud-amd64")?;
    Some(lab_profile("cloud-amd64").1)
}

/// Same layouts, symbol addresses and enums (ISF has no typedefs or symbol sizes, so type
/// spellings and sizes of symbols are not compared).
fn assert_same_layouts(a: &Profile, b: &Profile, what: &str) {
    assert_eq!(
        a.types.keys().collect::<Vec<_>>(),
        b.types.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (k, ta) in &a.types {
        let tb = &b.types[k];
        assert_eq!(ta.size, tb.size, "{what}: sizeof {k}");
        assert_eq!(ta.kind, tb.kind, "{what}: kind of {k}");
        let compared = |t: &pct::profile::TypeLayout| {
            t.fields
                .keys()
                .filter(|f| !FIELDS_NEWER_THAN_FIXTURE.contains(&format!("{k}.{f}").as_str()))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(compared(ta), compared(tb), "{what}: {k}");
        for f in compared(ta) {
            let (fa, fb) = (&ta.fields[&f], &tb.fields[&f]);
            assert_eq!(
                (fa.offset, fa.size, fa.count, fa.bit_offset, fa.bit_size),
                (fb.offset, fb.size, fb.count, fb.bit_offset, fb.bit_size),
                "{what}: {k}.{f}"
            );
        }
    }
    for (k, s) in &a.symbols {
        if b.symbol(k).is_none() && NEWER_THAN_FIXTURE.contains(&k.as_str()) {
            continue;
        }
        assert_eq!(Some(s.address), b.symbol(k), "{what}: symbol {k}");
    }
    let newer = |p: &Profile| {
        p.symbols
            .keys()
            .filter(|k| NEWER_THAN_FIXTURE.contains(&k.as_str()))
            .count()
    };
    assert_eq!(
        a.symbols.len() - newer(a),
        b.symbols.len() - newer(b),
        "{what}: symbols"
    );
    assert_eq!(a.enums, b.enums, "{what}: enums");
    assert_eq!(a.kernel.banner, b.kernel.banner, "{what}: banner");
    assert_eq!(a.kernel.release, b.kernel.release, "{what}: release");
}

#[test]
fn dwarf2json_isf_import_agrees_with_our_build() {
    let path = shared().join(ISF);
    if !path.exists() {
        support::profile::skip_or_fail(&format!("{} is not there", path.display()));
        return;
    }
    let p = isf::import_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.source.method, "isf");
    assert!(p.kernel.build_id.is_none(), "ISF carries no build-id");
    let ours = isf_kernel_profile();
    assert!(
        ours.source.method.starts_with("btf") || ours.source.method.starts_with("dwarf"),
        "the fixture is pct's build from vmlinux, not an import: {}",
        ours.source.method
    );
    assert!(
        ours.kernel.build_id.is_some(),
        "the fixture names its build"
    );
    // The same kernel build: same release and the same banner (build number, compiler, date).
    assert_eq!(
        (&p.kernel.release, &p.kernel.banner),
        (&ours.kernel.release, &ours.kernel.banner),
        "the ISF fixture and tests/fixtures/isf-kernel.profile.json describe different kernels"
    );
    assert_same_layouts(&p, &ours, "dwarf2json ISF vs pct build");
}

#[test]
fn isf_export_round_trips() {
    for p in [Some(isf_kernel_profile()), built_profile()]
        .into_iter()
        .flatten()
    {
        let v = isf::export_value(&p);
        let back = isf::import_value(&v, "export").unwrap_or_else(|e| panic!("{}", e.0));
        assert_same_layouts(&back, &p, "export → import");
    }
}

const VOL3_CHECK: &str = r#"
import json, sys, os
from volatility3 import schemas
from volatility3.framework import contexts
from volatility3.framework.objects import templates
from volatility3.framework.symbols import intermed
path = os.path.abspath(sys.argv[1])
doc = json.load(open(path))
assert schemas.validate(doc, False), "schema validation failed"
ctx = contexts.Context()
table = intermed.IntermediateSymbolTable(ctx, "pct", "pcttable", isf_url="file://" + path)
ctx.symbol_space.append(table)
out = {"types": {}, "symbols": {}, "enums": {}}
for tname, t in doc["user_types"].items():
    if not t["fields"]:
        continue
    vt = ctx.symbol_space.get_type("pcttable!" + tname)
    fields = {}
    for m in t["fields"]:
        off, tmpl = vt.vol.members[m]
        if isinstance(tmpl, templates.ReferenceTemplate):
            tmpl = ctx.symbol_space.get_type(tmpl.vol.type_name)
        fields[m] = [off, tmpl.size]
    out["types"][tname] = {"size": vt.size, "fields": fields}
for s in doc["symbols"]:
    out["symbols"][s] = ctx.symbol_space.get_symbol("pcttable!" + s).address
for e in doc["enums"]:
    out["enums"][e] = dict(ctx.symbol_space.get_enumeration("pcttable!" + e).choices)
print(json.dumps(out))
"#;

/// A Python with `volatility3` importable: $PCT_VOL3_PYTHON, else python3.
fn vol3_python() -> Option<String> {
    let py = std::env::var("PCT_VOL3_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import volatility3"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

#[test]
fn exported_isf_loads_in_volatility3() {
    let Some(py) = vol3_python() else {
        support::profile::skip_or_fail(
            "volatility3 is not importable (pip install volatility3, or set PCT_VOL3_PYTHON)",
        );
        return;
    };
    // pct's fixed build of the ISF fixture's kernel, and what pct builds today.
    for (n, p) in [Some(isf_kernel_profile()), built_profile()]
        .into_iter()
        .flatten()
        .enumerate()
    {
        check_in_volatility3(&py, &p, n);
    }
}

/// Volatility 3 loads pct's ISF export of `p` and reads the same sizes, offsets, symbol
/// addresses and enum values from it.
fn check_in_volatility3(py: &str, p: &Profile, n: usize) {
    let dir = std::env::temp_dir().join(format!("pct-isf-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let isf_path = dir.join("pct-export.json");
    std::fs::write(&isf_path, isf::export(p)).unwrap();
    let script = dir.join("check.py");
    std::fs::write(&script, VOL3_CHECK).unwrap();
    let mut check = Command::new(py);
    check.arg(&script).arg(&isf_path);
    let out = run_ok(&mut check, "volatility3 could not load the exported ISF");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut checked = 0;
    for (key, t) in &p.types {
        let name = t.name.as_deref().unwrap_or(key);
        let vt = &seen["types"][name];
        assert_eq!(
            vt["size"].as_u64(),
            Some(t.size),
            "volatility3 sizeof {name}"
        );
        for (fk, f) in &t.fields {
            let fname = f.name.as_deref().unwrap_or(fk).rsplit('.').next().unwrap();
            let vf = &vt["fields"][fname];
            assert_eq!(
                vf[0].as_u64(),
                Some(f.offset),
                "volatility3 offset of {name}.{fname}"
            );
            if f.bit_size.is_none() {
                assert_eq!(
                    vf[1].as_u64(),
                    Some(f.size),
                    "volatility3 size of {name}.{fname}"
                );
            }
            checked += 1;
        }
    }
    for (k, s) in &p.symbols {
        let name = s.name.as_deref().unwrap_or(k);
        assert_eq!(
            seen["symbols"][name].as_u64(),
            Some(s.address),
            "symbol {name}"
        );
    }
    assert_eq!(
        seen["enums"]["pageflags"]["PG_dirty"].as_i64(),
        p.enum_value("pageflags", "PG_dirty")
    );
    assert!(checked > 80);
}
