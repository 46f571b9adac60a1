// The compressor's device code (cuda/compress.cu describes it), templated on the input type of
// the projections (BF: bfloat16, else float32): cuda/compress.cu instantiates the float32 kernels,
// cuda/compress_bf16.cu the bfloat16 ones, each in its own module so that neither's code changes
// the other's.
#pragma once
#include <cstddef>

#include "floats.cuh"
#include "grid.cuh"
#include "quant.cuh"
#include "rope.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 128;
constexpr int MAX_DIM = 512;

// Mirrored by `Params` in rust/core/src/gpu/compress.rs (same field order, repr(C)); both sides
// check its size and a few offsets at compile time.
struct Params {
  const float* kv;     // float32, or bfloat16 in the *_bf16 kernels (read through in_at)
  const float* score;  // as kv
  const float* ape;
  const float* norm_weight;
  const void* inv_freq;
  int rope_mode;  // bits of cuda/include/rope.cuh
  int rope_pairs;
  float* kv_state;
  float* score_state;
  float* out;
  long long start;
  int tokens;
  int ratio;
  int overlap;
  int dim;
  float eps;
  Quant quant;
};
static_assert(sizeof(Params) == 104, "Params must match rust/core/src/gpu/compress.rs");
static_assert(offsetof(Params, start) == 72 && offsetof(Params, quant) == 100,
              "Params must match rust/core/src/gpu/compress.rs");

struct Candidate {
  float value, logit;
};

// Value i of an input row block (kv, score): float32, or bfloat16 (BF: the *_bf16 kernels, one
// instance of each device function per input type, so the float32 kernels' code is as before).
template <bool BF, typename I>
__device__ __forceinline__ float in_at(const float* base, I i) {
  if constexpr (BF) {
    return bf16_to_f32(((const uint16_t*)base)[i]);
  } else {
    return base[i];
  }
}

// Values i .. i + 3 (16-byte aligned in float32, 8-byte in bfloat16: the launcher's four_wide).
template <bool BF, typename I>
__device__ __forceinline__ float4 in_at4(const float* base, I i) {
  if constexpr (BF) {
    return load4(base, i, 1);
  } else {
    return *(const float4*)(base + i);
  }
}

// The input i values past base.
template <bool BF, typename I>
__device__ __forceinline__ const float* in_skip(const float* base, I i) {
  if constexpr (BF) {
    return (const float*)((const uint16_t*)base + i);
  } else {
    return base + i;
  }
}

// Token p's value and logit on state/input column `col`.
template <bool BF>
__device__ __forceinline__ Candidate candidate(const Params& p, long long pos, int col) {
  const int width = (p.overlap ? 2 : 1) * p.dim;
  const long long r = p.ratio;
  if (pos >= p.start) {
    const long long row = pos - p.start;
    return {in_at<BF>(p.kv, row * width + col), in_at<BF>(p.score, row * width + col) + p.ape[(pos % r) * width + col]};
  }
  // Tokens before the call live in the state: the block in progress at `start` in slots
  // [coff r - r, coff r), the one before it (overlap only) in slots [0, r).
  const bool current = pos / r == p.start / r;
  const long long slot = (p.overlap && current ? r : 0) + pos % r;
  return {p.kv_state[slot * width + col], p.score_state[slot * width + col]};
}

// Candidates a chunk of the pooling loop: their loads are issued together (the loop is bound by
// memory latency, not by arithmetic: a thread per channel and up to 2 r candidates each).
constexpr int CHUNK = 8;

// Channel c of entry i, pooled (one softmax over its candidates), not yet normalized. The softmax
// runs over chunks of CHUNK candidates with a running maximum: each chunk's terms are taken
// against the maximum so far (including the chunk), and the sums are rescaled by
// exp(old max - new max) when it grows; chunks whose logits are all -inf while the maximum is
// still -inf add nothing. With at most CHUNK candidates (r = 4) that is exactly the two-pass
// softmax (max, then the sums; the first rescale multiplies zeros by zero), and a channel whose
// candidates are all -inf gives 0 / 0 as before.
template <typename Fetch>
__device__ __forceinline__ float pool_chunks(int count, Fetch fetch) {
  float m = -INFINITY, num = 0.f, den = 0.f;
  for (int j0 = 0; j0 < count; j0 += CHUNK) {
    Candidate k[CHUNK];
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) k[u] = j0 + u < count ? fetch(j0 + u) : Candidate{0.f, -INFINITY};
    float mc = m;
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) mc = fmaxf(mc, k[u].logit);
    if (mc == -INFINITY) continue;  // no finite logit so far (e.g. a fresh state's slots): nothing to add
    const float rescale = expf(m - mc);
    den *= rescale;
    num *= rescale;
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) {
      const float w = expf(k[u].logit - mc);
      den += w;
      num = fmaf(w, k[u].value, num);
    }
    m = mc;
  }
  return num / den;
}

