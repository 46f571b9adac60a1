// Lightning Indexer top-k on the GPU (SPEC.md section 4), fused: the [queries x keys] score
// matrix never leaves the chip.
//
// dsv4_indexer_score: grid (splits, queries), 128 threads. Each block takes one query and one
// split of its visible keys, a 64-key page at a time: dequantizes the page into shared memory
// as bf16 (FP4 and FP8 values are exact in bf16), scores it against the query's heads with bf16
// tensor-core MMAs (mma.sync m16n8k16, sm_80+; fp32 accumulation), folds heads with
// sum_h w_h * ReLU(.), and keeps the split's scores in shared memory. It then writes only the
// split's top-min(k, split) candidates (exact radix select) to the workspace.
// dsv4_indexer_merge: one block per query selects the exact top-k of all splits' candidates,
// sorts them (score descending, lower index first on ties) and writes indices and scores.
#include "quant.cuh"
#include "topk.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 128;
constexpr int MAX_HEADS = 64;
constexpr int ROW = INDEX_DIM + 8;  // padded bf16 row stride: conflict-free fragment loads

enum KeyFormat { KEYS_FP4 = 0, KEYS_FP8 = 1, KEYS_BF16 = 2 };

__device__ __forceinline__ uint16_t to_bf16(float x) { return bf16_from_f32(x); }

// One page's keys as this thread moves them: chunks q = tid + 128 j (key q / 16, dims
// 8 (q % 16) .. + 8), raw bits and scale bits, loaded one page ahead of their use.
struct PageChunks {
  uint4 bits[PAGE_ROWS * 16 / THREADS];
  uint32_t scale[PAGE_ROWS * 16 / THREADS];
  bool valid[PAGE_ROWS * 16 / THREADS];
};

__device__ __forceinline__ void load_page(PageChunks& pc, const uint8_t* __restrict__ cache, int fmt, int page,
                                          bool page_ok, long long base, long long end, int tid) {
#pragma unroll
  for (int j = 0; j < PAGE_ROWS * 16 / THREADS; ++j) {
    const int q = tid + THREADS * j, key = q / 16, c = q % 16;
    const long long row = (long long)page * PAGE_ROWS + key;
    pc.valid[j] = page_ok && base + key < end;
    if (!pc.valid[j]) continue;
    if (fmt == KEYS_FP4) {
      pc.bits[j].x = *(const uint32_t*)(cache + INDEX_KEY_FP4.data_offset(row) + 4 * c);
      pc.scale[j] = cache[INDEX_KEY_FP4.scale_offset(row) + c / 4];
    } else if (fmt == KEYS_FP8) {
      uint2 raw = *(const uint2*)(cache + INDEX_KEY_FP8.data_offset(row) + 8 * c);
      pc.bits[j].x = raw.x;
      pc.bits[j].y = raw.y;
      pc.scale[j] = *(const uint32_t*)(cache + INDEX_KEY_FP8.scale_offset(row));
    } else {
      pc.bits[j] = *(const uint4*)(cache + row * (INDEX_DIM * 2) + 16 * c);
    }
  }
}

