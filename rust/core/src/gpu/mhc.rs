//! Launcher of cuda/mhc.cu. Shapes and dtypes are checked by the caller (`crate::mhc`).

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::tensor::TensorRef;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::mhc` checks;
/// `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_weights(
    dev: i32, stream: usize, mix: &TensorRef, scale: &TensorRef, base: &TensorRef, pre: &TensorRef, post: &TensorRef,
    comb: &TensorRef, n: usize, iters: usize, eps: f32,
) -> Result<()> {
    let tokens = mix.dim(0) as i64;
    let (mp, sp, bp, pp, op, cp) = (mix.ptr as u64, scale.ptr as u64, base.ptr as u64, pre.ptr as u64, post.ptr as u64, comb.ptr as u64);
    let (n, iters) = (n as i32, iters.min(i32::MAX as usize) as i32);
    // A token per group of lanes (cuda/mhc.cu `group_lanes`: the next power of two >= n).
    let lanes = (n as u64).next_power_of_two();
    let blocks = (tokens as u64 * lanes).div_ceil(128) as u32;
    let cfg = Launch { grid: (blocks, 1, 1), block: (128, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::MhcWeights, &cfg, &mut kernel_args!(mp, sp, bp, tokens, n, iters, eps, pp, op, cp))
}

const THREADS: u32 = 256;

/// A grid of `threads` threads (at most 2^31 - 1 blocks of THREADS).
fn threads_launch(threads: usize, arg: &str, stream: usize) -> Result<Launch> {
    let blocks = threads.div_ceil(THREADS as usize);
    if blocks > i32::MAX as usize {
        return Err(Error::value(arg, format!("{threads} threads are more than one launch takes")));
    }
    Ok(Launch { grid: (blocks as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream })
}

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::mhc` checks
/// (x `[T, n, d]`, pre `[T, n]`, y `[T, d]`); `stream` belongs to that device.
pub unsafe fn mhc_collapse(dev: i32, stream: usize, x: &TensorRef, pre: &TensorRef, y: &TensorRef, n: usize, d: usize) -> Result<()> {
    let tokens = x.dim(0);
    if tokens == 0 {
        return Ok(());
    }
    let vec4 = four_wide(d, &[x, y]);
    let cfg = threads_launch(tokens * d / if vec4 { 4 } else { 1 }, x.name, stream)?;
    let (xp, xb, pp, yp) = (x.ptr as u64, is_bf16(x), pre.ptr as u64, y.ptr as u64);
    let (t, n, d, v) = (tokens as i64, n as i32, d as i32, vec4 as i32);
    launch(dev, Kernel::MhcCollapse, &cfg, &mut kernel_args!(xp, xb, pp, yp, t, n, d, v))
}

/// # Safety
/// As [`mhc_collapse`] (x `[T, n, d]`, f and f2 `[T, d]`, post `[T, n]`, comb `[T, n, n]`, y
/// `[T, n, d]`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_combine(
    dev: i32, stream: usize, x: &TensorRef, f: &TensorRef, f2: Option<&TensorRef>, post: &TensorRef, comb: &TensorRef,
    y: &TensorRef, n: usize, d: usize,
) -> Result<()> {
    let tokens = x.dim(0);
    if tokens == 0 {
        return Ok(());
    }
    let vec4 = four_wide(d, &[x, f, y]) && f2.is_none_or(|g| four_wide(d, &[g]));
    let cfg = threads_launch(tokens * d / if vec4 { 4 } else { 1 }, x.name, stream)?;
    let (xp, xb, fp, fb, pp, cp, yp) = (x.ptr as u64, is_bf16(x), f.ptr as u64, is_bf16(f), post.ptr as u64, comb.ptr as u64, y.ptr as u64);
    let (t, n, d, v) = (tokens as i64, n as i32, d as i32, vec4 as i32);
    match f2 {
        None => launch(dev, Kernel::MhcCombine, &cfg, &mut kernel_args!(xp, xb, fp, fb, pp, cp, yp, t, n, d, v)),
        Some(g) => {
            let gp = g.ptr as u64;
            launch(dev, Kernel::MhcCombineAdd, &cfg, &mut kernel_args!(xp, xb, fp, fb, gp, pp, cp, yp, t, n, d, v))
        }
    }
}

/// Values of a token's streams one block of the first `mhc_pre` kernel covers (cuda/mhc.cu
/// `MIX_CHUNK`): the workspace holds `ceil(n d / MIX_CHUNK)` partial sums a token.
pub const MIX_CHUNK: usize = 1024;

/// Blocks that share a chunk's dot products in the first `mhc_pre` kernel (cuda/mhc.cu
/// `MIX_GROUPS`).
const MIX_GROUPS: u32 = 4;

/// Blocks a token of the second `mhc_pre` kernel (slices of y): `ceil(d / (256 V))`, V = 4 with
/// `vec4` (four values a thread) else 1.
pub fn pre_slices(d: usize, vec4: bool) -> usize {
    d.div_ceil(THREADS as usize * if vec4 { 4 } else { 1 })
}

/// Floats of `mhc_pre`'s workspace for `tokens` tokens of `n` streams of `d`.
pub fn pre_workspace_len(tokens: usize, n: usize, d: usize) -> usize {
    tokens * (n * d).div_ceil(MIX_CHUNK) * ((2 + n) * n + 1)
}

/// # Safety
/// As [`mhc_collapse`] (x `[T, n, d]`, proj `[(2 + n) n, n d]`, scale `[3]`, base `[(2 + n) n]`,
/// workspace at least [`pre_workspace_len`] floats, post `[T, n]`, comb `[T, n, n]`,
/// y `[T, d]`; T and the splits below 2^16; d below 2^24).
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_pre(
    dev: i32, stream: usize, x: &TensorRef, proj: &TensorRef, scale: &TensorRef, base: &TensorRef, workspace: &TensorRef,
    post: &TensorRef, comb: &TensorRef, y: &TensorRef, n: usize, d: usize, iters: usize, eps: f32, norm_eps: f32,
) -> Result<()> {
    let tokens = x.dim(0);
    if tokens == 0 {
        return Ok(());
    }
    let splits = (n * d).div_ceil(MIX_CHUNK);
    let (xp, xb, fp, wp) = (x.ptr as u64, is_bf16(x), proj.ptr as u64, workspace.ptr as u64);
    let (nn, dd) = (n as i32, d as i32);
    let mix_vec = four_wide(n * d, &[x, proj]) as i32;
    let cfg = Launch { grid: (splits as u32, tokens as u32, MIX_GROUPS), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::MhcMix, &cfg, &mut kernel_args!(xp, xb, fp, nn, dd, mix_vec, wp))?;
    let (sp, bp, pp, cp, yp) = (scale.ptr as u64, base.ptr as u64, post.ptr as u64, comb.ptr as u64, y.ptr as u64);
    let (s, it) = (splits as i32, iters.min(i32::MAX as usize) as i32);
    let pre_vec = four_wide(d, &[x, y]);
    let slices = pre_slices(d, pre_vec);
    let pre_vec = pre_vec as i32;
    let cfg = Launch { grid: (tokens as u32, slices as u32, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::MhcPre, &cfg, &mut kernel_args!(wp, s, sp, bp, it, eps, norm_eps, xp, xb, nn, dd, pre_vec, pp, cp, yp))
}

/// Most projection rows `mhc_mix` takes (`(2 + n) n` for 8 streams).
pub const MIX_MAX_ROWS: usize = 80;

/// The rows a thread's sums cover in `dsv4_mhc_mix_rows` (cuda/mhc.cu `MixRows`): `m` rounded up to
/// 8, 24, 48 or 80.
fn mix_bucket(m: usize) -> usize {
    [8, 24, 48].into_iter().find(|&b| m <= b).unwrap_or(MIX_MAX_ROWS)
}

/// Blocks a mix grid should have at the least (two a multiprocessor on the largest GPUs), where its
/// chunks can be made short enough.
const MIX_ROWS_BLOCKS: usize = 264;

/// How `mhc_mix` sums: `dsv4_mhc_mix_mma` (the tensor cores) or `dsv4_mhc_mix_rows` (fused
/// multiply-adds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MixForm {
    Rows,
    Mma,
}

impl MixForm {
    /// Tokens a block covers.
    fn block_tokens(self, m: usize) -> usize {
        match self {
            MixForm::Rows => 128 * if mix_bucket(m) <= 24 { 2 } else { 1 },
            MixForm::Mma => 128,
        }
    }

    /// Shared memory of a block for chunks of `chunk` values: the projection's chunk (float32 rows
    /// K-major, or three bfloat16 parts a row, 16 bytes apart) and two staged steps of the tokens.
    fn shared_bytes(self, m: usize, chunk: usize) -> usize {
        let projection = match self {
            MixForm::Rows => chunk * mix_bucket(m) * 4,
            MixForm::Mma => 3 * mix_bucket(m) * (2 * chunk + 16),
        };
        projection + 2 * self.block_tokens(m) * 80
    }
}

/// The form a call takes: the tensor cores for bfloat16 streams that 16-byte copies can stage
/// (`vec`) and at most 24 rows, unless `DSV4RS_MHC_MIX=rows` (`mma` or `auto`, the default:
/// where they apply).
fn mix_form(m: usize, bf16: bool, vec: bool) -> Result<MixForm> {
    let fits = bf16 && vec && m <= 24;
    match std::env::var("DSV4RS_MHC_MIX").ok().as_deref() {
        None | Some("") | Some("auto") | Some("mma") => Ok(if fits { MixForm::Mma } else { MixForm::Rows }),
        Some("rows") => Ok(MixForm::Rows),
        Some(other) => Err(Error::value("DSV4RS_MHC_MIX", format!("must be auto, mma or rows (got {other:?})"))),
    }
}

/// Values of K a block of `form` covers for `tokens` tokens, `m` rows and `k` values a token: the
/// longest of 512, 256 and 128 that leaves the grid [`MIX_ROWS_BLOCKS`] blocks (else 128), whose
/// shared memory stays within 96 KiB (every GPU from sm_80 on), and no longer than `k` needs.
fn form_chunk(form: MixForm, tokens: usize, m: usize, k: usize) -> usize {
    let tiles = tokens.div_ceil(form.block_tokens(m));
    let chunk = [512, 256, 128]
        .into_iter()
        .find(|&c| form.shared_bytes(m, c) <= 96 * 1024 && tiles * k.div_ceil(c) >= MIX_ROWS_BLOCKS)
        .unwrap_or(128);
    chunk.min(k.next_multiple_of(64).max(64))
}

/// Floats of `mhc_mix`'s workspace: the partial sums of `tokens` tokens, `m` rows, `k` values, for
/// either form (the shorter chunk's count); 0 for a row count the call refuses, so that nothing is
/// allocated for it.
pub fn mix_workspace_len(tokens: usize, m: usize, k: usize) -> usize {
    if m == 0 || m > MIX_MAX_ROWS || k == 0 {
        return 0;
    }
    let chunk = form_chunk(MixForm::Rows, tokens, m, k).min(form_chunk(MixForm::Mma, tokens, m, k));
    tokens * k.div_ceil(chunk) * (m + 1)
}

/// # Safety
/// As [`mhc_collapse`] (x `[T, n, d]` with `k = n d`, proj `[m, k]`, m in 1..=[`MIX_MAX_ROWS`],
/// workspace at least [`mix_workspace_len`] floats, mix `[T, m]`; T below 2^23).
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_mix(
    dev: i32, stream: usize, x: &TensorRef, proj: &TensorRef, workspace: &TensorRef, mix: &TensorRef, m: usize,
    k: usize, norm_eps: f32,
) -> Result<()> {
    let tokens = x.dim(0);
    if tokens == 0 {
        return Ok(());
    }
    let vec = (k * x.dtype.size()).is_multiple_of(16) && x.ptr.is_multiple_of(16);
    let form = mix_form(m, is_bf16(x) == 1, vec)?;
    let chunk = form_chunk(form, tokens, m, k);
    let splits = k.div_ceil(chunk);
    let tiles = tokens.div_ceil(form.block_tokens(m));
    if tiles > u16::MAX as usize || splits > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{tokens} tokens of {k} values are more than one launch takes")));
    }
    let (xp, xb, fp, wp, op) = (x.ptr as u64, is_bf16(x), proj.ptr as u64, workspace.ptr as u64, mix.ptr as u64);
    let (t, width, mm, c, v) = (tokens as i64, k as i64, m as i32, chunk as i32, vec as i32);
    let grid = (splits as u32, tiles as u32, 1);
    let cfg = Launch { grid, block: (128, 1, 1), shared_bytes: form.shared_bytes(m, chunk) as u32, stream };
    match form {
        MixForm::Rows => launch(dev, Kernel::MhcMixRows, &cfg, &mut kernel_args!(xp, xb, fp, t, width, mm, c, v, wp))?,
        MixForm::Mma => launch(dev, Kernel::MhcMixMma, &cfg, &mut kernel_args!(xp, fp, t, width, mm, c, wp))?,
    }
    let cfg = threads_launch(tokens * 32, x.name, stream)?;
    let s = splits as i32;
    launch(dev, Kernel::MhcMixFinish, &cfg, &mut kernel_args!(wp, s, t, mm, width, norm_eps, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_chunks_fill_the_grid_within_the_shared_memory() {
        // V4-Flash's sublayers (24 rows of 16,384): a prefill keeps 512-value chunks, 17 tokens
        // take 128 so that 128 blocks run; the head's 4 rows share the 8-row bucket.
        assert_eq!(form_chunk(MixForm::Rows, 4096, 24, 16384), 512);
        assert_eq!(form_chunk(MixForm::Rows, 2048, 24, 16384), 256);
        assert_eq!(form_chunk(MixForm::Rows, 17, 24, 16384), 128);
        assert_eq!(form_chunk(MixForm::Rows, 4096, 4, 16384), 512);
        // 80 rows: 128 values (40 KiB) at the most; short rows: one chunk of the row rounded to 64.
        assert_eq!(form_chunk(MixForm::Rows, 100_000, 80, 16384), 128);
        assert_eq!(form_chunk(MixForm::Rows, 1000, 3, 5), 64);
        assert_eq!(mix_workspace_len(1000, 3, 5), 1000 * 4);
        assert_eq!(mix_workspace_len(17, 24, 16384), 17 * 128 * 25);
        assert_eq!(mix_workspace_len(4096, 81, 16384), 0); // refused: nothing to allocate
        // The tensor-core form: 128 tokens a block, three bfloat16 parts of the projection.
        assert_eq!(form_chunk(MixForm::Mma, 4096, 24, 16384), 512);
        assert_eq!(form_chunk(MixForm::Mma, 512, 24, 16384), 128);
        assert!(MixForm::Mma.shared_bytes(24, 512) <= 96 * 1024);
        for m in 1..=MIX_MAX_ROWS {
            let b = mix_bucket(m);
            let chunk = form_chunk(MixForm::Rows, 1 << 20, m, 1 << 20);
            assert!(b >= m && MixForm::Rows.shared_bytes(m, chunk) <= 96 * 1024);
        }
    }
}
