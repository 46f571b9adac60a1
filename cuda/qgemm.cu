// Block-scaled GEMMs over weights as DeepSeek ships them (docs/kernels/qgemm.md), mirroring
// rust/core/src/qgemm.rs:
// - FP8 e4m3 weights [R, K] with a float32 scale per 128x128 block (the linears), or MXFP4 [R, K/2]
//   (e2m1, low nibble first) with a UE8M0 code per 1x32 (the routed experts);
// - activations quantized first (dsv4_act_quant): to FP8 e4m3 per 1x128 block with a UE8M0 scale
//   (DeepSeek's W8A8), or rounded to bfloat16; either way the result is held as exact bfloat16
//   values (an e4m3 code times a power of two is a bfloat16).
//
// dsv4_qgemm_*: Y = A W^T on the tensor cores (mma.sync m16n8k16 bf16, float32 accumulation).
// Weights are decoded to bfloat16 in registers, never to memory: an MXFP4 value times its
// power-of-two scale is exact in bfloat16, so the scale is folded in (the activations of MXFP4
// weights are stored with each 8 values interleaved to match the decoder); an FP8 code is exact in
// bfloat16 and its block scale (any float) multiplies the float32 partial sum of each 128-wide K
// step. The products are therefore exact and only the float32 summation order differs from the
// CPU twin. Two forms:
// - tiled (dsv4_qgemm_*_m64, many rows per weight: prefill): a block computes 64 rows x 64 weight
//   rows; 4 warps, each 16 weight rows (two n8 tiles) for all 64 rows; K runs in steps of 128
//   through a 3-stage cp.async pipeline (A and B tiles in shared memory), the block's weight scales
//   loaded once up front;
// - decode (dsv4_qgemv_*_n8/_n16, up to 16 rows per weight): the roles swapped (see qgemv).
//
// Work items: dense (a grid row per (group, row tile)), or the tiles of a MoE plan (expert,
// first sorted position, rows) read from device memory, so no count ever goes to the host.
// Epilogues: store (float32 or bfloat16, optionally into split-K partial sums), or clamped SwiGLU
// (the block's warps hold gate row n in tile 0 and up row I + n in tile 1, the same fragment
// positions, so h = silu(min(g, l)) clamp(u, -l, l) is formed in registers).
//
// dsv4_moe_plan: one block sorts the (token, choice) pairs by expert (counts, offsets, a slot per
// pair by atomics: the order within an expert does not change any row's result) and lists the
// row tiles. dsv4_moe_combine: out[t] = sum_j w[t, j] y[slot(t, j)] in choice order.
// dsv4_splitk_reduce: the split-K partial sums added in split order.
#include <cstddef>

#include "mma.cuh"
#include "quant.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 128;
constexpr int KC = 128;         // K per pipeline step: one activation block, four FP4 scale groups
constexpr int BN = 64;          // weight rows per block (4 warps x 2 n8 tiles)
constexpr int STAGES = 3;       // cp.async pipeline stages of the tiled form
constexpr int A_ROW_BYTES = 272;  // 256 bytes of bf16 + 16: 16-byte aligned, see a_chunk()

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
  int out_bf16;
  int k_steps_per_split;
};
static_assert(sizeof(GemmParams) == 136, "GemmParams must match rust/core/src/gpu/qgemm.rs");
static_assert(offsetof(GemmParams, m) == 72 && offsetof(GemmParams, a_div) == 104 && offsetof(GemmParams, limit) == 124,
              "GemmParams must match rust/core/src/gpu/qgemm.rs");

template <bool FP4>
struct Fmt {
  static constexpr int B_ROW_BYTES = FP4 ? 64 : 128;  // bytes of one weight row per K step
};

// Shared-memory position (bytes within a row) of 16-byte chunk h (8 bf16 values, K offsets
// 8h .. 8h + 7) of an A row. A lane reads chunk s2 + 4q (q = lane % 4) of rows r and r + 8; the
// permutation h ^ 2 (h >= 8) with 272-byte rows puts the 8 lanes of a quarter warp on 8
// distinct 4-bank groups.
__device__ __forceinline__ int a_chunk(int h) { return 16 * (h ^ (((h >> 3) & 1) << 1)); }

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

