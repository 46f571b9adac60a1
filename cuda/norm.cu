// RMSNorm over the last dim (docs/model.md section 2): y = (x * rsqrt(mean(x^2) + eps)) * w, in
// float32, rounded once to the output's dtype. x float32 or bfloat16, w absent, float32 or
// bfloat16, y float32 or bfloat16: the casts around torch's norm are part of the one kernel.
// Mirrors rust/core/src/norm.rs (float32; the sum of squares in its own order).
#include "floats.cuh"
#include "grid.cuh"

using namespace dsv4;

namespace {

constexpr int MAX_LANES = 1024;
// Loads of V values a thread keeps in registers between the sum of squares and the output: a
// row of up to CACHED * V * lanes values is read from memory once; longer rows read the rest
// twice.
constexpr int CACHED = 8;

// A row per `lanes` threads (a power of two, 32 to MAX_LANES; several rows a block when
// lanes < 256). V values a load (4 when the row's length and the pointers allow it). Every load
// of a thread is issued before the first is used, so a row costs about one memory latency.
template <int V>
__device__ __forceinline__ void rms_row(const void* x, int x_bf16, long long x_stride, const void* w, int w_kind, void* y,
                                        int y_bf16, long long rows, int dim, int lanes, float eps) {
  __shared__ float partial[MAX_LANES / 32];
  const int per_block = blockDim.x / lanes;
  const long long r = blockIdx.x * (long long)per_block + threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int stride = lanes * V;
  const bool live = r < rows;
  const long long at = (live ? r : 0) * (long long)dim, x_at = (live ? r : 0) * x_stride;
  float v[CACHED][V];
  float ss = 0.f;
  if (live) {
#pragma unroll
    for (int c = 0; c < CACHED; ++c) {
      const int i = lane * V + c * stride;
      if (i < dim) load_n<V>(x, x_at + i, x_bf16, v[c]);
    }
#pragma unroll
    for (int c = 0; c < CACHED; ++c) {
      if (lane * V + c * stride < dim) {
#pragma unroll
        for (int k = 0; k < V; ++k) ss = fmaf(v[c][k], v[c][k], ss);
      }
    }
#pragma unroll 4
    for (int i = lane * V + CACHED * stride; i < dim; i += stride) {
      float u[V];
      load_n<V>(x, x_at + i, x_bf16, u);
#pragma unroll
      for (int k = 0; k < V; ++k) ss = fmaf(u[k], u[k], ss);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (lanes > 32) {  // every thread of the block reaches the barrier (no return above)
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    const int first = (threadIdx.x / lanes) * (lanes / 32);
    ss = 0.f;
    for (int k = 0; k < lanes / 32; ++k) ss += partial[first + k];
  }
  if (!live) return;
  const float scale = rsqrtf(ss / (float)dim + eps);
  auto emit = [&](int i, float (&u)[V]) {
    if (w_kind != 0) {
      float g[V];
      load_n<V>(w, i, w_kind == 2, g);
#pragma unroll
      for (int k = 0; k < V; ++k) u[k] = (u[k] * scale) * g[k];
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) u[k] *= scale;
    }
    store_n<V>(y, at + i, y_bf16, u);
  };
#pragma unroll
  for (int c = 0; c < CACHED; ++c) {
    const int i = lane * V + c * stride;
    if (i < dim) emit(i, v[c]);
  }
  for (int i = lane * V + CACHED * stride; i < dim; i += stride) {
    float u[V];
    load_n<V>(x, x_at + i, x_bf16, u);
    emit(i, u);
  }
}

}  // namespace

// x_stride: values from one row of x to the next (dim where x is contiguous; y's rows are
// adjacent). w_kind: 0 no weight, 1 float32, 2 bfloat16. lanes: a power of two, 32 to MAX_LANES;
// a block of max(lanes, 256) threads holds blockDim.x / lanes rows. vec4: dim % 4 == 0, x_stride
// % 4 == 0 and every pointer aligned to four values.
extern "C" __global__ void __launch_bounds__(MAX_LANES) dsv4_rms_norm(const void* x, int x_bf16, long long x_stride,
                                                                      const void* w, int w_kind, void* y, int y_bf16,
                                                                      long long rows, int dim, int lanes, int vec4,
                                                                      float eps) {
  dsv4::grid_begin();
  if (vec4) {
    rms_row<4>(x, x_bf16, x_stride, w, w_kind, y, y_bf16, rows, dim, lanes, eps);
  } else {
    rms_row<1>(x, x_bf16, x_stride, w, w_kind, y, y_bf16, rows, dim, lanes, eps);
  }
}