// The candidates of an entry whose rows are all inputs, with the shapes known at compile time
// (W: a row's floats; R: the ratio; PREV: the previous block's R candidates come first, on column
// c, then the own block's on own_col): every load is a base register plus an immediate offset, so
// a thread's loads need few registers and more threads stay resident to keep memory busy.
// W = 0: the shapes at run time.
template <int W, int R, bool PREV, bool BF>
__device__ __forceinline__ float pool_inputs(const float* kv, const float* score, const float* ape, int width, int r,
                                             int c, int own_col) {
  const int w = W ? W : width, rr = R ? R : r;
  const int split = PREV ? rr : 0;
  return pool_chunks(split + rr, [&](int j) {
    const int col = j < split ? c : own_col;
    const int at = j * w + col;
    return Candidate{in_at<BF>(kv, at), in_at<BF>(score, at) + ape[(j < split ? j : j - split) * w + col]};
  });
}

// SHAPES: V4's three compressors get loads compiled for their shapes (below); without, every
// shape takes the run-time form (the same values: only the loads' addressing differs).
template <bool BF, bool SHAPES = true>
__device__ __forceinline__ float pool_channel(const Params& p, long long i, int c) {
  const long long r = p.ratio;
  const int d = p.dim;
  // Candidates: (previous block, "b" half at column c) then (own block, "a" half at d + c).
  const int own_col = p.overlap ? d + c : c;
  const long long prev0 = (p.overlap && i > 0) ? r * i - r : r * i;
  if (prev0 < p.start) {
    // Some candidates live in the state (the first entries of a call, decode).
    const int split = (int)(r * i - prev0);
    return pool_chunks((int)(r * i + r - prev0),
                       [&](int j) { return candidate<BF>(p, prev0 + j, j < split ? c : own_col); });
  }
  // Every candidate is an input row: j's row is prev0 - start + j, its ape row j % r.
  const int width = (p.overlap ? 2 : 1) * d;
  const long long row0 = (prev0 - p.start) * width;
  const float *kv = in_skip<BF>(p.kv, row0), *score = in_skip<BF>(p.score, row0);
  const bool prev = prev0 < r * i;
  // V4's three compressors: CSA main rows (r = 4, D = 512) and indexer keys (r = 4, D = 128),
  // both overlapping, and HCA (r = 128, D = 512).
  auto pool = [&](auto w_tag, auto r_tag) {
    constexpr int W = decltype(w_tag)::value, R = decltype(r_tag)::value;
    return prev ? pool_inputs<W, R, true, BF>(kv, score, p.ape, width, (int)r, c, own_col)
                : pool_inputs<W, R, false, BF>(kv, score, p.ape, width, (int)r, c, own_col);
  };
  if (SHAPES && p.overlap && r == 4 && d == 512) return pool(Tag<1024>{}, Tag<4>{});
  if (SHAPES && p.overlap && r == 4 && d == 128) return pool(Tag<256>{}, Tag<4>{});
  if (SHAPES && !p.overlap && r == 128 && d == 512) return pool(Tag<512>{}, Tag<128>{});  // (never prev: no overlap)
  return pool(Tag<0>{}, Tag<0>{});
}

