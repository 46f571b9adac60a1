//! mHC weights (docs/model.md section 6): from the projected mix of one token's streams
//! (`mu = r * (Phi vec X)`, `(2 + n) n` values), the collapse weights `pre`, the expansion weights
//! `post` and the mixing matrix `comb`, projected towards doubly stochastic by Sinkhorn
//! iterations. One call replaces some 130 small tensor ops per sublayer.

use crate::error::{Error, Result};
use crate::gpu;
use crate::quant;
use crate::rows::{fill_rows, Floats};
use crate::tensor::{same_device, DType, Device, TensorRef};

pub use gpu::mhc::{mix_workspace_len, pre_workspace_len, MIX_CHUNK, MIX_MAX_ROWS};

/// Most streams a call takes (`hc_mult`; V4 uses 4).
pub const MAX_STREAMS: usize = 8;
/// The most Sinkhorn iterations `mhc_weights` runs (V4 runs 20; a bound so that a corrupt
/// config cannot hang a step).
pub const MAX_ITERS: usize = 1000;

/// Streams `n` of a mix width `(2 + n) n`.
fn streams(width: usize) -> Option<usize> {
    (1..=MAX_STREAMS).find(|n| (2 + n) * n == width)
}

/// Settings of [`mhc_weights`].
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Sinkhorn iterations (`hc_sinkhorn_iters`, >= 1): columns once, then rows and columns
    /// `iters - 1` times.
    pub iters: usize,
    /// `hc_eps`: added to `pre` and to the softmaxed `comb`, and to every Sinkhorn divisor.
    pub eps: f32,
}

/// One token, in float32 and in the order transformers' `DeepseekV4HyperConnection` computes.
#[allow(clippy::too_many_arguments)]
pub fn token(mix: &[f32], scale: &[f32], base: &[f32], n: usize, cfg: Config, pre: &mut [f32], post: &mut [f32], comb: &mut [f32]) {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    for j in 0..n {
        pre[j] = sigmoid(mix[j] * scale[0] + base[j]) + cfg.eps;
        post[j] = 2.0 * sigmoid(mix[n + j] * scale[1] + base[n + j]);
    }
    for i in 0..n {
        let row = &mut comb[i * n..(i + 1) * n];
        for (k, c) in row.iter_mut().enumerate() {
            *c = mix[2 * n + i * n + k] * scale[2] + base[2 * n + i * n + k];
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for c in row.iter_mut() {
            *c = (*c - max).exp();
            sum += *c;
        }
        for c in row.iter_mut() {
            *c = *c / sum + cfg.eps;
        }
    }
    let columns = |comb: &mut [f32]| {
        for k in 0..n {
            let s: f32 = (0..n).map(|i| comb[i * n + k]).sum::<f32>() + cfg.eps;
            (0..n).for_each(|i| comb[i * n + k] /= s);
        }
    };
    columns(comb);
    for _ in 1..cfg.iters {
        for row in comb.chunks_exact_mut(n) {
            let s = row.iter().sum::<f32>() + cfg.eps;
            row.iter_mut().for_each(|c| *c /= s);
        }
        columns(comb);
    }
}

/// `pre [T, n]`, `post [T, n]` and `comb [T, n, n]` (float32) of `mix [T, (2 + n) n]` with the
/// sublayer's `scale [3]` and `base [(2 + n) n]` (all float32, one device).
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; the outputs alias nothing.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_weights(
    mix: &TensorRef, scale: &TensorRef, base: &TensorRef, pre: &TensorRef, post: &TensorRef, comb: &TensorRef,
    cfg: Config, stream: usize,
) -> Result<()> {
    for t in [mix, scale, base, pre, post, comb] {
        t.expect_dtype(&[DType::F32])?;
    }
    mix.expect_shape(&[None, None])?;
    let (tokens, width) = (mix.dim(0), mix.dim(1));
    let n = streams(width).ok_or_else(|| {
        Error::value(mix.name, format!("expected (2 + n) n columns for n streams in 1..={MAX_STREAMS}, got {width}"))
    })?;
    scale.expect_shape(&[Some(3)])?;
    base.expect_shape(&[Some(width)])?;
    pre.expect_shape(&[Some(tokens), Some(n)])?;
    post.expect_shape(&[Some(tokens), Some(n)])?;
    comb.expect_shape(&[Some(tokens), Some(n), Some(n)])?;
    if cfg.iters == 0 || cfg.iters > MAX_ITERS {
        return Err(Error::value("iters", format!("must be in 1..={MAX_ITERS}, got {}", cfg.iters)));
    }
    if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
        return Err(Error::value("eps", format!("must be finite and >= 0, got {}", cfg.eps)));
    }
    match same_device(&[mix, scale, base, pre, post, comb])? {
        Device::Cuda(dev) => gpu::mhc::mhc_weights(dev, stream, mix, scale, base, pre, post, comb, n, cfg.iters, cfg.eps),
        Device::Cpu => {
            let (m, s, b) = (mix.host::<f32>(&[DType::F32])?, scale.host::<f32>(&[DType::F32])?, base.host::<f32>(&[DType::F32])?);
            for (arg, values) in [(mix, m), (scale, s), (base, b)] {
                if values.iter().any(|x| !x.is_finite()) {
                    return Err(Error::value(arg.name, "values must be finite"));
                }
            }
            let (pr, po, co) = (pre.host_mut::<f32>(&[DType::F32])?, post.host_mut::<f32>(&[DType::F32])?, comb.host_mut::<f32>(&[DType::F32])?);
            for t in 0..tokens {
                token(&m[t * width..(t + 1) * width], s, b, n, cfg, &mut pr[t * n..(t + 1) * n], &mut po[t * n..(t + 1) * n],
                      &mut co[t * n * n..(t + 1) * n * n]);
            }
            Ok(())
        }
    }
}

