// Lightning Indexer top-k on the GPU (docs/model.md section 4), fused: the [queries x keys] score
// matrix never leaves the chip.
//
// dsv4_indexer_score: grid (splits, queries), 128 threads = 4 warps. Each block takes one query
// and one split of its visible keys, a 64-key page at a time. Pages are staged raw into shared
// memory by cp.async, three pages ahead; a staged page is decoded to bf16 (FP4 and FP8 values
// are exact in bf16; FP4 keys' dims in pairs of their own order, the query loaded alike) and
// scored with bf16 tensor-core MMAs (mma.sync m16n8k16, sm_80+, fp32 accumulation): warp w holds
// heads 16w .. 16w + 15 of the query in registers and scores all 64 keys, then heads are folded
// as sum_h w_h ReLU(.); the next page decodes while a page's heads fold (two barriers a page).
// The split's scores stay in shared memory; only its top-min(k, split) candidates (exact radix
// select) reach the workspace.
// dsv4_indexer_score_dense: the same body (one template, two instances) writing every score of
// the split to `dense` (a [T, width] float32 matrix) instead, and -inf for keys it does not score:
// `ops.indexer_scores`, whose scores are those of the selection bit for bit.
// dsv4_indexer_merge: the splits' candidates to the exact top-k, in stages of one block per
// group of lists: each keeps the top k of its group's candidates (as many as 99 KiB of shared
// memory hold beside the kept keys), until one group is left, whose block sorts them (score
// descending, lower index first on ties) and writes indices and scores.
#include "mma.cuh"
#include "quant.cuh"
#include "topk.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 128;  // 4 warps: one per 16-head tile (64 heads at most)
constexpr int ROW = INDEX_DIM + 8;  // padded bf16 row stride: conflict-free fragment loads

