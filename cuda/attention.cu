// Sparse attention with sink over paged KV entries (SPEC.md section 2), decode and prefill.
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
#include "mma.cuh"
#include "quant.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 256;
constexpr int HEAD_TILES = 4;                    // 16 heads each
constexpr int SLICES = 2;                        // output dims split between the warps of a head tile
constexpr int SLICE = ENTRY_DIM / SLICES;        // 256 dims
constexpr int HEADS_PER_BLOCK = 16 * HEAD_TILES; // 64
constexpr int TILE = 32;              // candidates per tile
constexpr int SP_ROW = TILE + 8;      // padded row of partial scores: conflict-free float2 access
constexpr int KROW = ENTRY_DIM + 8;   // padded bf16 row stride (1040 B): conflict-free fragments
constexpr float LOG2E = 1.4426950408889634f;

enum EntryFormat { ENTRIES_FP8 = 0, ENTRIES_BF16 = 1 };

struct Cache {
  const uint8_t* base;
  long long rows;
  int fmt;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return (uint32_t)bf16_from_f32(lo) | ((uint32_t)bf16_from_f32(hi) << 16);
}

// Tiles of raw rows are staged in shared memory by cp.async, STAGES - 1 tiles ahead of the one
// being computed. A staged row takes STAGE_ROW bytes: an FP8 entry's 576 data bytes then its 8
// scale bytes, or a BF16 row's 1024 bytes. Thread (row lrow, part lp of PARTS) moves 16-byte
// chunks lp + PARTS j of its row.
constexpr int STAGES = 3;
// Padded by 64 bytes so that the 4 rows a warp decodes at once fall in different banks.
constexpr int STAGE_ROW = ENTRY_DIM * 2 + 64;

template <int PARTS>
__device__ __forceinline__ void stage_row(uint8_t* dst, const Cache& c, long long row, int lp) {
  if (row < 0) return;
  if (c.fmt == ENTRIES_FP8) {
    const uint8_t* data = c.base + MAIN_ENTRY.data_offset(row);
    for (int ch = lp; ch < MAIN_ENTRY.data_bytes / 16; ch += PARTS) cp_async16(dst + 16 * ch, data + 16 * ch);
    if (lp == 0) cp_async8(dst + MAIN_ENTRY.data_bytes, c.base + MAIN_ENTRY.scale_offset(row));
  } else {
    const uint8_t* data = c.base + row * (ENTRY_DIM * 2);
#pragma unroll
    for (int j = 0; j < 64 / PARTS; ++j) cp_async16(dst + 16 * (lp + PARTS * j), data + 16 * (lp + PARTS * j));
  }
}

// Decodes a staged row into the shared tile row `dst` as bf16: chunks PARTS j + lp (dims 8 c ..
// 8 c + 8 of chunk c), so the PARTS threads of a row write consecutive 16-byte chunks. `fmt` < 0:
// a masked row (zeros).
template <int PARTS>
__device__ __forceinline__ void decode_row(const uint8_t* src, int fmt, int lp, uint16_t* dst) {
#pragma unroll
  for (int j = 0; j < 64 / PARTS; ++j) {
    const int ch = PARTS * j + lp;
    uint4 out = make_uint4(0, 0, 0, 0);
    if (fmt == ENTRIES_FP8) {
      if (ch < NOPE_DIM / 8) {
        int se = (int)src[MAIN_ENTRY.data_bytes + ch / 8] - 127;
        out = fp8x8_to_bf16(*(const uint2*)(src + 8 * ch), se);
      } else {
        out = *(const uint4*)(src + NOPE_DIM + 16 * (ch - NOPE_DIM / 8));
      }
    } else if (fmt == ENTRIES_BF16) {
      out = *(const uint4*)(src + 16 * ch);
    }
    *(uint4*)(dst + 8 * ch) = out;
  }
}