/// Checks the streams `x` (float32/bfloat16 `[T, n, d]`, `n` in 1..=[`MAX_STREAMS`], `d` in
/// `1..2^31`) and returns `(T, n, d)`.
fn stream_shape(x: &TensorRef) -> Result<(usize, usize, usize)> {
    x.expect_dtype(&[DType::F32, DType::BF16])?;
    x.expect_shape(&[None, None, None])?;
    let (t, n, d) = (x.dim(0), x.dim(1), x.dim(2));
    if n == 0 || n > MAX_STREAMS {
        return Err(Error::value(x.name, format!("expected 1..={MAX_STREAMS} streams (dim 1), got {n}")));
    }
    if d == 0 || d > i32::MAX as usize {
        return Err(Error::value(x.name, format!("expected 1 to 2^31 - 1 values a stream (dim 2), got {d}")));
    }
    Ok((t, n, d))
}

/// Float32 host values of `t`, all finite.
unsafe fn finite_f32(t: &TensorRef) -> Result<&[f32]> {
    let v = t.host::<f32>(&[DType::F32])?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::value(t.name, format!("contains a non-finite value at flat index {i}")));
    }
    Ok(v)
}

/// Checks the RMS norm's epsilon of `mhc_pre` and `mhc_mix`: finite and above 0.
fn check_norm_eps(norm_eps: f32) -> Result<()> {
    if !(norm_eps.is_finite() && norm_eps > 0.0) {
        return Err(Error::value("norm_eps", format!("must be finite and > 0, got {norm_eps}")));
    }
    Ok(())
}

/// The partial sums' workspace of a GPU `mhc_pre` or `mhc_mix` call: present, float32, at least
/// `need` values.
fn gpu_workspace(workspace: Option<&TensorRef>, need: usize) -> Result<&TensorRef> {
    let ws = workspace.ok_or_else(|| Error::value("workspace", "a GPU call needs the partial sums' workspace"))?;
    ws.expect_dtype(&[DType::F32])?;
    if ws.numel() < need {
        return Err(Error::value(ws.name, format!("needs {need} float32 values, got {}", ws.numel())));
    }
    Ok(ws)
}

/// The CPU collapse into `y [T, d]` of the streams `src` (`[T, n, d]`) with `pre [T, n]`.
///
/// # Safety
/// `y` satisfies [`TensorRef`]'s contract, on the CPU, and aliases nothing.
unsafe fn collapse_rows(src: &Floats, pre: &[f32], n: usize, d: usize, y: &TensorRef) -> Result<()> {
    fill_rows(y, d, |r, out| {
        let mut v = vec![0f32; d];
        for j in 0..n {
            src.read((r * n + j) * d, &mut v);
            let w = pre[r * n + j];
            for (o, v) in out.iter_mut().zip(&v) {
                *o = if j == 0 { w * v } else { *o + w * v };
            }
        }
    })
}

