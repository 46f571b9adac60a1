//! Writing entries into paged caches and reading them back, on the CPU or the GPU
//! (docs/model.md section 5). The byte formats live in [`crate::quant`].
//!
//! A cache is a `uint8` tensor `[num_pages, page_bytes]`; row `r` is row `r % 64` of page
//! `r / 64`. Row ids (`slots` on write, `rows` on read) are int64; `-1` means "no row": skipped
//! on write, zeros on read. On the CPU any other id outside the cache is an error; the GPU
//! kernels cannot raise without synchronizing, so they treat such ids as `-1` (they never touch
//! memory outside the cache).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::IndexFormat;
use crate::gpu;
use crate::quant::{self, Codec, RowFormat, CODECS, INDEX_KEY_FP4_CODEC, INDEX_KEY_FP8_CODEC, MAIN_ENTRY, MAIN_ENTRY_CODEC};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// The codec of a packed key format; plain bf16 keys have none (a ValueError naming `arg`).
fn key_codec(arg: &str, fmt: IndexFormat) -> Result<Codec> {
    match fmt {
        IndexFormat::Fp4 => Ok(INDEX_KEY_FP4_CODEC),
        IndexFormat::Fp8 => Ok(INDEX_KEY_FP8_CODEC),
        IndexFormat::Bf16 => Err(Error::value(arg, "expected \"fp4\" or \"fp8\", got \"bf16\"")),
    }
}

/// Checks a cache tensor against its format and returns its number of rows.
pub fn cache_rows(cache: &TensorRef, fmt: RowFormat) -> Result<usize> {
    cache.expect_dtype(&[DType::U8])?;
    cache.expect_shape(&[None, Some(fmt.page_bytes())]).map_err(|_| {
        Error::value(
            cache.name,
            format!(
                "expected a {} cache of shape [num_pages, {}], got {:?}",
                fmt.name,
                fmt.page_bytes(),
                cache.shape
            ),
        )
    })?;
    if !cache.ptr.is_multiple_of(16) {
        return Err(Error::value(cache.name, "cache data must be 16-byte aligned"));
    }
    Ok(cache.dim(0) * quant::PAGE_ROWS)
}

/// Checks `[n, dim]` float32/bfloat16 values and returns `n`.
fn check_values(x: &TensorRef, dim: usize) -> Result<usize> {
    x.expect_dtype(&[DType::F32, DType::BF16])?;
    x.expect_shape(&[None, Some(dim)])?;
    Ok(x.dim(0))
}

fn check_ids(ids: &TensorRef, n: usize) -> Result<()> {
    ids.expect_dtype(&[DType::I64])?;
    ids.expect_shape(&[Some(n)])
}

/// Host values as f32 rows, checked to be finite.
///
/// # Safety
/// `x` satisfies [`TensorRef`]'s contract.
unsafe fn host_values(x: &TensorRef) -> Result<Vec<f32>> {
    let v: Vec<f32> = match x.dtype {
        DType::BF16 => x.host::<u16>(&[DType::BF16])?.iter().map(|b| quant::bf16_to_f32(*b)).collect(),
        _ => x.host::<f32>(&[DType::F32])?.to_vec(),
    };
    if let Some(i) = v.iter().position(|f| !f.is_finite()) {
        return Err(Error::value(x.name, format!("contains a non-finite value ({}) at flat index {i}", v[i])));
    }
    Ok(v)
}

/// Host row ids, checked to be -1 or inside `[0, rows)`.
///
/// # Safety
/// `ids` satisfies [`TensorRef`]'s contract.
unsafe fn host_ids(ids: &TensorRef, rows: usize) -> Result<&[i64]> {
    let v = ids.host::<i64>(&[DType::I64])?;
    if let Some(i) = v.iter().position(|r| *r < -1 || *r >= rows as i64) {
        return Err(Error::index(
            ids.name,
            format!("row id {} at position {i} is outside [-1, {rows}) (the cache holds {rows} rows)", v[i]),
        ));
    }
    Ok(v)
}

/// Checks a write of `x` (`[n, fmt.dim]`) at `slots` (`[n]`) into `cache`; returns the cache's
/// number of rows.
fn check_write(cache: &TensorRef, slots: &TensorRef, x: &TensorRef, fmt: RowFormat) -> Result<usize> {
    let rows = cache_rows(cache, fmt)?;
    check_ids(slots, check_values(x, fmt.dim)?)?;
    Ok(rows)
}

