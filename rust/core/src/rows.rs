//! Rows of caller-owned float tensors and paged caches, read as f32 one row at a time.
//!
//! The ops never copy an input whole: a bfloat16 query or a quantized cache row is converted
//! into a small per-thread buffer when a kernel reaches it. [`PagedRows`] is the one decoder path
//! for every cache format an op reads (docs/model.md section 5): the packed FP8 entry and FP4/FP8
//! indexer-key layouts, and plain bfloat16/float32 rows for exactness tests.

use crate::error::{Error, Result};
use crate::quant::{self, Codec, RowFormat, CODECS, PAGE_ROWS};
use crate::simd::any_non_finite;
use crate::tensor::{DType, Device, TensorRef};

/// A float32 or bfloat16 host tensor, borrowed.
#[derive(Clone, Copy)]
pub enum Floats<'a> {
    F32(&'a [f32]),
    BF16(&'a [u16]),
}

impl<'a> Floats<'a> {
    /// Borrows `t` (float32 or bfloat16, on the CPU) and checks that every value is finite.
    ///
    /// # Safety
    /// `t` satisfies [`TensorRef`]'s contract and is not written while borrowed.
    pub unsafe fn new(t: &'a TensorRef) -> Result<Self> {
        let f = Self::view(t)?;
        if let Some(i) = f.first_non_finite() {
            return Err(Error::value(t.name, format!("contains a non-finite value at flat index {i}")));
        }
        Ok(f)
    }

    /// Borrows `t` (float32 or bfloat16, on the CPU) as it is, non-finite values included.
    ///
    /// # Safety
    /// As [`Floats::new`].
    pub unsafe fn view(t: &'a TensorRef) -> Result<Self> {
        t.expect_device(Device::Cpu)?;
        Ok(match t.expect_dtype(&[DType::F32, DType::BF16])? {
            DType::BF16 => Floats::BF16(t.host::<u16>(&[DType::BF16])?),
            _ => Floats::F32(t.host::<f32>(&[DType::F32])?),
        })
    }

    /// The flat index of the first value that is not finite.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            Floats::F32(v) => first_non_finite(v),
            Floats::BF16(v) => {
                let bad = |b: &u16| b & 0x7F80 == 0x7F80;
                first_where(v, |c| c.iter().fold(false, |a, b| a | bad(b)), bad)
            }
        }
    }

    /// Converts values `start .. start + out.len()` into `out`.
    #[inline]
    pub fn read(&self, start: usize, out: &mut [f32]) {
        match self {
            Floats::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Floats::BF16(v) => {
                let n = out.len();
                for (o, b) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = quant::bf16_to_f32(*b);
                }
            }
        }
    }
}

/// Index of the first value of `v` with `bad`. Chunks are tested with `any`, a branch-free
/// scan that vectorizes (a search that stops at the first hit does not), and searched only when
/// they hold one.
fn first_where<T>(v: &[T], any: impl Fn(&[T]) -> bool, bad: impl Fn(&T) -> bool) -> Option<usize> {
    const CHUNK: usize = 4096;
    v.chunks(CHUNK)
        .enumerate()
        .find_map(|(c, chunk)| any(chunk).then(|| c * CHUNK + chunk.iter().position(&bad).unwrap_or(0)))
}

fn first_non_finite(v: &[f32]) -> Option<usize> {
    first_where(v, any_non_finite, |x| !x.is_finite())
}

/// How a cache stores its rows.
#[derive(Clone, Copy)]
enum Storage<'a> {
    /// A packed quantized layout, with its decoder.
    Packed { bytes: &'a [u8], codec: Codec },
    /// Plain rows `[pages, 64, dim]`.
    Plain(Floats<'a>),
}

/// A paged cache of `dim`-wide rows in any supported format; row `r` is row `r % 64` of page
/// `r / 64`.
#[derive(Clone, Copy)]
pub struct PagedRows<'a> {
    pub name: &'static str,
    pub dim: usize,
    pub rows: usize,
    storage: Storage<'a>,
}

/// How a paged cache stores its rows, read off its dtype and shape (no data is touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// A packed quantized layout: `uint8 [pages, 64 * row_bytes]`.
    Packed(RowFormat),
    /// Plain rows `float32 [pages, 64, dim]`.
    PlainF32,
    /// Plain rows `bfloat16 [pages, 64, dim]`.
    PlainBf16,
}

/// Recognizes the format of `cache` for rows of width `dim`, or says which shapes it accepts.
pub fn cache_kind(cache: &TensorRef, dim: usize) -> Result<CacheKind> {
    let pages = cache.shape.first().copied().unwrap_or(0);
    let kind = match cache.dtype {
        DType::U8 => CODECS
            .iter()
            .find(|c| c.rows.dim == dim && cache.shape == [pages, c.rows.page_bytes()])
            .map(|c| CacheKind::Packed(c.rows)),
        DType::F32 if cache.shape == [pages, PAGE_ROWS, dim] => Some(CacheKind::PlainF32),
        DType::BF16 if cache.shape == [pages, PAGE_ROWS, dim] => Some(CacheKind::PlainBf16),
        _ => None,
    };
    kind.ok_or_else(|| {
        let packed: Vec<String> = CODECS
            .iter()
            .filter(|c| c.rows.dim == dim)
            .map(|c| format!("uint8 [num_pages, {}] ({})", c.rows.page_bytes(), c.rows.name))
            .collect();
        Error::value(
            cache.name,
            format!(
                "expected a cache of {}, or bfloat16/float32 [num_pages, {PAGE_ROWS}, {dim}]; got {} {:?}",
                packed.join(", "),
                cache.dtype.name(),
                cache.shape
            ),
        )
    })
}