/// The collapse of a sublayer's input: `y[t] = sum_j pre[t, j] x[t, j]` for the streams `x`
/// (float32/bfloat16 `[T, n, d]`) and `pre` (float32 `[T, n]`, from [`mhc_weights`]) into `y`
/// (`[T, d]`, the dtype of `x`): float32 products added in stream order, rounded once.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `y` aliases nothing; `stream` is a `CUstream`
/// of the tensors' GPU when they live on one.
pub unsafe fn mhc_collapse(x: &TensorRef, pre: &TensorRef, y: &TensorRef, stream: usize) -> Result<()> {
    let (t, n, d) = stream_shape(x)?;
    pre.expect_dtype(&[DType::F32])?;
    pre.expect_shape(&[Some(t), Some(n)])?;
    y.expect_dtype(&[x.dtype])?;
    y.expect_shape(&[Some(t), Some(d)])?;
    match same_device(&[x, pre, y])? {
        Device::Cuda(dev) => gpu::mhc::mhc_collapse(dev, stream, x, pre, y, n, d),
        Device::Cpu => {
            collapse_rows(&Floats::new(x)?, finite_f32(pre)?, n, d, y)
        }
    }
}

/// The combine after a sublayer: `y[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] x[t, j]` for
/// the streams `x` (float32/bfloat16 `[T, n, d]`), the sublayer's output `f` (float32/bfloat16
/// `[T, d]`) and the weights `post` (float32 `[T, n]`) and `comb` (float32 `[T, n, n]`) from
/// [`mhc_weights`], into `y` (`[T, n, d]`, the dtype of `x`): in float32 (the weights as they
/// are; the `comb` terms added in stream order, on the GPU as fused multiply-adds), rounded once.
/// With `f2` (`[T, d]`, the dtype of `f`) the sublayer's output is `f + f2`, added in float32 and
/// rounded to that dtype first, as a separate add gives it (the MoE's routed and shared experts).
///
/// # Safety
/// As [`mhc_collapse`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_combine(
    x: &TensorRef, f: &TensorRef, f2: Option<&TensorRef>, post: &TensorRef, comb: &TensorRef, y: &TensorRef,
    stream: usize,
) -> Result<()> {
    let (t, n, d) = stream_shape(x)?;
    let f_dtype = f.expect_dtype(&[DType::F32, DType::BF16])?;
    f.expect_shape(&[Some(t), Some(d)])?;
    if let Some(g) = f2 {
        g.expect_dtype(&[f_dtype])?;
        g.expect_shape(&[Some(t), Some(d)])?;
    }
    post.expect_dtype(&[DType::F32])?;
    post.expect_shape(&[Some(t), Some(n)])?;
    comb.expect_dtype(&[DType::F32])?;
    comb.expect_shape(&[Some(t), Some(n), Some(n)])?;
    y.expect_dtype(&[x.dtype])?;
    y.expect_shape(&[Some(t), Some(n), Some(d)])?;
    let mut all = vec![x, f, post, comb, y];
    all.extend(f2);
    match same_device(&all)? {
        Device::Cuda(dev) => gpu::mhc::mhc_combine(dev, stream, x, f, f2, post, comb, y, n, d),
        Device::Cpu => {
            let (src, out) = (Floats::new(x)?, Floats::new(f)?);
            let add = f2.map(|g| Floats::new(g)).transpose()?;
            let bf16 = f_dtype == DType::BF16;
            let (po, co) = (finite_f32(post)?, finite_f32(comb)?);
            // A row of y is one stream k of one token: y.len() / d rows, token r / n.
            fill_rows(y, d, |r, o| {
                let (tok, k) = (r / n, r % n);
                let mut v = vec![0f32; d];
                out.read(tok * d, &mut v);
                if let Some(add) = &add {
                    let mut w = vec![0f32; d];
                    add.read(tok * d, &mut w);
                    for (v, w) in v.iter_mut().zip(&w) {
                        let s = *v + w;
                        *v = if bf16 { quant::bf16_round(s) } else { s };
                    }
                }
                let p = po[tok * n + k];
                o.iter_mut().zip(&v).for_each(|(o, v)| *o = p * v);
                for j in 0..n {
                    src.read((tok * n + j) * d, &mut v);
                    let c = co[tok * n * n + j * n + k];
                    o.iter_mut().zip(&v).for_each(|(o, v)| *o += c * v);
                }
            })
        }
    }
}

