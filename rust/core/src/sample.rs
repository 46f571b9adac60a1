//! Gumbel-max sampling of one token per row: `argmax_v logits[b, v] / temperature[b] + g` with
//! `g = -ln(-ln(u))` and `u` a counter-based uniform of `(seed[b], step[b], v)`, or the plain arg
//! max where `temperature[b] <= 0` (python/dsv4rs/runtime/sampling.py has the torch form,
//! `gumbel_max` and `uniform`; cuda/sample.cu the GPU form). The float32 operations are the torch
//! form's, in its order; arg max as torch's: a NaN above everything, ties to the lowest index.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gpu;
use crate::tensor::{same_device, DType, Device, TensorRef};

fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The hash of a row's `(seed, step)`, from which every column's uniform is drawn.
pub fn row_hash(seed: i64, step: i64) -> u32 {
    let (seed, step) = (seed as u64, step as u64);
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(step as u32)))
}

/// The uniform of column `v` of a row with [`row_hash`] `hash`: `(k + 1/2) / 2^23` for a hashed
/// 23-bit `k`, exact in float32, in (0, 1).
pub fn uniform(hash: u32, v: u32) -> f32 {
    let bits = mix32(mix32(hash ^ v) ^ v.wrapping_mul(0x9E37_79B9));
    ((bits >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// Whether score `a` at index `ia` comes before `b` at `ib` in torch's arg max order.
fn before(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && (!b.is_nan() || ia < ib);
    }
    a > b || (a == b && ia < ib)
}

/// The token of one row.
pub fn row(logits: &[f32], temperature: f32, seed: i64, step: i64) -> i64 {
    let hash = row_hash(seed, step);
    let greedy = temperature <= 0.0;
    let mut best = (f32::NAN, usize::MAX);
    for (v, x) in logits.iter().enumerate() {
        let s = if greedy { *x } else { *x / temperature + -(-uniform(hash, v as u32).ln()).ln() };
        if best.1 == usize::MAX || before(s, v, best.0, best.1) {
            best = (s, v);
        }
    }
    best.1 as i64
}

/// `out[b]` (int64 `[B]`): a token drawn from row `b` of `logits` (float32 `[B, V]`, `V >= 1`)
/// at `temperature[b]` (float32 `[B]`; `<= 0`: greedy), with the random numbers of
/// `(seeds[b], steps[b])` (int64 `[B]`). All on one device; on a GPU the call runs on `stream`
/// without synchronizing.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` aliases nothing.
pub unsafe fn sample_gumbel(
    logits: &TensorRef,
    temperature: &TensorRef,
    seeds: &TensorRef,
    steps: &TensorRef,
    out: &TensorRef,
    stream: usize,
) -> Result<()> {
    logits.expect_dtype(&[DType::F32])?;
    logits.expect_shape(&[None, None])?;
    let (b, v) = (logits.dim(0), logits.dim(1));
    if v == 0 || v > i32::MAX as usize {
        return Err(Error::value(logits.name, format!("expected 1 to {} columns (the vocabulary), got {v}", i32::MAX)));
    }
    if b > i32::MAX as usize {
        return Err(Error::value(logits.name, format!("{b} rows are more than one launch takes")));
    }
    temperature.expect_dtype(&[DType::F32])?;
    temperature.expect_shape(&[Some(b)])?;
    for t in [seeds, steps, out] {
        t.expect_dtype(&[DType::I64])?;
        t.expect_shape(&[Some(b)])?;
    }
    match same_device(&[logits, temperature, seeds, steps, out])? {
        Device::Cuda(dev) => gpu::sample::sample_gumbel(dev, stream, logits, temperature, seeds, steps, out),
        Device::Cpu => {
            let x = logits.host::<f32>(&[DType::F32])?;
            let t = temperature.host::<f32>(&[DType::F32])?;
            let (s, p) = (seeds.host::<i64>(&[DType::I64])?, steps.host::<i64>(&[DType::I64])?);
            let o = out.host_mut::<i64>(&[DType::I64])?;
            if b == 0 {
                return Ok(());
            }
            o.par_iter_mut().zip(x.par_chunks(v)).enumerate().for_each(|(i, (o, row_logits))| {
                *o = row(row_logits, t[i], s[i], p[i]);
            });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_lie_strictly_inside_the_unit_interval() {
        let hash = row_hash(7, 3);
        for v in 0..100_000u32 {
            let u = uniform(hash, v);
            assert!(u > 0.0 && u < 1.0);
            let k = u * 8_388_608.0 - 0.5;
            assert_eq!(k, k.trunc());
        }
        assert_eq!(((0u32 >> 9) as f32 + 0.5) / 8_388_608.0, 0.5 / 8_388_608.0);
        assert!((((u32::MAX >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)) < 1.0);
    }

    #[test]
    fn greedy_rows_take_the_first_maximum_and_nan_wins() {
        assert_eq!(row(&[1.0, 3.0, 3.0, 2.0], 0.0, 1, 1), 1);
        assert_eq!(row(&[1.0, f32::NAN, 3.0, f32::NAN], 0.0, 1, 1), 1);
        assert_eq!(row(&[f32::NEG_INFINITY; 3], -1.0, 1, 1), 0);
    }

    #[test]
    fn a_dominant_logit_is_drawn_and_draws_follow_the_softmax() {
        assert_eq!(row(&[0.0, 40.0, 0.0], 1.0, 5, 9), 1);
        // Two tokens with probabilities 0.2 and 0.8 (logits ln 1, ln 4): over 20,000 steps the
        // share of the second within 5 sigma of 0.8.
        let logits = [0.0, 4f32.ln()];
        let n = 20_000;
        let hits = (0..n).filter(|s| row(&logits, 1.0, 42, *s) == 1).count() as f64;
        assert!((hits / n as f64 - 0.8).abs() < 5.0 * (0.16 / n as f64).sqrt(), "{hits}");
    }
}