// Weight row (within its group) held in shared-memory row slot sr (warp sr / 16, tile
// (sr / 8) % 2, fragment row sr % 8), or -1 when past the weights.
__device__ __forceinline__ int weight_row(const GemmParams& p, int sr) {
  const int w = sr / 16, j = (sr / 8) % 2, r = sr % 8;
  if (p.swiglu) {
    const int half = p.n / 2;
    const int h = blockIdx.x * (BN / 2) + 8 * w + r;
    return h < half ? h + j * half : -1;
  }
  const int n = blockIdx.x * BN + sr;
  return n < p.n ? n : -1;
}

template <bool FP4, int MT>
__device__ __forceinline__ void qgemm(const GemmParams& p) {
  constexpr int BM = 16 * MT;
  constexpr int B_ROW = Fmt<FP4>::B_ROW_BYTES;
  constexpr int A_TILE = BM * A_ROW_BYTES;
  constexpr int B_TILE = BN * B_ROW;
  constexpr int STAGE = A_TILE + B_TILE;
  extern __shared__ __align__(16) uint8_t smem[];

  int g, rows;
  long long row0;
  if (!work_item(p, BM, g, row0, rows)) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q = lane % 4, fr = lane / 4;
  const int k_steps = (p.k + KC - 1) / KC;
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int c_end = min(k_steps, c_begin + p.k_steps_per_split);
  const long long k = p.k;

  // Weight scales of the block's rows for the whole of K, loaded once.
  uint8_t* scales = smem + STAGES * STAGE;
  const int scale_cols = FP4 ? p.k / 32 : k_steps;
  if (FP4) {
    for (int i = tid; i < BN * scale_cols; i += THREADS) {
      const int sr = i / scale_cols, col = i % scale_cols, n = weight_row(p, sr);
      scales[i] = n < 0 ? (uint8_t)127 : ((const uint8_t*)p.w_scale)[((long long)g * p.n + n) * scale_cols + col];
    }
  } else {
    float* fs = (float*)scales;  // [BN][k_steps]: the scale of each row slot's 128-row block
    for (int i = tid; i < BN * k_steps; i += THREADS) {
      const int sr = i / k_steps, col = i % k_steps, n = weight_row(p, sr);
      fs[i] = n < 0 ? 0.f : ((const float*)p.w_scale)[(((long long)g * p.n + n) / 128) * k_steps + col];
    }
  }

  // This thread's copies per stage: A chunks (row tid / 16 + 8 j, chunk tid % 16) and B chunks.
  constexpr int A_COPIES = BM / 8;
  constexpr int B_CHUNKS = B_ROW / 16;
  constexpr int B_COPIES = BN * B_CHUNKS / THREADS;
  const uint16_t* a_src[A_COPIES];
#pragma unroll
  for (int j = 0; j < A_COPIES; ++j) {
    const int r = tid / 16 + 8 * j;
    a_src[j] = nullptr;
    if (r < rows) {
      const long long pos = row0 + r;
      const long long src = p.a_rows ? p.a_rows[pos] / p.a_div : pos;
      a_src[j] = p.a + src * p.a_row_stride + g * p.a_group_stride;
    }
  }
  const uint8_t* b_src[B_COPIES];
#pragma unroll
  for (int j = 0; j < B_COPIES; ++j) {
    const int chunk = tid + THREADS * j, sr = chunk / B_CHUNKS;
    const int n = weight_row(p, sr);
    b_src[j] = n < 0 ? nullptr : p.w + ((long long)g * p.n + n) * (FP4 ? k / 2 : k);
  }

  auto issue = [&](int c, int stage) {
    uint8_t* at = smem + stage * STAGE;
    uint8_t* bt = at + A_TILE;
#pragma unroll
    for (int j = 0; j < A_COPIES; ++j) {
      const int r = tid / 16 + 8 * j, h = tid % 16;
      uint8_t* dst = at + r * A_ROW_BYTES + a_chunk(h);
      const long long col = (long long)c * KC + 8 * h;
      if (a_src[j] && col < k) cp_async16(dst, a_src[j] + col);
      else *(uint4*)dst = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < B_COPIES; ++j) {
      const int chunk = tid + THREADS * j, sr = chunk / B_CHUNKS, h = chunk % B_CHUNKS;
      uint8_t* dst = bt + sr * B_ROW + 16 * h;
      const long long col = (long long)c * KC + (FP4 ? 32 : 16) * h;  // first K index of the chunk
      if (b_src[j] && col < k) cp_async16(dst, b_src[j] + (long long)c * B_ROW + 16 * h);
      else *(uint4*)dst = make_uint4(0, 0, 0, 0);
    }
  };

  float acc[MT][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (c_begin + s < c_end) issue(c_begin + s, s);
    cp_async_commit();
  }
  for (int c = c_begin; c < c_end; ++c) {
    const int stage = (c - c_begin) % STAGES;
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage c has landed for every thread; stage c - 1 is consumed
    if (c + STAGES - 1 < c_end) issue(c + STAGES - 1, (c - c_begin + STAGES - 1) % STAGES);
    cp_async_commit();

    const uint8_t* at = smem + stage * STAGE;
    const uint8_t* bt = at + A_TILE;
    // This lane's 32 weight values (K offsets 32 q .. 32 q + 31 of the step) of its two rows, as
    // bf16 pairs: b[j][2 s], b[j][2 s + 1] are the B registers of mma step s (K offsets 4 s .. 4 s + 3).
    uint32_t b[2][16];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int sr = 16 * warp + 8 * j + fr;
      if (FP4) {
        const int group = 4 * c + q;  // past K (a partial last step) the bytes are zeros
        const int se = group < scale_cols ? (int)scales[sr * scale_cols + group] - 127 : 0;
        fp4x32_lane(*(const uint4*)(bt + sr * B_ROW + 16 * q), se, b[j]);
      } else {
        fp8x32_lane(*(const uint4*)(bt + sr * B_ROW + 32 * q), *(const uint4*)(bt + sr * B_ROW + 32 * q + 16), b[j]);
      }
    }
    float part[MT][2][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[i][j][e] = 0.f;
#pragma unroll
    for (int s2 = 0; s2 < 4; ++s2) {  // two mma steps per 16-byte A read
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = 16 * i + fr;
        const uint4 lo = *(const uint4*)(at + r * A_ROW_BYTES + a_chunk(s2 + 4 * q));
        const uint4 hi = *(const uint4*)(at + (r + 8) * A_ROW_BYTES + a_chunk(s2 + 4 * q));
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float(&d)[4] = FP4 ? acc[i][j] : part[i][j];
          mma_bf16(d, lo.x, hi.x, lo.y, hi.y, b[j][4 * s2], b[j][4 * s2 + 1]);
          mma_bf16(d, lo.z, hi.z, lo.w, hi.w, b[j][4 * s2 + 2], b[j][4 * s2 + 3]);
        }
      }
    }
    if (!FP4) {
      const float* fs = (const float*)scales;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col0 = 16 * warp + 8 * j + 2 * q;  // row slots of this lane's two output columns
        const float s0 = fs[col0 * k_steps + c], s1 = fs[(col0 + 1) * k_steps + c];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          acc[i][j][0] += part[i][j][0] * s0;
          acc[i][j][1] += part[i][j][1] * s1;
          acc[i][j][2] += part[i][j][2] * s0;
          acc[i][j][3] += part[i][j][3] * s1;
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue. Fragment (i, j, e): row 16 i + fr + 8 (e / 2), weight row slot 16 warp + 8 j + 2 q + e % 2.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 16 * i + fr + 8 * half;
      if (r >= rows) continue;
      const long long row = row0 + r;
      if (p.swiglu) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = blockIdx.x * (BN / 2) + 8 * warp + 2 * q + e;
          if (col >= p.n / 2) continue;
          const float gate = fminf(acc[i][0][2 * half + e], p.limit);
          const float up = fminf(fmaxf(acc[i][1][2 * half + e], -p.limit), p.limit);
          const float h = silu(gate) * up;
          const long long o = row * p.out_row_stride + g * p.out_group_stride;
          if (p.out_bf16) ((uint16_t*)p.out)[o + interleaved_col(col)] = bf16_from_f32(h);  // A of the down GEMM
          else ((float*)p.out)[o + col] = h;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int n = blockIdx.x * BN + 16 * warp + 8 * j + 2 * q + e;
            if (n >= p.n) continue;
            const float v = acc[i][j][2 * half + e];
            const long long o = blockIdx.z * p.out_split_stride + row * p.out_row_stride + g * p.out_group_stride + n;
            if (p.out_bf16) ((uint16_t*)p.out)[o] = bf16_from_f32(v);
            else ((float*)p.out)[o] = v;
          }
        }
      }
    }
  }
}

