//! MoE routing from the router's logits (docs/model.md section 7), one row per token:
//!
//! ```text
//! a_e  = sqrt(softplus(l_e))          softplus(x) = x if x > 20, else ln(1 + e^x)  (torch's)
//! idx  = the k experts of largest a_e + bias_e (descending; ties to the lower expert)
//!        or, on a hash layer, table[ids[t]]
//! w_j  = a[idx_j]; with `norm`: w_j / (w_0 + ... + w_{k-1} + 1e-20); then times `scale`
//! ```
//!
//! all in float32 from the logits' values (float32 or bfloat16). The CPU twin and the GPU
//! kernel (cuda/route.cu) compute the same float32 operations in the same order; the CPU's
//! `exp`, `ln_1p` and `sqrt` may round differently from the GPU's by an ulp, which can change a
//! choice only between scores that close. Choice order as torch's `topk`: a NaN above
//! everything, ties to the lower index.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gpu;
use crate::rows::{Floats, Ids};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// Most experts a call takes (the GPU kernel keeps a token's scores in shared memory).
pub const MAX_EXPERTS: usize = 1024;
/// Most choices per token.
pub const MAX_K: usize = 16;

/// torch's `softplus` (beta 1, threshold 20) in float32.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Whether score `a` of expert `ia` comes before `b` of expert `ib` in torch's `topk` order.
fn before(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && (!b.is_nan() || ia < ib);
    }
    a > b || (a == b && ia < ib)
}

/// How a layer chooses its experts.
pub enum Choice<'a> {
    /// The top k of affinity plus this bias (float32 `[E]`).
    Bias(&'a [f32]),
    /// `table[ids[t]]` (int32/int64 `[V, k]`), values already checked within `[0, E)`.
    Hash { table: Ids<'a>, ids: Ids<'a> },
}

/// One token: `logits` its `E` values, `idx` and `w` its `k` outputs.
pub fn route_row(logits: &[f32], choice: &Choice, t: usize, scale: f32, norm: bool, idx: &mut [i64], w: &mut [f32]) {
    let a: Vec<f32> = logits.iter().map(|l| softplus(*l).sqrt()).collect();
    let k = idx.len();
    match choice {
        Choice::Bias(bias) => {
            let mut taken = vec![false; a.len()];
            for slot in idx.iter_mut() {
                let mut best = (0.0f32, usize::MAX);
                for (e, (ae, be)) in a.iter().zip(bias.iter()).enumerate() {
                    let s = ae + be;
                    if !taken[e] && (best.1 == usize::MAX || before(s, e, best.0, best.1)) {
                        best = (s, e);
                    }
                }
                taken[best.1] = true;
                *slot = best.1 as i64;
            }
        }
        Choice::Hash { table, ids } => {
            let row = ids.get(t) as usize;
            for (j, slot) in idx.iter_mut().enumerate() {
                *slot = table.get(row * k + j);
            }
        }
    }
    for (wj, e) in w.iter_mut().zip(idx.iter()) {
        *wj = a[*e as usize];
    }
    if norm {
        let sum = w.iter().fold(0.0f32, |s, v| s + v) + 1e-20;
        for wj in w.iter_mut() {
            *wj /= sum;
        }
    }
    for wj in w.iter_mut() {
        *wj *= scale;
    }
}