// Decodes the chunks (exact in bf16 for FP4 and FP8 keys) into the shared key tile.
__device__ __forceinline__ void store_page(const PageChunks& pc, int fmt, uint16_t* ks, int tid) {
#pragma unroll
  for (int j = 0; j < PAGE_ROWS * 16 / THREADS; ++j) {
    const int q = tid + THREADS * j, key = q / 16, c = q % 16;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (pc.valid[j]) {
      if (fmt == KEYS_FP4) {
        v = fp4x8_to_bf16(pc.bits[j].x, (int)pc.scale[j] - 127);
      } else if (fmt == KEYS_FP8 && (pc.scale[j] & 0x807FFFFFu) == 0) {
        v = fp8x8_to_bf16(make_uint2(pc.bits[j].x, pc.bits[j].y), (int)(pc.scale[j] >> 23) - 127);
      } else if (fmt == KEYS_FP8) {  // a scale that is not a power of two: decode and round
        const float s = __uint_as_float(pc.scale[j]);
        const uint32_t w[2] = {pc.bits[j].x, pc.bits[j].y};
        uint32_t o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t lo = (w[i / 2] >> (16 * (i % 2))) & 0xFFu, hi = (w[i / 2] >> (16 * (i % 2) + 8)) & 0xFFu;
          o[i] = to_bf16(fp8_decode(lo) * s) | ((uint32_t)to_bf16(fp8_decode(hi) * s) << 16);
        }
        v = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
        v = pc.bits[j];
      }
    }
    *(uint4*)(ks + key * ROW + 8 * c) = v;
  }
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *(const uint32_t*)p; }

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_indexer_score(
    const void* __restrict__ q, int q_bf16, const float* __restrict__ w, int heads,
    const uint8_t* __restrict__ keys, int fmt, long long num_pages, const int* __restrict__ block_table,
    int max_pages, const void* __restrict__ seq_ids, const void* __restrict__ visible, int seq64,
    int vis64, int split_keys, int kcap, int splits, unsigned long long* __restrict__ cand, int* __restrict__ counts) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* qs = (uint16_t*)smem;
  uint16_t* ks = qs + MAX_HEADS * ROW;
  float* ws = (float*)(ks + PAGE_ROWS * ROW);
  uint64_t* pool = (uint64_t*)(ws + MAX_HEADS);
  SelectScratch& scratch = *(SelectScratch*)(pool + split_keys);
  __shared__ int n_valid, n_out;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const long long t = blockIdx.y;
  const int s = blockIdx.x;
  const long long vis = load_id(visible, t, vis64), seq = load_id(seq_ids, t, seq64);
  const long long k0 = (long long)s * split_keys, k1 = min(k0 + split_keys, vis);
  uint64_t* out = (uint64_t*)cand + ((long long)t * splits + s) * kcap;
  if (k0 >= k1) {
    for (int i = tid; i < kcap; i += THREADS) out[i] = 0;
    if (tid == 0) counts[t * splits + s] = 0;
    return;
  }

  for (int i = tid; i < MAX_HEADS * INDEX_DIM; i += THREADS) {
    int h = i / INDEX_DIM, d = i % INDEX_DIM;
    float v = h < heads ? load_value(q, (t * heads + h) * INDEX_DIM + d, q_bf16) : 0.f;
    qs[h * ROW + d] = to_bf16(v);
  }
  for (int h = tid; h < MAX_HEADS; h += THREADS) ws[h] = h < heads ? w[t * heads + h] : 0.f;
  if (tid == 0) n_valid = 0;
  const int mtiles = (heads + 15) / 16;
  const int r = lane / 4, c2 = (lane % 4) * 2;

  // Pipeline: page i + 1's bytes and page i + 2's id are in flight while page i is scored.
  auto page_at = [&](long long base) -> int {
    return base < k1 ? block_table[seq * max_pages + base / PAGE_ROWS] : -1;
  };
  PageChunks pc;
  int page = page_at(k0);
  bool page_ok = page >= 0 && page < num_pages;
  load_page(pc, keys, fmt, page, page_ok, k0, k1, tid);
  int page_ahead = page_at(k0 + PAGE_ROWS);
  for (long long base = k0; base < k1; base += PAGE_ROWS) {
    store_page(pc, fmt, ks, tid);
    const bool tile_ok = page_ok;
    __syncthreads();
    if (base + PAGE_ROWS < k1) {
      page = page_ahead;
      page_ok = page >= 0 && page < num_pages;
      load_page(pc, keys, fmt, page, page_ok, base + PAGE_ROWS, k1, tid);
      page_ahead = page_at(base + 2 * PAGE_ROWS);
    }

    // Warp `warp` scores keys [16 warp, 16 warp + 16): two n-tiles of 8 keys, all head tiles.
    float acc[4][2][4];
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < INDEX_DIM; kk += 16) {
      uint32_t b[2][2];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const uint16_t* kr = ks + (16 * warp + 8 * n + r) * ROW + kk + c2;
        b[n][0] = ld32(kr);
        b[n][1] = ld32(kr + 8);
      }
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        if (m < mtiles) {
          const uint16_t* q0 = qs + (16 * m + r) * ROW + kk + c2;
          const uint16_t* q1 = q0 + 8 * ROW;
          uint32_t a0 = ld32(q0), a1 = ld32(q1), a2 = ld32(q0 + 8), a3 = ld32(q1 + 8);
#pragma unroll
          for (int n = 0; n < 2; ++n) mma_bf16(acc[m][n], a0, a1, a2, a3, b[n][0], b[n][1]);
        }
      }
    }
    // Fold heads: lane holds heads 16m + r and 16m + r + 8 for keys c2, c2 + 1 of each n-tile.
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float part = 0.f;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          if (m < mtiles) {
            part += ws[16 * m + r] * fmaxf(acc[m][n][c], 0.f);
            part += ws[16 * m + r + 8] * fmaxf(acc[m][n][2 + c], 0.f);
          }
        }
        part += __shfl_xor_sync(0xffffffffu, part, 4);
        part += __shfl_xor_sync(0xffffffffu, part, 8);
        part += __shfl_xor_sync(0xffffffffu, part, 16);
        long long idx = base + 16 * warp + 8 * n + c2 + c;
        if (r == 0 && tile_ok && idx < k1) pool[atomicAdd(&n_valid, 1)] = pack_candidate(part, (uint32_t)idx);
      }
    }
    __syncthreads();
  }

  const int n = n_valid;
  if (n <= kcap) {
    for (int i = tid; i < kcap; i += THREADS) out[i] = i < n ? pool[i] : 0;
    if (tid == 0) counts[t * splits + s] = n;
    return;
  }
  uint64_t thr = kth_largest([&](int i) { return pool[i]; }, n, kcap, scratch);
  if (tid == 0) n_out = 0;
  __syncthreads();
  for (int i = tid; i < n; i += THREADS) {
    if (pool[i] >= thr) out[atomicAdd(&n_out, 1)] = pool[i];
  }
  if (tid == 0) counts[t * splits + s] = kcap;
}

