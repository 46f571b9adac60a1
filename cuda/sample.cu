// Gumbel-max sampling of one token per row (python/dsv4rs/runtime/sampling.py, `gumbel_max`;
// the CPU twin is rust/core/src/sample.rs): out[b] = argmax_v logits[b, v] / temperature[b] + g,
// g = -log(-log(u)) with u the counter-based uniform of `uniform(seeds, steps, vocab)` (a hash of
// (seed, step, v), (k + 1/2) / 2^23 for a 23-bit k), or argmax_v logits[b, v] where
// temperature[b] <= 0. The same float32 operations in the same order as the torch form, so the
// two agree bit for bit; argmax as torch's: a NaN above everything, ties to the lowest index.
// One block per row; each thread scans a strided share of the vocabulary, then the block reduces.
#include <cstdint>

#include "grid.cuh"

namespace {

constexpr int THREADS = 512;

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Whether score a at index ia comes before score b at index ib in torch's argmax order.
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_sample_gumbel(
    const float* __restrict__ logits, long long row_stride, int vocab, const float* __restrict__ temperature,
    const long long* __restrict__ seeds, const long long* __restrict__ steps, long long* __restrict__ out) {
  dsv4::grid_begin();
  const int b = blockIdx.x;
  const float* row = logits + b * row_stride;
  const float t = temperature[b];
  const bool greedy = t <= 0.f;
  const uint64_t seed = (uint64_t)seeds[b];
  const uint32_t hash = mix32((uint32_t)seed ^ mix32((uint32_t)(seed >> 32) ^ mix32((uint32_t)(uint64_t)steps[b])));
  float best = 0.f;
  int at = -1;
  for (int v = threadIdx.x; v < vocab; v += THREADS) {
    float s = row[v];
    if (!greedy) {
      const uint32_t bits = mix32(mix32(hash ^ (uint32_t)v) ^ ((uint32_t)v * 0x9E3779B9u));
      const float u = ((float)(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
      s = __fadd_rn(__fdiv_rn(s, t), -logf(-logf(u)));
    }
    if (at < 0 || before(s, v, best, at)) best = s, at = v;
  }
  // Warp, then block reduction in the same order.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_down_sync(0xffffffffu, best, o);
    const int oa = __shfl_down_sync(0xffffffffu, at, o);
    if (oa >= 0 && (at < 0 || before(ob, oa, best, at))) best = ob, at = oa;
  }
  __shared__ float sb[THREADS / 32];
  __shared__ int sa[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sb[warp] = best, sa[warp] = at;
  __syncthreads();
  if (warp == 0) {
    best = lane < THREADS / 32 ? sb[lane] : 0.f;
    at = lane < THREADS / 32 ? sa[lane] : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_down_sync(0xffffffffu, best, o);
      const int oa = __shfl_down_sync(0xffffffffu, at, o);
      if (oa >= 0 && (at < 0 || before(ob, oa, best, at))) best = ob, at = oa;
    }
    if (lane == 0) out[b] = at;
  }
}
