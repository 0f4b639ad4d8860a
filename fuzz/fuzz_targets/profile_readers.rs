//! Fuzz the profile readers: ELF (symbols, banner, build-id, debug sections), DWARF (index +
//! type resolution), BTF, Volatility 2 dwarfdump text and Volatility 3 ISF JSON. The first
//! byte picks the reader; every path must return a value or an error, never panic or hang.
//!
//!   cargo +nightly fuzz run profile_readers
#![no_main]

use std::borrow::Cow;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pct::profile::btf::Btf;
use pct::profile::dwarf::{DwarfSections, DwarfTypes};
use pct::profile::elf::ElfImage;
use pct::profile::types::{extract, TypeSource};
use pct::profile::{isf, vol2, Manifest};

fn run_types(src: &dyn TypeSource) {
    let _ = extract(&Manifest::builtin(), &[src]);
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    let path = Path::new("fuzz-input");
    match sel % 4 {
        0 => {
            let Ok(elf) = ElfImage::parse(path, data) else {
                return;
            };
            let _ = elf.symbols(&["linux_banner", "init_task"]);
            let _ = elf.build_id();
            let _ = elf.read_va(0xffff_ffff_8100_0000, 64);
            if let Ok(Some(secs)) = DwarfSections::load(&elf) {
                let wanted = Manifest::builtin().wanted_type_names();
                if let Ok(t) = DwarfTypes::new(&secs, &wanted, path) {
                    run_types(&t);
                }
            }
            if let Ok(Some(b)) = elf.section(".BTF") {
                if let Ok(btf) = Btf::parse(b, path) {
                    run_types(&btf);
                }
            }
        }
        1 => {
            if let Ok(btf) = Btf::parse(Cow::Borrowed(data), path) {
                run_types(&btf);
            }
        }
        2 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                let _ = isf::import_value(&v, "fuzz");
            }
        }
        _ => {
            let text = String::from_utf8_lossy(data);
            let (dwarf, map) = text.split_once("\n\n\n").unwrap_or((&text, ""));
            let _ = vol2::import_texts(dwarf, map, Some("4.9.0-6-amd64"), "fuzz");
        }
    }
});
