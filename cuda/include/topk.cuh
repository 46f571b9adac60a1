// Exact top-k selection on 64-bit keys in shared memory, for the indexer.
//
// A candidate is packed as key = ord(score) << 32 | (0xFFFFFFFF - index): keys are unique, a
// larger key is a higher score, and among equal scores the LOWER index has the larger key, which
// is the tie rule of docs/model.md section 4 shared with the CPU op. Selection is an MSB-first radix
// select (8 passes of 8 bits) that finds the k-th largest key exactly, so no sort of all
// candidates is needed.
#pragma once
#include <stdint.h>

namespace dsv4 {

__device__ __forceinline__ uint32_t ord_f32(float f) {
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float unord_f32(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

__device__ __forceinline__ uint64_t pack_candidate(float score, uint32_t index) {
  return ((uint64_t)ord_f32(score) << 32) | (uint64_t)(0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t candidate_index(uint64_t key) {
  return 0xFFFFFFFFu - (uint32_t)(key & 0xFFFFFFFFu);
}

__device__ __forceinline__ float candidate_score(uint64_t key) { return unord_f32((uint32_t)(key >> 32)); }

// Shared scratch of the radix select.
struct SelectScratch {
  uint32_t hist[256];
  uint64_t prefix;
  uint32_t remaining;
};

// Returns the k-th largest of keys[0..n) (1 <= k <= n), reading keys through `load(i)` so the
// keys may live in shared or global memory. All threads of the block must call it.
template <typename Load>
__device__ uint64_t kth_largest(Load load, int n, int k, SelectScratch& s) {
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.remaining = (uint32_t)k;
  }
  uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
    __syncthreads();
    uint64_t prefix = s.prefix;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      uint64_t key = load(i);
      if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    // Warp 0 finds the bin holding the `remaining`-th largest key: lane l sums bins
    // 255 - 8l .. 248 - 8l, a prefix sum over lanes runs from the top bin down, and the one lane
    // whose range crosses `remaining` walks its eight bins.
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x, top = 255 - 8 * lane;
      const uint32_t need = s.remaining;
      uint32_t sum = 0;
      for (int i = 0; i < 8; ++i) sum += s.hist[top - i];
      uint32_t incl = sum;
      for (int off = 1; off < 32; off *= 2) {
        uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      uint32_t above = incl - sum;
      // Every lane has read `remaining` and the histogram before the one lane below rewrites
      // `remaining` and `prefix`: the shuffles above already order that, but only a barrier says
      // so to the race checker (compute-sanitizer racecheck counts it as a hazard otherwise).
      __syncwarp();
      if (above < need && need <= incl) {
        int b = top;
        for (; b > top - 7; --b) {
          if (above + s.hist[b] >= need) break;
          above += s.hist[b];
        }
        s.remaining = need - above;
        s.prefix = prefix | ((uint64_t)b << shift);
      }
    }
    mask |= (uint64_t)255 << shift;
    __syncthreads();
  }
  return s.prefix;
}

// Sorts keys[0..n) in shared memory in descending order (n <= capacity, a power of two; slots
// n..capacity must hold 0, which sorts last). Bitonic sort; all threads must call it.
__device__ void sort_descending(uint64_t* keys, int capacity) {
  for (int size = 2; size <= capacity; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < capacity; i += blockDim.x) {
        int j = i ^ stride;
        if (j > i) {
          bool desc = (i & size) == 0;
          uint64_t a = keys[i], b = keys[j];
          if ((a < b) == desc) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace dsv4