__device__ __forceinline__ uint16_t to_bf16(float x) { return bf16_from_f32(x); }

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
// codes a thread (fp4x8_to_bf16_paired, the tile in its paired order), two blocks a thread: in
// each quarter warp's 16-byte loads and stores (units 4 key + block and key + 4 block + step,
// mod 8) 8 threads take keys 4g .. 4g + 3, two blocks each, blocks 0-1 of the first two keys and
// 2-3 of the next two or (odd quarters) the other way round, so neither conflicts. FP8 keys and
// bf16 rows: thread tid takes chunks q = tid + 128 j (key q / 16, dims 8 (q % 16) .. + 8), so
// each quarter warp writes 8 consecutive 16-byte chunks of one row; FP8 keys decode to their
// codes' values, exact in bf16, and their float32 scale (any value: a power of two as
// index_key_write writes it, or DeepGEMM's amax / 448) multiplies the key's dot products
// afterwards, in float32. Keys at or past `valid` become zeros with scale 0. FULL (valid is 64,
// every page but a split's last or a skipped one) drops the test, so the addresses are one base
// plus constants.
template <IndexFormat FMT, bool FULL>
__device__ __forceinline__ void decode_page(const uint8_t* stage, int valid, uint16_t* ks,
                                            float* kscale, int tid) {
  if constexpr (FMT == KEYS_FP4) {
    const int flip = (tid >> 3) & 1;
    const int key0 = 4 * (tid >> 4) + ((tid & 7) >> 1);
    const int blk = ((tid & 1) | (((tid >> 2) & 1) << 1)) ^ (flip << 1);
#pragma unroll
    for (int j = 0; j < PAGE_ROWS * 4 / THREADS; ++j) {
      const int key = key0 + THREADS / 4 * j;
      const bool ok = FULL || key < valid;
      uint4 raw = make_uint4(0, 0, 0, 0);
      int e = 0;
      if (ok) {
        raw = *(const uint4*)(stage + key * INDEX_KEY_FP4.data_bytes + 16 * blk);
        e = (int)stage[PAGE_ROWS * INDEX_KEY_FP4.data_bytes + key * INDEX_KEY_FP4.scale_bytes + blk] - 127;
      }
      uint16_t* dst = ks + key * ROW + 32 * blk;
      *(uint4*)(dst) = fp4x8_to_bf16_paired(raw.x, e);
      *(uint4*)(dst + 8) = fp4x8_to_bf16_paired(raw.y, e);
      *(uint4*)(dst + 16) = fp4x8_to_bf16_paired(raw.z, e);
      *(uint4*)(dst + 24) = fp4x8_to_bf16_paired(raw.w, e);
      if (blk == 0) kscale[key] = ok ? 1.f : 0.f;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < PAGE_ROWS * 16 / THREADS; ++j) {
    const int key = tid / 16 + THREADS / 16 * j, c = tid % 16;  // chunk tid + 128 j
    uint4 v = make_uint4(0, 0, 0, 0);
    float sc = 0.f;
    if (FULL || key < valid) {
      sc = 1.f;
      if (FMT == KEYS_FP8) {
        uint2 bits = *(const uint2*)(stage + key * INDEX_KEY_FP8.data_bytes + 8 * c);
        sc = *(const float*)(stage + PAGE_ROWS * INDEX_KEY_FP8.data_bytes + key * INDEX_KEY_FP8.scale_bytes);
        v = fp8x8_to_bf16<true>(bits, 0);
      } else {
        v = *(const uint4*)(stage + key * INDEX_DIM * 2 + 16 * c);
      }
    }
    *(uint4*)(ks + key * ROW + 8 * c) = v;
    if (c == 0) kscale[key] = sc;
  }
}

// The score kernel's body: DENSE writes the scores to `dense` (the selection's arguments unused),
// else the split's candidates to `cand` (`dense` unused). One body, instantiated twice, so the two
// compute every score with the same code, while the selection's instance carries none of the
// dense writes.
template <bool DENSE, IndexFormat FMT>
__device__ __forceinline__ void score_split(
    const void* __restrict__ q, int q_bf16, const float* __restrict__ w, int heads,
    const uint8_t* __restrict__ keys, long long num_pages, const int* __restrict__ block_table,
    int max_pages, const void* __restrict__ seq_ids, const void* __restrict__ visible, int seq64,
    int vis64, int split_keys, int kcap, int splits, unsigned long long* __restrict__ cand, int* __restrict__ counts,
    float* __restrict__ dense, long long width) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* ks = (uint16_t*)smem;                                  // [64][ROW] bf16 keys
  float* red = (float*)(ks + PAGE_ROWS * ROW);                      // [4 warps][64] partial scores
  float* kscale = red + 4 * PAGE_ROWS;                              // [2][64] the keys' scales (pages alternate)
  float* pool = kscale + 2 * PAGE_ROWS;                              // [split_keys] scores (none if dense)
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
        qa[kk][i] = (uint32_t)to_bf16(x0) | ((uint32_t)to_bf16(x1) << 16);
      }
    }
    if (h_lo < heads) wlo = w[t * heads + h_lo];
    if (h_hi < heads) whi = w[t * heads + h_hi];
  }

  constexpr int bytes = page_bytes_of(FMT);
  const int n_pages = (int)((k1 - k0 + PAGE_ROWS - 1) / PAGE_ROWS);
  auto page_of = [&](int i) -> int { return block_table[seq * max_pages + k0 / PAGE_ROWS + i]; };
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
  auto decode = [&](int i) {
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
  };
  cp_async_wait<STAGES - 2>();
  __syncthreads();  // page 0 staged by every thread
  decode(0);
  cp_async_commit();
  __syncthreads();

  // Two barriers a page: after page i's products (the tile is free and page i + 1 staged), the
  // tile takes page i + 1 while this warp folds page i's heads; after both, page i's scores are
  // summed over the warps (and page i + 1's products follow). The keys' scales alternate between
  // two arrays, as page i + 1's are written before page i's scores read theirs.
  for (int i = 0; i < n_pages; ++i) {
    // This warp's 16 heads x the page's 64 keys: 8 n-tiles of 8 keys, 8 k-steps. One ldmatrix
    // gives the B fragments of two n-tiles (lanes 8i .. 8i + 7 address matrix i: keys 16 np +
    // 8 (i / 2) .., dims 16 kk + 8 (i % 2) ..).
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[n][k] = 0.f;
    if (active) {
      const uint16_t* kb = ks + (8 * (lane / 16) + lane % 8) * ROW + 8 * ((lane / 8) % 2);
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, kb + 16 * np * ROW + 16 * kk);
          mma_bf16(acc[2 * np], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
          mma_bf16(acc[2 * np + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
        }
      }
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // every warp is done with the tile; page i + 1 staged by every thread
    if (i + 1 < n_pages) decode(i + 1);
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
    const int valid = valid_of(i);
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
  for (int base = 0; base < n; base += THREADS) {
    const int i = base + tid;
    const uint64_t c = i < n ? key(i) : 0;
    append_key(out, &n_out, c >= thr, c);
  }
  if (tid == 0) counts[t * splits + s] = min(candidates, kcap);
}

}  // namespace

#define SCORE_PARAMS                                                                                                \
  const void *__restrict__ q, int q_bf16, const float *__restrict__ w, int heads, const uint8_t *__restrict__ keys, \
      IndexFormat fmt, long long num_pages, const int *__restrict__ block_table, int max_pages,                     \
      const void *__restrict__ seq_ids, const void *__restrict__ visible, int seq64, int vis64, int split_keys,     \
      int kcap, int splits, unsigned long long *__restrict__ cand, int *__restrict__ counts,                        \
      float *__restrict__ dense, long long width