// Resident blocks of the decode form per SM its register budget allows (at most 168 registers a
// thread): enough warps that the weight loads of some overlap the arithmetic of others.
constexpr int GEMV_BLOCKS_PER_SM = 3;

// A 16-byte load of weights, which a call reads once: no L1 allocation.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The decode form (a few activation rows): the same products and float32 sums as qgemm with the
// roles swapped, Y^T = W A^T, so the weights are the mma's 16-row A operand (decoded straight from
// global memory into registers, no shared-memory staging) and up to 8 activation rows its n8 B
// operand (NT such tiles: 8 NT rows a block). A warp holds 16 weight rows: rows n0 + fr and
// n0 + fr + 8 (or, with SwiGLU, gate row h0 + fr and up row I + h0 + fr, so the C fragment holds both
// for h). The block's 4 warps split its K steps; warps 1-3 leave their partial sums in shared memory
// and warp 0 adds them in warp order (a fixed order) before the epilogue. Each warp issues the
// weight and scale loads of BATCH K steps before using any; a lane's activation values are loaded
// at their step (read by many blocks, they mostly hit in cache).
template <bool FP4, int NT>
__device__ __forceinline__ void qgemv(const GemmParams& p) {
  constexpr int BM = 8 * NT;
  constexpr int WARPS = THREADS / 32;
  constexpr int BATCH = FP4 ? 8 : 4;  // K steps whose weight loads are issued together
  constexpr int W_CHUNKS = FP4 ? 1 : 2;  // 16-byte weight chunks per row and step for one lane
  __shared__ float red[WARPS - 1][NT][4][32];

  int g, rows;
  long long row0;
  if (!work_item(p, BM, g, row0, rows)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q = lane % 4, fr = lane / 4;
  const long long k = p.k;
  const int k_steps = (p.k + KC - 1) / KC;
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int c_end = min(k_steps, c_begin + p.k_steps_per_split);
  const int per = (c_end - c_begin + WARPS - 1) / WARPS;
  const int w_begin = c_begin + warp * per, w_end = min(c_end, w_begin + per);

  // The lane's two weight rows (within group g), or null past the weights.
  const uint8_t* wrow[2];
  long long n_glob[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    int n;
    if (p.swiglu) {
      const int half = p.n / 2, h = blockIdx.x * 8 + fr;
      n = h < half ? h + j * half : -1;
    } else {
      n = blockIdx.x * 16 + fr + 8 * j;
      n = n < p.n ? n : -1;
    }
    n_glob[j] = (long long)g * p.n + n;
    wrow[j] = n < 0 ? nullptr : p.w + n_glob[j] * (FP4 ? k / 2 : k);
  }
  // The lane's activation rows: row 8 t + fr of the tile.
  const uint16_t* arow[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int r = 8 * t + fr;
    arow[t] = nullptr;
    if (r < rows) {
      const long long pos = row0 + r;
      const long long src = p.a_rows ? p.a_rows[pos] / p.a_div : pos;
      arow[t] = p.a + src * p.a_row_stride + g * p.a_group_stride;
    }
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

  for (int c0 = w_begin; c0 < w_end; c0 += BATCH) {
    // The batch's weights and scales: all loads issued before any is used.
    uint4 wraw[BATCH][2][W_CHUNKS];
    float wscale[BATCH][2];  // FP8: the block scale
    int wexp[BATCH][2];      // FP4: the exponent of the lane's 1x32 scale
#pragma unroll
    for (int s = 0; s < BATCH; ++s) {
      const long long col = (long long)(c0 + s) * KC + 32 * q;  // the lane's first K of the step
      const bool live = c0 + s < w_end && col < k;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool on = live && wrow[j];
#pragma unroll
        for (int u = 0; u < W_CHUNKS; ++u)
          wraw[s][j][u] = on ? ld_stream(wrow[j] + (FP4 ? col / 2 : col) + 16 * u) : make_uint4(0, 0, 0, 0);
        if (FP4) {
          wexp[s][j] = on ? (int)__ldg(((const uint8_t*)p.w_scale) + n_glob[j] * (k / 32) + col / 32) - 127 : 0;
        } else {
          // The block scale multiplies the C fragment, whose entries mix every lane's K values:
          // every lane needs it, also a lane whose own K values lie past K.
          const bool step = c0 + s < w_end && wrow[j];
          wscale[s][j] = step ? __ldg(((const float*)p.w_scale) + (n_glob[j] / 128) * k_steps + c0 + s) : 0.f;
        }
      }
    }
#pragma unroll
    for (int s = 0; s < BATCH; ++s) {
      if (c0 + s >= w_end) break;
      const long long col = (long long)(c0 + s) * KC + 32 * q;
      const bool live = col < k;
      uint32_t b[2][16];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (FP4) fp4x32_lane(wraw[s][j][0], wexp[s][j], b[j]);
        else fp8x32_lane(wraw[s][j][0], wraw[s][j][W_CHUNKS - 1], b[j]);
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        // The lane's 32 activation values of row 8 t + fr, loaded at their step so that they do
        // not hold registers while the batch's weights are in flight.
        uint4 araw[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) araw[u] = live && arow[t] ? __ldg((const uint4*)(arow[t] + col) + u) : make_uint4(0, 0, 0, 0);
        const uint32_t* a = (const uint32_t*)araw;
        float part[4] = {0.f, 0.f, 0.f, 0.f};
        float(&d)[4] = FP4 ? acc[t] : part;
#pragma unroll
        for (int m = 0; m < 8; ++m) mma_bf16(d, b[0][2 * m], b[1][2 * m], b[0][2 * m + 1], b[1][2 * m + 1], a[2 * m], a[2 * m + 1]);
        if (!FP4) {
          acc[t][0] += part[0] * wscale[s][0];
          acc[t][1] += part[1] * wscale[s][0];
          acc[t][2] += part[2] * wscale[s][1];
          acc[t][3] += part[3] * wscale[s][1];
        }
      }
    }
  }

  // Warps 1-3 hand their sums to warp 0, which adds them in warp order.
  if (warp > 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp - 1][t][e][lane] = acc[t][e];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int w = 0; w < WARPS - 1; ++w)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] += red[w][t][e][lane];

  // Epilogue. Fragment (t, e): weight row fr + 8 (e / 2), activation row 8 t + 2 q + e % 2.
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int r = 8 * t + 2 * q + e2;
      if (r >= rows) continue;
      const long long row = row0 + r;
      if (p.swiglu) {
        const int col = blockIdx.x * 8 + fr;
        if (col >= p.n / 2) continue;
        const float gate = fminf(acc[t][e2], p.limit);
        const float up = fminf(fmaxf(acc[t][2 + e2], -p.limit), p.limit);
        const float h = silu(gate) * up;
        const long long o = row * p.out_row_stride + g * p.out_group_stride;
        if (p.out_bf16) ((uint16_t*)p.out)[o + interleaved_col(col)] = bf16_from_f32(h);
        else ((float*)p.out)[o + col] = h;
      } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = blockIdx.x * 16 + fr + 8 * j;
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