/// Checks a read of `ids` (`[m]`) from `cache` into `out` (`[m, fmt.dim]` float32); returns the
/// cache's number of rows.
fn check_read(cache: &TensorRef, ids: &TensorRef, out: &TensorRef, fmt: RowFormat) -> Result<usize> {
    let rows = cache_rows(cache, fmt)?;
    out.expect_dtype(&[DType::F32])?;
    out.expect_shape(&[None, Some(fmt.dim)])?;
    check_ids(ids, out.dim(0))?;
    Ok(rows)
}

/// Quantizes rows of `x` and writes them into `cache` (of `rows` rows) at `slots`, on the CPU.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `cache` is not aliased by the others; the
/// arguments passed [`check_write`].
unsafe fn write_rows(cache: &TensorRef, rows: usize, slots: &TensorRef, x: &TensorRef, codec: Codec) -> Result<()> {
    let fmt = codec.rows;
    let values = host_values(x)?;
    let ids = host_ids(slots, rows)?;
    if let Some(dup) = first_duplicate(ids) {
        return Err(Error::value(slots.name, format!("slot {dup} appears more than once")));
    }
    let encoded: Vec<Vec<u8>> = values
        .par_chunks(fmt.dim)
        .map(|row| {
            let mut buf = vec![0u8; fmt.row_bytes()];
            let (data, scales) = buf.split_at_mut(fmt.data_bytes);
            (codec.encode)(row, data, scales);
            buf
        })
        .collect();
    let bytes = cache.host_mut::<u8>(&[DType::U8])?;
    for (slot, buf) in ids.iter().zip(&encoded) {
        if *slot >= 0 {
            let (d, s) = fmt.offsets(*slot as usize);
            bytes[d..d + fmt.data_bytes].copy_from_slice(&buf[..fmt.data_bytes]);
            bytes[s..s + fmt.scale_bytes].copy_from_slice(&buf[fmt.data_bytes..]);
        }
    }
    Ok(())
}

fn first_duplicate(ids: &[i64]) -> Option<i64> {
    let mut seen: Vec<i64> = ids.iter().copied().filter(|r| *r >= 0).collect();
    seen.sort_unstable();
    seen.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// Dequantizes cache rows `rows` into `out` (`[m, dim]` float32), on the CPU.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` is not aliased by the others; the
/// arguments passed [`check_read`].
unsafe fn read_rows(cache: &TensorRef, n_rows: usize, rows: &TensorRef, out: &TensorRef, codec: Codec) -> Result<()> {
    let fmt = codec.rows;
    let ids = host_ids(rows, n_rows)?;
    let bytes = cache.host::<u8>(&[DType::U8])?;
    let dst = out.host_mut::<f32>(&[DType::F32])?;
    dst.par_chunks_mut(fmt.dim).zip(ids.par_iter()).for_each(|(o, row)| {
        if *row < 0 {
            o.fill(0.0);
        } else {
            let (d, s) = fmt.offsets(*row as usize);
            (codec.decode)(&bytes[d..d + fmt.data_bytes], &bytes[s..s + fmt.scale_bytes], o);
        }
    });
    Ok(())
}

fn gpu_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) => Some(i),
        Device::Cpu => None,
    }
}

/// Quantizes KV entries `x` (`[n, 512]` float32/bfloat16) into the 584-byte FP8 layout and
/// writes them at rows `slots` (`[n]` int64, -1 skipped) of `cache`. Duplicate slots are an
/// error on the CPU; on the GPU the last writer is unspecified.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `stream` is a valid `CUstream` of the
/// tensors' device (or 0) when they live on a GPU.
pub unsafe fn kv_write(cache: &TensorRef, slots: &TensorRef, x: &TensorRef, stream: usize) -> Result<()> {
    let device = same_device(&[cache, slots, x])?;
    let rows = check_write(cache, slots, x, MAIN_ENTRY)?;
    match gpu_index(device) {
        None => write_rows(cache, rows, slots, x, MAIN_ENTRY_CODEC),
        Some(dev) => gpu::quant::kv_write(dev, stream, cache, rows, slots, x),
    }
}

/// Reads and dequantizes rows `rows` (`[m]` int64, -1 gives zeros) of a 584-byte cache into
/// `out` (`[m, 512]` float32).
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn kv_read(cache: &TensorRef, rows: &TensorRef, out: &TensorRef, stream: usize) -> Result<()> {
    let device = same_device(&[cache, rows, out])?;
    let n_rows = check_read(cache, rows, out, MAIN_ENTRY)?;
    match gpu_index(device) {
        None => read_rows(cache, n_rows, rows, out, MAIN_ENTRY_CODEC),
        Some(dev) => gpu::quant::kv_read(dev, stream, cache, n_rows, rows, out),
    }
}

