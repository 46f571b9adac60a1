// MoE routing from the router's logits (rust/core/src/route.rs has the CPU twin and the
// definition): a_e = sqrt(softplus(l_e)) in float32; the k experts of largest a_e + bias_e
// (descending, ties to the lower expert, a NaN first: torch's topk order) or table[ids[t]] on a
// hash layer; weights a[idx_j], normalized by their sum + 1e-20 when asked, times the scale. The
// same float32 operations in the same order as the CPU twin.
//
// A warp per token, four a block; or, with `wide` (a decode step's few tokens), a block per
// token whose four warps compute the affinities together and whose first warp then selects, so
// that a token's serial chain is shorter where its block shares a multiprocessor with a GEMV's.
// On a hash layer the lanes below k first read the token's table entries, so that those loads
// overlap the affinities. The affinities and, with a bias, each selection score's order key
// (below) go to the token's part of shared memory. Then k rounds: each lane holds the best of its
// experts (lane, lane + 32, ...) not yet taken; the warp's largest key (`redux.sync` max) and the
// lowest expert holding it (min) are the round's choice, and only the lane that owned it looks
// for its next best. Lane 0 then forms the weights in choice order. Both forms compute the same
// values in the same order.
#include <climits>
#include <cstdint>

#include "grid.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int MAX_K = 16;  // rust/core/src/route.rs MAX_K

// An unsigned key whose order is torch's topk order of the scores: a NaN above everything, then
// larger values first; -0 and +0 one key (they tie, as `==` has them); 0 is no score's key.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  const uint32_t u = __float_as_uint(x == 0.f ? 0.f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

}  // namespace

extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv4_moe_route(
    const void* __restrict__ logits, int logits_bf16, long long tokens, int experts, int k,
    const float* __restrict__ bias, const void* __restrict__ table, int table64, long long vocab,
    const void* __restrict__ ids, int ids64, float scale, int norm, long long* __restrict__ idx_out,
    float* __restrict__ w_out, int wide) {
  dsv4::grid_begin();
  extern __shared__ float route_smem[];
  __shared__ int chosen[WARPS][MAX_K];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = wide ? (long long)blockIdx.x : (long long)blockIdx.x * WARPS + warp;
  if (t >= tokens) return;  // the whole warp (wide: the whole block)
  float* a = route_smem + (wide ? 0 : warp * 2 * experts);
  uint32_t* key = (uint32_t*)(a + experts);
  const bool selects = !wide || warp == 0;
  int hashed = -1;
  if (selects && !bias && lane < k) {
    const long long id = ids64 ? ((const long long*)ids)[t] : ((const int*)ids)[t];
    long long e = -1;
    if (id >= 0 && id < vocab) e = table64 ? ((const long long*)table)[id * k + lane] : ((const int*)table)[id * k + lane];
    hashed = e >= 0 && e < experts ? (int)e : -1;
  }
  const int first = wide ? (int)threadIdx.x : lane, stride = wide ? WARPS * 32 : 32;
#pragma unroll 4
  for (int e = first; e < experts; e += stride) {
    const long long at = t * experts + e;
    const float l = logits_bf16 ? __uint_as_float((uint32_t)((const uint16_t*)logits)[at] << 16) : ((const float*)logits)[at];
    const float ae = sqrtf(softplus(l));
    a[e] = ae;
    if (bias) key[e] = order_key(ae + bias[e]);
  }
  if (wide) {
    __syncthreads();
    if (!selects) return;
  } else {
    __syncwarp();
  }
  if (bias) {
    uint32_t taken = 0;  // bit i: expert lane + 32 i
    uint32_t best = 0;   // the lane's best key not taken (0: none)
    int best_e = INT_MAX;
    auto rescan = [&]() {
      best = 0, best_e = INT_MAX;
      for (int i = 0, e = lane; e < experts; ++i, e += 32) {
        const uint32_t ke = key[e];
        if (!((taken >> i) & 1) && ke > best) best = ke, best_e = e;  // `>`: the lower expert of a tie
      }
    };
    rescan();
    for (int j = 0; j < k; ++j) {
      const uint32_t top = __reduce_max_sync(0xffffffffu, best);
      const int at = (int)__reduce_min_sync(0xffffffffu, best == top ? (uint32_t)best_e : 0xFFFFFFFFu);
      if (lane == 0) chosen[warp][j] = at;
      if (at % 32 == lane) {
        taken |= 1u << (at / 32);
        rescan();
      }
    }
  } else if (lane < k) {
    chosen[warp][lane] = hashed;
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