// One candidate list: row ids [T, stride] (int32 or int64) and optional counts [T].
struct List {
  const void* ids;
  const void* counts;  // null: all `stride` columns count
  int stride;
  int ids64, counts64;
};

// Mirrored by `Params` in rust/core/src/gpu/attention.rs (same field order, repr(C)).
struct Params {
  const void* q;
  int q_bf16;
  int heads;
  Cache a, b;
  List la, lb;                 // lb.ids null: no second list
  const float* sink;
  float scale;
  const void* positions;       // null: no de-rotation
  int positions64;
  const void* inv_freq;        // [32], float32 or float64
  int inv_freq64;
  int splits;
  int split_len;
  float* out;      // [T, H, 512]
  float* lse;      // [T, H]
  float* part_o;   // [T, splits, H, 512]
  float* part_ml;  // [T, splits, H, 2]
};

__device__ __forceinline__ int list_count(const List& l, long long t) {
  if (!l.ids) return 0;
  return l.counts ? (int)min(load_id(l.counts, t, l.counts64), (long long)l.stride) : l.stride;
}

// Candidate `pos` of query t's list -> row of cache `which`, or -1 when masked.
__device__ __forceinline__ long long candidate_row(const Params& p, long long t, int na, int nb, int pos,
                                                   int& which) {
  long long row = -1;
  if (pos < na) {
    row = load_id(p.la.ids, t * p.la.stride + pos, p.la.ids64);
    which = 0;
    if (row >= p.a.rows) row = -1;
  } else if (pos < na + nb) {
    row = load_id(p.lb.ids, t * p.lb.stride + pos - na, p.lb.ids64);
    which = 1;
    if (row >= p.b.rows) row = -1;
  }
  return row < 0 ? -1 : row;
}

// Inverse RoPE at `pos` on dims 448:512 of a 512-d output row held as (dim, value) pairs.
__device__ __forceinline__ void derotate_pair(float& x0, float& x1, long long pos, const Params& p, int j) {
  const double f = p.inv_freq64 ? ((const double*)p.inv_freq)[j] : (double)((const float*)p.inv_freq)[j];
  double s, c;
  sincospi(-(double)pos * f * M_1_PI, &s, &c);  // the pi-scaled argument makes range reduction cheap
  float y0 = x0 * (float)c - x1 * (float)s, y1 = x0 * (float)s + x1 * (float)c;
  x0 = y0;
  x1 = y1;
}

// The staging pipeline of both kernels: a split's candidate rows in tiles of T, staged raw by
// cp.async S - 1 tiles ahead of the one being computed, while the row ids of tile i + S are
// already being read, so no copy waits on the index load before it. THREADS / T threads share a
// row. `next(i)` waits for tile i, decodes it into the bf16 tile `ks` (masked rows as zeros, with
// a -inf score bias in `valid`) and starts tile i + S - 1; both barriers are inside.
template <int T, int S>
struct RowPipeline {
  static constexpr int PARTS = THREADS / T;
  const Params& p;
  const long long t;
  const int na, nb, begin, end, lrow, lpart;
  uint8_t* const stages;  // [S][T][STAGE_ROW]
  int* const row_fmt;     // [S][T]: the staged row's format, -1 for none
  int which_ahead = 0;
  long long ahead = -1;

  __device__ RowPipeline(const Params& p_, long long t_, int na_, int nb_, int begin_, int end_, uint8_t* stages_,
                         int* row_fmt_)
      : p(p_), t(t_), na(na_), nb(nb_), begin(begin_), end(end_), lrow(threadIdx.x / PARTS),
        lpart(threadIdx.x % PARTS), stages(stages_), row_fmt(row_fmt_) {}

  __device__ int tiles() const { return begin < end ? (end - begin + T - 1) / T : 0; }

  __device__ long long row_at(int tile, int& which) const {
    const int pos = begin + tile * T + lrow;
    return pos < end ? candidate_row(p, t, na, nb, pos, which) : -1;
  }

