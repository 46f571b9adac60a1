// Shared parts of the sparse-attention kernels (cuda/attention.cu, cuda/attention_sm90a.cu):
// the parameter block, candidate lists, the staging pipeline of raw rows, the online-softmax step
// and the epilogue. See cuda/attention.cu for the math.
#pragma once
#include <cstddef>

#include "mma.cuh"
#include "quant.cuh"
#include "rope.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 256;
constexpr float LOG2E = 1.4426950408889634f;

struct Cache {
  const uint8_t* base;
  long long rows;
  EntryFormat fmt;
};

// Two floats as packed bf16 (round to nearest even, one cvt instruction).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *(const uint32_t*)&v;
}

// 2^x by the special-function unit (ex2.approx.ftz: about 2 ulp; results below 2^-126 flush to
// zero, which the softmax, whose largest term is 1, cannot see).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A staged raw row: an FP8 entry's 576 data bytes then its 8 scale bytes, or a BF16 row's 1024
// bytes. Thread (row lrow, part lp of PARTS) moves 16-byte chunks lp + PARTS j of its row.
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

// decode_row's FP8 entries: NoPE chunks from FP8 codes and their block's scale (one multiply per
// pair where SMALL), RoPE chunks copied as the bf16 they are stored as.
template <int PARTS, bool SMALL>
__device__ __forceinline__ void decode_fp8_row(const uint8_t* src, uint2 scales, int lp, uint16_t* dst,
                                               int chunk_stride) {
  constexpr int NOPE_CHUNKS = NOPE_DIM / 8;
#pragma unroll
  for (int j = 0; j < 64 / PARTS; ++j) {
    const int ch = PARTS * j + lp;
    const bool nope = PARTS * (j + 1) <= NOPE_CHUNKS || (PARTS * j < NOPE_CHUNKS && ch < NOPE_CHUNKS);
    uint4 out;
    if (nope) {
      const int b = ch / 8;
      const int se = (int)__byte_perm(b < 4 ? scales.x : scales.y, 0, 0x4440 | (b & 3)) - 127;
      out = fp8x8_to_bf16<SMALL>(*(const uint2*)(src + 8 * ch), se);
    } else {
      out = *(const uint4*)(src + NOPE_DIM + 16 * (ch - NOPE_CHUNKS));
    }
    *(uint4*)(dst + ch * chunk_stride) = out;
  }
}

// Decodes chunks PARTS j + lp of a staged row (dims 8 c .. 8 c + 8 of chunk c) as bf16 into
// `dst + c * chunk_stride`. `fmt` < 0: a masked row (zeros). The format test is per row, whether
// a chunk is NoPE (FP8) or RoPE (bf16) is known at compile time where PARTS allows, and an entry
// whose scales are all at most 2^7 (any entry of amax up to 57,344) takes the one-multiply path.
template <int PARTS>
__device__ __forceinline__ void decode_row(const uint8_t* src, int fmt, int lp, uint16_t* dst, int chunk_stride) {
  if (fmt == ENTRIES_FP8) {
    const uint2 scales = *(const uint2*)(src + MAIN_ENTRY.data_bytes);  // one UE8M0 byte per 64 dims
    // Bytes above 127 + 7 among the 7 NoPE blocks' scales.
    const bool small = (__vcmpgtu4(scales.x, 0x86868686u) | (__vcmpgtu4(scales.y, 0x86868686u) & 0x00FFFFFFu)) == 0;
    if (small)
      decode_fp8_row<PARTS, true>(src, scales, lp, dst, chunk_stride);
    else
      decode_fp8_row<PARTS, false>(src, scales, lp, dst, chunk_stride);
  } else {
    const bool bf16 = fmt == ENTRIES_BF16;
#pragma unroll
    for (int j = 0; j < 64 / PARTS; ++j) {
      const int ch = PARTS * j + lp;
      *(uint4*)(dst + ch * chunk_stride) = bf16 ? *(const uint4*)(src + 16 * ch) : make_uint4(0, 0, 0, 0);
    }
  }
}

// One candidate list: row ids [T, stride] (int32 or int64) and optional counts [T].
struct List {
  const void* ids;
  const void* counts;  // null: all `stride` columns count
  int stride;
  int ids64, counts64;
};

// Mirrored by `Params` in rust/core/src/gpu/attention.rs (same field order, repr(C)); both sides
// check its size and a few offsets at compile time.
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
  int rope_mode;               // bits of rope.cuh
  int splits;
  int split_len;
  float* out;      // [T, H, 512]; bfloat16 where out_bf16 (stored by the combine, or by a kernel built to)
  float* lse;      // [T, H]
  float* part_o;   // [T, splits, H, 512]
  float* part_ml;  // [T, splits, H, 2]
  int out_bf16;    // the combine rounds the output to bfloat16 as it stores it (splits > 1)
};
static_assert(sizeof(Cache) == 24 && sizeof(List) == 32, "Cache and List must match rust/core/src/gpu/attention.rs");
static_assert(sizeof(Params) == 224, "Params must match rust/core/src/gpu/attention.rs");
static_assert(offsetof(Params, sink) == 128 && offsetof(Params, part_ml) == 208 && offsetof(Params, out_bf16) == 216,
              "Params must match rust/core/src/gpu/attention.rs");