// Channels c .. c + 3 of a float32 row: one 16-byte access where the launcher found the rows
// four-wide (`vec4`: D a multiple of 4 and every row 16-byte aligned, `four_wide`), else one at a
// time; loads give zeros at or past d, stores stop there.
__device__ __forceinline__ float4 load_channels(const float* row, int c, int d, int vec4) {
  if (vec4) return c < d ? load4(row, c, 0) : make_float4(0.f, 0.f, 0.f, 0.f);
  float v[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = c + k < d ? row[c + k] : 0.f;
  return make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store_channels(float* row, int c, int d, int vec4, float4 v) {
  if (vec4) {
    if (c < d) store4(row, c, 0, v);
    return;
  }
  const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (c + k < d) row[c + k] = x[k];
}

// Entry rows a finish block takes: one warp an entry, with no barrier of the block between its
// steps (a block an entry chained three), so four entries' loads are in flight a block.
constexpr int FINISH_ROWS = THREADS / 32;

// Channels a lane holds of an entry row: 128 u + 4 l .. 128 u + 4 l + 3 for lane l, u < U.
constexpr int U = MAX_DIM / 128;

// Channels c .. c + 3 of entry i of the overlapping form (r = 4), pooled by pool_chunks as
// pool_channel pools each: candidate j is position 4 i - 4 + j, at the column of its half (the
// previous block's "b", c; the own block's "a", D + c), an input row (logit score + ape) or,
// before `start`, a state slot (as candidate() picks it; the logit as stored). Entry 0 has no
// previous block: its 4 missing candidates count as logit -inf, value 0, placed first, which adds
// exact zeros (pool_chunks pads after the 4 it has; the sums are the same bit for bit). INPUTS:
// every candidate is an input row (the rows are then a constant stride apart). 16-byte loads
// (the rows four-wide, as the launcher checks); the 8 candidates' loads go out together.
template <bool INPUTS, bool BF>
__device__ __forceinline__ float4 pool_group4(const Params& p, long long i, int c) {
  const int d = p.dim, width = 2 * d;
  float4 kx[8], lx[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const long long pos = 4 * i - 4 + j;
    const int col = (j < 4 ? 0 : d) + c;
    kx[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    lx[j] = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    if (INPUTS || pos >= p.start) {
      const long long at = (pos - p.start) * width + col;
      kx[j] = in_at4<BF>(p.kv, at);
      const float4 sc = in_at4<BF>(p.score, at), a = *(const float4*)(p.ape + (j % 4) * width + col);
      lx[j] = make_float4(sc.x + a.x, sc.y + a.y, sc.z + a.z, sc.w + a.w);
    } else if (pos >= 0) {  // uniform over the warp
      const long long at = ((pos / 4 == p.start / 4 ? 4 : 0) + pos % 4) * width + col;
      kx[j] = *(const float4*)(p.kv_state + at);
      lx[j] = *(const float4*)(p.score_state + at);
    }
  }
  float r[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) r[k] = pool_chunks(8, [&](int j) { return Candidate{(&kx[j].x)[k], (&lx[j].x)[k]}; });
  return make_float4(r[0], r[1], r[2], r[3]);
}

// Entry i of the overlapping form pooled by one warp into `val` (lane l: channels 128 u + 4 l ..),
// through `xs` (the warp's D shared floats): a lane pools 4 channels at once (pool_group4, the
// warp's loads 512 contiguous bytes) where the rows allow 16-byte loads, else channel by channel
// through pool_channel's generic form.
template <bool BF>
__device__ __forceinline__ void pool_entry4(const Params& p, long long i, float4 (&val)[U], float* xs, int vec4) {
  const int lane = threadIdx.x % 32, d = p.dim;
  if (vec4) {
    if (i > 0 && 4 * i - 4 >= p.start) {
#pragma unroll 1
      for (int c = 4 * lane; c < d; c += 128) *(float4*)(xs + c) = pool_group4<true, BF>(p, i, c);
    } else {
#pragma unroll 1
      for (int c = 4 * lane; c < d; c += 128) *(float4*)(xs + c) = pool_group4<false, BF>(p, i, c);
    }
  } else {
    for (int c = lane; c < d; c += 32) xs[c] = pool_channel<BF, false>(p, i, c);
  }
  __syncwarp();
#pragma unroll
  for (int u = 0; u < U; ++u) val[u] = load_channels(xs, 128 * u + 4 * lane, d, vec4);
  __syncwarp();  // finish_values writes xs next
}

// One warp on entry i, pooled in `val` (lane l: channels 128 u + 4 l ..), to `dst` (D floats):
// RMSNorm, RoPE at the block's first position, then the quant round trip. `xs` is the warp's own
// D floats of shared memory (the RoPE pairs cross lanes). Every lane of the warp calls it;
// nothing else of the block takes part.
__device__ __forceinline__ void finish_values(const Params& p, long long i, float4 (&val)[U], float* dst, float* xs,
                                              int vec4) {
  const int lane = threadIdx.x % 32;
  const long long r = p.ratio;
  const int d = p.dim;
  float4 w[U];
#pragma unroll
  for (int u = 0; u < U; ++u) w[u] = load_channels(p.norm_weight, 128 * u + 4 * lane, d, vec4);
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) ss += (val[u].x * val[u].x + val[u].y * val[u].y) + (val[u].z * val[u].z + val[u].w * val[u].w);
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float rms = rsqrtf(ss / d + p.eps);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = 128 * u + 4 * lane;
    if (c < d) {
      val[u] = make_float4(val[u].x * rms * w[u].x, val[u].y * rms * w[u].y, val[u].z * rms * w[u].z,
                           val[u].w * rms * w[u].w);
      store_channels(xs, c, d, vec4, val[u]);
    }
  }
  __syncwarp();
  // RoPE at position r i on the last 2 rope_pairs dims (interleaved pairs), the mode's angles:
  // lane j rotates pair j (and j + 32, ..). (The angles come after the norm, whose values are then
  // in shared memory: computed beside the loads, they held the registers of both at once.)
  for (int j = lane; j < p.rope_pairs; j += 32) {
    double s, co;
    rope_sincos(r * i, p.inv_freq, j, p.rope_mode, false, s, co);
    const int k = d - 2 * p.rope_pairs + 2 * j;
    const float x0 = xs[k], x1 = xs[k + 1];
    xs[k] = x0 * (float)co - x1 * (float)s;
    xs[k + 1] = x0 * (float)s + x1 * (float)co;
  }
  __syncwarp();
  if (p.quant == QUANT_FP8) {
    // D = 512: 16 lanes share one 64-dim FP8 block's amax; dims from NOPE_DIM on (u = 3, lanes
    // 16 .. 31) are the RoPE dims, rounded to bf16.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = 128 * u + 4 * lane;
      const float4 x4 = *(const float4*)(xs + c);
      float v[4] = {x4.x, x4.y, x4.z, x4.w};
      float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
      m = group_amax(m, 16);  // every lane takes part in the shuffles
      if (c < NOPE_DIM) {
        fp8_round_trip4(v, ue8m0_exponent(m, FP8_MAX));
      } else {
        for (int k = 0; k < 4; ++k) v[k] = bf16_to_f32(bf16_from_f32(v[k]));
      }
      *(float4*)(dst + c) = make_float4(v[0], v[1], v[2], v[3]);
    }
  } else if (p.quant == QUANT_FP4) {
    // D = 128: Hadamard-128 (same butterflies as the CPU), then FP4 per 32 dims (8 lanes).
    const float4 x4 = *(const float4*)(xs + 4 * lane);
    float v[4] = {x4.x, x4.y, x4.z, x4.w};
    float a0 = v[0] + v[1], b0 = v[0] - v[1], a1 = v[2] + v[3], b1 = v[2] - v[3];
    v[0] = a0 + a1; v[2] = a0 - a1; v[1] = b0 + b1; v[3] = b0 - b1;
    for (int h = 4; h < INDEX_DIM; h *= 2) {
      int mask = h / 4;
      bool upper = (lane & mask) != 0;
      for (int k = 0; k < 4; ++k) {
        float other = __shfl_xor_sync(0xffffffffu, v[k], mask);
        v[k] = upper ? other - v[k] : v[k] + other;
      }
    }
    float m = 0.f;
    for (int k = 0; k < 4; ++k) {
      v[k] *= HADAMARD_SCALE;
      m = fmaxf(m, fabsf(v[k]));
    }
    int e = ue8m0_exponent(group_amax(m, 8), FP4_MAX);
    float s = exp2i(e);
    for (int k = 0; k < 4; ++k) v[k] = fp4_decode(fp4_encode(v[k], e)) * s;
    *(float4*)(dst + 4 * lane) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = 128 * u + 4 * lane;
      if (c < d) store_channels(dst, c, d, vec4, load_channels(xs, c, d, vec4));
    }
  }
}