/// The mHC input of a sublayer in one call: from the streams `x` (float32/bfloat16 `[T, n, d]`)
/// and the projection `proj` (`hc_fn`, float32 `[(2 + n) n, n d]`), the mix
/// `mu = rsqrt(mean(x^2) + norm_eps) (proj x)` (over the token's `n d` values), the weights of
/// [`mhc_weights`] with `scale` and `base`, and the collapse `y = sum_j pre_j x_j` (as
/// [`mhc_collapse`]). Writes `post [T, n]`, `comb [T, n, n]` (float32) and `y [T, d]` (the dtype
/// of `x`). On a GPU two kernels, with `workspace` (float32, [`pre_workspace_len`] values) for the
/// partial sums; on the CPU the workspace may be absent. The sums of the mix are float32 on the
/// GPU (split over blocks), float64 on the CPU.
///
/// # Safety
/// As [`mhc_collapse`]; `workspace` aliases nothing.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_pre(
    x: &TensorRef, proj: &TensorRef, scale: &TensorRef, base: &TensorRef, workspace: Option<&TensorRef>,
    post: &TensorRef, comb: &TensorRef, y: &TensorRef, cfg: Config, norm_eps: f32, stream: usize,
) -> Result<()> {
    let (t, n, d) = stream_shape(x)?;
    let (width, k) = ((2 + n) * n, n * d);
    for w in [proj, scale, base, post, comb] {
        w.expect_dtype(&[DType::F32])?;
    }
    proj.expect_shape(&[Some(width), Some(k)])?;
    scale.expect_shape(&[Some(3)])?;
    base.expect_shape(&[Some(width)])?;
    post.expect_shape(&[Some(t), Some(n)])?;
    comb.expect_shape(&[Some(t), Some(n), Some(n)])?;
    y.expect_dtype(&[x.dtype])?;
    y.expect_shape(&[Some(t), Some(d)])?;
    if cfg.iters == 0 || cfg.iters > MAX_ITERS {
        return Err(Error::value("iters", format!("must be in 1..={MAX_ITERS}, got {}", cfg.iters)));
    }
    if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
        return Err(Error::value("eps", format!("must be finite and >= 0, got {}", cfg.eps)));
    }
    check_norm_eps(norm_eps)?;
    let mut all = vec![x, proj, scale, base, post, comb, y];
    all.extend(workspace);
    match same_device(&all)? {
        Device::Cuda(dev) => {
            let ws = gpu_workspace(workspace, pre_workspace_len(t, n, d))?;
            // Grid dims: (splits, t) for the mix, (t, slices of y) for the rest (the most slices:
            // a value a thread).
            let slices = gpu::mhc::pre_slices(d, false);
            if k.div_ceil(MIX_CHUNK) > u16::MAX as usize || t > u16::MAX as usize || slices > u16::MAX as usize {
                return Err(Error::value(x.name, format!("{t} tokens of {k} values are more than one launch takes")));
            }
            gpu::mhc::mhc_pre(dev, stream, x, proj, scale, base, ws, post, comb, y, n, d, cfg.iters, cfg.eps, norm_eps)
        }
        Device::Cpu => {
            let src = Floats::new(x)?;
            let (f, sc, b) = (finite_f32(proj)?, finite_f32(scale)?, finite_f32(base)?);
            let (po, co) = (post.host_mut::<f32>(&[DType::F32])?, comb.host_mut::<f32>(&[DType::F32])?);
            // The mix of each token, then its weights.
            let mixes = cpu_mixes(&src, f, t, k, norm_eps);
            let mut pre = vec![0f32; t * n];
            for (tok, mix) in mixes.chunks_exact(width).enumerate() {
                token(mix, sc, b, n, cfg, &mut pre[tok * n..(tok + 1) * n], &mut po[tok * n..(tok + 1) * n],
                      &mut co[tok * n * n..(tok + 1) * n * n]);
            }
            collapse_rows(&src, &pre, n, d, y)
        }
    }
}

