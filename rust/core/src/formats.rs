//! The storage formats of cache rows and the compressor's quantization, and the RoPE tables, one
//! enum per fact.
//!
//! Where a kernel is told a format, the enum is `#[repr(i32)]` and its discriminants are the
//! codes the kernel reads: cuda/include/formats.cuh declares the same enums with the same values
//! (a test in rust/core/tests/sources.rs compares them). Users name formats by the strings of
//! [`Named::name`].

use crate::error::{Error, Result};
use crate::quant::{RowFormat, ENTRY_DIM, INDEX_DIM, INDEX_KEY_FP4, INDEX_KEY_FP8, MAIN_ENTRY};
use crate::tensor::{DType, TensorRef};

/// A format users name by a string.
pub trait Named: Copy + PartialEq + 'static {
    /// Every value, in the order error messages list them.
    const ALL: &'static [Self];
    fn name(self) -> &'static str;

    /// The value named `s` (argument `arg`), any of [`Self::ALL`].
    fn parse(arg: &str, s: &str) -> Result<Self> {
        parse_among(arg, s, Self::ALL)
    }
}

/// The value among `choices` named `s`, or a ValueError naming `arg` that lists them
/// (`expected "a", "b" or "c", got "s"`).
pub fn parse_among<T: Named>(arg: &str, s: &str, choices: &[T]) -> Result<T> {
    if let Some(v) = choices.iter().find(|v| v.name() == s) {
        return Ok(*v);
    }
    let quoted: Vec<String> = choices.iter().map(|v| format!("{:?}", v.name())).collect();
    let list = match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    };
    Err(Error::value(arg, format!("expected {list}, got {s:?}")))
}

/// Storage format of main KV entries (window rows and CSA/HCA compressed rows); the attention
/// kernels read it per cache (`EntryFormat` in cuda/include/formats.cuh).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainFormat {
    /// 448 FP8 + 64 BF16 + 8 scale bytes = 584 B ([`MAIN_ENTRY`]).
    Fp8 = 0,
    /// 512 BF16 = 1024 B.
    Bf16 = 1,
}

impl Named for MainFormat {
    const ALL: &'static [Self] = &[MainFormat::Fp8, MainFormat::Bf16];
    fn name(self) -> &'static str {
        match self {
            MainFormat::Fp8 => "fp8",
            MainFormat::Bf16 => "bf16",
        }
    }
}

impl MainFormat {
    pub fn row_bytes(self) -> usize {
        match self {
            MainFormat::Fp8 => MAIN_ENTRY.row_bytes(),
            MainFormat::Bf16 => 2 * ENTRY_DIM,
        }
    }
}

/// Storage format of indexer keys; the indexer and key kernels read it (`IndexFormat` in
/// cuda/include/formats.cuh).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFormat {
    /// 64 B of FP4 e2m1 + 4 UE8M0 scales = 68 B ([`INDEX_KEY_FP4`]).
    Fp4 = 0,
    /// 128 B of FP8 e4m3 + one fp32 scale = 132 B ([`INDEX_KEY_FP8`]).
    Fp8 = 1,
    /// 128 BF16 = 256 B.
    Bf16 = 2,
}

impl Named for IndexFormat {
    const ALL: &'static [Self] = &[IndexFormat::Fp4, IndexFormat::Fp8, IndexFormat::Bf16];
    fn name(self) -> &'static str {
        match self {
            IndexFormat::Fp4 => "fp4",
            IndexFormat::Fp8 => "fp8",
            IndexFormat::Bf16 => "bf16",
        }
    }
}

impl IndexFormat {
    /// The quantized formats, which `index_key_write` / `index_key_read` take.
    pub const PACKED: &'static [Self] = &[IndexFormat::Fp4, IndexFormat::Fp8];

    /// A quantized format named `s`: `"fp4"` or `"fp8"`.
    pub fn parse_packed(arg: &str, s: &str) -> Result<Self> {
        parse_among(arg, s, Self::PACKED)
    }

    /// The page layout of a quantized format (`None` for plain bf16 rows).
    pub fn packed(self) -> Option<RowFormat> {
        match self {
            IndexFormat::Fp4 => Some(INDEX_KEY_FP4),
            IndexFormat::Fp8 => Some(INDEX_KEY_FP8),
            IndexFormat::Bf16 => None,
        }
    }