// finish_values on the pooled entry i at `dst` (the pool kernel's output), in place.
__device__ __forceinline__ void finish_entry(const Params& p, long long i, float* dst, float* xs, int vec4) {
  const int lane = threadIdx.x % 32;
  float4 val[U];
#pragma unroll
  for (int u = 0; u < U; ++u) val[u] = load_channels(dst, 128 * u + 4 * lane, p.dim, vec4);
  finish_values(p, i, val, dst, xs, vec4);
}

// Advances state column `col` (< coff D) by the call's tokens, as feeding them one by one would.
// Without overlap the tokens' slots are distinct, so `parts` blocks share them (part k takes the
// chunks k, k + parts, ...); the overlapping form is done by part 0 alone.
template <bool BF>
__device__ __forceinline__ void advance_state(const Params& p, int col, int part, int parts) {
  const int width = (p.overlap ? 2 : 1) * p.dim;
  const long long r = p.ratio, end = p.start + p.tokens;
  if (!p.overlap) {
    // The last min(S, r) tokens, CHUNK at a time: the loads of a chunk before its stores (the
    // compiler cannot move loads above stores that may alias them).
    for (long long pos0 = max(p.start, end - r) + (long long)part * CHUNK; pos0 < end; pos0 += (long long)parts * CHUNK) {
      float kv[CHUNK], sc[CHUNK];
      long long slot[CHUNK];
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        const long long pos = pos0 + u, row = pos - p.start;
        slot[u] = pos % r;
        if (pos < end) {
          kv[u] = in_at<BF>(p.kv, row * width + col);
          sc[u] = in_at<BF>(p.score, row * width + col) + p.ape[slot[u] * width + col];
        }
      }
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        if (pos0 + u < end) {
          p.kv_state[slot[u] * width + col] = kv[u];
          p.score_state[slot[u] * width + col] = sc[u];
        }
      }
    }
    return;
  }
  if (part != 0) return;
  // Overlap (r = 4): slots [4, 8) hold the last token of each residue (the block in progress);
  // after the last block completed here, slots [0, 4) hold a copy of that block.
  float kv_cur[4], sc_cur[4];
  for (int j = 0; j < 4; ++j) {
    kv_cur[j] = p.kv_state[(4 + j) * width + col];
    sc_cur[j] = p.score_state[(4 + j) * width + col];
  }
  const long long last_done = end / 4 - 1;  // last block completed by position end - 1
  if (last_done >= 0 && 4 * last_done + 3 >= p.start) {
    for (int j = 0; j < 4; ++j) {
      const long long pos = 4 * last_done + j;
      Candidate k = pos >= p.start ? candidate<BF>(p, pos, col) : Candidate{kv_cur[j], sc_cur[j]};
      p.kv_state[j * width + col] = k.value;
      p.score_state[j * width + col] = k.logit;
    }
  }
  for (int j = 0; j < 4; ++j) {
    long long pos = end - 1 - ((end - 1 - j) % 4 + 4) % 4;  // last position < end with pos % 4 == j
    if (pos >= p.start && pos >= 0) {
      Candidate k = candidate<BF>(p, pos, col);
      p.kv_state[(4 + j) * width + col] = k.value;
      p.score_state[(4 + j) * width + col] = k.logit;
    }
  }
}