  __device__ void issue(int tile, long long row, int which) {
    const Cache& c = which ? p.b : p.a;
    stage_row<PARTS>(stages + ((tile % S) * T + lrow) * STAGE_ROW, c, row, lpart);
    if (lpart == 0) row_fmt[(tile % S) * T + lrow] = row < 0 ? -1 : c.fmt;
  }

  __device__ void start() {
    const int n = tiles();
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
      if (i < n) issue(i, row_at(i, which_ahead), which_ahead);
      cp_async_commit();
    }
    ahead = row_at(S - 1, which_ahead);
  }

  __device__ void next(int i, uint16_t* ks, float* valid) {
    cp_async_wait<S - 2>();
    __syncthreads();  // tile i staged by every thread; the previous tile's readers are done
    const int fmt_row = row_fmt[(i % S) * T + lrow];
    decode_row<PARTS>(stages + ((i % S) * T + lrow) * STAGE_ROW, fmt_row, lpart, ks + lrow * KROW);
    if (lpart == 0) valid[lrow] = fmt_row < 0 ? -INFINITY : 0.f;
    if (i + S - 1 < tiles()) {
      issue(i + S - 1, ahead, which_ahead);
      ahead = row_at(i + S, which_ahead);
    }
    cp_async_commit();
    __syncthreads();
  }
};

// The end of a block: a warp's accumulators `o` (16 heads h0.. x dims [d0, d0 + 8 N)) and the
// running row max and sum (log2 units, spread over the 4 lanes of a row) become the output (one
// split: normalized with the sink, de-rotated) or the split's partials. `first` marks the warp
// that writes the per-head statistics.
template <int N>
__device__ __forceinline__ void finish_rows(const Params& p, float (&o)[N][4], float (&row_max)[2],
                                            float (&row_sum)[2], long long t, int split, int h0, int d0,
                                            bool first) {
  const int lane = threadIdx.x % 32, r = lane / 4, c2 = (lane % 4) * 2;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 1);
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 2);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int h = h0 + r + 8 * j;
    if (h >= p.heads) continue;
    if (p.splits == 1) {
      // out = O / (l + 2^(sink - m)) with O and l relative to the row max m (0 when no candidate).
      const float m = row_max[j];
      const float f = m == -INFINITY ? 0.f : 1.f / (row_sum[j] + exp2f(p.sink[h] * LOG2E - m));
      float* dst = p.out + (t * p.heads + h) * ENTRY_DIM;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        float x0 = o[n][2 * j] * f, x1 = o[n][2 * j + 1] * f;
        const int d = d0 + 8 * n + c2;
        if (p.positions && d >= NOPE_DIM) derotate_pair(x0, x1, load_id(p.positions, t, p.positions64), p, (d - NOPE_DIM) / 2);
        *(float2*)(dst + d) = make_float2(x0, x1);
      }
      if (first && lane % 4 == 0)
        p.lse[t * p.heads + h] = m == -INFINITY ? -INFINITY : (m + log2f(row_sum[j])) / LOG2E;
    } else {
      float* dst = p.part_o + ((t * p.splits + split) * p.heads + h) * ENTRY_DIM + d0;
#pragma unroll
      for (int n = 0; n < N; ++n) *(float2*)(dst + 8 * n + c2) = make_float2(o[n][2 * j], o[n][2 * j + 1]);
      if (first && lane % 4 == 0) {
        float* ml = p.part_ml + ((t * p.splits + split) * p.heads + h) * 2;
        ml[0] = row_max[j];
        ml[1] = row_sum[j];
      }
    }
  }
}

