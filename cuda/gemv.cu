// y = x W^T for a few rows (decode): x float32/bfloat16 [T, K], W float32/bfloat16 [N, K], y
// [T, N] in float32 or bfloat16 (rounded once). The router's logits at decode (N = 256 experts,
// K = 4,096) in one kernel, where cuBLAS runs a split-K GEMV and a reduce.
//
// `split` warps (1, 2, 4 or 8; rust/core/src/gemv.rs `split`) take a weight row, 8 / split rows
// a block: the router's 256 rows of 4,096 values are 2,048 warps whose every load is in flight at
// once; a matrix of more rows takes fewer warps a row. Virtual lane v = warp-in-row * 32 + lane
// takes the row's 8-value chunks v, v + 32 split, ..., issues its loads of four chunks of the row
// before it uses the first, and for each of the T rows of x adds the chunk's products in float32
// (fmaf in K order within the lane); then a butterfly of each warp's 32 lanes, then the warps'
// sums added in warp order. So a weight byte
// is read once, and x (a few kilobytes a row) from the L2. Mirrors rust/core/src/gemv.rs.
#include <cstdint>

#include "floats.cuh"
#include "grid.cuh"

using namespace dsv4;

namespace {

constexpr int WARPS = 8;       // rust/core/src/gpu/gemv.rs WARPS
constexpr int MAX_ROWS = 8;    // rust/core/src/gemv.rs MAX_ROWS

// 16 bytes of a row as 8 bfloat16 or 4 float32 values.
__device__ __forceinline__ uint4 load16(const void* base, long long byte) {
  return *(const uint4*)((const char*)base + byte);
}

// The 8 values of a chunk held as loaded (bfloat16: one 16-byte load; float32: two).
template <bool W_BF16>
struct Chunk {
  uint4 r[W_BF16 ? 1 : 2];
  __device__ __forceinline__ void load(const void* w, long long i) {
#pragma unroll
    for (int h = 0; h < (W_BF16 ? 1 : 2); ++h) r[h] = load16(w, (W_BF16 ? 2 : 4) * i + 16 * h);
  }
  __device__ __forceinline__ static uint32_t word(const uint4& q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
  }
  // Value e (a constant once unrolled).
  __device__ __forceinline__ float operator[](int e) const {
    if constexpr (W_BF16) {
      const uint32_t v = word(r[0], e / 2);
      return __uint_as_float(e % 2 ? v & 0xFFFF0000u : v << 16);
    } else {
      return __uint_as_float(word(r[e / 4 % (W_BF16 ? 1 : 2)], e % 4));
    }
  }
};

// A lane's sums acc[t] = x[t] . w[row] over its chunks v, v + lanes, ...: IN_FLIGHT chunks of
// the weight row loaded before the first is used.
template <bool W_BF16>
__device__ __forceinline__ void lane_sums(const void* x, int x_bf16, const void* w, long long w_at, int rows,
                                          int k, int chunks, int vlane, int lanes, float (&acc)[MAX_ROWS]) {
  constexpr int IN_FLIGHT = 4;
  for (int c0 = vlane; c0 < chunks; c0 += lanes * IN_FLIGHT) {
    Chunk<W_BF16> wv[IN_FLIGHT];
#pragma unroll
    for (int u = 0; u < IN_FLIGHT; ++u) {
      const int c = c0 + lanes * u;
      if (c < chunks) wv[u].load(w, w_at + 8LL * c);
    }
#pragma unroll
    for (int u = 0; u < IN_FLIGHT; ++u) {
      const int c = c0 + lanes * u;
      if (c >= chunks) break;
#pragma unroll
      for (int t = 0; t < MAX_ROWS; ++t) {
        if (t >= rows) break;
        float xv[8];
        load8(x, (long long)t * k + 8LL * c, x_bf16, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[t] = fmaf(xv[e], wv[u][e], acc[t]);
      }
    }
  }
}

}  // namespace

// k % 8 == 0, every pointer 16-byte aligned, split in {1, 2, 4, 8} (the launcher checks);
// rows <= MAX_ROWS.
extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv4_gemv_rows(const void* __restrict__ x, int x_bf16,
                                                                       const void* __restrict__ w, int w_bf16,
                                                                       int rows, int n, int k, int split,
                                                                       void* __restrict__ y, int y_bf16) {
  __shared__ float part[WARPS][MAX_ROWS];
  dsv4::grid_begin();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * (WARPS / split) + warp / split;
  const int lanes = 32 * split, vlane = (warp % split) * 32 + lane;
  const bool live = row < n;
  const long long w_at = (long long)row * k;
  float acc[MAX_ROWS];
#pragma unroll
  for (int t = 0; t < MAX_ROWS; ++t) acc[t] = 0.f;
  const int chunks = live ? k / 8 : 0;
  if (w_bf16) {
    lane_sums<true>(x, x_bf16, w, w_at, rows, k, chunks, vlane, lanes, acc);
  } else {
    lane_sums<false>(x, x_bf16, w, w_at, rows, k, chunks, vlane, lanes, acc);
  }
#pragma unroll
  for (int t = 0; t < MAX_ROWS; ++t) {
    if (t >= rows) break;
    float s = acc[t];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (split == 1) {
      if (live && lane == 0) store_value(y, (long long)t * n + row, y_bf16, s);
    } else if (lane == 0) {
      part[warp][t] = s;
    }
  }
  if (split == 1) return;
  __syncthreads();
  // The first warp of a row adds its warps' sums in warp order, a lane a row of x.
  if (live && warp % split == 0 && lane < rows) {
    float s = part[warp][lane];
    for (int i = 1; i < split; ++i) s += part[warp + i][lane];
    store_value(y, (long long)lane * n + row, y_bf16, s);
  }
}