// Mirrored by `BatchParams` in rust/core/src/gpu/compress.rs (same field order, repr(C)); both
// sides check its size and a few offsets at compile time. `base` holds what the sequences share
// (kv, score: the whole batch; out: [T, D]); each kernel fills a copy per sequence.
struct BatchParams {
  Params base;
  float* state;             // [slots, 2, coff r, coff D]
  const void* state_slots;  // [B], int32 or int64
  const void* starts;       // [B], int64 or int32
  const void* cu_tokens;    // [B + 1], int32 or int64
  long long slots;
  long long total;          // T, the rows of kv, score and out
  int batch;                // B
  int slots64;
  int starts64;
  int cu64;
};
static_assert(sizeof(BatchParams) == 168, "BatchParams must match rust/core/src/gpu/compress.rs");
static_assert(offsetof(BatchParams, state) == 104 && offsetof(BatchParams, total) == 144 &&
                  offsetof(BatchParams, cu64) == 164,
              "BatchParams must match rust/core/src/gpu/compress.rs");

// Positions are clamped to [0, MAX_START] so that no garbage start overflows the arithmetic.
constexpr long long MAX_START = 1LL << 50;

// cu_tokens[k] clamped into [0, T].
__device__ __forceinline__ long long cu_at(const BatchParams& bp, int k) {
  return min(max(load_id(bp.cu_tokens, k, bp.cu64), 0LL), bp.total);
}

