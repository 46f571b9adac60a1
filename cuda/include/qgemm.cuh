// What the block-scaled GEMM kernels share (cuda/qgemm.cu, the portable forms, and
// cuda/qgemm_sm90a.cu, the Hopper tiled form): the launch parameters, the weight decoders and the
// work items. See cuda/qgemm.cu for the contract.
#pragma once
#include <cstddef>
#include <stdint.h>

#include "quant.cuh"

namespace dsv4 {

constexpr int KC = 128;  // K per step: one activation block, four FP4 scale groups, an FP8 block column
// Mirrored by `GemmParams` in rust/core/src/gpu/qgemm.rs (same field order, repr(C)); both sides
// check its size and a few offsets at compile time.
struct GemmParams {
  const uint16_t* a;         // bf16 activations (already quantized / rounded)
  long long a_row_stride;    // elements between rows
  long long a_group_stride;  // elements between groups (grouped linear); 0 for the MoE
  const int* a_rows;         // MoE: sorted position -> pair; the A row is a_rows[i] / a_div. Null: i
  const uint8_t* w;
  const void* w_scale;       // FP8: float [ceil(R/128), ceil(K/128)]; FP4: uint8 [R, K/32]
  const int* tiles;          // MoE plan: [*, 3] (group, first position, rows); null: dense
  const int* tile_count;
  void* out;
  long long m;               // dense: rows
  long long out_row_stride;  // elements
  long long out_group_stride;
  long long out_split_stride;  // split-K: elements between the partial sums of two splits
  int a_div;
  int n;                     // weight rows per group (2I for SwiGLU)
  int k;
  int m_tiles;               // dense: row tiles per group
  int swiglu;
  float limit;
  int out_bf16;              // 0 float32, 1 bfloat16; OUT_H_BF16_ODD: h as bf16_round_odd (below)
  int k_steps_per_split;
  const float* a_scale;      // FP8 decode form: the activations' float scale per (row, 128 block)
  const void* x;             // the Hopper decode form's fused kernels: the unquantized activations,
  int x_bf16;                // bfloat16 (1) or float32 (0), strides a_row_stride / a_group_stride
  int w_tiles;               // the weights in 64-row tiles (w_row); 0: DeepSeek's rows
  int weights_first;         // the Hopper decode form's MoE GEMM after the first: see qgemv_wg
  int pad_;
};
static_assert(sizeof(GemmParams) == 168, "GemmParams must match rust/core/src/gpu/qgemm.rs");
static_assert(offsetof(GemmParams, m) == 72 && offsetof(GemmParams, a_div) == 104 && offsetof(GemmParams, limit) == 124 &&
                  offsetof(GemmParams, a_scale) == 136 && offsetof(GemmParams, x_bf16) == 152,
              "GemmParams must match rust/core/src/gpu/qgemm.rs");


// Where a weight row's bytes lie. DeepSeek's layout: row ng (groups flattened) at ng times the
// row's bytes (K / 2 MXFP4, K FP8), its K steps of 128 values (64 or 128 bytes) one after the
// other. In tiles (p.w_tiles; python dsv4rs.ops.weight_tiles): one K step of 64 consecutive rows
// lies together (4 KB MXFP4, 8 KB FP8), a row block's tiles in K order, so a block reading a K step
// of its rows reads whole kilobytes. A row's bytes within a step are where they were; only the
// row's start (w_row) and the distance from one step to the next (w_step) move.
template <bool FP4>
__device__ __forceinline__ long long w_row(const GemmParams& p, long long ng, long long k) {
  constexpr int STEP = FP4 ? KC / 2 : KC;
  const long long row_bytes = FP4 ? k / 2 : k;
  return p.w_tiles ? (ng & ~63LL) * row_bytes + (ng & 63) * STEP : ng * row_bytes;
}
template <bool FP4>
__device__ __forceinline__ long long w_step(const GemmParams& p) {
  constexpr int STEP = FP4 ? KC / 2 : KC;
  return p.w_tiles ? 64 * STEP : STEP;
}

// Eight FP4 codes (values v0 .. v7: two per byte, even index in the low nibble) as packed bf16
// pairs (v_i, v_{i+4}), i = 0..3, times `mult` (a bf16 power of two in both halves). Nibble i
// and nibble i + 4 sit 16 bits apart, so one shift moves the magnitude bits of both into bf16
// position (bits 6-8: the value times 2^-126, subnormals included) and one the signs (bit 15):
// two shifts, two masks, an or and one multiply per pair. The activations are stored in the same
// interleaved order (`interleaved_col`), so the mma sees matching K values.
template <int I>
__device__ __forceinline__ uint32_t shift_left(uint32_t x) {
  return I >= 0 ? x << (I >= 0 ? I : 0) : x >> (I < 0 ? -I : 0);
}

template <int I>
__device__ __forceinline__ uint32_t fp4_pair(uint32_t raw, uint32_t mult) {
  const uint32_t bits = (shift_left<6 - 4 * I>(raw) & 0x01C001C0u) | (shift_left<12 - 4 * I>(raw) & 0x80008000u);
  __nv_bfloat162 v = __hmul2(*(const __nv_bfloat162*)&bits, *(const __nv_bfloat162*)&mult);
  return *(uint32_t*)&v;
}

__device__ __forceinline__ void fp4x8_interleaved(uint32_t raw, uint32_t mult, uint32_t* r) {
  r[0] = fp4_pair<0>(raw, mult);
  r[1] = fp4_pair<1>(raw, mult);
  r[2] = fp4_pair<2>(raw, mult);
  r[3] = fp4_pair<3>(raw, mult);
}

__device__ __forceinline__ uint32_t bf16x2_pow2(int e) {
  const uint32_t h = (uint32_t)((e + 127) << 7) & 0xFFFFu;
  return h | (h << 16);
}

// This lane's 32 consecutive weight values of one row in a 128-wide K step as 16 bf16 pairs in
// mma order: pairs 2s and 2s + 1 hold K offsets 4s .. 4s + 3 of the 32 (for FP4 in the
// interleaved order of interleaved_col). FP4: 16 bytes and the exponent se of their 1x32 scale,
// folded in exactly (one multiply by 2^(126 + se) when that is a bf16, i.e. se <= 1 as for every
// real weight, else a second by 2^(se - 1)); FP8: 32 bytes (the block scale multiplies the step's
// float32 partial sum instead).
__device__ __forceinline__ void fp4x32_lane(const uint4 raw, int se, uint32_t (&b)[16]) {
  const uint32_t mult = bf16x2_pow2(126 + min(se, 1));
  fp4x8_interleaved(raw.x, mult, &b[0]);
  fp4x8_interleaved(raw.y, mult, &b[4]);
  fp4x8_interleaved(raw.z, mult, &b[8]);
  fp4x8_interleaved(raw.w, mult, &b[12]);
  if (se > 1) {
    const __nv_bfloat162 extra = __bfloat162bfloat162(__ushort_as_bfloat16((unsigned short)((se - 1 + 127) << 7)));
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      __nv_bfloat162 v = __hmul2(*(const __nv_bfloat162*)&b[e], extra);
      b[e] = *(uint32_t*)&v;
    }
  }
}