#define SCORE_ARGS \
  q, q_bf16, w, heads, keys, num_pages, block_table, max_pages, seq_ids, visible, seq64, vis64, split_keys, kcap, \
      splits, cand, counts, dense, width

// The key format is a template parameter of the body (a branch per format, each with its page
// size as a constant), chosen here; other values of fmt score nothing.
#define SCORE_BY_FORMAT(DENSE)                                            \
  switch (fmt) {                                                          \
    case KEYS_FP4: score_split<DENSE, KEYS_FP4>(SCORE_ARGS); break;       \
    case KEYS_FP8: score_split<DENSE, KEYS_FP8>(SCORE_ARGS); break;       \
    case KEYS_BF16: score_split<DENSE, KEYS_BF16>(SCORE_ARGS); break;     \
  }

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_indexer_score(SCORE_PARAMS) { SCORE_BY_FORMAT(false) }

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_indexer_score_dense(SCORE_PARAMS) { SCORE_BY_FORMAT(true) }
#undef SCORE_BY_FORMAT

// One merge stage, one block per (group, query): the candidates of lists g * group .. g * group +
// group - 1 of query t (list l holds counts[l] keys at cand + l * cap; [T, lists, cap] and
// [T, lists]) are gathered into shared memory, and their top min(k, n) kept. A middle stage
// (final = 0) writes those, unordered, to out_cand [T, groups, k] and out_counts [T, groups];
// the final stage (one group) sorts them (score descending, lower index first on ties) and
// writes ids (logical, or physical through the block table) and scores, -1 / -inf past them.
// Shared memory: group * cap + kpow2 keys and the select scratch.
extern "C" __global__ void __launch_bounds__(1024) dsv4_indexer_merge(
    const unsigned long long* __restrict__ cand, const int* __restrict__ counts, int lists, int cap, int group,
    int k, int kpow2, int final_stage, unsigned long long* __restrict__ out_cand, int* __restrict__ out_counts,
    const int* __restrict__ block_table, int max_pages, const void* __restrict__ seq_ids, int seq64, int physical,
    int* __restrict__ out_idx, float* __restrict__ out_score) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, g = blockIdx.x, groups = gridDim.x;
  const long long t = blockIdx.y;
  const int l0 = g * group, slots = min(group, lists - l0) * cap;
  uint64_t* buf = (uint64_t*)smem;  // [group * cap] the group's candidates
  uint64_t* sel = buf + group * cap;  // [kpow2] the kept ones
  SelectScratch& scratch = *(SelectScratch*)(sel + kpow2);
  __shared__ int filled, chosen;
  if (tid == 0) filled = chosen = 0;
  __syncthreads();
  const uint64_t* src = (const uint64_t*)cand + (t * lists + l0) * cap;
  const int* cnt = counts + t * lists + l0;
  for (int base = 0; base < slots; base += blockDim.x) {
    const int i = base + tid;
    const bool ok = i < slots && i % cap < cnt[i / cap];
    append_key(buf, &filled, ok, ok ? src[i] : 0);
  }
  __syncthreads();
  const int n = filled, m = min(k, n);
  if (n > m) {
    const uint64_t thr = top_threshold([&](int i) { return buf[i]; }, n, m, scratch);
    for (int base = 0; base < n; base += blockDim.x) {
      const int i = base + tid;
      const uint64_t key = i < n ? buf[i] : 0;
      append_key(sel, &chosen, i < n && key >= thr, key);
    }
  } else {
    for (int i = tid; i < n; i += blockDim.x) sel[i] = buf[i];
  }
  __syncthreads();
  if (!final_stage) {
    uint64_t* dst = (uint64_t*)out_cand + (t * groups + g) * k;
    for (int i = tid; i < m; i += blockDim.x) dst[i] = sel[i];
    if (tid == 0) out_counts[t * groups + g] = m;
    return;
  }
  for (int i = m + tid; i < kpow2; i += blockDim.x) sel[i] = 0;
  __syncthreads();
  sort_descending(sel, kpow2);
  const long long seq = load_id(seq_ids, t, seq64);
  for (int i = tid; i < k; i += blockDim.x) {
    int idx = -1;
    float score = -INFINITY;
    if (i < m) {
      uint32_t logical = candidate_index(sel[i]);
      score = candidate_score(sel[i]);
      idx = physical ? block_table[seq * max_pages + logical / PAGE_ROWS] * PAGE_ROWS + logical % PAGE_ROWS
                     : (int)logical;
    }
    out_idx[t * k + i] = idx;
    out_score[t * k + i] = score;
  }
}