impl<'a> PagedRows<'a> {
    /// Recognizes the format of `cache` (see [`cache_kind`]).
    ///
    /// # Safety
    /// `cache` satisfies [`TensorRef`]'s contract and is not written while borrowed.
    pub unsafe fn new(cache: &'a TensorRef, dim: usize) -> Result<Self> {
        cache.expect_device(Device::Cpu)?;
        let pages = cache.shape.first().copied().unwrap_or(0);
        let storage = match cache_kind(cache, dim)? {
            CacheKind::Packed(fmt) => {
                let codec = *CODECS.iter().find(|c| c.rows == fmt).expect("a packed format");
                Storage::Packed { bytes: cache.host::<u8>(&[DType::U8])?, codec }
            }
            CacheKind::PlainBf16 => Storage::Plain(Floats::BF16(cache.host::<u16>(&[DType::BF16])?)),
            CacheKind::PlainF32 => Storage::Plain(Floats::F32(cache.host::<f32>(&[DType::F32])?)),
        };
        Ok(PagedRows { name: cache.name, dim, rows: pages * PAGE_ROWS, storage })
    }

    /// Decodes row `row` (`< self.rows`) into `out` (`dim` values). Rows can hold non-finite
    /// values (a plain row, or a packed one whose scale decodes to infinity): kernels check the
    /// tiles they decode with [`check_rows`].
    #[inline]
    pub fn read(&self, row: usize, out: &mut [f32]) {
        match self.storage {
            Storage::Packed { bytes, codec } => {
                let (d, s) = codec.rows.offsets(row);
                (codec.decode)(&bytes[d..d + codec.rows.data_bytes], &bytes[s..s + codec.rows.scale_bytes], out);
            }
            Storage::Plain(values) => values.read(row * self.dim, out),
        }
    }
}

/// Errors unless every value of the decoded rows `tile` (`[n, dim]`) is finite; `which(j)`
/// names the cache and row id of tile row `j`. One scan per tile keeps the check cheap.
pub fn check_rows(tile: &[f32], dim: usize, which: impl Fn(usize) -> (&'static str, usize)) -> Result<()> {
    match first_non_finite(tile) {
        None => Ok(()),
        Some(i) => {
            let (name, row) = which(i / dim);
            Err(Error::value(name, format!("row {row} holds a non-finite value at column {}", i % dim)))
        }
    }
}

/// Row ids `[n]` or `[T, K]` (int32 or int64) of a host tensor, borrowed.
#[derive(Clone, Copy)]
pub enum Ids<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl<'a> Ids<'a> {
    /// Borrows `t` (int32 or int64, on the CPU).
    ///
    /// # Safety
    /// `t` satisfies [`TensorRef`]'s contract and is not written while borrowed.
    pub unsafe fn new(t: &'a TensorRef) -> Result<Self> {
        t.expect_device(Device::Cpu)?;
        Ok(match t.expect_dtype(&[DType::I32, DType::I64])? {
            DType::I32 => Ids::I32(t.host::<i32>(&[DType::I32])?),
            _ => Ids::I64(t.host::<i64>(&[DType::I64])?),
        })
    }

    /// The first value outside `[low, high)`, with its flat index.
    pub fn find_outside(&self, low: i64, high: i64) -> Option<(usize, i64)> {
        (0..self.len()).map(|i| (i, self.get(i))).find(|(_, v)| !(low..high).contains(v))
    }

    /// IndexError naming `name` unless every value lies in `[low, high)`; `what` says why.
    pub fn expect_range(&self, name: &str, low: i64, high: i64, what: &str) -> Result<()> {
        match self.find_outside(low, high) {
            None => Ok(()),
            Some((i, v)) => {
                Err(Error::index(name, format!("value {v} at flat index {i} is outside [{low}, {high}) ({what})")))
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Ids::I32(v) => v.len(),
            Ids::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Ids::I32(v) => v[i] as i64,
            Ids::I64(v) => v[i],
        }
    }
}

/// `v` as bfloat16 bits, nearest even; NaN stays NaN (0x7FC0, as the GPU's `bf16_from_f32`).
pub fn bf16_bits(v: f32) -> u16 {
    if v.is_nan() {
        0x7FC0
    } else {
        quant::bf16_from_f32(v)
    }
}

/// Fills a float32 or bfloat16 host tensor `out` of `rows` rows of `width` values, in parallel:
/// `row(r, values)` computes row `r` in float32 and the values are rounded once ([`bf16_bits`]).
///
/// # Safety
/// `out` satisfies [`TensorRef`]'s contract, holds `rows * width` values and is not aliased.
pub unsafe fn fill_rows(out: &TensorRef, width: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Result<()> {
    use rayon::prelude::*;
    if width == 0 {
        return Ok(());
    }
    match out.expect_dtype(&[DType::F32, DType::BF16])? {
        DType::BF16 => out.host_mut::<u16>(&[DType::BF16])?.par_chunks_mut(width).enumerate().for_each_init(
            || vec![0f32; width],
            |v, (r, o)| {
                row(r, v);
                o.iter_mut().zip(v.iter()).for_each(|(o, v)| *o = bf16_bits(*v));
            },
        ),
        _ => out.host_mut::<f32>(&[DType::F32])?.par_chunks_mut(width).enumerate().for_each(|(r, o)| row(r, o)),
    }
    Ok(())
}