// fp4x32_lane for a scale exponent se <= 1 (every real weight's): one multiply, no branch.
__device__ __forceinline__ void fp4x32_lane_small(const uint4 raw, int se, uint32_t (&b)[16]) {
  const uint32_t mult = bf16x2_pow2(126 + se);
  fp4x8_interleaved(raw.x, mult, &b[0]);
  fp4x8_interleaved(raw.y, mult, &b[4]);
  fp4x8_interleaved(raw.z, mult, &b[8]);
  fp4x8_interleaved(raw.w, mult, &b[12]);
}

__device__ __forceinline__ void fp8x32_lane(const uint4 r0, const uint4 r1, uint32_t (&b)[16]) {
  const uint2 parts[4] = {make_uint2(r0.x, r0.y), make_uint2(r0.z, r0.w), make_uint2(r1.x, r1.y), make_uint2(r1.z, r1.w)};
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const uint4 v = fp8x8_to_bf16<true>(parts[u], 0);
    b[4 * u] = v.x, b[4 * u + 1] = v.y, b[4 * u + 2] = v.z, b[4 * u + 3] = v.w;
  }
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// Where value `col` of a row is stored in the interleaved order of MXFP4 activations: within
// each group of 8, v0 v4 v1 v5 v2 v6 v3 v7.
__device__ __forceinline__ int interleaved_col(int col) { return (col & ~7) | ((col & 3) << 1) | ((col >> 2) & 1); }

