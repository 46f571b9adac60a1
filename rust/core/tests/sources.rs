//! Checks that the Rust and CUDA sources agree where the compiler cannot see both sides: every
//! kernel has one `Kernel` variant naming its module, the format codes of
//! cuda/include/formats.cuh are the Rust enums' discriminants, and the RoPE mode bits of
//! cuda/include/rope.cuh are those `RopeTable::kernel_mode` sets.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dsv4rs_core::formats::{IndexFormat, MainFormat, Quant, RopeTable};
use dsv4rs_core::gpu::Kernel;
use dsv4rs_core::tensor::{DType, Device, TensorRef};

fn cuda_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cuda")
}

/// `(symbol, module)` of every `extern "C" __global__` function in cuda/*.cu.
fn cuda_kernels() -> Vec<(String, String)> {
    const MARK: &str = "extern \"C\" __global__";
    let mut found = Vec::new();
    for entry in fs::read_dir(cuda_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices(MARK) {
            // `void`, an optional `__launch_bounds__(...)`, then the name.
            let mut rest = text[at + MARK.len()..].trim_start().strip_prefix("void").expect("kernels return void");
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                rest = &r[r.find(')').expect("closed launch bounds") + 1..];
            }
            let name: String = rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(!name.is_empty(), "no kernel name after {MARK} in {}", path.display());
            found.push((name, module.clone()));
        }
    }
    found.sort();
    found
}

#[test]
fn every_cuda_kernel_has_one_variant_with_its_module() {
    let cuda = cuda_kernels();
    let mut rust: Vec<(String, String)> =
        Kernel::ALL.iter().map(|k| (k.symbol().to_string(), k.module().to_string())).collect();
    rust.sort();
    let missing: Vec<_> = cuda.iter().filter(|k| !rust.contains(k)).collect();
    let stale: Vec<_> = rust.iter().filter(|k| !cuda.contains(k)).collect();
    assert!(missing.is_empty() && stale.is_empty(), "kernels without a variant: {missing:?}; variants without a kernel: {stale:?}");
    let mut symbols: Vec<&str> = Kernel::ALL.iter().map(|k| k.symbol()).collect();
    symbols.sort();
    symbols.dedup();
    assert_eq!(symbols.len(), Kernel::COUNT, "one variant per symbol");
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

/// The value of `constexpr int NAME = V;` in cuda/include/rope.cuh.
fn rope_constant(name: &str) -> i32 {
    let text = fs::read_to_string(cuda_dir().join("include/rope.cuh")).unwrap();
    let mark = format!("constexpr int {name} =");
    let at = text.find(&mark).unwrap_or_else(|| panic!("{mark} in rope.cuh"));
    let rest = &text[at + mark.len()..];
    rest[..rest.find(';').unwrap()].trim().parse().unwrap()
}

#[test]
fn rope_mode_bits_are_the_kernels() {
    let (freq64, official) = (rope_constant("ROPE_FREQ64"), rope_constant("ROPE_OFFICIAL"));
    let freqs = |dtype| TensorRef::dense("inv_freq", 0, vec![32], dtype, Device::Cpu);
    for (table, dtype, want) in [
        (RopeTable::Exact, DType::F32, 0),
        (RopeTable::Exact, DType::F64, freq64),
        (RopeTable::Official, DType::F32, official),
        (RopeTable::Official, DType::F64, freq64 | official),
    ] {
        assert_eq!(table.kernel_mode(&freqs(dtype)), want, "{table:?} with {dtype:?} frequencies");
    }
    assert!(freq64 != official && (freq64 & official) == 0, "distinct bits");
}
