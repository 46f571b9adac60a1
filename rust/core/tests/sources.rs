//! Checks that the Rust and CUDA sources agree where the compiler cannot see both sides: the
//! format codes of cuda/include/formats.cuh are the Rust enums' discriminants.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dsv4rs_core::formats::{IndexFormat, MainFormat, Quant};

fn cuda_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cuda")
}

/// The enumerators of `enum NAME : int { A = 0, B = 1 };` in cuda/include/formats.cuh.
fn header_enum(name: &str) -> BTreeMap<String, i32> {
    let text = fs::read_to_string(cuda_dir().join("include/formats.cuh")).unwrap();
    let start = text.find(&format!("enum {name} : int {{")).unwrap_or_else(|| panic!("enum {name} in formats.cuh"));
    let body = &text[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    body.split(',')
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap_or_else(|| panic!("{name}: every enumerator has a value: {e:?}"));
            (k.trim().to_string(), v.trim().parse().unwrap())
        })
        .collect()
}

fn expect(name: &str, rust: &[(&str, i32)]) {
    let want: BTreeMap<String, i32> = rust.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(header_enum(name), want, "cuda/include/formats.cuh: {name}");
}

#[test]
fn format_codes_are_the_rust_discriminants() {
    expect("EntryFormat", &[("ENTRIES_FP8", MainFormat::Fp8 as i32), ("ENTRIES_BF16", MainFormat::Bf16 as i32)]);
    expect(
        "IndexFormat",
        &[("KEYS_FP4", IndexFormat::Fp4 as i32), ("KEYS_FP8", IndexFormat::Fp8 as i32), ("KEYS_BF16", IndexFormat::Bf16 as i32)],
    );
    expect(
        "Quant",
        &[("QUANT_NONE", Quant::None as i32), ("QUANT_FP8", Quant::Fp8 as i32), ("QUANT_FP4", Quant::Fp4 as i32)],
    );
}