// Block-wide exclusive prefix sum of one int per thread (THREADS_PLAN threads); `total` gets the sum.
constexpr int THREADS_PLAN = 1024;
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = warp_sums[lane];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += y;
    }
    warp_sums[lane] = s;  // inclusive sums of the warps
  }
  __syncthreads();
  const int before = (warp ? warp_sums[warp - 1] : 0) + x - v;
  total = warp_sums[31];
  __syncthreads();  // warp_sums may be reused by the next scan
  return before;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemm_fp8_m64(const GemmParams p) { qgemm<false, 4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemm_fp4_m64(const GemmParams p) { qgemm<true, 4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp8_n8(const GemmParams p) { qgemv<false, 1>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp8_n16(const GemmParams p) { qgemv<false, 2>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp4_n8(const GemmParams p) { qgemv<true, 1>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp4_n16(const GemmParams p) { qgemv<true, 2>(p); }

// Rows of x [rows, k] (float32 or bfloat16) as exact bf16 values: FP8 e4m3 per 1x128 block with a
// UE8M0 scale (act_fp8), or rounded to bf16. With `interleave` (activations of MXFP4 weights),
// each group of 8 values is stored in the order v0 v4 v1 v5 v2 v6 v3 v7 (see fp4x8_interleaved).
// A warp per (row, 128-block), grid (rows / 4, k / 128); k % 32 == 0.
extern "C" __global__ void __launch_bounds__(128) dsv4_act_quant(const void* __restrict__ x, int x_bf16, long long rows,
                                                                 int k, int act_fp8, int interleave,
                                                                 uint16_t* __restrict__ out) {
  const long long row = (long long)blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const long long col = (long long)blockIdx.y * KC + 4 * lane;
  if (row >= rows) return;  // whole warps leave together
  const bool valid = col < k;  // k % 32 == 0: both lanes of an 8-group are valid or neither
  const char* src = (const char*)x + (row * k + col) * (x_bf16 ? 2 : 4);
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (valid) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = load_value(src, i, x_bf16);
  }
  uint16_t o[4];
  if (act_fp8) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) m = fmaxf(m, fabsf(v[i]));
    m = group_amax(m, 32);
    const int e = ue8m0_exponent(m, FP8_MAX);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = bf16_from_f32(fp8_decode(fp8_encode(v[i], e)) * exp2i(e));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = bf16_from_f32(v[i]);
  }
  if (interleave) {
    // The even lane of a pair holds v0..v3 of the group, the odd one v4..v7.
    uint16_t p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = (uint16_t)__shfl_xor_sync(0xffffffffu, (unsigned)o[i], 1);
    const bool odd = lane & 1;
    const uint16_t w[4] = {odd ? p[2] : o[0], odd ? o[2] : p[0], odd ? p[3] : o[1], odd ? o[3] : p[1]};
    if (valid) *(uint2*)(out + row * k + col) = *(const uint2*)w;
  } else if (valid) {
    *(uint2*)(out + row * k + col) = *(uint2*)o;
  }
}

// The MoE plan: pairs (token, choice) of idx [pairs] sorted by expert. offsets [experts + 1];
// order[slot] = pair; slot_of[pair] = slot (-1 for ids outside [0, experts), which contribute
// nothing); tiles [*, 3] = (expert, first slot, rows) per bm rows of each expert; tile_count.
// One block; dynamic shared memory 3 * experts ints.
extern "C" __global__ void __launch_bounds__(THREADS_PLAN) dsv4_moe_plan(
    const void* __restrict__ idx, int idx64, long long pairs, int experts, int bm, int* __restrict__ offsets,
    int* __restrict__ order, int* __restrict__ slot_of, int* __restrict__ tiles, int* __restrict__ tile_count) {
  extern __shared__ int plan_smem[];
  __shared__ int warp_sums[32];
  int* counts = plan_smem;
  int* cursor = plan_smem + experts;
  int* tile_first = plan_smem + 2 * experts;
  const int tid = threadIdx.x;
  for (int e = tid; e < experts; e += THREADS_PLAN) counts[e] = 0;
  __syncthreads();
  for (long long p = tid; p < pairs; p += THREADS_PLAN) {
    const long long e = load_id(idx, p, idx64);
    if (e >= 0 && e < experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  // Each thread scans a run of consecutive experts.
  const int per = (experts + THREADS_PLAN - 1) / THREADS_PLAN;
  const int e0 = min(tid * per, experts), e1 = min(e0 + per, experts);
  int rows = 0, ntiles = 0;
  for (int e = e0; e < e1; ++e) rows += counts[e], ntiles += (counts[e] + bm - 1) / bm;
  int total_rows, total_tiles;
  int at = block_exclusive_scan(rows, warp_sums, total_rows);
  int tile_at = block_exclusive_scan(ntiles, warp_sums, total_tiles);
  for (int e = e0; e < e1; ++e) {
    offsets[e] = at;
    cursor[e] = at;
    tile_first[e] = tile_at;
    at += counts[e];
    tile_at += (counts[e] + bm - 1) / bm;
  }
  if (tid == 0) {
    offsets[experts] = total_rows;
    *tile_count = total_tiles;
  }
  __syncthreads();
  for (long long p = tid; p < pairs; p += THREADS_PLAN) {
    const long long e = load_id(idx, p, idx64);
    int slot = -1;
    if (e >= 0 && e < experts) {
      slot = atomicAdd(&cursor[e], 1);
      order[slot] = (int)p;
    }
    slot_of[p] = slot;
  }
  for (int e = tid; e < experts; e += THREADS_PLAN) {
    const int n = counts[e], first = offsets[e];
    for (int t = 0; t * bm < n; ++t) {
      int* tile = tiles + 3 * (tile_first[e] + t);
      tile[0] = e;
      tile[1] = first + t * bm;
      tile[2] = min(bm, n - t * bm);
    }
  }
}

// out[t, c] = sum_j w[t, j] y[slot_of[t k + j], c] (float32, in choice order; missing slots add
// nothing), stored as float32 or bf16. Grid (T, dim / 512): a thread per 4 columns (dim % 4 == 0).
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_combine(const float* __restrict__ y,
                                                                   const int* __restrict__ slot_of,
                                                                   const float* __restrict__ w, int k, int dim,
                                                                   void* __restrict__ out, int out_bf16) {
  const long long t = blockIdx.x;
  const int c = (blockIdx.y * 128 + threadIdx.x) * 4;
  if (c >= dim) return;
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j = 0; j < k; ++j) {
    const int slot = slot_of[t * k + j];
    if (slot < 0) continue;
    const float wj = w[t * k + j];
    const float4 v = *(const float4*)(y + (long long)slot * dim + c);
    s.x += wj * v.x, s.y += wj * v.y, s.z += wj * v.z, s.w += wj * v.w;
  }
  if (out_bf16) {
    const uint16_t o[4] = {bf16_from_f32(s.x), bf16_from_f32(s.y), bf16_from_f32(s.z), bf16_from_f32(s.w)};
    *(uint2*)((uint16_t*)out + t * dim + c) = *(const uint2*)o;
  } else {
    *(float4*)((float*)out + t * dim + c) = s;
  }
}

// out[i] = sum over splits of part[s, i] (float32, in split order), stored as float32 or bf16.
extern "C" __global__ void __launch_bounds__(256) dsv4_splitk_reduce(const float* __restrict__ part, int splits,
                                                                     long long n, void* __restrict__ out,
                                                                     int out_bf16) {
  const long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int j = 0; j < splits; ++j) s += part[j * n + i];
  if (out_bf16) ((uint16_t*)out)[i] = bf16_from_f32(s);
  else ((float*)out)[i] = s;
}
