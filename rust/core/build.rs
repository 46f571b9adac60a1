//! Compiles every `cuda/*.cu` into a fatbin with nvcc 13.0 and embeds it.
//!
//! nvcc is looked up in this order: `$DSV4RS_NVCC`, `nvcc` 13.0 on `PATH`, the
//! `nvidia/cu13/bin/nvcc` of the PyPI wheel set on the `sys.path` of `$PYO3_PYTHON`
//! (or `python3`), then the build environment `scripts/env.sh` sets up
//! (`$DSV4RS_CACHE/build-venv`, default `~/.cache/dsv4rs/build-venv`). `pip install .` puts
//! the wheel set in its isolated build environment through `build-system.requires`, so no
//! CUDA toolkit is needed; after `bash scripts/test.sh` a plain `cargo test` finds the build
//! environment's nvcc. When no nvcc is found (and `$DSV4RS_NVCC` is not set), the build goes on
//! without GPU kernels and says so in a `cargo:warning` (GPU calls then raise an error).
//! nvcc also needs a host C++ compiler (g++).
//!
//! Knobs (environment):
//! - `DSV4RS_CUDA_ARCHS`: comma list of SM targets, default `80,86,89,90,100,120`
//!   (PTX for `compute_80` is always added so newer GPUs can JIT).
//! - `DSV4RS_NVCC_ANY_VERSION=1`: accept an nvcc other than 13.0.
//! - `DSV4RS_CPU_ONLY=1`: build without kernels, without looking for nvcc.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,86,89,90,100,120";
const NVCC_RELEASE: &str = "release 13.0";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let cuda_dir = manifest.join("../../cuda").canonicalize().unwrap_or_else(|_| {
        panic!("dsv4rs: the cuda/ folder next to rust/ is missing ({})", manifest.display())
    });
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    for var in
        ["DSV4RS_NVCC", "DSV4RS_CUDA_ARCHS", "DSV4RS_NVCC_ANY_VERSION", "DSV4RS_CPU_ONLY", "DSV4RS_CACHE", "PYO3_PYTHON"]
    {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(dsv4rs_cpu_only)");

    let mut sources: Vec<PathBuf> = fs::read_dir(&cuda_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    for entry in fs::read_dir(cuda_dir.join("include")).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let cpu_only = env::var("DSV4RS_CPU_ONLY").is_ok_and(|v| v == "1");
    let archs: Vec<String> = env::var("DSV4RS_CUDA_ARCHS")
        .unwrap_or_else(|_| DEFAULT_ARCHS.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();

    let nvcc = if cpu_only { None } else { find_nvcc() };
    let mut modules = Vec::new();
    if let Some(nvcc) = &nvcc {
        check_version(nvcc);
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let (nvcc, src, out, archs, inc) =
                    (nvcc.clone(), src.clone(), out.clone(), archs.clone(), cuda_dir.join("include"));
                std::thread::spawn(move || compile(&nvcc, &src, &out, &archs, &inc))
            })
            .collect();
        for h in handles {
            modules.push(h.join().expect("nvcc thread panicked"));
        }
    } else {
        println!("cargo:rustc-cfg=dsv4rs_cpu_only");
    }
    write_registry(&out, &modules, if nvcc.is_none() { &[] } else { &archs });
}