// Sequence b as a single-sequence call: its rows [lo, lo + tokens) of the batch, its state slot
// and its start. False for a padding row (slot outside [0, slots)).
template <bool BF>
__device__ __forceinline__ bool sequence(const BatchParams& bp, int b, Params& p, long long& lo) {
  const long long slot = load_id(bp.state_slots, b, bp.slots64);
  if (slot < 0 || slot >= bp.slots) return false;
  lo = cu_at(bp, b);
  const long long hi = max(lo, cu_at(bp, b + 1));
  const long long width = (bp.base.overlap ? 2 : 1) * (long long)bp.base.dim;
  const long long state_size = (bp.base.overlap ? 2 : 1) * (long long)bp.base.ratio * width;
  p = bp.base;
  p.kv = in_skip<BF>(bp.base.kv, lo * width);
  p.score = in_skip<BF>(bp.base.score, lo * width);
  p.kv_state = bp.state + slot * 2 * state_size;
  p.score_state = p.kv_state + state_size;
  p.start = min(max(load_id(bp.starts, b, bp.starts64), 0LL), MAX_START);
  p.tokens = (int)(hi - lo);
  return true;
}

// The entry row t of the batch completes, if any: its sequence as a single call (p) and the
// entry's index (i). Row t's sequence is the last b with cu_tokens[b] <= t (binary search).
template <bool BF>
__device__ __forceinline__ bool entry_of_row(const BatchParams& bp, long long t, Params& p, long long& i) {
  if (bp.batch <= 0) return false;
  int lo_b = 0, hi_b = bp.batch - 1;
  while (lo_b < hi_b) {
    const int mid = (lo_b + hi_b + 1) / 2;
    if (cu_at(bp, mid) <= t) lo_b = mid; else hi_b = mid - 1;
  }
  long long lo;
  if (!sequence<BF>(bp, lo_b, p, lo) || t < lo || t >= lo + p.tokens) return false;
  const long long pos = p.start + (t - lo);
  i = pos / p.ratio;
  return (pos + 1) % p.ratio == 0;
}

}  // namespace

// Grid (entries, channel groups of 128): thread per channel, one softmax over its candidates;
// the pooled, not yet normalized entry goes to `out`.
// (The register cap, 48 a thread here and 56 in the batched form, lets 10 or 9 blocks share an SM,
// for more loads in flight.)
template <bool BF>
__device__ __forceinline__ void compress_pool(const Params& p) {
  const int c = blockIdx.y * THREADS + threadIdx.x;
  const long long r = p.ratio;
  const long long i = p.start / r + blockIdx.x;
  if (c >= p.dim) return;
  p.out[blockIdx.x * (long long)p.dim + c] = pool_channel<BF>(p, i, c);
}

// Grid (finish_blocks + column groups x parts): block b < finish_blocks finishes entries
// 4 b .. 4 b + 3 of the call, a warp each: with `pool` (the overlapping form, r = 4) it pools the
// entry first (pool_entry4), else it reads what dsv4_compress_pool wrote; then RMSNorm, RoPE at
// the block's first position and the quant round trip, to `out`. The blocks after them advance
// the state, (column group, part) each (parts: see advance_state), which must follow every read
// of the old state: after the pool kernel, or (pool) as a launch of their own after the entries'
// (in the same launch where no entry reads the old state).
template <bool BF>
__device__ __forceinline__ void compress_finish(const Params& p, int finish_blocks, int parts, int pool, int vec4) {
  if ((int)blockIdx.x >= finish_blocks) {
    const int b = blockIdx.x - finish_blocks;
    const int col = (b / parts) * THREADS + threadIdx.x;
    if (col < (p.overlap ? 2 : 1) * p.dim) advance_state<BF>(p, col, b % parts, parts);
    return;
  }
  __shared__ __align__(16) float xs[FINISH_ROWS][MAX_DIM];
  const long long r = p.ratio, first = p.start / r, entries = (p.start + p.tokens) / r - first;
  const int warp = threadIdx.x / 32;
  const long long e = (long long)FINISH_ROWS * blockIdx.x + warp;
  if (e >= entries) return;
  float* dst = p.out + e * p.dim;
  if (pool) {
    float4 val[U];
    pool_entry4<BF>(p, first + e, val, xs[warp], vec4);
    finish_values(p, first + e, val, dst, xs[warp], vec4);
  } else {
    finish_entry(p, first + e, dst, xs[warp], vec4);
  }
}

