// RoPE (docs/model.md section 2) of x [T, ..., D], float32 or bfloat16, into float32: pair j of the
// last 2R dims of every row of token t, (x[D - 2R + 2j], x[D - 2R + 2j + 1]), is rotated by the
// angle positions[t] * inv_freq[j] (its negative when `inverse`); the other dims are copied. The
// angle's sine and cosine are the table's of `rope_mode` (cuda/include/rope.cuh); the rotation is
// computed in double, as rust/core/src/rope.rs does, with the products and the sum rounded
// separately (no fused multiply-add, as on the CPU).
#include "floats.cuh"
#include "grid.cuh"
#include "quant.cuh"
#include "rope.cuh"

using namespace dsv4;

// The first (`first`) or the second element of the pair (x0, x1) rotated by the angle of sine s
// and cosine c, in double with the products and the sum rounded separately (no fused
// multiply-add), as the CPU op.
__device__ __forceinline__ double rotated(double x0, double x1, double s, double c, bool first) {
  return first ? __dsub_rn(__dmul_rn(x0, c), __dmul_rn(x1, s)) : __dadd_rn(__dmul_rn(x0, s), __dmul_rn(x1, c));
}

// VALUES values a thread, the block's values contiguous (value u of a thread is the block's
// u * blockDim + thread), each loaded before any is computed. A thread a value made 2 KB blocks
// (float32) that the GPU started no faster than one every 1.2 ns, which bound the kernel (on an
// H100, 64 heads x 512 dims of 4,096 tokens took 0.637 ms, 56 % of the copy rate). A value's
// column and token come from the thread's first value's (one 64-bit division each) by 32-bit
// steps: 64-bit divisions per value cost more instructions than the rest of its work. `n`
// values, `dim` a row, `per_token` a token.
//
// `dsv4_rope_one` (one value a thread) takes the calls whose grid of 8-value threads would leave
// most multiprocessors idle: there a thread's chain of 8 double-precision angles is the time
// (a decode step's 64 indexer heads: 8,192 values, 4 blocks).
template <int VALUES>
__device__ __forceinline__ void rope_values(
    const void* __restrict__ x, int x_bf16, const void* __restrict__ positions, int positions64,
    const void* __restrict__ inv_freq, int rope_mode, int pairs, long long n, int dim, long long per_token,
    int inverse, float* __restrict__ out) {
  const int step = blockDim.x, first_rotated = dim - 2 * pairs;
  const long long base = blockIdx.x * (long long)step * VALUES + threadIdx.x;
  if (base >= n) return;
  const int col0 = (int)(base % dim);
  float v[VALUES], other[VALUES];
  int col = col0;
#pragma unroll
  for (int u = 0; u < VALUES; ++u) {
    const long long i = base + (long long)u * step;
    const int k = col - first_rotated;  // position in the rotated part
    v[u] = i < n ? load_value(x, i, x_bf16) : 0.f;
    other[u] = i < n && k >= 0 ? load_value(x, k % 2 == 0 ? i + 1 : i - 1, x_bf16) : 0.f;
    col = (int)(((unsigned)col + (unsigned)step) % (unsigned)dim);
  }
  col = col0;
  long long token = base / per_token, in_token = base % per_token;
#pragma unroll
  for (int u = 0; u < VALUES; ++u) {
    const long long i = base + (long long)u * step;
    if (i >= n) break;
    const int k = col - first_rotated;
    if (k < 0) {
      out[i] = v[u];
    } else {
      const double x0 = k % 2 == 0 ? v[u] : other[u], x1 = k % 2 == 0 ? other[u] : v[u];
      double s, c;
      rope_sincos(load_id(positions, token, positions64), inv_freq, k / 2, rope_mode, inverse, s, c);
      out[i] = (float)rotated(x0, x1, s, c, k % 2 == 0);
    }
    col = (int)(((unsigned)col + (unsigned)step) % (unsigned)dim);
    in_token += step;
    if (in_token >= per_token) {
      token += in_token / per_token;
      in_token %= per_token;
    }
  }
}