/// Quantizes indexer keys `x` (`[n, 128]`) into `fmt` and writes them at `slots`.
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_write(
    cache: &TensorRef,
    slots: &TensorRef,
    x: &TensorRef,
    fmt: IndexFormat,
    stream: usize,
) -> Result<()> {
    let codec = key_codec("fmt", fmt)?;
    let device = same_device(&[cache, slots, x])?;
    let rows = check_write(cache, slots, x, codec.rows)?;
    match gpu_index(device) {
        None => write_rows(cache, rows, slots, x, codec),
        Some(dev) => gpu::quant::index_key_write(dev, stream, cache, rows, slots, x, fmt),
    }
}

/// Reads and dequantizes indexer keys at `rows` into `out` (`[m, 128]` float32).
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_read(
    cache: &TensorRef,
    rows: &TensorRef,
    out: &TensorRef,
    fmt: IndexFormat,
    stream: usize,
) -> Result<()> {
    let codec = key_codec("fmt", fmt)?;
    let device = same_device(&[cache, rows, out])?;
    let n_rows = check_read(cache, rows, out, codec.rows)?;
    match gpu_index(device) {
        None => read_rows(cache, n_rows, rows, out, codec),
        Some(dev) => gpu::quant::index_key_read(dev, stream, cache, n_rows, rows, out, fmt),
    }
}

/// The byte layout of a cache's rows for [`copy_rows`]: a packed format, told by its page width
/// (`uint8 [P, 64 * row_bytes]`), or plain rows (`bfloat16`/`float32 [P, 64, D]`: no scale part).
fn row_layout(cache: &TensorRef) -> Result<RowFormat> {
    match cache.dtype {
        DType::U8 => CODECS
            .iter()
            .map(|c| c.rows)
            .find(|f| cache.shape.len() == 2 && cache.dim(1) == f.page_bytes())
            .ok_or_else(|| {
                let widths: Vec<String> = CODECS.iter().map(|c| format!("{} ({})", c.rows.page_bytes(), c.rows.name)).collect();
                Error::value(cache.name, format!("expected uint8 [num_pages, {}], got {:?}", widths.join(" or "), cache.shape))
            }),
        DType::BF16 | DType::F32 => {
            cache.expect_shape(&[None, Some(quant::PAGE_ROWS), None])?;
            let dim = cache.dim(2);
            Ok(RowFormat { name: "plain rows", dim, data_bytes: dim * cache.dtype.size(), scale_bytes: 0 })
        }
        other => Err(Error::dtype(
            cache.name,
            format!("expected uint8 (packed rows), bfloat16 or float32 (plain rows), got {}", other.name()),
        )),
    }
}

/// A host buffer that parallel jobs write at disjoint offsets.
#[derive(Clone, Copy)]
struct Scatter(*mut u8);

// SAFETY: the jobs of [`copy_rows`] write disjoint byte ranges (distinct destination rows, checked
// before they start) of a buffer no one else touches meanwhile.
unsafe impl Send for Scatter {}
unsafe impl Sync for Scatter {}

impl Scatter {
    /// # Safety
    /// `at .. at + bytes.len()` lies inside the buffer, no other job writes it, `bytes` is elsewhere.
    unsafe fn write(self, at: usize, bytes: &[u8]) {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(at), bytes.len());
    }
}

