//! Launchers of cuda/quant.cu. Shapes and dtypes are checked by the callers in `crate::kv`.

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::Result;
use crate::formats::IndexFormat;
use crate::kernel_args;
use crate::quant::{RowFormat, ENTRY_DIM};
use crate::tensor::TensorRef;

/// The launch of a row kernel over `n` rows of `threads` threads each, several rows a block:
/// two of 64 threads (128 threads a block) or eight of 32 (256). A row a block, the kernels were
/// bound by how fast blocks are started: on an H100 each of `kv_write`, `kv_read`,
/// `index_key_write` and `hadamard128` took 82 us for 65,536 rows, whatever its bytes. A sweep of
/// block sizes there (medians of three), at 65,536 / 262,144 rows, % of the copy rate (docs/kernels/
/// formats.md has the bench's figures): `kv_write` 93 / 92 % at 128 threads (92 /
/// 91 % at 256; 70 / 72 % a row a block), `index_key_write` (FP4) 65 / 74 % at 256 threads (55 /
/// 62 % at 128, 62 / 70 % at 512; 16 % at 65,536 a row a block).
fn rows_launch(n: usize, threads: u32, stream: usize) -> Launch {
    let block = if threads >= 64 { 128 } else { 256 };
    let rows = (block / threads) as usize;
    Launch { grid: (n.div_ceil(rows) as u32, 1, 1), block: (block, 1, 1), shared_bytes: 0, stream }
}

fn grid_rows(arg: &TensorRef) -> Result<usize> {
    let n = arg.dim(0);
    if n > i32::MAX as usize {
        return Err(crate::Error::value(arg.name, "more than 2^31 - 1 rows in one launch"));
    }
    Ok(n)
}

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev`; `stream` belongs to that device.
pub unsafe fn kv_write(dev: i32, stream: usize, cache: &TensorRef, rows: usize, slots: &TensorRef, x: &TensorRef) -> Result<()> {
    let n = grid_rows(x)?;
    let (xp, bf, nn, sp, cp, nr) = (x.ptr as u64, is_bf16(x), n as i64, slots.ptr as u64, cache.ptr as u64, rows as i64);
    let vec4 = four_wide(ENTRY_DIM, &[x]) as i32;
    launch(dev, Kernel::KvWrite, &rows_launch(n, 64, stream), &mut kernel_args!(xp, bf, nn, sp, cp, nr, vec4))
}

/// # Safety
/// As [`kv_write`].
pub unsafe fn kv_read(dev: i32, stream: usize, cache: &TensorRef, rows: usize, ids: &TensorRef, out: &TensorRef) -> Result<()> {
    let m = grid_rows(out)?;
    let (cp, nr, ip, mm, op) = (cache.ptr as u64, rows as i64, ids.ptr as u64, m as i64, out.ptr as u64);
    launch(dev, Kernel::KvRead, &rows_launch(m, 64, stream), &mut kernel_args!(cp, nr, ip, mm, op))
}

/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_write(
    dev: i32,
    stream: usize,
    cache: &TensorRef,
    rows: usize,
    slots: &TensorRef,
    x: &TensorRef,
    fmt: IndexFormat,
) -> Result<()> {
    let n = grid_rows(x)?;
    let (xp, bf, nn, sp, cp, nr) = (x.ptr as u64, is_bf16(x), n as i64, slots.ptr as u64, cache.ptr as u64, rows as i64);
    launch(dev, Kernel::IndexKeyWrite, &rows_launch(n, 32, stream), &mut kernel_args!(xp, bf, nn, sp, cp, nr, fmt))
}

/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_read(
    dev: i32,
    stream: usize,
    cache: &TensorRef,
    rows: usize,
    ids: &TensorRef,
    out: &TensorRef,
    fmt: IndexFormat,
) -> Result<()> {
    let m = grid_rows(out)?;
    let (cp, nr, ip, mm, op) = (cache.ptr as u64, rows as i64, ids.ptr as u64, m as i64, out.ptr as u64);
    launch(dev, Kernel::IndexKeyRead, &rows_launch(m, 32, stream), &mut kernel_args!(cp, nr, ip, mm, op, fmt))
}

/// Pairs of rows a block of `dsv4_copy_rows` copies (a warp each).
const COPY_PAIRS: usize = 4;

/// # Safety
/// As [`kv_write`]; `dst` and `src` are caches of `fmt` rows (`dst_total` and `src_total` of
/// them) that do not overlap.
#[allow(clippy::too_many_arguments)]
pub unsafe fn copy_rows(
    dev: i32,
    stream: usize,
    dst: &TensorRef,
    dst_total: usize,
    dst_rows: &TensorRef,
    src: &TensorRef,
    src_total: usize,
    src_rows: &TensorRef,
    fmt: RowFormat,
) -> Result<()> {
    let n = grid_rows(dst_rows)?;
    let (dp, dn, dip) = (dst.ptr as u64, dst_total as i64, dst_rows.ptr as u64);
    let (sp, sn, sip) = (src.ptr as u64, src_total as i64, src_rows.ptr as u64);
    let (nn, db, sb) = (n as i64, fmt.data_bytes as i32, fmt.scale_bytes as i32);
    let cfg = Launch { grid: (n.div_ceil(COPY_PAIRS) as u32, 1, 1), block: (32 * COPY_PAIRS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CopyRows, &cfg, &mut kernel_args!(dp, dn, dip, sp, sn, sip, nn, db, sb))
}

/// # Safety
/// As [`kv_write`].
pub unsafe fn index_key_round_trip(dev: i32, stream: usize, x: &TensorRef, out: &TensorRef, fmt: IndexFormat) -> Result<()> {
    let n = grid_rows(x)?;
    let (xp, bf, nn, op) = (x.ptr as u64, is_bf16(x), n as i64, out.ptr as u64);
    launch(dev, Kernel::IndexKeyRoundTrip, &rows_launch(n, 32, stream), &mut kernel_args!(xp, bf, nn, op, fmt))
}

/// # Safety
/// As [`kv_write`].
pub unsafe fn hadamard128(dev: i32, stream: usize, x: &TensorRef, out: &TensorRef) -> Result<()> {
    let n = grid_rows(x)?;
    let (xp, bf, nn, op) = (x.ptr as u64, is_bf16(x), n as i64, out.ptr as u64);
    launch(dev, Kernel::Hadamard128, &rows_launch(n, 32, stream), &mut kernel_args!(xp, bf, nn, op))
}
