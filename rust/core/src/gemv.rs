//! `y = x W^T` for a few rows (the router's logits at decode): x float32/bfloat16 `[T, K]` with
//! `T <= MAX_ROWS`, W float32/bfloat16 `[N, K]`, `K` a multiple of 8, y float32/bfloat16 `[T, N]`
//! rounded once. The GPU form is cuda/gemv.cu; the CPU form adds the products in the GPU's order
//! (`32 split` lanes, [`split`] warps a weight row: a lane's 8-value chunks `lane, lane + 32
//! split, ...` by fused multiply-adds, the butterfly of each warp's 32 lanes, then the warps' sums
//! in warp order), so the two give the same bits.

use crate::error::{Error, Result};
use crate::gpu;
use crate::rows::{bf16_bits, Floats};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// Most rows of x a call takes (cuda/gemv.cu `MAX_ROWS`).
pub const MAX_ROWS: usize = 8;
/// Values a chunk (16 bytes of bfloat16).
const CHUNK: usize = 8;
const LANES: usize = 32;
/// Most warps a weight row (cuda/gemv.cu `WARPS`, a block's warps).
const MAX_SPLIT: usize = 8;

/// Warps the kernel fills a GPU with (about an H100's resident warps at this kernel's registers).
const FILL_WARPS: usize = 2048;

/// Warps that share each of `n` weight rows of `k` values: the most of 8, 4, 2 that gives each
/// lane at least two 8-value chunks and keeps `n split` within [`FILL_WARPS`], else 1. So the
/// router's 256 rows of 4,096 values take 8 warps each (every load in flight at once) and a
/// matrix of thousands of rows a warp a row.
pub fn split(n: usize, k: usize) -> usize {
    let chunks = k / CHUNK;
    let mut s = MAX_SPLIT;
    while s > 1 && (chunks < 2 * LANES * s || n.saturating_mul(s) > FILL_WARPS) {
        s /= 2;
    }
    s
}

/// One dot product in the GPU's order with `split` warps a weight row ([`split`]).
pub fn dot(x: &[f32], w: &[f32], split: usize) -> f32 {
    let mut lanes = [0f32; LANES * MAX_SPLIT];
    let lanes = &mut lanes[..LANES * split];
    for (c, (xc, wc)) in x.chunks_exact(CHUNK).zip(w.chunks_exact(CHUNK)).enumerate() {
        let acc = &mut lanes[c % (LANES * split)];
        for (a, b) in xc.iter().zip(wc) {
            *acc = a.mul_add(*b, *acc);
        }
    }
    let mut total = 0f32;
    for (i, warp) in lanes.chunks_exact_mut(LANES).enumerate() {
        let mut off = LANES / 2;
        while off > 0 {
            let prev: [f32; LANES] = warp.try_into().expect("a warp is 32 lanes");
            for (l, s) in warp.iter_mut().enumerate() {
                *s = prev[l] + prev[l ^ off];
            }
            off /= 2;
        }
        total = if i == 0 { warp[0] } else { total + warp[0] };
    }
    total
}

/// `y = x W^T` (shapes above). On a GPU the call runs on `stream`, x and W starting 16-byte
/// aligned (else ValueError naming the tensor); non-finite values propagate there and raise on
/// the CPU.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `y` aliases nothing; `stream` is a
/// `CUstream` of the tensors' GPU when they live on one.
pub unsafe fn linear_rows(x: &TensorRef, w: &TensorRef, y: &TensorRef, stream: usize) -> Result<()> {
    for t in [x, w, y] {
        t.expect_dtype(&[DType::F32, DType::BF16])?;
    }
    if x.shape.len() != 2 {
        return Err(Error::value(x.name, format!("expected shape [T, K], got {:?}", x.shape)));
    }
    let (rows, k) = (x.dim(0), x.dim(1));
    if rows > MAX_ROWS {
        return Err(Error::value(x.name, format!("{rows} rows, at most {MAX_ROWS} a call")));
    }
    if k == 0 || !k.is_multiple_of(CHUNK) {
        return Err(Error::value(x.name, format!("rows of {k} values: a positive multiple of {CHUNK}")));
    }
    w.expect_shape(&[None, Some(k)])?;
    let n = w.dim(0);
    y.expect_shape(&[Some(rows), Some(n)])?;
    if n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(Error::value(w.name, format!("shape {:?} is more than a launch takes", w.shape)));
    }
    match same_device(&[x, w, y])? {
        Device::Cuda(dev) => {
            for t in [x, w] {
                if !t.ptr.is_multiple_of(16) {
                    return Err(Error::value(t.name, "must start 16-byte aligned"));
                }
            }
            gpu::gemv::linear_rows(dev, stream, x, w, y, rows, n, k, split(n, k))
        }
        Device::Cpu => {
            let (xs, ws) = (Floats::new(x)?, Floats::new(w)?);
            let mut xv = vec![0f32; rows * k];
            xs.read(0, &mut xv);
            let mut wv = vec![0f32; k];
            let mut out = vec![0f32; rows * n];
            let split = split(n, k);
            for e in 0..n {
                ws.read(e * k, &mut wv);
                for t in 0..rows {
                    out[t * n + e] = dot(&xv[t * k..(t + 1) * k], &wv, split);
                }
            }
            match y.dtype {
                DType::BF16 => y.host_mut::<u16>(&[DType::BF16])?.iter_mut().zip(&out).for_each(|(o, v)| *o = bf16_bits(*v)),
                _ => y.host_mut::<f32>(&[DType::F32])?.copy_from_slice(&out),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_is_the_sum_in_the_lanes_order() {
        let x: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
        let w: Vec<f32> = (0..4096).map(|i| ((i * 104729) % 1000) as f32 / 991.0 - 0.5).collect();
        let want: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
        for s in [1, 2, 4, 8] {
            assert!((dot(&x, &w, s) as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
        }
        assert_eq!(dot(&[1.0; 8], &[2.0; 8], 1), 16.0);
        assert_eq!(dot(&[0.0; 264], &[1.0; 264], 1), 0.0);
        // the last warp's lanes hold the last chunks: a 1 there moves the sum
        let mut x = vec![0f32; 4096];
        x[4095] = 1.0;
        assert_eq!(dot(&x, &vec![3.0; 4096], 8), 3.0);
    }

    #[test]
    fn split_fills_the_gpu_and_gives_each_lane_two_chunks() {
        assert_eq!([8, 256, 1016, 1024, 2048, 4088, 4096, 7168].map(|k| split(256, k)), [1, 1, 1, 2, 4, 4, 8, 8]);
        assert_eq!([1, 256, 257, 512, 1024, 2048, 2624, usize::MAX].map(|n| split(n, 4096)), [8, 8, 4, 4, 2, 1, 1, 1]);
    }
}
