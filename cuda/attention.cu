// Sparse attention with sink over paged KV entries (docs/model.md section 2), decode and prefill.
//
// Every query t has its own candidate list: the first counts[t] rows of list A into cache A (e.g.
// its top-k compressed entries) followed by those of list B into cache B (its sliding window), as
// physical row ids; -1 and ids outside a cache are masked. K = V = the 512-d entry. One softmax
// over all candidates plus the per-head sink:
//   out_h = sum_j exp(z_hj) e_j / (sum_j exp(z_hj) + exp(sink_h)),  z_hj = scale * q_h . e_j
//
// dsv4_sparse_attention: grid (splits, head blocks, queries), 256 threads = 8 warps. A block
// takes 64 heads of one query (all of them for V4-Flash) and one split of its candidate list,
// 32 candidates at a time: raw rows are staged by cp.async two tiles ahead, dequantized (FP8
// entries or BF16 rows) into shared memory as bf16, and bf16 tensor-core MMAs (mma.sync
// m16n8k16 with ldmatrix operands, sm_80+, fp32 accumulation) compute S = Q K^T and O += P V
// with an online softmax (FlashAttention-2 style). Warp w owns head tile w / 2 (16 heads) and
// output dims [256 (w % 2), +256); the two warps of a head tile add their partial scores through
// shared memory. With one split the block writes the final output; otherwise it writes
// (O, row max, row sum) partials that dsv4_attention_combine folds together.
#include "attention.cuh"
#include "grid.cuh"

namespace {

constexpr int HEAD_TILES = 4;                    // 16 heads each
constexpr int SLICES = 2;                        // output dims split between the warps of a head tile
constexpr int SLICE = ENTRY_DIM / SLICES;        // 256 dims
constexpr int HEADS_PER_BLOCK = 16 * HEAD_TILES; // 64
constexpr int TILE = 32;              // candidates per tile
constexpr int SP_ROW = TILE + 8;      // padded row of partial scores: conflict-free float2 access
constexpr int STAGES = 3;

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1) dsv4_sparse_attention(const Params p) {
  dsv4::grid_begin();
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* qs = (uint16_t*)smem;                                 // [64 heads][KROW] bf16 queries
  uint16_t* ks = qs + HEADS_PER_BLOCK * KROW;                      // [TILE][KROW] bf16 rows
  float* sp = (float*)(ks + TILE * KROW);                          // [4][2][16][SP_ROW] partial scores
  uint8_t* stages = (uint8_t*)(sp + HEAD_TILES * SLICES * 16 * SP_ROW);  // [STAGES][TILE][stage row]
  __shared__ float valid_s[TILE];
  __shared__ int row_fmt[STAGES * TILE];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int mt = warp / SLICES, ds = warp % SLICES;  // head tile, output-dim slice
  const int r = lane / 4, c2 = (lane % 4) * 2;
  const long long t = blockIdx.z;
  const int hb = blockIdx.y * HEADS_PER_BLOCK, h0 = hb + mt * 16;
  const int split = blockIdx.x;
  const Span span = split_span(p, t, split);
  const float qscale = p.scale * LOG2E;  // scores are kept in log2 units

  // The block's queries as bf16 rows (the bf16 copies join the first staged tile's group).
  for (int i = tid; i < HEADS_PER_BLOCK * ENTRY_DIM / 8; i += THREADS) {
    const int h = i / (ENTRY_DIM / 8), c = i % (ENTRY_DIM / 8);
    load_query_chunk(p, t, hb + h, c, qs + h * KROW + 8 * c);
  }

  float o[SLICE / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  RowPipeline<TILE, STAGES> pipe(p, t, span, stages, row_fmt);
  pipe.start();
  const int tiles = pipe.tiles();
  for (int i = 0; i < tiles; ++i) {
    pipe.next(i, ks, valid_s);

    // Partial scores over this warp's 256 dims: [16 heads x 32 candidates]. A fragments (16
    // heads x 16 dims) and B fragments (two 8-candidate tiles x 16 dims) by ldmatrix.
    float s[4][4];
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[n][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < SLICE / 16; ++kk) {
      const int d = ds * SLICE + 16 * kk;
      uint32_t a[4];
      ldmatrix_x4(a, qs + (16 * mt + lane % 16) * KROW + d + 8 * (lane / 16));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + (16 * np + lane % 8 + 8 * (lane / 16)) * KROW + d + 8 * ((lane / 8) % 2));
        mma_bf16(s[2 * np], a[0], a[1], a[2], a[3], b[0], b[1]);
        mma_bf16(s[2 * np + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
      }
    }
    float* mine = sp + ((mt * SLICES + ds) * 16) * SP_ROW;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      *(float2*)(mine + r * SP_ROW + 8 * n + c2) = make_float2(s[n][0], s[n][1]);
      *(float2*)(mine + (r + 8) * SP_ROW + 8 * n + c2) = make_float2(s[n][2], s[n][3]);
    }
    __syncthreads();
    // Full scores (the two slices added in a fixed order), masked, then online softmax.
    const float* all = sp + (mt * SLICES * 16) * SP_ROW;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h, col = 8 * n + c2;
        const float2 x = *(const float2*)(all + row * SP_ROW + col), y = *(const float2*)(all + (16 + row) * SP_ROW + col);
        s[n][2 * h] = (x.x + y.x) * qscale + valid_s[col];
        s[n][2 * h + 1] = (x.y + y.y) * qscale + valid_s[col + 1];
      }
    }
    uint32_t pa[2][4];
    softmax_step(s, row_max, row_sum, o, pa);
    // O += P V over this warp's 256 output dims: 32 n-tiles of 8 dims (two per transposed
    // ldmatrix), 2 k-steps of 16 candidates.
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
      for (int np = 0; np < SLICE / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, ks + (16 * kk + lane % 16) * KROW + ds * SLICE + 16 * np + 8 * (lane / 16));
        mma_bf16(o[2 * np], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[0], b[1]);
        mma_bf16(o[2 * np + 1], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();
  finish_rows(p, o, row_max, row_sum, t, split, h0, ds * SLICE, ds == 0);
}

