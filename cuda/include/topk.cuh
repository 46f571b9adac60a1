// Exact top-k selection on 64-bit keys in shared memory, for the indexer.
//
// A candidate is packed as key = ord(score) << 32 | (0xFFFFFFFF - index): keys are unique, a
// larger key is a higher score, and among equal scores the LOWER index has the larger key, which
// is the tie rule of docs/model.md section 4 shared with the CPU op. Selection is an MSB-first radix
// select (up to 8 passes of 8 bits) that finds a threshold with exactly k keys at or above it,
// so no sort of all candidates is needed.
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
  int done;
};

// Appends `key` to dst[*count ...] when `ok`, a warp at a time: one shared atomic a warp, the
// lanes' slots in lane order. Every lane of the warp must call it (a uniform loop bound).
__device__ __forceinline__ void append_key(uint64_t* dst, int* count, bool ok, uint64_t key) {
  const uint32_t lane = threadIdx.x % 32, votes = __ballot_sync(0xffffffffu, ok);
  int base = 0;
  if (lane == 0 && votes != 0) base = atomicAdd(count, __popc(votes));
  base = __shfl_sync(0xffffffffu, base, 0);
  if (ok) dst[base + __popc(votes & ((1u << lane) - 1u))] = key;
}

// Returns a threshold `thr` such that exactly k of keys[0..n) are >= thr (1 <= k <= n, keys
// unique), reading keys through `load(i)` so they may live in shared or global memory. All
// threads of the block must call it, with blockDim.x a multiple of 32.
//
// MSB-first radix select, 8 bits a pass: each pass counts the keys that match the prefix chosen
// so far into 256 bins and picks the bin holding the `remaining`-th largest. When that bin is
// taken whole (its keys are exactly the ones still needed), every key at or above the prefix with
// zeros below is in the top k and every other key is not, so the select stops there: with
// distinct scores that is usually after the 2nd or 3rd pass rather than the 8th. Otherwise the
// 8th pass ends at the k-th largest key itself.
//
// The lanes of a warp whose keys fall in one bin add their count with one atomic
// (__match_any_sync): scores of one query mostly share their top byte, so without it the first
// pass serializes on one or two bins.
//
// With `passes` < 8 the select may stop early, at the prefix chosen so far (zeros below): at
// least k keys are then at or above it, so it is a floor under the k-th largest key, not
// necessarily the key itself (the indexer merge's floor: cuda/indexer.cu).
template <typename Load>
__device__ uint64_t top_threshold(Load load, int n, int k, SelectScratch& s, int passes = 8) {
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.remaining = (uint32_t)k;
    s.done = 0;
  }
  uint64_t mask = 0;
  for (int shift = 56; shift >= 64 - 8 * passes; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
    __syncthreads();
    const uint64_t prefix = s.prefix;
    for (int base = 0; base < n; base += blockDim.x) {  // the same rounds for every lane
      const int i = base + threadIdx.x;
      uint32_t bin = 256;  // no bin: past n, or off the prefix
      if (i < n) {
        const uint64_t key = load(i);
        if ((key & mask) == prefix) bin = (uint32_t)(key >> shift) & 255u;
      }
      const uint32_t peers = __match_any_sync(0xffffffffu, bin);
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], (uint32_t)__popc(peers));
    }
    __syncthreads();
    // Warp 0 finds the bin holding the `remaining`-th largest key: lane l sums bins
    // 255 - 8l .. 248 - 8l, a prefix sum over lanes runs from the top bin down, and the one lane
    // whose range crosses `remaining` walks its eight bins.
    if (threadIdx.x < 32) {
      const int top = 255 - 8 * lane;
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
        s.done = above + s.hist[b] == need;
      }
    }
    mask |= (uint64_t)255 << shift;
    __syncthreads();
    if (s.done) break;
  }
  return s.prefix;
}

// One compare-exchange step of a bitonic sort (phase `size`, distance `stride` < 32) on element
// i's key `a`, whose partner i ^ stride sits in lane ^ stride of the same warp: the pair's lower
// index keeps the larger key in a descending run ((i & size) == 0), the smaller in an ascending one.
__device__ __forceinline__ uint64_t bitonic_lane_step(uint64_t a, int i, int size, int stride) {
  const uint64_t b = __shfl_xor_sync(0xffffffffu, (unsigned long long)a, stride);
  const bool take_max = ((i & size) == 0) == ((i & stride) == 0);
  return take_max == (a > b) ? a : b;
}

// The steps of stride < 32 of phases `from` .. `to` (powers of two), in registers: each thread
// loads its elements (i = threadIdx.x + r blockDim.x), exchanges with its lanes by shuffles and
// stores them back. capacity is a multiple of 32, so a warp's lanes are all in or all out.
__device__ __forceinline__ void bitonic_lane_steps(uint64_t* keys, int capacity, int from, int to) {
  for (int base = 0; base < capacity; base += blockDim.x) {
    const int i = base + threadIdx.x;
    if (base + (int)(threadIdx.x & ~31u) >= capacity) break;  // the warp's lanes are past capacity
    uint64_t a = keys[i];
    for (int size = from; size <= to; size <<= 1)
      for (int stride = min(size >> 1, 16); stride > 0; stride >>= 1) a = bitonic_lane_step(a, i, size, stride);
    keys[i] = a;
  }
}

// Sorts keys[0..n) in shared memory in descending order (n <= capacity, a power of two; slots
// n..capacity must hold 0, which sorts last). Bitonic sort; all threads must call it, blockDim.x
// a multiple of 32. The steps of stride 32 and more go through shared memory, a barrier each;
// those below 32 run in registers, one pass (and one barrier) for the phases' runs of them, so a
// sort of 512 keys takes 15 barriers rather than 45.
__device__ void sort_descending(uint64_t* keys, int capacity) {
  auto shared_step = [&](int size, int stride) {
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
  };
  if (capacity < 64) {
    for (int size = 2; size <= capacity; size <<= 1)
      for (int stride = size >> 1; stride > 0; stride >>= 1) shared_step(size, stride);
    return;
  }
  bitonic_lane_steps(keys, capacity, 2, 32);
  __syncthreads();
  for (int size = 64; size <= capacity; size <<= 1) {
    for (int stride = size >> 1; stride >= 32; stride >>= 1) shared_step(size, stride);
    bitonic_lane_steps(keys, capacity, size, size);
    __syncthreads();
  }
}

}  // namespace dsv4
