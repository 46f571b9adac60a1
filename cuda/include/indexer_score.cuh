// The Lightning Indexer's score kernel body (cuda/indexer.cu describes the kernels): one template
// instantiated with mma.sync by cuda/indexer.cu (sm_80+) and with wgmma by cuda/indexer_sm90a.cu
// (sm_90a); the kernels themselves are declared in those files.
#pragma once
#include "mma.cuh"
#include "quant.cuh"
#include "topk.cuh"
#include "wgmma.cuh"

namespace dsv4 {
namespace indexer {

constexpr int THREADS = 128;  // 4 warps (one warpgroup): one per 16-head tile (64 heads at most)
// Peaks a split writes for the merge's floor, one a half warp (the launcher's PEAKS_PER_SPLIT).
constexpr int PEAKS = THREADS / 16;
constexpr int MAX_SPLIT_PAGES = 64;  // a split takes at most 4096 keys (the launcher's MAX_SPLIT_KEYS)
// Blocks a multiprocessor runs at once (what the registers, at most 128 a thread, allow; the
// shared memory of an FP4 split of 4096 keys allows 4 too): the page pipelines of four blocks
// together keep enough bytes in flight.
constexpr int MIN_BLOCKS = 4;

// The bf16 key tile of a page (64 keys x 128 dims) in 8 x 8 core matrices of 128 bytes (8 keys,
// 16 bytes of dims each): chunk c of dims 8c .. 8c + 7 is 1024 bytes (8 key groups) from chunk
// c - 1, key group g 128 bytes from group g - 1. That is the no-swizzle K-major layout of wgmma's
// B operand (LBO 1024, SBO 128), and ldmatrix reads each 8 x 8 matrix as 128 contiguous bytes:
// neither conflicts in shared memory.
__device__ __forceinline__ int tile_offset(int key, int dim) {
  return (dim / 8) * (8 * PAGE_ROWS) + (key / 8) * 64 + (key % 8) * 8 + dim % 8;
}

// Two values rounded to bfloat16 (to nearest even) and packed, lo in the low half: one
// conversion instruction (sm_80+). The same bits as bf16_from_f32 for every value but NaN, which
// becomes another NaN; a NaN query gives NaN products either way, and the fold's ReLU maps them
// to 0, so no score differs.
__device__ __forceinline__ uint32_t bf16x2_rn(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Raw pages are staged in shared memory by cp.async, STAGES - 1 pages ahead of the one being
// scored, so enough bytes are in flight to cover memory latency.
constexpr int STAGES = 4;

__host__ __device__ constexpr int page_bytes_of(IndexFormat fmt) {
  return fmt == KEYS_FP4 ? (int)INDEX_KEY_FP4.page_bytes()
                         : fmt == KEYS_FP8 ? (int)INDEX_KEY_FP8.page_bytes() : PAGE_ROWS * INDEX_DIM * 2;
}

// Starts copying page `page` (all its bytes, contiguous in the cache) into `stage`.
template <IndexFormat FMT>
__device__ __forceinline__ void stage_page(uint8_t* stage, const uint8_t* __restrict__ cache, int page, int tid) {
  constexpr int bytes = page_bytes_of(FMT);
  const uint8_t* src = cache + (long long)page * bytes;
  for (int off = 16 * tid; off < bytes; off += 16 * THREADS) cp_async16(stage + off, src + off);
}

// Decodes a staged page into the shared key tile as bf16 and the keys' scales into `kscale`.
// FP4 keys decode exactly with their power-of-two block scales (scale 1), a whole block of 32
// codes (16 bytes) a unit (fp4x8_to_bf16_paired, the tile in its paired order), two units a
// thread: quarter warp q's 8 threads take keys 8g .. 8g + 7 (g = q % 4, then g + 4), one each,
// and key 8g + i its block (i / 2 + q / 4) % 4, so the 16-byte loads meet 8 distinct bank groups
// (key parity and block differ) and so do the stores (8 keys of one chunk). FP8 keys and bf16
// rows: 8 units of 8 dims (a chunk) a thread: half warp h's thread i takes chunk (i + h) % 16 of
// keys i % 8, 8 + i % 8, .., so a half warp loads 16 distinct chunks (distinct banks: 8-byte FP8
// loads, 16-byte bf16 ones by quarter warp) and a quarter warp stores 8 keys. A thread's units
// lie a constant apart, in the stage and in the tile. FP8 keys decode to their codes' values,
// exact in bf16, and their float32 scale (any value: a power of two as index_key_write writes it,
// or DeepGEMM's amax / 448) multiplies the key's dot products afterwards, in float32. Keys at or
// past `valid` become zeros with scale 0. FULL (valid is 64, every page but a split's last or a
// skipped one) drops the test. The tile's writers fence it for the async proxy (wgmma reads it
// after the next barrier).
template <IndexFormat FMT, bool FULL>
__device__ __forceinline__ void decode_page(const uint8_t* stage, int valid, uint16_t* ks,
                                            float* kscale, int tid) {
  if constexpr (FMT == KEYS_FP4) {
    const int i = tid % 8, q = tid / 8, blk = (i / 2 + q / 4) % 4;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int key = 8 * (q % 4 + 4 * j) + i;
      const bool ok = FULL || key < valid;
      uint4 raw = make_uint4(0, 0, 0, 0);
      int e = 0;
      if (ok) {
        raw = *(const uint4*)(stage + key * INDEX_KEY_FP4.data_bytes + 16 * blk);
        e = (int)stage[PAGE_ROWS * INDEX_KEY_FP4.data_bytes + key * INDEX_KEY_FP4.scale_bytes + blk] - 127;
      }
      uint16_t* dst = ks + tile_offset(key, 32 * blk);
      *(uint4*)(dst) = fp4x8_to_bf16_paired(raw.x, e);
      *(uint4*)(dst + 8 * PAGE_ROWS) = fp4x8_to_bf16_paired(raw.y, e);
      *(uint4*)(dst + 16 * PAGE_ROWS) = fp4x8_to_bf16_paired(raw.z, e);
      *(uint4*)(dst + 24 * PAGE_ROWS) = fp4x8_to_bf16_paired(raw.w, e);
      if (blk == 0) kscale[key] = ok ? 1.f : 0.f;
    }
  } else {
    const int i = tid % 16, c = (i + tid / 16) % 16;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int key = 8 * j + i % 8;
      const bool ok = FULL || key < valid;
      uint4 v = make_uint4(0, 0, 0, 0);
      float sc = 0.f;
      if (ok) {
        if (FMT == KEYS_FP8) {
          v = fp8x8_to_bf16<true>(*(const uint2*)(stage + key * INDEX_KEY_FP8.data_bytes + 8 * c), 0);
          sc = *(const float*)(stage + PAGE_ROWS * INDEX_KEY_FP8.data_bytes + key * INDEX_KEY_FP8.scale_bytes);
        } else {
          v = *(const uint4*)(stage + key * INDEX_DIM * 2 + 16 * c);
          sc = 1.f;
        }
      }
      *(uint4*)(ks + tile_offset(key, 8 * c)) = v;
      if (c == 0) kscale[key] = sc;
    }
  }
  fence_async_shared();
}

// The score kernel's body: DENSE writes the scores to `dense` (the selection's arguments unused),
// else the split's candidates to `cand` (`dense` unused). One body, instantiated twice per MMA
// kind, so the two compute every score with the same code, while the selection's instance carries
// none of the dense writes. WG takes the products with one warpgroup MMA (wgmma, sm_90a) a k-step
// where the other instance takes 8 mma.sync and 4 ldmatrix a warp; both sum each product over
// the dims in float32, not necessarily in the same order.
template <bool DENSE, IndexFormat FMT, bool WG>
__device__ __forceinline__ void score_split(
    const void* __restrict__ q, int q_bf16, const float* __restrict__ w, int heads,
    const uint8_t* __restrict__ keys, long long num_pages, const int* __restrict__ block_table,
    int max_pages, const void* __restrict__ seq_ids, const void* __restrict__ visible, int seq64,
    int vis64, int split_keys, int kcap, int splits, unsigned long long* __restrict__ cand, int* __restrict__ counts,
    unsigned long long* __restrict__ peaks, float* __restrict__ dense, long long width) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* ks = (uint16_t*)smem;                                  // [64 x 128] bf16 keys (tile_offset)
  float* red = (float*)(ks + PAGE_ROWS * INDEX_DIM);                // [4 warps][64] partial scores
  float* kscale = red + 4 * PAGE_ROWS;                              // [2][64] the keys' scales (pages alternate)
  int* split_pages = (int*)(kscale + 2 * PAGE_ROWS);                // [64] the split's block-table entries
  float* pool = (float*)(split_pages + MAX_SPLIT_PAGES);             // [split_keys] scores (none if dense)
  SelectScratch& scratch = *(SelectScratch*)(pool + (DENSE ? 0 : split_keys));
  uint8_t* stages = (uint8_t*)(&scratch + 1);                       // [STAGES][page bytes]
  __shared__ uint64_t skipped;  // bit i: page i of the split lies outside the cache (at most 64 pages)
  __shared__ int n_out;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const long long t = blockIdx.y;
  const int s = blockIdx.x;
  // Keys past the block table (or, dense, past the row) are not scored.
  long long vis = min(load_id(visible, t, vis64), (long long)max_pages * PAGE_ROWS);
  if (DENSE) vis = min(vis, width);
  const long long seq = load_id(seq_ids, t, seq64);
  const long long k0 = (long long)s * split_keys, k1 = min(k0 + split_keys, vis);
  uint64_t* out = (uint64_t*)cand + ((long long)t * splits + s) * kcap;  // kcap = 0 when dense
  float* row = dense + t * width;                                        // width = 0 unless dense
  if (DENSE) {
    for (long long i = max(k0, k1) + tid; i < min(k0 + split_keys, width); i += THREADS) row[i] = -INFINITY;
  }
  if (k0 >= k1) {
    if (tid == 0 && !DENSE) counts[t * splits + s] = 0;
    if (tid < PEAKS && !DENSE && peaks) peaks[((long long)t * splits + s) * PEAKS + tid] = 0;  // no key: below every one
    return;
  }
  if (tid == 0) skipped = 0;