// The portable kernel, for GPUs with less shared memory per block than the first kernel needs
// (sm_80 allows 163 KiB, sm_86/89/120 99 KiB), in two blocks of 16 candidates a tile (3 tiles
// staged). A block takes P_HEAD_TILES tiles of 16 heads of one query (each staged row is decoded
// once for all of them) with P_WARPS warps: warp w owns head tile w / P_SLICES and dims
// [P_SLICE (w % P_SLICES), +P_SLICE), its queries' A fragments in registers (no shared copy of the
// queries). Each warp computes its head tile's partial scores over its dims, the P_SLICES partials
// of a head tile are added through shared memory in a fixed order, and the warp accumulates its
// P_SLICE output dims. Head tiles past the query's heads only stage and decode. Same workspace
// layout and combine step; the scores are summed in another order than the kernel above's.
// - dsv4_sparse_attention_portable: 64 heads, 16 warps (4 a head tile, 128 dims each), 91.25 KiB.
// - dsv4_sparse_attention_portable16: 16 heads, 8 warps (64 dims each), 79.25 KiB, for small grids
//   (the launcher's choice: few queries, or at most 16 heads), where the 64-head block leaves most
//   SMs idle.
namespace {
constexpr int P_TILE = 16;            // candidates per tile
constexpr int P_SP_ROW = P_TILE + 8;  // padded row of partial scores
constexpr int P_STAGES = 3;
constexpr int P_THREADS = 512;        // the 64-head block
}  // namespace