// The block's work item: group, first row (sorted position or dense row) and row count; false
// when the block has none (past the plan's tile count).
__device__ __forceinline__ bool work_item(const GemmParams& p, int bm, int& g, long long& row0, int& rows) {
  const int y = blockIdx.y;
  if (p.tiles) {
    if (y >= *p.tile_count) return false;
    g = p.tiles[3 * y];
    row0 = p.tiles[3 * y + 1];
    rows = p.tiles[3 * y + 2];
    return rows > 0;
  }
  g = y / p.m_tiles;
  row0 = (long long)(y % p.m_tiles) * bm;
  rows = (int)min((long long)bm, p.m - row0);
  return rows > 0;
}

// Weight row (within its group) held in row slot sr of a block of `bn` weight rows (warp sr / 16,
// tile or fragment half (sr / 8) % 2, fragment row sr % 8), or -1 when past the weights. With
// SwiGLU the slots 16 w + r and 16 w + 8 + r hold gate row h and up row I + h of the same h.
__device__ __forceinline__ int weight_row(const GemmParams& p, int sr, int bn) {
  const int w = sr / 16, j = (sr / 8) % 2, r = sr % 8;
  if (p.swiglu) {
    const int half = p.n / 2;
    const int h = blockIdx.x * (bn / 2) + 8 * w + r;
    return h < half ? h + j * half : -1;
  }
  const int n = blockIdx.x * bn + sr;
  return n < p.n ? n : -1;
}

// Orders of the bf16 activations A(x) in memory (dsv4_act_quant's `layout`), each matching how a
// GEMM form reads its B (or wgmma A) operand: natural; interleaved within groups of 8 (the
// portable forms over MXFP4 weights, see fp4x8_interleaved); and the Hopper tiled form's orders
// over FP8 or MXFP4 weights (wgmma_pos).
enum ActLayout : int { ACT_NATURAL = 0, ACT_INTERLEAVED = 1, ACT_WGMMA_FP8 = 2, ACT_WGMMA_FP4 = 3 };

// Where the activation of K offset c (0..127 within its 128-block) is stored for the Hopper tiled
// form (cuda/qgemm_sm90a.cu). There a lane (quad position q) decodes 32 consecutive weight values
// of a row per step, in the pair order of fp8x32_lane / fp4x32_lane: its registers for wgmma k16
// step s hold the values at lane positions P = 32 q + 4 s + 2 hi + e (e = 0, 1 in a register;
// hi = 0 for A fragment columns 2q, 2q + 1, hi = 1 for 2q + 8, 2q + 9), and the activations,
// read by wgmma K-major from shared memory, must hold the same K at logical position
// L = 16 s + 8 hi + 2 q + e. P is the natural offset for FP8 weights and the interleaved one
// (interleaved_col) for MXFP4.
__device__ __forceinline__ int wgmma_pos(int c, bool fp4) {
  const int p = fp4 ? interleaved_col(c) : c;
  return 16 * ((p >> 2) & 7) + 8 * ((p >> 1) & 1) + 2 * (p >> 5) + (p & 1);
}

// Position of K offset `col` of a row in activation layout `layout` (k % 128 == 0 for the wgmma
// layouts).
__device__ __forceinline__ int act_pos(int col, int layout) {
  switch (layout) {
    case ACT_INTERLEAVED: return interleaved_col(col);
    case ACT_WGMMA_FP8: return (col & ~127) | wgmma_pos(col & 127, false);
    case ACT_WGMMA_FP4: return (col & ~127) | wgmma_pos(col & 127, true);
    default: return col;
  }
}

// The FP8 decode forms' pieces (cuda/qgemm.cu qgemv_f8 on mma.sync, cuda/qgemm_sm90a.cu
// qgemv_wg on wgmma).