/// Finds nvcc 13.0; `None` (with a `cargo:warning` saying how to get one) when there is none,
/// and the build goes on without kernels.
fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("DSV4RS_NVCC") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "dsv4rs: DSV4RS_NVCC={} is not a file", p.display());
        return Some(p);
    }
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let cand = dir.join("nvcc");
            if cand.is_file() && nvcc_release(&cand).is_some_and(|r| r.contains(NVCC_RELEASE)) {
                return Some(cand);
            }
        }
    }
    let python = env::var("PYO3_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let listing = Command::new(&python)
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for entry in listing.lines() {
        let cand = Path::new(entry).join("nvidia/cu13/bin/nvcc");
        if cand.is_file() {
            return Some(cand);
        }
    }
    let venv = build_venv();
    if let Some(venv) = &venv {
        // The build environment of scripts/env.sh: lib/python3.*/site-packages/nvidia/cu13/bin/nvcc.
        let mut found: Vec<PathBuf> = fs::read_dir(venv.join("lib"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvcc"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
        // Found later (scripts/test.sh sets it up): look again then.
        println!("cargo:rerun-if-changed={}", venv.display());
    }
    println!(
        "cargo:warning=dsv4rs: nvcc 13.0 not found (looked at $DSV4RS_NVCC, PATH, the sys.path of {python} \
         and {}); building WITHOUT GPU kernels (CPU only; GPU calls raise an error). To build them: \
         `bash scripts/test.sh` sets up the build environment with the PyPI nvcc, or \
         `pip install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
         nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85` into {python}, or set DSV4RS_NVCC; \
         nvcc also needs a host C++ compiler (g++). DSV4RS_CPU_ONLY=1 silences this.",
        venv.map_or_else(|| "no build environment".to_string(), |v| v.display().to_string())
    );
    None
}

/// The build environment of scripts/env.sh: `$DSV4RS_CACHE/build-venv`, default
/// `~/.cache/dsv4rs/build-venv`.
fn build_venv() -> Option<PathBuf> {
    let cache = match env::var_os("DSV4RS_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => PathBuf::from(env::var_os("HOME")?).join(".cache/dsv4rs"),
    };
    Some(cache.join("build-venv"))
}

fn nvcc_release(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check_version(nvcc: &Path) {
    let text = nvcc_release(nvcc)
        .unwrap_or_else(|| panic!("dsv4rs: could not run {} --version", nvcc.display()));
    let any = env::var("DSV4RS_NVCC_ANY_VERSION").is_ok_and(|v| v == "1");
    if !text.contains(NVCC_RELEASE) && !any {
        panic!(
            "dsv4rs: {} is not nvcc 13.0 ({}); set DSV4RS_NVCC_ANY_VERSION=1 to use it anyway",
            nvcc.display(),
            text.lines().last().unwrap_or("")
        );
    }
}

/// nvcc `-gencode` flags: SASS for each target plus compute_80 PTX.
/// Sources whose name ends in `_sm90a` are Hopper-only (wgmma/TMA) and get sm_90a alone.
fn gencode(src: &Path, archs: &[String]) -> Vec<String> {
    let stem = src.file_stem().unwrap().to_string_lossy();
    if stem.ends_with("_sm90a") {
        return vec!["-gencode=arch=compute_90a,code=sm_90a".to_string()];
    }
    let mut flags: Vec<String> =
        archs.iter().map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}")).collect();
    flags.push("-gencode=arch=compute_80,code=compute_80".to_string());
    flags
}

fn compile(nvcc: &Path, src: &Path, out: &Path, archs: &[String], include: &Path) -> (String, PathBuf) {
    let name = src.file_stem().unwrap().to_string_lossy().into_owned();
    let fatbin = out.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-O3", "-std=c++17", "--threads", "0", "-Xptxas", "-warn-spills"])
        .arg("-I")
        .arg(include)
        .args(gencode(src, archs))
        .arg("-o")
        .arg(&fatbin)
        .arg(src);
    let output = cmd.output().unwrap_or_else(|e| panic!("dsv4rs: failed to start nvcc: {e}"));
    if !output.status.success() {
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let hint = if ["host compiler", "cc1plus", "gcc: No such file", "g++: No such file", "unsupported GNU version"]
            .iter()
            .any(|s| text.contains(s))
        {
            "\nnvcc needs a host C++ compiler it supports: install g++ (Debian/Ubuntu: apt install g++; \
             Fedora: dnf install gcc-c++), or build without GPU kernels with DSV4RS_CPU_ONLY=1."
        } else {
            ""
        };
        panic!("dsv4rs: nvcc failed on {}:\n{text}{hint}", src.display());
    }
    let warnings = String::from_utf8_lossy(&output.stderr);
    for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=nvcc {name}: {line}");
    }
    (name, fatbin)
}

/// Writes `kernels.rs`: one 64-byte aligned static per fatbin and a table of them.
fn write_registry(out: &Path, modules: &[(String, PathBuf)], archs: &[String]) {
    let mut code = String::new();
    code.push_str("#[repr(C, align(64))]\npub struct Aligned<T: ?Sized>(pub T);\n");
    for (name, path) in modules {
        let ident = name.to_uppercase();
        writeln!(
            code,
            "static {ident}: &Aligned<[u8]> = &Aligned(*include_bytes!({:?}));",
            path.display().to_string()
        )
        .unwrap();
    }
    code.push_str("/// (module name, fatbin image) for every compiled cuda/*.cu file.\n");
    code.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for (name, _) in modules {
        writeln!(code, "    ({name:?}, &{}.0),", name.to_uppercase()).unwrap();
    }
    code.push_str("];\n");
    let mut all: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    if modules.iter().any(|(name, _)| name.ends_with("_sm90a")) {
        all.push("sm_90a".to_string());
    }
    if !archs.is_empty() {
        all.push("compute_80".to_string());
    }
    writeln!(code, "/// GPU targets the fatbins carry (SASS, then PTX).\npub static TARGETS: &[&str] = &{all:?};")
        .unwrap();
    fs::write(out.join("kernels.rs"), code).unwrap();
}