// One online-softmax step over a tile's scores s (NT n-tiles of 8 candidates, log2 units): the
// new row max, the rescale of the running sum and of `o`, and P = 2^(s - max) packed as the bf16
// A fragments of the P V product (k-step n / 2 from n-tiles n and n + 1).
template <int NT, int N>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&row_max)[2], float (&row_sum)[2],
                                             float (&o)[N][4], uint32_t (&pa)[NT / 2][4]) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
  float corr[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    tile_max[j] = fmaxf(tile_max[j], __shfl_xor_sync(0xffffffffu, tile_max[j], 1));
    tile_max[j] = fmaxf(tile_max[j], __shfl_xor_sync(0xffffffffu, tile_max[j], 2));
    float m_new = fmaxf(row_max[j], tile_max[j]);
    corr[j] = m_new == -INFINITY ? 1.f : exp2f(row_max[j] - m_new);
    row_max[j] = m_new;
    row_sum[j] *= corr[j];
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    float e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float m = row_max[i / 2];
      e[i] = m == -INFINITY ? 0.f : exp2f(s[n][i] - m);
      row_sum[i / 2] += e[i];
    }
    pa[n / 2][(n % 2) * 2 + 0] = pack_bf16(e[0], e[1]);
    pa[n / 2][(n % 2) * 2 + 1] = pack_bf16(e[2], e[3]);
  }
  if (__all_sync(0xffffffffu, corr[0] == 1.f && corr[1] == 1.f)) return;  // no row max moved
