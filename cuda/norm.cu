// RMSNorm over the last dim (docs/model.md section 2): y = (x * rsqrt(mean(x^2) + eps)) * w, in
// float32, rounded once to the output's dtype. x float32 or bfloat16, w absent, float32 or
// bfloat16, y float32 or bfloat16: the casts around torch's norm are part of the one kernel.
// Mirrors rust/core/src/norm.rs (float32; the sum of squares in its own order).
#include "floats.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 256;

// A row per `lanes` threads (32: a warp, several rows a block; THREADS: the whole block). V values
// a load (4 when the row's length and the pointers allow it).
template <int V>
__device__ __forceinline__ void rms_row(const void* x, int x_bf16, const void* w, int w_kind, void* y, int y_bf16,
                                        long long rows, int dim, int lanes, float eps) {
  __shared__ float partial[THREADS / 32];
  const long long r = blockIdx.x * (long long)(THREADS / lanes) + threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const bool live = r < rows;
  const long long at = (live ? r : 0) * (long long)dim;
  float ss = 0.f;
  if (live) {
    for (int i = lane * V; i < dim; i += lanes * V) {
      float v[V];
      load_n<V>(x, at + i, x_bf16, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ss = fmaf(v[k], v[k], ss);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (lanes > 32) {  // one row a block: every thread reaches the barrier
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    ss = 0.f;
#pragma unroll
    for (int k = 0; k < THREADS / 32; ++k) ss += partial[k];
  }
  if (!live) return;
  const float scale = rsqrtf(ss / (float)dim + eps);
  for (int i = lane * V; i < dim; i += lanes * V) {
    float v[V];
    load_n<V>(x, at + i, x_bf16, v);
    if (w_kind != 0) {
      float g[V];
      load_n<V>(w, i, w_kind == 2, g);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = (v[k] * scale) * g[k];
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] *= scale;
    }
    store_n<V>(y, at + i, y_bf16, v);
  }
}

}  // namespace

// w_kind: 0 no weight, 1 float32, 2 bfloat16. lanes: 32 or 256 (THREADS); the grid covers
// rows * lanes threads. vec4: dim % 4 == 0 and every pointer aligned to four values.
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_rms_norm(const void* x, int x_bf16, const void* w, int w_kind,
                                                                    void* y, int y_bf16, long long rows, int dim,
                                                                    int lanes, int vec4, float eps) {
  if (vec4) {
    rms_row<4>(x, x_bf16, w, w_kind, y, y_bf16, rows, dim, lanes, eps);
  } else {
    rms_row<1>(x, x_bf16, w, w_kind, y, y_bf16, rows, dim, lanes, eps);
  }
}