// The non-overlapping form (r = 128) in one launch for long calls: grid (state_blocks + entries),
// ENTRY_THREADS threads. Block state_blocks + e pools entry e of the call, a thread a channel
// (pool_channel, as dsv4_compress_pool), into shared memory; then its first warp finishes it
// (finish_values: RMSNorm, RoPE, the quant round trip) to `out`, so the pooled entry never goes
// through memory and no finish launch follows. Blocks b < state_blocks advance the state, part b
// of state_blocks (advance_state), a thread a column; the launcher gives it state blocks only
// where no entry reads the old state (a call from a block start), else the finish kernel's state
// blocks follow in a launch of their own. Two blocks an SM (64 registers): at three (40
// registers) the loop spilled and the call took 10 % longer.
constexpr int ENTRY_THREADS = MAX_DIM;

template <bool BF>
__device__ __forceinline__ void compress_entry(const Params& p, int state_blocks, int vec4) {
  const int c = threadIdx.x;
  if ((int)blockIdx.x < state_blocks) {
    if (c < p.dim) advance_state<BF>(p, c, blockIdx.x, state_blocks);
    return;
  }
  __shared__ __align__(16) float xs[MAX_DIM];
  const long long e = blockIdx.x - state_blocks, i = p.start / p.ratio + e;
  if (c < p.dim) xs[c] = pool_channel<BF>(p, i, c);
  __syncthreads();
  if (c >= 32) return;
  float4 val[U];
#pragma unroll
  for (int u = 0; u < U; ++u) val[u] = load_channels(xs, 128 * u + 4 * c, p.dim, vec4);
  __syncwarp();  // finish_values writes xs next
  finish_values(p, i, val, p.out + e * p.dim, xs, vec4);
}

// Grid (T, channel groups of 128): row t's channel c is the pooled entry token t completes, or
// zero when it completes none (or belongs to a padding row).
template <bool BF>
__device__ __forceinline__ void compress_batch_pool(const BatchParams& bp) {
  const int c = blockIdx.y * THREADS + threadIdx.x;
  if (c >= bp.base.dim) return;
  const long long t = blockIdx.x;
  Params p;
  long long i;
  bp.base.out[t * bp.base.dim + c] = entry_of_row<BF>(bp, t, p, i) ? pool_channel<BF>(p, i, c) : 0.f;
}

// Grid (finish_blocks + B x column groups x parts): block b < finish_blocks takes rows
// 4 b .. 4 b + 3, a warp each: a row that completes an entry gets it (with `pool`, the overlapping
// form, pooled here, else as dsv4_compress_batch_pool wrote it), finished as dsv4_compress_finish
// does; with `pool` the other rows get zeros. The blocks after them advance each live sequence's
// state, (sequence, column group, part) each, after every read of the old states (as in
// dsv4_compress_finish).
template <bool BF>
__device__ __forceinline__ void compress_batch_finish(const BatchParams& bp, int finish_blocks, int columns, int parts,
                                                      int pool, int vec4) {
  Params p;
  if ((int)blockIdx.x >= finish_blocks) {
    const int b = blockIdx.x - finish_blocks, part = b % parts, group = (b / parts) % columns;
    const int col = group * THREADS + threadIdx.x;
    long long lo;
    if (col >= (bp.base.overlap ? 2 : 1) * bp.base.dim) return;
    if (!sequence<BF>(bp, b / parts / columns, p, lo) || p.tokens == 0) return;
    advance_state<BF>(p, col, part, parts);
    return;
  }
  __shared__ __align__(16) float xs[FINISH_ROWS][MAX_DIM];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = (long long)FINISH_ROWS * blockIdx.x + warp;
  if (t >= bp.total) return;
  float* dst = bp.base.out + t * bp.base.dim;
  long long i;
  if (!entry_of_row<BF>(bp, t, p, i)) {  // uniform over the warp
    if (pool)
      for (int c = lane; c < bp.base.dim; c += 32) dst[c] = 0.f;
    return;
  }
  if (pool) {
    float4 val[U];
    pool_entry4<BF>(p, i, val, xs[warp], vec4);
    finish_values(p, i, val, dst, xs[warp], vec4);
  } else {
    finish_entry(p, i, dst, xs[warp], vec4);
  }
}