template <int P_HEAD_TILES, int P_WARPS>
__device__ __forceinline__ void portable_attention(const Params& p, uint8_t* smem) {
  constexpr int P_SLICES = P_WARPS / P_HEAD_TILES;  // dim slices a head tile
  constexpr int P_SLICE = ENTRY_DIM / P_SLICES;     // dims a warp
  uint16_t* ks = (uint16_t*)smem;                              // [P_TILE][KROW] bf16 rows
  float* sp = (float*)(ks + P_TILE * KROW);                     // [P_WARPS][16 heads][P_SP_ROW] partials
  uint8_t* stages = (uint8_t*)(sp + P_WARPS * 16 * P_SP_ROW);   // [P_STAGES][P_TILE][stage row]
  __shared__ float valid_s[P_TILE];
  __shared__ int row_fmt[P_STAGES * P_TILE];

  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32;
  // Head tile and dim slice (one head tile: the warp's slice is its index).
  const int mt = P_HEAD_TILES == 1 ? 0 : w / P_SLICES, ds = P_HEAD_TILES == 1 ? w : w % P_SLICES;
  const int r = lane / 4, c2 = (lane % 4) * 2;
  const long long t = blockIdx.z;
  const int h0 = blockIdx.y * 16 * P_HEAD_TILES + 16 * mt;
  // A head tile holding at least one of the query's heads (a grid of 16-head blocks has none past them).
  const bool active = P_HEAD_TILES == 1 || h0 < p.heads;
  const int split = blockIdx.x;
  const Span span = split_span(p, t, split);
  const float qscale = p.scale * LOG2E;

  // A fragments of the queries (16 heads x this warp's dims), bf16, straight from memory.
  uint32_t qa[P_SLICE / 16][4];
#pragma unroll
  for (int kk = 0; kk < P_SLICE / 16; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = h0 + r + 8 * (i % 2), d = ds * P_SLICE + 16 * kk + c2 + 8 * (i / 2);
      float x0 = 0.f, x1 = 0.f;
      if (h < p.heads) {
        const long long off = (t * p.heads + h) * ENTRY_DIM + d;
        x0 = load_value(p.q, off, p.q_bf16);
        x1 = load_value(p.q, off + 1, p.q_bf16);
      }
      qa[kk][i] = pack_bf16(x0, x1);
    }
  }

  float o[P_SLICE / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  RowPipeline<P_TILE, P_STAGES, ROW_MAJOR, 32 * P_WARPS> pipe(p, t, span, stages, row_fmt);
  pipe.start();
  const int tiles = pipe.tiles();
  for (int i = 0; i < tiles; ++i) {
    pipe.next(i, ks, valid_s);

    // Partial scores [16 heads x 16 candidates] over this warp's dims.
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
    if (active) {
#pragma unroll
      for (int kk = 0; kk < P_SLICE / 16; ++kk) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + (lane % 8 + 8 * (lane / 16)) * KROW + ds * P_SLICE + 16 * kk + 8 * ((lane / 8) % 2));
        mma_bf16(s[0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
        mma_bf16(s[1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
      }
      float* mine = sp + (w * 16) * P_SP_ROW;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        *(float2*)(mine + r * P_SP_ROW + 8 * n + c2) = make_float2(s[n][0], s[n][1]);
        *(float2*)(mine + (r + 8) * P_SP_ROW + 8 * n + c2) = make_float2(s[n][2], s[n][3]);
      }
    }
    __syncthreads();  // every warp's partials are in (the next tile's writes follow pipe.next's barriers)
    if (!active) continue;
    // Full scores: the head tile's slices added in a fixed order, masked, then online softmax.
    const float* all = sp + (mt * P_SLICES * 16) * P_SP_ROW;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h, col = 8 * n + c2;
        float2 v = make_float2(0.f, 0.f);
#pragma unroll
        for (int k = 0; k < P_SLICES; ++k) {
          const float2 x = *(const float2*)(all + (k * 16 + row) * P_SP_ROW + col);
          v.x += x.x;
          v.y += x.y;
        }
        s[n][2 * h] = v.x * qscale + valid_s[col];
        s[n][2 * h + 1] = v.y * qscale + valid_s[col + 1];
      }
    }
    uint32_t pa[1][4];
    softmax_step(s, row_max, row_sum, o, pa);
    // O += P V over this warp's output dims: n-tiles of 8 dims (two per transposed ldmatrix), one
    // k-step of 16 candidates.
#pragma unroll
    for (int np = 0; np < P_SLICE / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, ks + (lane % 16) * KROW + ds * P_SLICE + 16 * np + 8 * (lane / 16));
      mma_bf16(o[2 * np], pa[0][0], pa[0][1], pa[0][2], pa[0][3], b[0], b[1]);
      mma_bf16(o[2 * np + 1], pa[0][0], pa[0][1], pa[0][2], pa[0][3], b[2], b[3]);
    }
  }
  cp_async_wait<0>();
  if (active) finish_rows(p, o, row_max, row_sum, t, split, h0, ds * P_SLICE, ds == 0);
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_sparse_attention_portable16(const Params p) {
  dsv4::grid_begin();
  extern __shared__ __align__(16) uint8_t smem[];
  portable_attention<1, THREADS / 32>(p, smem);
}

extern "C" __global__ void __launch_bounds__(P_THREADS, 1) dsv4_sparse_attention_portable(const Params p) {
  dsv4::grid_begin();
  extern __shared__ __align__(16) uint8_t smem[];
  portable_attention<HEAD_TILES, P_THREADS / 32>(p, smem);
}

// Folds split partials: grid (heads, queries), 128 threads, 4 dims each; the output float32, or
// bfloat16 rounded to nearest even (out_bf16).
extern "C" __global__ void __launch_bounds__(128) dsv4_attention_combine(const Params p) {
  dsv4::grid_begin();
  const int h = blockIdx.x, tid = threadIdx.x;
  const long long t = blockIdx.y;
  const float* ml = p.part_ml + (t * p.splits * p.heads + h) * 2;
  Folded f;
  for (int s = 0; s < p.splits; ++s) f.m = fmaxf(f.m, ml[s * p.heads * 2]);
  for (int s = 0; s < p.splits; ++s) {
    const float ms = ml[s * p.heads * 2];
    if (ms == -INFINITY) continue;
    fold_split(f, ms, ml[s * p.heads * 2 + 1],
               *(const float4*)(p.part_o + ((t * p.splits + s) * p.heads + h) * ENTRY_DIM + 4 * tid));
  }
  store_folded(p, f, t, h, 4 * tid, tid == 0, p.sink[h], derotation(p, t, 4 * tid));
}