__device__ __forceinline__ int list_count(const List& l, long long t) {
  if (!l.ids) return 0;
  return l.counts ? (int)min(load_id(l.counts, t, l.counts64), (long long)l.stride) : l.stride;
}

// Candidate `pos` of query t's list: the row id as stored (any value; `masked_row` checks it)
// and which cache it indexes. Positions past both lists give -1.
__device__ __forceinline__ long long candidate_id(const Params& p, long long t, int na, int nb, int pos, int& which) {
  if (pos < na) {
    which = 0;
    return load_id(p.la.ids, t * p.la.stride + pos, p.la.ids64);
  }
  which = 1;
  return pos < na + nb ? load_id(p.lb.ids, t * p.lb.stride + pos - na, p.lb.ids64) : -1;
}

// The part of query t's candidate list that one split covers: the lengths of its two lists and
// the positions [begin, end) of the split (empty past the end).
struct Span {
  int na, nb, begin, end;
  __device__ int tiles(int tile) const { return begin < end ? (end - begin + tile - 1) / tile : 0; }
};

__device__ __forceinline__ Span split_span(const Params& p, long long t, int split) {
  const int na = list_count(p.la, t), nb = list_count(p.lb, t);
  const int begin = split * p.split_len;
  return {na, nb, begin, min(begin + p.split_len, na + nb)};
}

// Candidate `lane` of tile `tile` (of `tile_size`) of a split: its stored id (-1 past the split)
// and which cache it indexes.
__device__ __forceinline__ long long tile_candidate(const Params& p, long long t, const Span& span, int tile,
                                                    int tile_size, int lane, int& which) {
  const int pos = span.begin + tile * tile_size + lane;
  which = 0;
  return pos < span.end ? candidate_id(p, t, span.na, span.nb, pos, which) : -1;
}

