// Lightning Indexer top-k on the GPU (docs/model.md section 4), fused: the [queries x keys] score
// matrix never leaves the chip.
//
// dsv4_indexer_score: grid (splits, queries), 128 threads = 4 warps. Each block takes one query
// and one split of its visible keys, a 64-key page at a time. Pages are staged raw into shared
// memory by cp.async, three pages ahead; a staged page is decoded to bf16 (FP4 and FP8 values
// are exact in bf16; FP4 keys' dims in pairs of their own order, the query loaded alike) into a
// tile of 8 x 8 core matrices and scored with bf16 tensor-core MMAs (fp32 accumulation): warp w
// holds heads 16w .. 16w + 15 of the query in registers and scores all 64 keys (mma.sync
// m16n8k16 here, sm_80+; on sm_90a cuda/indexer_sm90a.cu's instances take the four warps' products
// as one warpgroup MMA, the same body otherwise: cuda/include/indexer_score.cuh), then heads are
// folded as sum_h w_h ReLU(.); the next page decodes while a page's heads fold (two barriers a
// page).
// The split's scores stay in shared memory; only its top-min(k, split) candidates (exact radix
// select) reach the workspace.
// dsv4_indexer_score_dense: the same body (one template, two instances) writing every score of
// the split to `dense` (a [T, width] float32 matrix) instead, and -inf for keys it does not score:
// `ops.indexer_scores`, whose scores are those of the selection bit for bit.
// dsv4_indexer_merge: the splits' candidates to the exact top-k, in stages of one block per
// group of lists: each keeps the top k of its group's candidates (as many as 99 KiB of shared
// memory hold beside the kept keys), until one group is left, whose block sorts them (score
// descending, lower index first on ties) and writes indices and scores. The first stage drops
// the candidates below a floor under the query's k-th largest key, found from the splits' peaks
// (the largest key each warp of a split saw): with many short splits (few queries, long context)
// most candidates fall below it, and the stages select among far fewer.
#include "grid.cuh"
#include "indexer_score.cuh"

using namespace dsv4;

// Radix passes of the floor from the peaks: two passes fix a key's top 16 bits (its score's sign,
// exponent and 7 mantissa bits), so the floor is within 2^-7 of the k-th peak's score, and
// stopping there spares the passes that would find the peak itself.
constexpr int FLOOR_PASSES = 2;

// The mma.sync score kernels (cuda/indexer_sm90a.cu holds the wgmma ones).
extern "C" __global__ void __launch_bounds__(indexer::THREADS, indexer::MIN_BLOCKS)
    dsv4_indexer_score(DSV4_INDEXER_SCORE_PARAMS) {
  dsv4::grid_begin();
  DSV4_INDEXER_SCORE_BY_FORMAT(false, false)
}

extern "C" __global__ void __launch_bounds__(indexer::THREADS, indexer::MIN_BLOCKS)
    dsv4_indexer_score_dense(DSV4_INDEXER_SCORE_PARAMS) {
  dsv4::grid_begin();
  DSV4_INDEXER_SCORE_BY_FORMAT(true, false)
}

// One merge stage, one block per (group, query): the candidates of lists g * group .. g * group +
// group - 1 of query t (list l holds counts[l] keys at cand + l * cap; [T, lists, cap] and
// [T, lists]) are gathered into shared memory, and their top min(k, n) kept. A middle stage
// (final = 0) writes those, unordered, to out_cand [T, groups, k] and out_counts [T, groups];
// the final stage (one group) sorts them (score descending, lower index first on ties) and
// writes ids (logical, or physical through the block table) and scores, -1 / -inf past them.
// With npeaks > 0 (the first stage; k <= npeaks <= group * cap) the npeaks keys at
// peaks + t * npeaks are maxima of disjoint sets of the query's keys, so the k-th largest of them
// is at most the query's k-th largest key: a candidate below a floor under it (`cut`, from
// FLOOR_PASSES radix passes over the peaks) is not in the top k, and is not gathered. The output
// is the same; the selects see fewer keys.
// Shared memory: group * cap + kpow2 keys and the select scratch.
extern "C" __global__ void __launch_bounds__(1024) dsv4_indexer_merge(
    const unsigned long long* __restrict__ cand, const int* __restrict__ counts, int lists, int cap, int group,
    int k, int kpow2, int final_stage, unsigned long long* __restrict__ out_cand, int* __restrict__ out_counts,
    const int* __restrict__ block_table, int max_pages, const void* __restrict__ seq_ids, int seq64, int physical,
    int* __restrict__ out_idx, float* __restrict__ out_score, const unsigned long long* __restrict__ peaks,
    int npeaks) {
  dsv4::grid_begin();
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
  uint64_t cut = 0;  // every candidate is at or above 0
  if (npeaks > 0) {
    // The peaks go through buf, which the candidates overwrite after the select's last barrier.
    const uint64_t* pk = (const uint64_t*)peaks + t * npeaks;
    for (int i = tid; i < npeaks; i += blockDim.x) buf[i] = pk[i];
    __syncthreads();
    cut = top_threshold([&](int i) { return buf[i]; }, npeaks, k, scratch, FLOOR_PASSES);
  }
  const uint64_t* src = (const uint64_t*)cand + (t * lists + l0) * cap;
  const int* cnt = counts + t * lists + l0;
  for (int base = 0; base < slots; base += blockDim.x) {
    const int i = base + tid;
    const bool listed = i < slots && i % cap < cnt[i / cap];
    const uint64_t key = listed ? src[i] : 0;
    append_key(buf, &filled, listed && key >= cut, key);
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