  // Warp w owns heads 16 w .. 16 w + 15: its query fragments (bf16) and head weights stay in
  // registers for the whole split, and it scores every key of a page against them. Tile column
  // d holds dim d, or for FP4 keys dim fp4_paired_code(d): the query is loaded in that order.
  const int r = lane / 4, c2 = (lane % 4) * 2;
  const bool active = 16 * warp < heads;
  uint32_t qa[8][4];
  float wlo = 0.f, whi = 0.f;
  {
    const int h_lo = 16 * warp + r, h_hi = h_lo + 8;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i % 2 ? h_hi : h_lo, d = 16 * kk + c2 + 8 * (i / 2);
        const int d0 = FMT == KEYS_FP4 ? fp4_paired_code(d) : d, d1 = FMT == KEYS_FP4 ? fp4_paired_code(d + 1) : d + 1;
        float x0 = 0.f, x1 = 0.f;
        if (h < heads) {
          x0 = load_value(q, (t * heads + h) * INDEX_DIM + d0, q_bf16);
          x1 = load_value(q, (t * heads + h) * INDEX_DIM + d1, q_bf16);
        }
        qa[kk][i] = bf16x2_rn(x0, x1);
      }
    }
    if (h_lo < heads) wlo = w[t * heads + h_lo];
    if (h_hi < heads) whi = w[t * heads + h_hi];
  }

  // The split's block-table entries, read once into shared memory: a page's entry is then a
  // shared load away when its decode and its staging need it.
  constexpr int bytes = page_bytes_of(FMT);
  const int n_pages = (int)((k1 - k0 + PAGE_ROWS - 1) / PAGE_ROWS);
  for (int i = tid; i < n_pages; i += THREADS) split_pages[i] = block_table[seq * max_pages + k0 / PAGE_ROWS + i];
  __syncthreads();
  auto page_of = [&](int i) -> int { return split_pages[i]; };
  auto page_ok = [&](int page) { return page >= 0 && page < num_pages; };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < n_pages) {
      int page = page_of(i);
      if (page_ok(page)) stage_page<FMT>(stages + i * bytes, keys, page, tid);
    }
    cp_async_commit();
  }

  // Page i's keys in the split and how many of them are scored (none when the page lies outside
  // the cache).
  auto in_split_of = [&](int i) { return (int)min((long long)PAGE_ROWS, k1 - k0 - (long long)i * PAGE_ROWS); };
  auto valid_of = [&](int i) { return page_ok(page_of(i)) ? in_split_of(i) : 0; };
  // Decodes page i (staged in its slot) into the tile and its keys' scales into kscale[i % 2],
  // then stages page i + STAGES - 1 into the slot of page i - 1, decoded a barrier before.
  auto decode = [&](int i) -> int {
    const int valid = valid_of(i);
    if (!DENSE && tid == 0 && valid == 0) skipped |= 1ull << i;
    float* sc = kscale + (i % 2) * PAGE_ROWS;
    if (valid == PAGE_ROWS)
      decode_page<FMT, true>(stages + (i % STAGES) * bytes, valid, ks, sc, tid);
    else
      decode_page<FMT, false>(stages + (i % STAGES) * bytes, valid, ks, sc, tid);
    if (i + STAGES - 1 < n_pages) {
      int next = page_of(i + STAGES - 1);
      if (page_ok(next)) stage_page<FMT>(stages + ((i + STAGES - 1) % STAGES) * bytes, keys, next, tid);
    }
    return valid;
  };
  cp_async_wait<STAGES - 2>();
  __syncthreads();  // page 0 staged by every thread
  int valid = decode(0);  // of the page in the tile
  cp_async_commit();
  __syncthreads();

  // Two barriers a page: after page i's products (the tile is free and page i + 1 staged), the
  // tile takes page i + 1 while this warp folds page i's heads; after both, page i's scores are
  // summed over the warps (and page i + 1's products follow). The keys' scales alternate between
  // two arrays, as page i + 1's are written before page i's scores read theirs.
  for (int i = 0; i < n_pages; ++i) {
    // This warp's 16 heads x the page's 64 keys: 8 n-tiles of 8 keys, 8 k-steps.
    float acc[8][4];
    if constexpr (WG) {
      // The warpgroup's 64 heads at once (a warp past the heads multiplies zeros): k-step kk's
      // slice of the tile starts 2 chunks (2048 bytes) after kk - 1's.
      const Desc kd = smem_desc(ks, 8 * PAGE_ROWS * 2, 128);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        if (kk == 0)
          wgmma_m64n64k16_rs<false>(acc, qa[kk], kd);
        else
          wgmma_m64n64k16_rs<true>(acc, qa[kk], kd + kk * (2 * 8 * PAGE_ROWS * 2 / 16));
      }
      wgmma_commit();
      wgmma_wait_all();
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int k = 0; k < 4; ++k) wgmma_pin(acc[n][k]);
    } else {
      // One ldmatrix gives the B fragments of two n-tiles (lanes 8i .. 8i + 7 address matrix i:
      // keys 16 np + 8 (i / 2) + lane % 8, dims 16 kk + 8 (i % 2) ..).
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[n][k] = 0.f;
      if (active) {
        const uint16_t* kb = ks + tile_offset(8 * (lane / 16) + lane % 8, 8 * ((lane / 8) % 2));
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, kb + tile_offset(16 * np, 16 * kk));
            mma_bf16(acc[2 * np], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
            mma_bf16(acc[2 * np + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
          }
        }
      }
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // every warp is done with the tile; page i + 1 staged by every thread
    const int valid_next = i + 1 < n_pages ? decode(i + 1) : 0;
    cp_async_commit();

    // Fold this warp's heads: v = w_h ReLU(dot) over the lane's two heads for each of its 16 keys
    // (8 n-tiles x 2 columns), then the sum over the 8 lanes of a column group (lanes r = 0..7 of
    // one c2) by halving exchanges: a lane keeps half its keys and adds its partner's half (lane
    // bits 4, 3, 2: n-tiles 4 apart, 2, 1), 14 shuffles where a full butterfly per key takes 48.
    // Lane (r, c2) ends with keys 8 r + c2 and 8 r + c2 + 1. The key's scale multiplies the sum
    // of the four warps (1 for FP4 and bf16 keys; FP8 scales are positive: ReLU commutes).
    float v[8][2];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) v[n][c] = wlo * fmaxf(acc[n][c], 0.f) + whi * fmaxf(acc[n][2 + c], 0.f);