/// The experts and weights of every token: `idx` (int64 `[T, k]`) and `w` (float32 `[T, k]`)
/// from `logits` (float32/bfloat16 `[T, E]`, `1 <= E <=` [`MAX_EXPERTS`], `1 <= k <= min(E,`
/// [`MAX_K`]`)`) and either `bias` (float32 `[E]`) or `table` (int32/int64 `[V, k]`) with `ids`
/// (int32/int64 `[T]`). `scale` finite. On the CPU non-finite logits, ids outside `[0, V)` and
/// table entries outside `[0, E)` raise; on a GPU (no synchronization) a NaN logit comes first,
/// and a token whose id is outside `[0, V)` or a table entry outside `[0, E)` gets expert -1
/// with weight 0 there (the fused MoE skips it).
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `idx` and `w` alias nothing; `stream` is a
/// `CUstream` of the tensors' GPU when they live on one.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe_route(
    logits: &TensorRef, bias: Option<&TensorRef>, table: Option<&TensorRef>, ids: Option<&TensorRef>,
    idx: &TensorRef, w: &TensorRef, scale: f32, norm: bool, stream: usize,
) -> Result<()> {
    logits.expect_dtype(&[DType::F32, DType::BF16])?;
    logits.expect_shape(&[None, None])?;
    let (t, e) = (logits.dim(0), logits.dim(1));
    if e == 0 || e > MAX_EXPERTS {
        return Err(Error::value(logits.name, format!("expected 1 to {MAX_EXPERTS} columns (the experts), got {e}")));
    }
    if t > i32::MAX as usize {
        return Err(Error::value(logits.name, format!("{t} rows are more than one launch takes")));
    }
    idx.expect_dtype(&[DType::I64])?;
    idx.expect_shape(&[Some(t), None])?;
    let k = idx.dim(1);
    if k == 0 || k > MAX_K.min(e) {
        return Err(Error::value(idx.name, format!("expected 1 to {} choices a token, got {k}", MAX_K.min(e))));
    }
    w.expect_dtype(&[DType::F32])?;
    w.expect_shape(&[Some(t), Some(k)])?;
    if !scale.is_finite() {
        return Err(Error::value("scale", format!("must be finite, got {scale}")));
    }
    let mut all = vec![logits, idx, w];
    match (bias, table, ids) {
        (Some(b), None, None) => {
            b.expect_dtype(&[DType::F32])?;
            b.expect_shape(&[Some(e)])?;
            all.push(b);
        }
        (None, Some(tab), Some(i)) => {
            tab.expect_dtype(&[DType::I32, DType::I64])?;
            tab.expect_shape(&[None, Some(k)])?;
            if tab.dim(0) == 0 || tab.dim(0) > i32::MAX as usize {
                return Err(Error::value(tab.name, format!("expected 1 to {} rows (the vocabulary), got {}", i32::MAX, tab.dim(0))));
            }
            i.expect_dtype(&[DType::I32, DType::I64])?;
            i.expect_shape(&[Some(t)])?;
            all.extend([tab, i]);
        }
        _ => {
            return Err(Error::value(
                "bias",
                "give either bias (a learned layer) or table and ids (a hash layer), not both, not neither",
            ))
        }
    }
    match same_device(&all)? {
        Device::Cuda(dev) => gpu::route::moe_route(dev, stream, logits, bias, table.zip(ids), idx, w, scale, norm),
        Device::Cpu => {
            let src = Floats::new(logits)?;
            let choice = match (bias, table, ids) {
                (Some(b), _, _) => Choice::Bias(b.host::<f32>(&[DType::F32])?),
                (_, Some(tab), Some(i)) => {
                    let (tab, i) = (Ids::new(tab)?, Ids::new(i)?);
                    i.expect_range("ids", 0, (tab.len() / k) as i64, "token ids index the hash table's rows")?;
                    tab.expect_range("table", 0, e as i64, "the hash table holds experts")?;
                    Choice::Hash { table: tab, ids: i }
                }
                _ => unreachable!("checked above"),
            };
            let (oi, ow) = (idx.host_mut::<i64>(&[DType::I64])?, w.host_mut::<f32>(&[DType::F32])?);
            if t == 0 {
                return Ok(());
            }
            oi.par_chunks_mut(k).zip(ow.par_chunks_mut(k)).enumerate().for_each(|(r, (oi, ow))| {
                let mut row = vec![0.0f32; e];
                src.read(r * e, &mut row);
                route_row(&row, &choice, r, scale, norm, oi, ow);
            });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_torchs_on_both_sides_of_the_threshold() {
        assert_eq!(softplus(25.0), 25.0);
        assert_eq!(softplus(20.0), 20.0f32.exp().ln_1p());
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert!(softplus(-120.0) >= 0.0);
    }

    #[test]
    fn ties_go_to_the_lower_expert_and_nan_first() {
        let bias = [0.0f32; 5];
        let (mut idx, mut w) = ([0i64; 3], [0f32; 3]);
        route_row(&[1.0, 2.0, 2.0, 0.5, 2.0], &Choice::Bias(&bias), 0, 1.0, false, &mut idx, &mut w);
        assert_eq!(idx, [1, 2, 4]);
        route_row(&[1.0, f32::NAN, 2.0, 0.5, 2.0], &Choice::Bias(&bias), 0, 1.0, false, &mut idx, &mut w);
        assert_eq!(idx, [1, 2, 4]);
        assert!(w[0].is_nan());
    }

    #[test]
    fn the_bias_chooses_and_does_not_weigh() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let bias = [10.0f32, 0.0, 0.0, -10.0];
        let (mut idx, mut w) = ([0i64; 2], [0f32; 2]);
        route_row(&logits, &Choice::Bias(&bias), 0, 2.0, true, &mut idx, &mut w);
        assert_eq!(idx, [0, 2]);
        let a: Vec<f32> = [0.0f32, 2.0].iter().map(|l| softplus(*l).sqrt()).collect();
        let sum = a[0] + a[1] + 1e-20;
        assert_eq!(w, [a[0] / sum * 2.0, a[1] / sum * 2.0]);
    }
}