// Where the activation code of K offset p (0..127 within its 128-wide step) is stored in the step,
// for each FP8 decode form and weight format (dsv4_act_quant_f8's `layout`):
// - F8_MMA_FP8 / F8_MMA_FP4 (qgemv_f8 on mma.sync): so that lane q of a quad finds its B registers
//   of mma i at words 2i and 2i + 1 of bytes 32q .. 32q + 31. MXFP4 weights: p = 32 b + 8 q + 2 j
//   + h (block b; the widened low nibbles (h = 0) form a0/a1, the high ones a2/a3) goes to
//   32 q + 8 b + 4 h + j. FP8 weights: p = 16 m + 4 q + j (16-byte chunk m, mma m / 2) goes to
//   32 q + 4 m + j.
// - F8_WG_FP8 / F8_WG_FP4 (cuda/qgemm_sm90a.cu qgemv_wg on wgmma, whose B operand is read from
//   shared memory in K order): at the K index the lane's A registers give it. FP8 weights: p
//   itself (also what qgemm_wgf8, the Hopper tiled form on FP8 tensor cores, reads: its weights
//   and activations both come from shared memory in K order). MXFP4 weights: slice b's K index
//   16 h + 4 q + j holds p = 32 b + 8 q + 2 j + h.
enum F8ActLayout : int { F8_MMA_FP8 = 0, F8_MMA_FP4 = 1, F8_WG_FP8 = 2, F8_WG_FP4 = 3 };
__device__ __forceinline__ int f8_act_pos(int p, int layout) {
  switch (layout) {
    case F8_MMA_FP4: return 32 * ((p >> 3) & 3) + 8 * (p >> 5) + 4 * (p & 1) + ((p >> 1) & 3);
    case F8_WG_FP8: return p;
    case F8_WG_FP4: return 32 * (p >> 5) + 16 * (p & 1) + 4 * ((p >> 3) & 3) + ((p >> 1) & 3);
    default: return 32 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3);
  }
}

// Eight e2m1 codes (a word of MXFP4: the low nibble of byte j is value 2j) as e4m3 codes of the
// values times 2^-6: `lo` holds values 0, 2, 4, 6 and `hi` values 1, 3, 5, 7.
__device__ __forceinline__ void fp4x8_to_e4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = ((w << 2) & 0x1C1C1C1Cu) | ((w << 4) & 0x80808080u);
  hi = ((w >> 2) & 0x1C1C1C1Cu) | (w & 0x80808080u);
}

// The float32 value of UE8M0 code byte B of `w` times 2^6 (the widening's 2^-6 undone): exact for
// codes 0 .. 248 (the caller adds 6 to every byte first, `w6 = w + 0x06060606`).
template <int B>
__device__ __forceinline__ float ue8m0x64(uint32_t w6) {
  return __uint_as_float((B < 3 ? w6 << (23 - 8 * B) : w6 >> 1) & 0x7F800000u);
}

// The value 2^(c - 127) of UE8M0 code byte b of `w`, for any code (0 is 2^-127, 255 NaN): the exact
// pass, for warps that met a code above 248, whose value times 2^6 would overflow float32 (the
// caller then applies the 2^6 to the step's sums).
__device__ __forceinline__ float ue8m0_any(uint32_t w, int b) {
  const uint32_t c = (w >> (8 * b)) & 0xFFu;
  return __uint_as_float(c == 255u ? 0x7FC00000u : c == 0u ? 0x00400000u : c << 23);
}

// Byte offset in a stage of 16-byte chunk c of weight row slot r, swizzled so that the eight rows
// of an ldmatrix matrix (one chunk of eight consecutive slots) hit eight distinct bank groups.
template <bool FP4>
__device__ __forceinline__ int f8_w_at(int r, int c) {
  return FP4 ? 64 * r + 16 * (c ^ ((r >> 1) & 3)) : 128 * r + 16 * (c ^ (r & 7));
}

// Weight row (within its group) of slot r of a warp's 16 in the FP8 decode forms, whose first
// row is `col0` (with SwiGLU its first h column: slots 0-7 gate rows col0 + r, 8-15 the matching
// up rows I + col0 + r - 8), or -1 past the weights.
__device__ __forceinline__ int f8_weight_row(const GemmParams& p, int col0, int r) {
  if (p.swiglu) {
    const int half = p.n / 2, h = col0 + r % 8;
    return h < half ? h + (r / 8) * half : -1;
  }
  const int n = col0 + r;
  return n < p.n ? n : -1;
}

// Element offset (in the activation codes) of activation row r of a decode tile, or -1 past
// its rows.
__device__ __forceinline__ long long f8_act_row(const GemmParams& p, int g, long long row0, int rows, int r) {
  if (r >= rows) return -1;
  const long long pos = row0 + r;
  const long long src = p.a_rows ? p.a_rows[pos] / p.a_div : pos;
  return src * p.a_row_stride + g * p.a_group_stride;
}

