// RoPE (docs/model.md section 2) of x [T, ..., D], float32 or bfloat16, into float32: pair j of the
// last 2R dims of every row of token t, (x[D - 2R + 2j], x[D - 2R + 2j + 1]), is rotated by the
// angle positions[t] * inv_freq[j] (its negative when `inverse`); the other dims are copied. The
// angle's sine and cosine are the table's of `rope_mode` (cuda/include/rope.cuh); the rotation is
// computed in double, as rust/core/src/rope.rs does, with the products and the sum rounded
// separately (no fused multiply-add, as on the CPU).
#include "grid.cuh"
#include "quant.cuh"
#include "rope.cuh"

using namespace dsv4;

// One thread per output value: `n` values, `dim` a row, `per_token` a token.
extern "C" __global__ void __launch_bounds__(256) dsv4_rope(
    const void* __restrict__ x, int x_bf16, const void* __restrict__ positions, int positions64,
    const void* __restrict__ inv_freq, int rope_mode, int pairs, long long n, int dim, long long per_token,
    int inverse, float* __restrict__ out) {
  dsv4::grid_begin();
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int k = (int)(i % dim) - (dim - 2 * pairs);  // position in the rotated part
  if (k < 0) {
    out[i] = load_value(x, i, x_bf16);
    return;
  }
  const long long x0_at = i - k % 2;
  const double x0 = load_value(x, x0_at, x_bf16), x1 = load_value(x, x0_at + 1, x_bf16);
  double s, c;
  rope_sincos(load_id(positions, i / per_token, positions64), inv_freq, k / 2, rope_mode, inverse, s, c);
  const double y = k % 2 == 0 ? __dsub_rn(__dmul_rn(x0, c), __dmul_rn(x1, s)) : __dadd_rn(__dmul_rn(x0, s), __dmul_rn(x1, c));
  out[i] = (float)y;
}