// Dims 8 c .. 8 c + 8 of query t's head h as 8 bf16 at the 16-byte aligned shared `dst`, zeros
// for a head past the last (exact for bf16 queries). bf16 queries are copied by cp.async (the
// caller commits the group), float32 ones read 16 bytes at a time; a query not 16-byte aligned
// takes scalar loads.
__device__ __forceinline__ void load_query_chunk(const Params& p, long long t, int h, int c, uint16_t* dst) {
  if (h >= p.heads) {
    *(uint4*)dst = make_uint4(0, 0, 0, 0);
    return;
  }
  const long long off = (t * p.heads + h) * ENTRY_DIM + 8 * c;
  const bool aligned = ((uintptr_t)p.q & 15) == 0;
  if (p.q_bf16 && aligned) {
    cp_async16(dst, (const uint16_t*)p.q + off);
  } else if (aligned) {
    const float4 x = *(const float4*)((const float*)p.q + off), y = *(const float4*)((const float*)p.q + off + 4);
    *(uint4*)dst = make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
  } else {
    uint32_t v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = pack_bf16(load_value(p.q, off + 2 * j, p.q_bf16), load_value(p.q, off + 2 * j + 1, p.q_bf16));
    *(uint4*)dst = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// A stored id as a row of cache c, or -1 when masked (negative or past the cache).
__device__ __forceinline__ long long masked_row(long long id, const Cache& c) { return id < 0 || id >= c.rows ? -1 : id; }

// A pair (x0, x1) rotated by the angle of cosine c and sine s.
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float c, float s) {
  float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
  x0 = y0;
  x1 = y1;
}

// Inverse RoPE at `pos` on dims 448:512 of a 512-d output row held as (dim, value) pairs.
__device__ __forceinline__ void derotate_pair(float& x0, float& x1, long long pos, const Params& p, int j) {
  double s, c;
  rope_sincos(pos, p.inv_freq, j, p.rope_mode, true, s, c);
  rotate_pair(x0, x1, (float)c, (float)s);
}

// How a tile of T decoded bf16 rows lies in shared memory, and which rows and chunks a thread
// stages and decodes (the NT / T threads of the pipeline's NT share a row).
// - ROW_MAJOR: row r at ks + r KROW, its 64 chunks of 8 dims consecutive (ldmatrix operands);
//   thread tid takes row tid / PARTS, part tid % PARTS. Staged rows are padded by 64 bytes so
//   that the 4 rows a warp decodes at once fall in different banks.
// - CORE_MATRICES: wgmma's no-swizzle K-major layout, chunk c of row r at ks + 8 (c T + r), so 8
//   rows x 8 dims form one contiguous 128-byte core matrix; each warp takes 8 rows x 4 parts, and
//   the 8 lanes of a part write one core matrix. Staged rows are padded by 16 bytes so that those
//   8 rows fall in different banks. The tile is read by the async proxy (wgmma), so the writers
//   fence it before the barrier.
enum TileLayout { ROW_MAJOR, CORE_MATRICES };
constexpr int KROW = ENTRY_DIM + 8;  // ROW_MAJOR's padded bf16 row stride (1040 B): conflict-free fragments

template <TileLayout L>
constexpr int stage_row_bytes() { return ENTRY_DIM * 2 + (L == ROW_MAJOR ? 64 : 16); }

// The staging pipeline of every attention kernel: a split's candidate rows in tiles of T, staged
// raw by cp.async S - 1 tiles ahead of the one being computed, while the row ids of tile i + S
// are already being read, so no copy waits on the index load before it. `next(i)` waits for
// tile i, decodes it into the bf16 tile `ks` (masked rows as zeros, with a -inf score bias in
// `valid`) and starts tile i + S - 1; both barriers are inside.
template <int T, int S, TileLayout L = ROW_MAJOR, int NT = THREADS>
struct RowPipeline {
  static constexpr int PARTS = NT / T;
  static constexpr int STAGE_ROW = stage_row_bytes<L>();
  static_assert(L == ROW_MAJOR || (T % 8 == 0 && PARTS % 4 == 0), "core-matrix tiles: 8 rows x 4 parts a warp");
  const Params& p;
  const long long t;
  const Span span;
  const int lrow, lpart;
  uint8_t* const stages;  // [S][T][STAGE_ROW]
  int* const row_fmt;     // [S][T]: the staged row's format, -1 for none
  int which_ahead = 0;
  long long ahead = -1;

  __device__ static int row_of(int tid) {
    return L == ROW_MAJOR ? tid / PARTS : (tid / 32) % (T / 8) * 8 + tid % 8;
  }
  __device__ static int part_of(int tid) {
    return L == ROW_MAJOR ? tid % PARTS : (tid / 32) / (T / 8) * 4 + tid % 32 / 8;
  }

  // `tid`: this thread's index among the pipeline's NT threads.
  __device__ RowPipeline(const Params& p_, long long t_, const Span& span_, uint8_t* stages_, int* row_fmt_,
                         int tid = threadIdx.x)
      : p(p_), t(t_), span(span_), lrow(row_of(tid)), lpart(part_of(tid)), stages(stages_), row_fmt(row_fmt_) {}

  __device__ int tiles() const { return span.tiles(T); }

  // The stored id of this thread's row of a tile (loaded a tile before its use: only `issue`
  // looks at the value).
  __device__ long long row_at(int tile, int& which) const {
    const int pos = span.begin + tile * T + lrow;
    return pos < span.end ? candidate_id(p, t, span.na, span.nb, pos, which) : -1;
  }

  __device__ void issue(int tile, long long id, int which) {
    const Cache& c = which ? p.b : p.a;
    const long long row = masked_row(id, c);
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

  // Starts staging tile i + S - 1 into the slot tile i - 1 used (decoded before the barrier that
  // precedes this call), then decodes the staged tile i (staged by every thread: after
  // cp_async_wait and a barrier) into `ks`, and its -inf score bias into `valid` unless that is
  // null (the wgmma kernel's consumers take the mask themselves, from `tile_candidate`).
  __device__ void decode(int i, uint16_t* ks, float* valid) {
    const int fmt_row = row_fmt[(i % S) * T + lrow];
    if (i + S - 1 < tiles()) {  // first, so the copies have the decode's time to land
      issue(i + S - 1, ahead, which_ahead);
      ahead = row_at(i + S, which_ahead);
    }
    cp_async_commit();
    const uint8_t* src = stages + ((i % S) * T + lrow) * STAGE_ROW;
    if constexpr (L == ROW_MAJOR) {
      decode_row<PARTS>(src, fmt_row, lpart, ks + lrow * KROW, 8);
    } else {
      decode_row<PARTS>(src, fmt_row, lpart, ks + 8 * lrow, 8 * T);
      fence_async_shared();
    }
    if (valid && lpart == 0) valid[lrow] = fmt_row < 0 ? -INFINITY : 0.f;
  }

  __device__ void next(int i, uint16_t* ks, float* valid) {
    cp_async_wait<S - 2>();
    __syncthreads();  // tile i staged by every thread; the previous tile's readers are done
    decode(i, ks, valid);
    __syncthreads();
  }
};

// The end of a block: a warp's accumulators `o` (16 heads h0.. x dims [d0, d0 + 8 N)) and the
// running row max and sum (log2 units, spread over the 4 lanes of a row) become the output (one
// split: normalized with the sink, de-rotated, stored as float32, or with OUT_BF16 rounded to
// bfloat16: a kernel of its own, so the float32 one keeps its code) or the split's partials.
// `first` marks the warp that writes the per-head statistics.
template <int N, bool OUT_BF16 = false>
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
      const long long at = (t * p.heads + h) * ENTRY_DIM;
      const long long pos = p.positions ? load_id(p.positions, t, p.positions64) : 0;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        float x0 = o[n][2 * j] * f, x1 = o[n][2 * j + 1] * f;
        const int d = d0 + 8 * n + c2;
        if (p.positions && d >= NOPE_DIM) derotate_pair(x0, x1, pos, p, (d - NOPE_DIM) / 2);
        if constexpr (OUT_BF16) {
          *(uint32_t*)((uint16_t*)p.out + at + d) = (uint32_t)bf16_from_f32(x0) | ((uint32_t)bf16_from_f32(x1) << 16);
        } else {
          *(float2*)(p.out + at + d) = make_float2(x0, x1);
        }
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

// Split partials folded into one head's output, 4 dims a thread (dsv4_attention_combine, and the
// wgmma kernel's clusters): m is the largest of the splits' row maxima; `fold_split` adds, in
// split order, each split with a candidate (m_s > -inf) weighted by 2^(m_s - m); `store_folded`
// divides by the sum and the sink's term, de-rotates (`derotation`), stores the output (bfloat16 where
// p.out_bf16) and, where `first`, the head's log-sum-exp. One code for both, so the same splits
// give the same bits.
struct Folded {
  float m = -INFINITY, sum = 0.f;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
};

__device__ __forceinline__ void fold_split(Folded& f, float ms, float ls, float4 v) {
  const float w = exp2f(ms - f.m);
  f.sum += ls * w;
  f.acc[0] += v.x * w;
  f.acc[1] += v.y * w;
  f.acc[2] += v.z * w;
  f.acc[3] += v.w * w;
}

// The inverse RoPE of dims d .. d + 4 of query t's output (the same for every head): the cosine
// and sine of its two pairs, or none (`on` false) where the call does not de-rotate or d < 448.
struct Derotation {
  bool on = false;
  float c[2], s[2];
};

__device__ __forceinline__ Derotation derotation(const Params& p, long long t, int d) {
  Derotation r;
  r.on = p.positions && d >= NOPE_DIM;
  if (r.on) {
    const long long pos = load_id(p.positions, t, p.positions64);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      double s, c;
      rope_sincos(pos, p.inv_freq, (d - NOPE_DIM) / 2 + i, p.rope_mode, true, s, c);
      r.c[i] = (float)c;
      r.s[i] = (float)s;
    }
  }
  return r;
}

// `sink`: the head's sink logit; `rot`: derotation(p, t, d).
__device__ __forceinline__ void store_folded(const Params& p, Folded& f, long long t, int h, int d, bool first,
                                             float sink, const Derotation& rot) {
  const float s = f.m == -INFINITY ? 0.f : 1.f / (f.sum + exp2f(sink * LOG2E - f.m));
#pragma unroll
  for (int i = 0; i < 4; ++i) f.acc[i] *= s;
  if (rot.on) {
    rotate_pair(f.acc[0], f.acc[1], rot.c[0], rot.s[0]);
    rotate_pair(f.acc[2], f.acc[3], rot.c[1], rot.s[1]);
  }
  const long long at = (t * p.heads + h) * ENTRY_DIM + d;
  if (p.out_bf16) {
    *(uint2*)((uint16_t*)p.out + at) =
        make_uint2((uint32_t)bf16_from_f32(f.acc[0]) | ((uint32_t)bf16_from_f32(f.acc[1]) << 16),
                   (uint32_t)bf16_from_f32(f.acc[2]) | ((uint32_t)bf16_from_f32(f.acc[3]) << 16));
  } else {
    *(float4*)(p.out + at) = make_float4(f.acc[0], f.acc[1], f.acc[2], f.acc[3]);
  }
  if (first) p.lse[t * p.heads + h] = f.m == -INFINITY ? -INFINITY : (f.m + log2f(f.sum)) / LOG2E;
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
    corr[j] = m_new == -INFINITY ? 1.f : fast_exp2(row_max[j] - m_new);
    row_max[j] = m_new;
    row_sum[j] *= corr[j];
  }
  // A row with no candidate yet has max -inf and only -inf scores: 2^(-inf - 0) = 0.
  const float m_use[2] = {row_max[0] == -INFINITY ? 0.f : row_max[0], row_max[1] == -INFINITY ? 0.f : row_max[1]};
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    float e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      e[i] = fast_exp2(s[n][i] - m_use[i / 2]);
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