#pragma unroll
  for (int n = 0; n < N; ++n) {
    o[n][0] *= corr[0];
    o[n][1] *= corr[0];
    o[n][2] *= corr[1];
    o[n][3] *= corr[1];
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1) dsv4_sparse_attention(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* qs = (uint16_t*)smem;                                 // [64 heads][KROW] bf16 queries
  uint16_t* ks = qs + HEADS_PER_BLOCK * KROW;                      // [TILE][KROW] bf16 rows
  float* sp = (float*)(ks + TILE * KROW);                          // [4][2][16][SP_ROW] partial scores
  uint8_t* stages = (uint8_t*)(sp + HEAD_TILES * SLICES * 16 * SP_ROW);  // [STAGES][TILE][STAGE_ROW]
  __shared__ float valid_s[TILE];
  __shared__ int row_fmt[STAGES * TILE];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int mt = warp / SLICES, ds = warp % SLICES;  // head tile, output-dim slice
  const int r = lane / 4, c2 = (lane % 4) * 2;
  const long long t = blockIdx.z;
  const int hb = blockIdx.y * HEADS_PER_BLOCK, h0 = hb + mt * 16;
  const int split = blockIdx.x;
  const int na = list_count(p.la, t), nb = list_count(p.lb, t);
  const int total = na + nb;
  const int begin = split * p.split_len, end = min(begin + p.split_len, total);
  const float qscale = p.scale * LOG2E;  // scores are kept in log2 units

  // The block's queries as bf16 (exact for bf16 queries); heads past the last are zeros. bf16
  // queries are copied by cp.async in 16-byte chunks (they join the first staged tile's group),
  // float32 ones read 16 bytes at a time; a query not 16-byte aligned takes the scalar path.
  const bool aligned = ((uintptr_t)p.q & 15) == 0;
  if (p.q_bf16 && aligned) {
    for (int i = tid; i < HEADS_PER_BLOCK * ENTRY_DIM / 8; i += THREADS) {
      const int h = i / (ENTRY_DIM / 8), c = i % (ENTRY_DIM / 8);
      uint16_t* dst = qs + h * KROW + 8 * c;
      if (hb + h < p.heads)
        cp_async16(dst, (const uint16_t*)p.q + (t * p.heads + hb + h) * ENTRY_DIM + 8 * c);
      else
        *(uint4*)dst = make_uint4(0, 0, 0, 0);
    }
  } else if (aligned) {
    for (int i = tid; i < HEADS_PER_BLOCK * ENTRY_DIM / 4; i += THREADS) {
      const int h = i / (ENTRY_DIM / 4), c = i % (ENTRY_DIM / 4);
      uint2 v = make_uint2(0, 0);
      if (hb + h < p.heads) {
        const float4 x = *(const float4*)((const float*)p.q + (t * p.heads + hb + h) * ENTRY_DIM + 4 * c);
        v = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
      }
      *(uint2*)(qs + h * KROW + 4 * c) = v;
    }
  } else {
    for (int i = tid; i < HEADS_PER_BLOCK * ENTRY_DIM / 2; i += THREADS) {
      const int h = 2 * i / ENTRY_DIM, d = 2 * i % ENTRY_DIM;
      float x0 = 0.f, x1 = 0.f;
      if (hb + h < p.heads) {
        const long long off = (t * p.heads + hb + h) * ENTRY_DIM + d;
        x0 = load_value(p.q, off, p.q_bf16);
        x1 = load_value(p.q, off + 1, p.q_bf16);
      }
      *(uint32_t*)(qs + h * KROW + d) = pack_bf16(x0, x1);
    }
  }

  float o[SLICE / 8][4];
#pragma unroll
  for (int n = 0; n < SLICE / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n][i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  RowPipeline<TILE, STAGES> pipe(p, t, na, nb, begin, end, stages, row_fmt);
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

// The portable variant, for GPUs with less shared memory per block than the kernel above needs
// (sm_80 allows 163 KiB, sm_86/89/120 99 KiB): 80 KiB. A block takes 16 heads of one query and
// 16 candidates a tile (3 tiles staged); warp w computes the partial scores over dims
// [64 w, 64 w + 64) with its queries held in registers, the 8 partials are added through shared
// memory in a fixed order, and warp w accumulates output dims [64 w, 64 w + 64). Same numerics,
// same workspace layout and combine step.
namespace {
constexpr int P_HEADS = 16;
constexpr int P_WARPS = THREADS / 32;           // 8 output-dim slices
constexpr int P_SLICE = ENTRY_DIM / P_WARPS;    // 64 dims
constexpr int P_TILE = 16;                      // candidates per tile
constexpr int P_SP_ROW = P_TILE + 8;            // padded row of partial scores
constexpr int P_STAGES = 3;
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_sparse_attention_portable(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* ks = (uint16_t*)smem;                              // [P_TILE][KROW] bf16 rows
  float* sp = (float*)(ks + P_TILE * KROW);                     // [8 warps][16 heads][P_SP_ROW] partial scores
  uint8_t* stages = (uint8_t*)(sp + P_WARPS * 16 * P_SP_ROW);   // [P_STAGES][P_TILE][STAGE_ROW]
  __shared__ float valid_s[P_TILE];
  __shared__ int row_fmt[P_STAGES * P_TILE];

  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32;
  const int r = lane / 4, c2 = (lane % 4) * 2;
  const long long t = blockIdx.z;
  const int h0 = blockIdx.y * P_HEADS;
  const int split = blockIdx.x;
  const int na = list_count(p.la, t), nb = list_count(p.lb, t);
  const int total = na + nb;
  const int begin = split * p.split_len, end = min(begin + p.split_len, total);
  const float qscale = p.scale * LOG2E;

  // A fragments of the queries (16 heads x this warp's 64 dims), bf16, straight from memory.
  uint32_t qa[P_SLICE / 16][4];
#pragma unroll
  for (int kk = 0; kk < P_SLICE / 16; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = h0 + r + 8 * (i % 2), d = w * P_SLICE + 16 * kk + c2 + 8 * (i / 2);
      float x0 = 0.f, x1 = 0.f;
      if (h < p.heads) {
        const long long off = (t * p.heads + h) * ENTRY_DIM + d;
        x0 = load_value(p.q, off, p.q_bf16);
        x1 = load_value(p.q, off + 1, p.q_bf16);
      }
      qa[kk][i] = pack_bf16(x0, x1);
    }
  }

  float o[P_SLICE / 8][4];
#pragma unroll
  for (int n = 0; n < P_SLICE / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n][i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  RowPipeline<P_TILE, P_STAGES> pipe(p, t, na, nb, begin, end, stages, row_fmt);
  pipe.start();
  const int tiles = pipe.tiles();
  for (int i = 0; i < tiles; ++i) {
    pipe.next(i, ks, valid_s);

    // Partial scores [16 heads x 16 candidates] over this warp's 64 dims.
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
#pragma unroll
    for (int kk = 0; kk < P_SLICE / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, ks + (lane % 8 + 8 * (lane / 16)) * KROW + w * P_SLICE + 16 * kk + 8 * ((lane / 8) % 2));
      mma_bf16(s[0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
      mma_bf16(s[1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
    }
    float* mine = sp + (w * 16) * P_SP_ROW;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      *(float2*)(mine + r * P_SP_ROW + 8 * n + c2) = make_float2(s[n][0], s[n][1]);
      *(float2*)(mine + (r + 8) * P_SP_ROW + 8 * n + c2) = make_float2(s[n][2], s[n][3]);
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h, col = 8 * n + c2;
        float2 v = make_float2(0.f, 0.f);
#pragma unroll
        for (int k = 0; k < P_WARPS; ++k) {
          const float2 x = *(const float2*)(sp + (k * 16 + row) * P_SP_ROW + col);
          v.x += x.x;
          v.y += x.y;
        }
        s[n][2 * h] = v.x * qscale + valid_s[col];
        s[n][2 * h + 1] = v.y * qscale + valid_s[col + 1];
      }
    }
    uint32_t pa[1][4];
    softmax_step(s, row_max, row_sum, o, pa);
#pragma unroll
    for (int np = 0; np < P_SLICE / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, ks + (lane % 16) * KROW + w * P_SLICE + 16 * np + 8 * (lane / 16));
      mma_bf16(o[2 * np], pa[0][0], pa[0][1], pa[0][2], pa[0][3], b[0], b[1]);
      mma_bf16(o[2 * np + 1], pa[0][0], pa[0][1], pa[0][2], pa[0][3], b[2], b[3]);
    }
  }
  cp_async_wait<0>();
  finish_rows(p, o, row_max, row_sum, t, split, h0, w * P_SLICE, w == 0);
}

// Folds split partials: grid (heads, queries), 128 threads, 4 dims each.
extern "C" __global__ void __launch_bounds__(128) dsv4_attention_combine(const Params p) {
  const int h = blockIdx.x, tid = threadIdx.x;
  const long long t = blockIdx.y;
  const float* ml = p.part_ml + (t * p.splits * p.heads + h) * 2;
  float m = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, ml[s * p.heads * 2]);
  float sum = 0.f;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < p.splits; ++s) {
    float ms = ml[s * p.heads * 2];
    if (ms == -INFINITY) continue;
    float w = exp2f(ms - m);
    sum += ml[s * p.heads * 2 + 1] * w;
    float4 v = *(const float4*)(p.part_o + ((t * p.splits + s) * p.heads + h) * ENTRY_DIM + 4 * tid);
    acc[0] += v.x * w;
    acc[1] += v.y * w;
    acc[2] += v.z * w;
    acc[3] += v.w * w;
  }
  const float f = m == -INFINITY ? 0.f : 1.f / (sum + exp2f(p.sink[h] * LOG2E - m));
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] *= f;
  const int d = 4 * tid;
  if (p.positions && d >= NOPE_DIM) {
    const long long pos = load_id(p.positions, t, p.positions64);
    derotate_pair(acc[0], acc[1], pos, p, (d - NOPE_DIM) / 2);
    derotate_pair(acc[2], acc[3], pos, p, (d - NOPE_DIM) / 2 + 1);
  }
  *(float4*)(p.out + (t * p.heads + h) * ENTRY_DIM + d) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  if (tid == 0) p.lse[t * p.heads + h] = m == -INFINITY ? -INFINITY : (m + log2f(sum)) / LOG2E;
}
