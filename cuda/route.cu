// MoE routing from the router's logits (rust/core/src/route.rs has the CPU twin and the
// definition): a_e = sqrt(softplus(l_e)) in float32; the k experts of largest a_e + bias_e
// (descending, ties to the lower expert, a NaN first: torch's topk order) or table[ids[t]] on a
// hash layer; weights a[idx_j], normalized by their sum + 1e-20 when asked, times the scale. The
// same float32 operations in the same order as the CPU twin.
//
// A warp per token, four a block. The warp writes its token's affinities and selection scores to
// its part of shared memory, then picks the k experts in k rounds: each lane takes the best of
// its experts (lane, lane + 32, ...) not yet taken, and a butterfly of shuffles gives every lane
// the round's winner, whose lane marks it taken. Lane 0 then forms the weights in choice order.
#include <cstdint>

#include "grid.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int MAX_K = 16;  // rust/core/src/route.rs MAX_K

// Whether score a of expert ia comes before score b of expert ib (torch's topk order).
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

}  // namespace

extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv4_moe_route(
    const void* __restrict__ logits, int logits_bf16, long long tokens, int experts, int k,
    const float* __restrict__ bias, const void* __restrict__ table, int table64, long long vocab,
    const void* __restrict__ ids, int ids64, float scale, int norm, long long* __restrict__ idx_out,
    float* __restrict__ w_out) {
  dsv4::grid_begin();
  extern __shared__ float route_smem[];
  __shared__ int chosen[WARPS][MAX_K];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = (long long)blockIdx.x * WARPS + warp;
  if (t >= tokens) return;  // the whole warp
  float* a = route_smem + warp * 2 * experts;
  float* s = a + experts;
  for (int e = lane; e < experts; e += 32) {
    const long long at = t * experts + e;
    const float l = logits_bf16 ? __uint_as_float((uint32_t)((const uint16_t*)logits)[at] << 16) : ((const float*)logits)[at];
    const float ae = sqrtf(softplus(l));
    a[e] = ae;
    if (bias) s[e] = ae + bias[e];
  }
  __syncwarp();
  if (bias) {
    uint32_t taken = 0;  // bit i: expert lane + 32 i
    for (int j = 0; j < k; ++j) {
      float best = 0.f;
      int at = -1;
      for (int i = 0, e = lane; e < experts; ++i, e += 32)
        if (!((taken >> i) & 1) && (at < 0 || before(s[e], e, best, at))) best = s[e], at = e;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oa = __shfl_xor_sync(0xffffffffu, at, o);
        if (oa >= 0 && (at < 0 || before(ob, oa, best, at))) best = ob, at = oa;
      }
      if (at % 32 == lane) taken |= 1u << (at / 32);
      if (lane == 0) chosen[warp][j] = at;
    }
  } else if (lane < k) {
    const long long id = ids64 ? ((const long long*)ids)[t] : ((const int*)ids)[t];
    long long e = -1;
    if (id >= 0 && id < vocab) e = table64 ? ((const long long*)table)[id * k + lane] : ((const int*)table)[id * k + lane];
    chosen[warp][lane] = e >= 0 && e < experts ? (int)e : -1;
  }
  __syncwarp();
  if (lane == 0) {
    float w[MAX_K];
    float sum = 0.f;
    for (int j = 0; j < k; ++j) {
      const int e = chosen[warp][j];
      w[j] = e >= 0 ? a[e] : 0.f;
      sum += w[j];
    }
    sum += 1e-20f;
    for (int j = 0; j < k; ++j) {
      const float v = norm ? w[j] / sum : w[j];
      w_out[t * k + j] = v * scale;
      idx_out[t * k + j] = chosen[warp][j];
    }
  }
}