/// The mix `r (proj x)` of each of the `t` tokens of `src` (`k` values each; `proj` `[m, k]`),
/// `[t, m]`: sums in float64, tokens in parallel.
fn cpu_mixes(src: &Floats, proj: &[f32], t: usize, k: usize, norm_eps: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let m = proj.len() / k;
    let mut out = vec![0f32; t * m];
    out.par_chunks_mut(m.max(1)).enumerate().for_each(|(tok, mix)| {
        let mut v = vec![0f32; k];
        src.read(tok * k, &mut v);
        let ss = v.iter().map(|a| *a as f64 * *a as f64).sum::<f64>() as f32;
        let r = 1.0 / (ss / k as f32 + norm_eps).sqrt();
        for (o, row) in mix.iter_mut().zip(proj.chunks_exact(k)) {
            *o = r * row.iter().zip(&v).map(|(w, a)| *w as f64 * *a as f64).sum::<f64>() as f32;
        }
    });
    out
}

/// The mix alone, for any number of rows: `mix [T, m] = rsqrt(mean(x^2) + norm_eps) (proj x)`
/// (over each token's `n d` values) from the streams `x` (float32/bfloat16 `[T, n, d]`) and
/// `proj` (float32 `[m, n d]`, `m` in 1..=[`MIX_MAX_ROWS`]: a sublayer's `hc_fn` or the head's).
/// On a GPU two kernels, with `workspace` (float32, [`mix_workspace_len`] values) for the partial
/// sums, which are float32 there (over chunks of K, then the chunks in order) and float64 on the
/// CPU, where the workspace may be absent.
///
/// # Safety
/// As [`mhc_collapse`]; `workspace` aliases nothing.
pub unsafe fn mhc_mix(
    x: &TensorRef, proj: &TensorRef, workspace: Option<&TensorRef>, mix: &TensorRef, norm_eps: f32, stream: usize,
) -> Result<()> {
    let (t, n, d) = stream_shape(x)?;
    let k = n * d;
    proj.expect_dtype(&[DType::F32])?;
    mix.expect_dtype(&[DType::F32])?;
    proj.expect_shape(&[None, Some(k)])?;
    let m = proj.dim(0);
    if m == 0 || m > MIX_MAX_ROWS {
        return Err(Error::value(proj.name, format!("expected 1..={MIX_MAX_ROWS} rows (dim 0), got {m}")));
    }
    mix.expect_shape(&[Some(t), Some(m)])?;
    check_norm_eps(norm_eps)?;
    let mut all = vec![x, proj, mix];
    all.extend(workspace);
    match same_device(&all)? {
        Device::Cuda(dev) => {
            let ws = gpu_workspace(workspace, mix_workspace_len(t, m, k))?;
            gpu::mhc::mhc_mix(dev, stream, x, proj, ws, mix, m, k, norm_eps)
        }
        Device::Cpu => {
            let src = Floats::new(x)?;
            let f = finite_f32(proj)?;
            let out = mix.host_mut::<f32>(&[DType::F32])?;
            out.copy_from_slice(&cpu_mixes(&src, f, t, k, norm_eps));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_makes_comb_nearly_doubly_stochastic() {
        let n = 4;
        let mix: Vec<f32> = (0..24).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let (scale, base) = ([1.0, 0.5, 2.0], vec![0.1; 24]);
        let (mut pre, mut post, mut comb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * n]);
        token(&mix, &scale, &base, n, Config { iters: 20, eps: 1e-6 }, &mut pre, &mut post, &mut comb);
        for i in 0..n {
            let row: f32 = comb[i * n..(i + 1) * n].iter().sum();
            let col: f32 = (0..n).map(|k| comb[k * n + i]).sum();
            assert!((row - 1.0).abs() < 1e-3 && (col - 1.0).abs() < 1e-5, "row {row} col {col}");
        }
        assert!(pre.iter().all(|p| *p > 0.0 && *p < 1.0 + 1e-5) && post.iter().all(|p| *p > 0.0 && *p < 2.0));
    }

    #[test]
    fn widths_give_streams() {
        assert_eq!(streams(24), Some(4));
        assert_eq!(streams(3), Some(1));
        assert_eq!(streams(25), None);
    }
}