#pragma unroll
    for (int bit = 16, half = 4; bit >= 4; bit /= 2, half /= 2) {
      const bool upper = lane & bit;
#pragma unroll
      for (int n = 0; n < half; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float send = upper ? v[n][c] : v[n + half][c], keep = upper ? v[n + half][c] : v[n][c];
          v[n][c] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
        }
    }
    *(float2*)(red + warp * PAGE_ROWS + 8 * r + c2) = make_float2(v[0][0], v[0][1]);
    __syncthreads();  // page i's partial scores are in; the tile holds page i + 1
    const long long base = k0 + (long long)i * PAGE_ROWS;
    if (tid < valid) {
      const float score = kscale[(i % 2) * PAGE_ROWS + tid] *
                          (((red[tid] + red[PAGE_ROWS + tid]) + red[2 * PAGE_ROWS + tid]) + red[3 * PAGE_ROWS + tid]);
      if (DENSE) {
        row[base + tid] = score;
      } else {
        pool[base - k0 + tid] = score;
      }
    } else if (DENSE && tid < in_split_of(i)) {
      row[base + tid] = -INFINITY;  // a page outside the cache is skipped
    }
    valid = valid_next;
  }
  cp_async_wait<0>();
  __syncthreads();
  if (DENSE) return;

  // The split's candidates (unordered) and their count: the merge reads only that many. The pool
  // holds a score at each key's place in the split; a key of a skipped page is no candidate
  // (key 0, below every candidate).
  const int n = (int)(k1 - k0);
  const uint64_t skip = skipped;
  int candidates = n;
  for (int p = 0; p < n_pages; ++p)
    if (skip >> p & 1) candidates -= min(PAGE_ROWS, n - p * PAGE_ROWS);
  auto key = [&](int i) -> uint64_t {
    return skip >> (i / PAGE_ROWS) & 1 ? 0 : pack_candidate(pool[i], (uint32_t)(k0 + i));
  };
  const uint64_t thr = candidates <= kcap ? 1 : top_threshold(key, n, kcap, scratch);
  if (tid == 0) n_out = 0;
  __syncthreads();
  uint64_t peak = 0;
  for (int base = 0; base < n; base += THREADS) {
    const int i = base + tid;
    const uint64_t c = i < n ? key(i) : 0;
    append_key(out, &n_out, c >= thr, c);
    peak = max(peak, c);
  }
  if (tid == 0) counts[t * splits + s] = min(candidates, kcap);
  // A half warp's peak: the largest key of the split's slots its lanes went through (whether
  // kept or not; 0 if none). The first merge stage takes the query's peaks for a floor under its
  // k-th key (cuda/indexer.cu); where it takes none the launcher passes no `peaks`.
  if (!peaks) return;
