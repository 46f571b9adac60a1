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
