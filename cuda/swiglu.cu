// Clamped SwiGLU (docs/model.md section 7; rust/core/src/swiglu.rs has the CPU twin):
// h = silu(min(g, l)) * clamp(u, -l, l) with silu(x) = x / (1 + e^-x), in float32 from float32 or
// bfloat16 inputs, rounded once to the output's dtype. The clamps keep a NaN (as torch's clamp
// does). A thread per 4 consecutive values where the rows and the pointers allow it, else per
// value. The inputs are rows of `width` values, each `gate_stride` / `up_stride` values after the
// last (a column range of the packed gate-up projection); the output's rows are adjacent.
#include "floats.cuh"
#include "grid.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 256;

__device__ __forceinline__ float clamped_swiglu(float g, float u, float l) {
  g = g > l ? l : g;
  u = u > l ? l : (u < -l ? -l : u);
  return g / (1.f + expf(-g)) * u;
}

template <int V>
__device__ __forceinline__ void run(const void* gate, int gate_bf16, long long gate_stride, const void* up, int up_bf16,
                                    long long up_stride, void* out, int out_bf16, long long n, long long width,
                                    float limit) {
  const long long i = ((long long)blockIdx.x * THREADS + threadIdx.x) * V;
  if (i >= n) return;
  const long long r = i / width, c = i - r * width;  // V divides width
  float g[V], u[V], h[V];
  load_n<V>(gate, r * gate_stride + c, gate_bf16, g);
  load_n<V>(up, r * up_stride + c, up_bf16, u);
#pragma unroll
  for (int j = 0; j < V; ++j) h[j] = clamped_swiglu(g[j], u[j], limit);
  store_n<V>(out, i, out_bf16, h);
}

}  // namespace

// n values in rows of `width`; vec4: width % 4 == 0, both strides % 4 == 0 and every pointer
// aligned to four values.
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_swiglu(const void* gate, int gate_bf16, long long gate_stride,
                                                                  const void* up, int up_bf16, long long up_stride,
                                                                  void* out, int out_bf16, long long n, long long width,
                                                                  float limit, int vec4) {
  grid_begin();
  if (vec4) run<4>(gate, gate_bf16, gate_stride, up, up_bf16, up_stride, out, out_bf16, n, width, limit);
  else run<1>(gate, gate_bf16, gate_stride, up, up_bf16, up_stride, out, out_bf16, n, width, limit);
}