#pragma unroll
  for (int off = 8; off > 0; off /= 2) {
    peak = max(peak, (uint64_t)__shfl_xor_sync(0xffffffffu, (unsigned long long)peak, off));
  }
  if (lane % 16 == 0) peaks[((long long)t * splits + s) * PEAKS + tid / 16] = peak;
}

}  // namespace indexer
}  // namespace dsv4

// The score kernels' parameters (one list for every instance; the launcher passes them in order).
#define DSV4_INDEXER_SCORE_PARAMS                                                                                   \
  const void *__restrict__ q, int q_bf16, const float *__restrict__ w, int heads, const uint8_t *__restrict__ keys, \
      IndexFormat fmt, long long num_pages, const int *__restrict__ block_table, int max_pages,                     \
      const void *__restrict__ seq_ids, const void *__restrict__ visible, int seq64, int vis64, int split_keys,     \
      int kcap, int splits, unsigned long long *__restrict__ cand, int *__restrict__ counts,                        \
      unsigned long long *__restrict__ peaks, float *__restrict__ dense, long long width
#define DSV4_INDEXER_SCORE_ARGS \
  q, q_bf16, w, heads, keys, num_pages, block_table, max_pages, seq_ids, visible, seq64, vis64, split_keys, kcap, \
      splits, cand, counts, peaks, dense, width

// The body of a score kernel: the selection's (DENSE false) or the dense scores' with the MMA
// kind WG. The key format is a template parameter of the body (a branch per format, each with
// its page size as a constant), chosen here; other values of fmt score nothing.
#define DSV4_INDEXER_SCORE_BY_FORMAT(DENSE, WG)                                                                   \
  switch (fmt) {                                                                                                  \
    case KEYS_FP4: dsv4::indexer::score_split<DENSE, KEYS_FP4, WG>(DSV4_INDEXER_SCORE_ARGS); break;               \
    case KEYS_FP8: dsv4::indexer::score_split<DENSE, KEYS_FP8, WG>(DSV4_INDEXER_SCORE_ARGS); break;               \
    case KEYS_BF16: dsv4::indexer::score_split<DENSE, KEYS_BF16, WG>(DSV4_INDEXER_SCORE_ARGS); break;             \
  }