    pub fn row_bytes(self) -> usize {
        self.packed().map_or(2 * INDEX_DIM, |f| f.row_bytes())
    }
}

/// What a compressed entry goes through after RMSNorm and RoPE; the compressor kernel reads it
/// (`Quant` in cuda/include/formats.cuh).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Nothing.
    None = 0,
    /// The main-entry FP8 round trip (D = 512).
    Fp8 = 1,
    /// Hadamard-128 then the FP4 indexer-key round trip (D = 128).
    Fp4 = 2,
}

impl Named for Quant {
    const ALL: &'static [Self] = &[Quant::None, Quant::Fp8, Quant::Fp4];
    fn name(self) -> &'static str {
        match self {
            Quant::None => "none",
            Quant::Fp8 => "fp8",
            Quant::Fp4 => "fp4",
        }
    }
}

impl Quant {
    /// The entry width the round trip needs (`None`: any).
    pub fn dim(self) -> Option<usize> {
        match self {
            Quant::None => None,
            Quant::Fp8 => Some(ENTRY_DIM),
            Quant::Fp4 => Some(INDEX_DIM),
        }
    }
}

/// How RoPE computes an angle's sine and cosine (`RopeTable` of docs/model.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeTable {
    /// As DeepSeek's float32 table (and transformers', vLLM's and SGLang's caches): the position
    /// and the frequency rounded to f32, their product rounded to f32, its sine and cosine
    /// rounded to f32. The angle's error grows with the position (1.5e-2 rad at 2^20).
    Official,
    /// The f64 product of the position and the frequency, its sine and cosine in f64.
    Exact,
}

impl Named for RopeTable {
    const ALL: &'static [Self] = &[RopeTable::Official, RopeTable::Exact];
    fn name(self) -> &'static str {
        match self {
            RopeTable::Official => "official",
            RopeTable::Exact => "exact",
        }
    }
}

impl RopeTable {
    /// `(cos, sin)` of the angle `pos * freq`.
    pub fn cos_sin(self, pos: i64, freq: f64) -> (f64, f64) {
        match self {
            RopeTable::Official => {
                let (s, c) = ((pos as f32 * freq as f32) as f64).sin_cos();
                (c as f32 as f64, s as f32 as f64)
            }
            RopeTable::Exact => {
                let (s, c) = (pos as f64 * freq).sin_cos();
                (c, s)
            }
        }
    }

    /// The flags the kernels read (`rope_sincos` in cuda/include/rope.cuh) for a table of
    /// frequencies `inv_freq`: bit 0 its values are float64, bit 1 the official angles.
    pub fn kernel_mode(self, inv_freq: &TensorRef) -> i32 {
        (inv_freq.dtype == DType::F64) as i32 | (2 * (self == RopeTable::Official) as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_list_the_choices_as_before() {
        let msg = |e: Error| e.to_string();
        assert_eq!(msg(IndexFormat::parse_packed("fmt", "x").unwrap_err()), r#"fmt: expected "fp4" or "fp8", got "x""#);
        assert_eq!(
            msg(IndexFormat::parse("index_format", "bf8").unwrap_err()),
            r#"index_format: expected "fp4", "fp8" or "bf16", got "bf8""#
        );
        assert_eq!(msg(MainFormat::parse("main_format", "").unwrap_err()), r#"main_format: expected "fp8" or "bf16", got """#);
        assert_eq!(msg(Quant::parse("quant", "int8").unwrap_err()), r#"quant: expected "none", "fp8" or "fp4", got "int8""#);
        assert_eq!(IndexFormat::parse_packed("fmt", "bf16").unwrap_err().to_string(), r#"fmt: expected "fp4" or "fp8", got "bf16""#);
        for f in IndexFormat::ALL {
            assert_eq!(IndexFormat::parse("f", f.name()), Ok(*f));
        }
    }

    #[test]
    fn row_bytes_of_every_format() {
        let index: Vec<usize> = IndexFormat::ALL.iter().map(|f| f.row_bytes()).collect();
        assert_eq!(index, [68, 132, 256]);
        assert_eq!((MainFormat::Fp8.row_bytes(), MainFormat::Bf16.row_bytes()), (584, 1024));
    }
}