#define DSV4_ROPE_PARAMS                                                                                  \
  const void *__restrict__ x, int x_bf16, const void *__restrict__ positions, int positions64,          \
      const void *__restrict__ inv_freq, int rope_mode, int pairs, long long n, int dim, long long per_token, \
      int inverse, float *__restrict__ out
#define DSV4_ROPE_ARGS x, x_bf16, positions, positions64, inv_freq, rope_mode, pairs, n, dim, per_token, inverse, out

extern "C" __global__ void __launch_bounds__(256) dsv4_rope(DSV4_ROPE_PARAMS) {
  dsv4::grid_begin();
  rope_values<8>(DSV4_ROPE_ARGS);
}

extern "C" __global__ void __launch_bounds__(256) dsv4_rope_one(DSV4_ROPE_PARAMS) {
  dsv4::grid_begin();
  rope_values<1>(DSV4_ROPE_ARGS);
}

// RMSNorm then RoPE of rows of at most ROW_MAX values, a multiple of 4 (the query's heads, the
// entry): out = rope(round(rms_norm(x) w)), bit for bit the two kernels one after the other
// (dsv4_rms_norm's arithmetic for such a row: a warp a row, four values a load, chunk c of lane l
// at 4 l + 128 c, the sum of squares in that order then a butterfly; the norm rounded to bfloat16
// when `round_bf16`; then dsv4_rope's rotation of each pair, in double). A warp a row, four rows a
// block; the rows of a token are `per_token` consecutive rows. Each lane rotates the pairs
// j = lane, lane + 32, ... from the warp's row in shared memory.
constexpr int NORM_ROPE_ROW_MAX = 512;  // rust/core/src/gpu/rope.rs NORM_ROPE_ROW_MAX

extern "C" __global__ void __launch_bounds__(128) dsv4_rms_norm_rope(
    const void* __restrict__ x, int x_bf16, long long x_stride, const void* __restrict__ w, int w_kind, long long rows,
    int dim, float eps, int round_bf16, const void* __restrict__ positions, int positions64,
    const void* __restrict__ inv_freq, int rope_mode, int pairs, long long per_token, float* __restrict__ out) {
  dsv4::grid_begin();
  constexpr int V = 4, CHUNKS = NORM_ROPE_ROW_MAX / (32 * V);
  __shared__ __align__(16) float row[4][NORM_ROPE_ROW_MAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long r = (long long)blockIdx.x * 4 + warp;
  if (r >= rows) return;  // the whole warp
  const long long at = r * dim, x_at = r * x_stride;
  float v[CHUNKS][V];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = lane * V + c * 32 * V;
    if (i < dim) load_n<V>(x, x_at + i, x_bf16, v[c]);
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (lane * V + c * 32 * V < dim) {
#pragma unroll
      for (int k = 0; k < V; ++k) ss = fmaf(v[c][k], v[c][k], ss);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float scale = rsqrtf(ss / (float)dim + eps);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = lane * V + c * 32 * V;
    if (i >= dim) continue;
    float g[V];
    if (w_kind != 0) load_n<V>(w, i, w_kind == 2, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float u = w_kind != 0 ? (v[c][k] * scale) * g[k] : v[c][k] * scale;
      if (round_bf16) u = __uint_as_float((uint32_t)bf16_from_f32(u) << 16);
      row[warp][i + k] = u;
    }
  }
  __syncwarp();
  const long long pos = load_id(positions, r / per_token, positions64);
  const int first = dim - 2 * pairs;
  for (int j = lane; j < pairs; j += 32) {
    double s, c;
    rope_sincos(pos, inv_freq, j, rope_mode, false, s, c);
    const double x0 = row[warp][first + 2 * j], x1 = row[warp][first + 2 * j + 1];
    row[warp][first + 2 * j] = (float)rotated(x0, x1, s, c, true);
    row[warp][first + 2 * j + 1] = (float)rotated(x0, x1, s, c, false);
  }
  __syncwarp();
  for (int i = lane * V; i < dim; i += 32 * V) *(float4*)(out + at + i) = *(const float4*)&row[warp][i];
}