/// Copies cache rows byte for byte, in place on `dst`: row `src_rows[i]` of `src` to row
/// `dst_rows[i]` of `dst` (int64 `[n]` both; -1 in either skips the pair). `dst` and `src` are
/// caches of one format (see [`row_layout`]), of any numbers of pages, that must not overlap in
/// memory. On the CPU an id outside its cache is an IndexError and a destination row that two
/// copied pairs name a ValueError; the GPU kernel skips ids outside a cache (raising would need a
/// synchronization) and leaves the last writer of a repeated row unspecified.
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn copy_rows(dst: &TensorRef, dst_rows: &TensorRef, src: &TensorRef, src_rows: &TensorRef, stream: usize) -> Result<()> {
    let device = same_device(&[dst, dst_rows, src, src_rows])?;
    let fmt = row_layout(dst)?;
    if src.dtype != dst.dtype || src.shape.len() != dst.shape.len() || src.shape[1..] != dst.shape[1..] {
        return Err(Error::value(
            src.name,
            format!(
                "must have the format of {} ({} {:?} pages), got {} {:?}",
                dst.name,
                dst.dtype.name(),
                &dst.shape[1..],
                src.dtype.name(),
                src.shape
            ),
        ));
    }
    dst_rows.expect_dtype(&[DType::I64])?;
    dst_rows.expect_shape(&[None])?;
    check_ids(src_rows, dst_rows.dim(0))?;
    let span = |t: &TensorRef| (t.ptr, t.ptr + t.numel() * t.dtype.size());
    let ((d0, d1), (s0, s1)) = (span(dst), span(src));
    if d0 < d1 && s0 < s1 && d0 < s1 && s0 < d1 {
        return Err(Error::value(&format!("{}, {}", dst.name, src.name), "must not overlap in memory"));
    }
    let (dst_total, src_total) = (dst.dim(0) * quant::PAGE_ROWS, src.dim(0) * quant::PAGE_ROWS);
    let Some(dev) = gpu_index(device) else {
        let (to, from) = (host_ids(dst_rows, dst_total)?, host_ids(src_rows, src_total)?);
        let pairs: Vec<(usize, usize)> =
            to.iter().zip(from).filter(|(d, s)| **d >= 0 && **s >= 0).map(|(d, s)| (*d as usize, *s as usize)).collect();
        let written: Vec<i64> = pairs.iter().map(|(d, _)| *d as i64).collect();
        if let Some(dup) = first_duplicate(&written) {
            return Err(Error::value(dst_rows.name, format!("row {dup} is the destination of more than one copied row")));
        }
        let from = src.host_bytes()?;
        let to = Scatter(dst.host_bytes_mut()?.as_mut_ptr());
        pairs.par_iter().with_min_len(256).for_each(|&(d, s)| {
            let ((d_data, d_scales), (s_data, s_scales)) = (fmt.offsets(d), fmt.offsets(s));
            // SAFETY: rows of the caches (ids checked), each destination row once, dst and src
            // apart (checked above).
            unsafe {
                to.write(d_data, &from[s_data..s_data + fmt.data_bytes]);
                to.write(d_scales, &from[s_scales..s_scales + fmt.scale_bytes]);
            }
        });
        return Ok(());
    };
    gpu::quant::copy_rows(dev, stream, dst, dst_total, dst_rows, src, src_total, src_rows, fmt)
}

/// What [`index_key_write`] then [`index_key_read`] return for keys `x` (`[n, 128]`
/// float32/bfloat16), without a cache: into `out` (`[n, 128]` float32). Non-finite keys are an
/// error on the CPU; the GPU kernel shares the write kernel's encoder and does what it does.
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_round_trip(x: &TensorRef, out: &TensorRef, fmt: IndexFormat, stream: usize) -> Result<()> {
    let codec = key_codec("fmt", fmt)?;
    map_keys(x, out, |o| codec.round_trip(o), |dev| gpu::quant::index_key_round_trip(dev, stream, x, out, fmt))
}

/// Normalized Hadamard-128 transform of the rows of `x` (`[n, 128]`) into `out` (float32).
///
/// # Safety
/// As [`kv_write`].
pub unsafe fn hadamard128(x: &TensorRef, out: &TensorRef, stream: usize) -> Result<()> {
    map_keys(x, out, quant::hadamard128, |dev| gpu::quant::hadamard128(dev, stream, x, out))
}

/// Checks `x` (`[n, 128]` float32/bfloat16) and `out` (`[n, 128]` float32) and fills `out`: on
/// the CPU each row of `x` transformed in place by `cpu`, on a GPU by the launch `gpu`.
///
/// # Safety
/// As [`kv_write`].
unsafe fn map_keys(
    x: &TensorRef,
    out: &TensorRef,
    cpu: impl Fn(&mut [f32]) + Sync,
    gpu: impl FnOnce(i32) -> Result<()>,
) -> Result<()> {
    let n = check_values(x, quant::INDEX_DIM)?;
    out.expect_dtype(&[DType::F32])?;
    out.expect_shape(&[Some(n), Some(quant::INDEX_DIM)])?;
    match gpu_index(same_device(&[x, out])?) {
        None => {
            let values = host_values(x)?;
            let dst = out.host_mut::<f32>(&[DType::F32])?;
            dst.par_chunks_mut(quant::INDEX_DIM).zip(values.par_chunks(quant::INDEX_DIM)).for_each(|(o, v)| {
                o.copy_from_slice(v);
                cpu(o);
            });
            Ok(())
        }
        Some(dev) => gpu(dev),
    }
}