extern "C" __global__ void __launch_bounds__(256) dsv4_indexer_merge(
    const unsigned long long* __restrict__ cand, const int* __restrict__ counts, int splits, int kcap,
    int k, int kpow2, const int* __restrict__ block_table, int max_pages,
    const void* __restrict__ seq_ids, int seq64, int physical, int* __restrict__ out_idx,
    float* __restrict__ out_score) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint64_t* buf = (uint64_t*)smem;
  SelectScratch& scratch = *(SelectScratch*)(buf + kpow2);
  __shared__ int total, filled;
  const long long t = blockIdx.x;
  const int tid = threadIdx.x;
  const uint64_t* keys = (const uint64_t*)cand + t * splits * kcap;
  if (tid == 0) {
    int sum = 0;
    for (int s = 0; s < splits; ++s) sum += counts[t * splits + s];
    total = sum;
    filled = 0;
  }
  __syncthreads();
  const int m = min(k, total);
  if (m > 0) {
    const int n = splits * kcap;
    uint64_t thr = kth_largest([&](int i) { return keys[i]; }, n, m, scratch);
    for (int i = tid; i < n; i += blockDim.x) {
      uint64_t key = keys[i];
      if (key != 0 && key >= thr) buf[atomicAdd(&filled, 1)] = key;
    }
  }
  __syncthreads();
  for (int i = m + tid; i < kpow2; i += blockDim.x) buf[i] = 0;
  __syncthreads();
  sort_descending(buf, kpow2);
  const long long seq = load_id(seq_ids, t, seq64);
  for (int i = tid; i < k; i += blockDim.x) {
    int idx = -1;
    float score = -INFINITY;
    if (i < m) {
      uint32_t logical = candidate_index(buf[i]);
      score = candidate_score(buf[i]);
      idx = physical ? block_table[seq * max_pages + logical / PAGE_ROWS] * PAGE_ROWS + logical % PAGE_ROWS
                     : (int)logical;
    }
    out_idx[t * k + i] = idx;
    out_score[t * k + i] = score;
  }
}