// Where weight row n's scales of K step 0 start: its UE8M0 codes (MXFP4; a word a step) or its
// 128-row block's floats (FP8; one a step); null past the weights (n < 0).
template <bool FP4>
__device__ __forceinline__ const uint8_t* f8_scale_src(const GemmParams& p, int g, int n) {
  if (n < 0) return nullptr;
  const long long ng = (long long)g * p.n + n;
  return FP4 ? (const uint8_t*)p.w_scale + ng * (p.k / 32) : (const uint8_t*)((const float*)p.w_scale + (ng / 128) * (p.k / KC));
}

// The four MXFP4 scale codes (one a 32-wide block) of rows fr and fr + 8 of a K step, c0 and c1,
// as float32: times 2^6 by integer moves in the fast pass (exact up to code 248; `code_max` keeps
// the bytewise maximum met), any code exactly in the EXACT pass (the caller applies the 2^6).
template <bool EXACT>
__device__ __forceinline__ void f8_fp4_scales(uint32_t c0, uint32_t c1, float (&ws)[2][4], uint32_t& code_max) {
  if (EXACT) {
#pragma unroll
    for (int b = 0; b < 4; ++b) ws[0][b] = ue8m0_any(c0, b), ws[1][b] = ue8m0_any(c1, b);
  } else {
    code_max = __vmaxu4(code_max, __vmaxu4(c0, c1));
    const uint32_t w0 = c0 + 0x06060606u, w1 = c1 + 0x06060606u;
    ws[0][0] = ue8m0x64<0>(w0), ws[0][1] = ue8m0x64<1>(w0), ws[0][2] = ue8m0x64<2>(w0), ws[0][3] = ue8m0x64<3>(w0);
    ws[1][0] = ue8m0x64<0>(w1), ws[1][1] = ue8m0x64<1>(w1), ws[1][2] = ue8m0x64<2>(w1), ws[1][3] = ue8m0x64<3>(w1);
  }
}

// `out_bf16` of a SwiGLU GEMM whose h an FP8 quantization reads next (the Hopper tiled form over
// MXFP4 weights): h rounded to odd in bfloat16, rows in natural order, which that quantization
// reads as the float32 h's codes and scales bit for bit at half the bytes.
constexpr int OUT_H_BF16_ODD = 2;

// The epilogue for one warp's 16 weight rows (the decode forms; the Hopper tiled forms, NT 16):
// stores its outputs (or, with SwiGLU, h: bf16 in H_LAYOUT, the down GEMM's order, or float32;
// with ODD_H, bf16_round_odd in natural order). Fragment (t, e) holds weight slot fr + 8 (e / 2),
// activation row 8 t + 2 q + e % 2 of the tile. `col0` is the warp's first weight row (with
// SwiGLU: its first h column, gate rows in slots 0-7, the matching up rows in 8-15).
template <int NT, int H_LAYOUT = ACT_INTERLEAVED, bool ODD_H = false>
__device__ __forceinline__ void gemv_store(const GemmParams& p, const float (&acc)[NT][4], int g, long long row0, int rows,
                                           int col0) {
  const int lane = threadIdx.x % 32, q = lane % 4, fr = lane / 4;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int r = 8 * t + 2 * q + e2;
      if (r >= rows) continue;
      const long long row = row0 + r;
      if (p.swiglu) {
        const int col = col0 + fr;
        if (col >= p.n / 2) continue;
        const float gate = fminf(acc[t][e2], p.limit);
        const float up = fminf(fmaxf(acc[t][2 + e2], -p.limit), p.limit);
        const float h = silu(gate) * up;
        const long long o = row * p.out_row_stride + g * p.out_group_stride;
        if constexpr (ODD_H) ((uint16_t*)p.out)[o + col] = bf16_round_odd(h);
        else if (p.out_bf16) ((uint16_t*)p.out)[o + act_pos(col, H_LAYOUT)] = bf16_from_f32(h);
        else ((float*)p.out)[o + col] = h;
      } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = col0 + fr + 8 * j;
          if (n >= p.n) continue;
          const float v = acc[t][2 * j + e2];
          const long long o = blockIdx.z * p.out_split_stride + row * p.out_row_stride + g * p.out_group_stride + n;
          if (p.out_bf16) ((uint16_t*)p.out)[o] = bf16_from_f32(v);
          else ((float*)p.out)[o] = v;
        }
      }
    }
  }
}

}  // namespace dsv4
