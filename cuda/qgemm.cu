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
// - decode (dsv4_qgemv_*_n8/_n16, up to 16 rows per weight): the roles swapped (see qgemv);
// - FP8 decode (dsv4_qgemv_f8_*, sm_89 and later, FP8 activations): the decode form on FP8 tensor
//   cores, activations as FP8 codes with their scales apart (dsv4_act_quant_f8; see qgemv_f8).
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

#include "floats.cuh"
#include "grid.cuh"
#include "mma.cuh"
#include "qgemm.cuh"

using namespace dsv4;

namespace {

constexpr int THREADS = 128;
constexpr int BN = 64;          // weight rows per block (4 warps x 2 n8 tiles)
constexpr int STAGES = 3;       // cp.async pipeline stages of the tiled form
constexpr int A_ROW_BYTES = 272;  // 256 bytes of bf16 + 16: 16-byte aligned, see a_chunk()

template <bool FP4>
struct Fmt {
  static constexpr int B_ROW_BYTES = FP4 ? 64 : 128;  // bytes of one weight row per K step
};

// Shared-memory position (bytes within a row) of 16-byte chunk h (8 bf16 values, K offsets
// 8h .. 8h + 7) of an A row. A lane reads chunk s2 + 4q (q = lane % 4) of rows r and r + 8; the
// permutation h ^ 2 (h >= 8) with 272-byte rows puts the 8 lanes of a quarter warp on 8
// distinct 4-bank groups.
__device__ __forceinline__ int a_chunk(int h) { return 16 * (h ^ (((h >> 3) & 1) << 1)); }

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
      const int sr = i / scale_cols, col = i % scale_cols, n = weight_row(p, sr, BN);
      scales[i] = n < 0 ? (uint8_t)127 : ((const uint8_t*)p.w_scale)[((long long)g * p.n + n) * scale_cols + col];
    }
  } else {
    float* fs = (float*)scales;  // [BN][k_steps]: the scale of each row slot's 128-row block
    for (int i = tid; i < BN * k_steps; i += THREADS) {
      const int sr = i / k_steps, col = i % k_steps, n = weight_row(p, sr, BN);
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
    const int n = weight_row(p, sr, BN);
    b_src[j] = n < 0 ? nullptr : p.w + w_row<FP4>(p, (long long)g * p.n + n, k);
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
      if (b_src[j] && col < k) cp_async16(dst, b_src[j] + c * w_step<FP4>(p) + 16 * h);
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

// The decode forms' K steps of warp `warp`: its share of the block's split (blockIdx.z), the
// block's 4 warps taking consecutive runs of steps.
__device__ __forceinline__ void warp_steps(const GemmParams& p, int k_steps, int warp, int& begin, int& end) {
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int c_end = min(k_steps, c_begin + p.k_steps_per_split);
  const int per = (c_end - c_begin + THREADS / 32 - 1) / (THREADS / 32);
  begin = c_begin + warp * per;
  end = min(c_end, begin + per);
}

// The decode forms' end: warps 1-3 hand their sums to warp 0 through `red`, which adds them in
// warp order, then stores the block's outputs (or, with SwiGLU, h). Every thread of the block
// calls it (it holds a block barrier).
template <int NT>
__device__ __forceinline__ void gemv_finish(const GemmParams& p, float (&acc)[NT][4], float (&red)[THREADS / 32 - 1][NT][4][32],
                                            int g, long long row0, int rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int WARPS = THREADS / 32;
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

  gemv_store<NT>(p, acc, g, row0, rows, blockIdx.x * (p.swiglu ? 8 : 16));
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
  int w_begin, w_end;
  warp_steps(p, k_steps, warp, w_begin, w_end);

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
    wrow[j] = n < 0 ? nullptr : p.w + w_row<FP4>(p, n_glob[j], k);
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
          wraw[s][j][u] = on ? ld_stream(wrow[j] + (c0 + s) * w_step<FP4>(p) + (FP4 ? 16 : 32) * q + 16 * u)
                             : make_uint4(0, 0, 0, 0);
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

  gemv_finish<NT>(p, acc, red, g, row0, rows);
}

// ---------------------------------------------------------------------------------------------
// The FP8 decode form (sm_89 and later; act = "fp8", K % 128 == 0): the decode form's roles
// (Y^T = W A^T, 16 weight rows a warp, 8 NT activation rows a block, K split over the 4 warps),
// on `mma.sync m16n8k32` e4m3 x e4m3 instead of bf16. The activations stay FP8 codes with their
// 1x128 scale apart (dsv4_act_quant_f8); FP8 weights go to the tensor cores as stored, MXFP4 ones
// after widening: an e2m1 nibble `s e1 e0 m` placed as the e4m3 byte `s 0 0 e1 e0 m 0 0` is the FP4
// value times 2^-6, subnormals included, so 8 values take 7 integer operations and no multiply.
//
// Each warp streams its 16 rows' bytes of a K step (and the step's activation codes and scales)
// into a private ring of shared-memory stages with cp.async, STAGES - 1 steps ahead, and reads
// the weights back with ldmatrix: lane (fr, q) receives bytes 4q .. 4q + 3 of each 16-byte
// chunk, which for MXFP4 is word q of a 32-value scale block, so one m16n8k32 covers exactly one
// scale block of every row. The activation codes of a 128-wide step are stored permuted
// (f8_act_pos) so that a lane's B operands for the whole step are 32 consecutive bytes.
//
// Numerics: the products are exact (e4m3 x e4m3 and e2m1 x e4m3 fit the tensor core's product);
// each instruction sums one 32-wide K slice from a zero accumulator (the tensor core's FP8 sums
// keep fewer bits than float32; docs/kernels/qgemm.md states the bound), and the slice sums are
// scaled (weight scale, activation scale: powers of two, or an FP8 block's float multiplier) and
// added in float32.

// D = A B for one 16x8x32 e4m3 tile from a zero accumulator (fragment layouts of PTX's
// mma.m16n8k32 for 8-bit types). Only compiled for sm_89 and later.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
#else
  d[0] = d[1] = d[2] = d[3] = 0.f;
  __trap();
#endif
}

template <bool FP4, int NT>
struct F8Layout {
  static constexpr int ROW = FP4 ? 64 : 128;   // bytes of one weight row per K step
  static constexpr int W = 16 * ROW;          // the warp's 16 rows
  static constexpr int A = 8 * NT * KC;       // the activation codes of the step
  static constexpr int WS = 64;               // weight scales: 16 rows x 4 UE8M0 codes, or 16 floats
  static constexpr int AS = 8 * NT * 4;       // activation scales (float)
  static constexpr int STAGE = W + A + WS + AS;
  // Stages of a warp's ring (rust/core/src/gpu/qgemm.rs F8_STAGES): 34-68 KB of shared memory a
  // block. Measured on the H200 (MoE at V4-Flash width, decode): 4 stages and one grid column a
  // block ran 1.2-1.4x faster than 6-8 stages with each block streaming up to 8 columns in turn
  // (fewer resident warps).
  static constexpr int STAGES = 4;
  static constexpr int WARP = STAGES * STAGE;  // a warp's ring; the block's dynamic shared memory is 4 rings
};

// Byte offset of 16-byte chunk c of activation row r within the stage's activation codes.
__device__ __forceinline__ int f8_a_at(int r, int c) { return 128 * r + 16 * (c ^ (r & 7)); }

template <bool FP4, int NT>
__device__ __forceinline__ void qgemv_f8(const GemmParams& p) {
  using L = F8Layout<FP4, NT>;
  constexpr int S = L::STAGES;
  constexpr int BM = 8 * NT;
  constexpr int WARPS = THREADS / 32;
  constexpr int W_COPIES = L::W / 16 / 32;  // 16-byte weight copies per lane and step
  constexpr int A_COPIES = L::A / 16 / 32;
  constexpr int ROW_CHUNKS = L::ROW / 16;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float red[WARPS - 1][NT][4][32];

  int g, rows;
  long long row0;
  if (!work_item(p, BM, g, row0, rows)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q = lane % 4, fr = lane / 4;
  const long long k = p.k;
  const int k_steps = p.k / KC;
  int w_begin, w_end;
  warp_steps(p, k_steps, warp, w_begin, w_end);
  const int nsteps = max(0, w_end - w_begin);
  uint8_t* ring = smem + warp * L::WARP;

  // This warp's first weight row (with SwiGLU its first h column).
  const int col0 = blockIdx.x * (p.swiglu ? 8 : 16);
  auto weight_of = [&](int r) { return f8_weight_row(p, col0, r); };
  auto act_of = [&](int r) { return f8_act_row(p, g, row0, rows, r); };

  // This lane's copies: weight chunks, activation chunks, a scale of each.
  const uint8_t* w_src[W_COPIES];
  int w_dst[W_COPIES];
#pragma unroll
  for (int u = 0; u < W_COPIES; ++u) {
    const int idx = lane + 32 * u, r = idx / ROW_CHUNKS, c = idx % ROW_CHUNKS;
    const int n = weight_of(r);
    w_dst[u] = f8_w_at<FP4>(r, c);
    w_src[u] = n < 0 ? nullptr : p.w + w_row<FP4>(p, (long long)g * p.n + n, k) + 16 * c;
  }
  const uint8_t* a_src[A_COPIES];
  int a_dst[A_COPIES];
#pragma unroll
  for (int u = 0; u < A_COPIES; ++u) {
    const int idx = lane + 32 * u, r = idx / 8, c = idx % 8;
    const long long off = act_of(r);
    a_dst[u] = L::W + f8_a_at(r, c);
    a_src[u] = off < 0 ? nullptr : (const uint8_t*)p.a + off + 16 * c;
  }
  // Weight scales: lane r < 16 copies row slot r's four UE8M0 codes of the step (MXFP4) or its
  // 128x128 block's float (FP8); lane r < 8 NT copies activation row r's scale.
  const uint8_t* ws_src = lane < 16 ? f8_scale_src<FP4>(p, g, weight_of(lane)) : nullptr;
  const float* as_src = nullptr;
  if (lane < BM) {
    const long long off = act_of(lane);
    if (off >= 0) as_src = p.a_scale + off / KC;
  }

  // Slots no copy fills (past the weights or the rows) hold zeros in every stage.
  for (int s = 0; s < S; ++s) {
    uint8_t* st = ring + s * L::STAGE;
#pragma unroll
    for (int u = 0; u < W_COPIES; ++u)
      if (!w_src[u]) *(uint4*)(st + w_dst[u]) = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < A_COPIES; ++u)
      if (!a_src[u]) *(uint4*)(st + a_dst[u]) = make_uint4(0, 0, 0, 0);
    if (lane < 16 && !ws_src) *(uint32_t*)(st + L::W + L::A + 4 * lane) = 0;
    if (lane < BM && !as_src) *(float*)(st + L::W + L::A + L::WS + 4 * lane) = 0.f;
  }

  const uint32_t ring_at = (uint32_t)__cvta_generic_to_shared(ring);
  auto issue = [&](int c, int s) {
    const uint32_t st = ring_at + s * L::STAGE;
#pragma unroll
    for (int u = 0; u < W_COPIES; ++u)
      if (w_src[u]) cp_async16(st + w_dst[u], w_src[u] + c * w_step<FP4>(p));
#pragma unroll
    for (int u = 0; u < A_COPIES; ++u)
      if (a_src[u]) cp_async16(st + a_dst[u], a_src[u] + (long long)c * KC);
    if (ws_src) cp_async4(st + L::W + L::A + 4 * lane, ws_src + 4 * c);
    if (as_src) cp_async4(st + L::W + L::A + L::WS + 4 * lane, as_src + c);
  };

  float acc[NT][4];
  // ldmatrix row address of this lane: matrix lane / 8 (slots 8 (m & 1) .., chunk offset m / 2).
  const int ld_slot = (lane & 7) + 8 * ((lane >> 3) & 1), ld_chunk = lane >> 4;
  // One pass over the warp's K steps into acc. MXFP4 scale codes become float32 values times 2^6
  // by integer moves, exact for codes up to 248; the fast pass (EXACT false) takes every code that
  // way and returns whether the warp met a larger one (never produced by a quantizer: 2^122 and
  // up), after which the warp runs the exact pass (every code converted exactly, the 2^6 applied to
  // the step's sums). Keeping the exact conversion out of the fast loop keeps it short: ptxas
  // if-converts a per-step branch, paying both sides every step.
  auto pass = [&](auto exact_tag) -> bool {
    constexpr bool EXACT = decltype(exact_tag)::value;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
    uint32_t code_max = 0;  // bytewise maximum of the scale codes met (fast pass)
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < nsteps) issue(w_begin + s, s);
      cp_async_commit();
    }
    for (int i = 0; i < nsteps; ++i) {
      cp_async_wait<S - 2>();
      __syncwarp();  // step i has landed for every lane; stage (i - 1) % STAGES is consumed
      if (i + S - 1 < nsteps) issue(w_begin + i + S - 1, (i + S - 1) % S);
      cp_async_commit();
      const uint8_t* st = ring + (i % S) * L::STAGE;
      const uint8_t* sa = st + L::W;
      const uint8_t* sws = sa + L::A;
      const float* sas = (const float*)(sws + L::WS);

      // The lane's B operands: activation row 8 t + fr, bytes 32 q .. 32 q + 31 of the step.
      uint32_t b[NT][8];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int r = 8 * t + fr;
        const uint4 lo = *(const uint4*)(sa + f8_a_at(r, 2 * q));
        const uint4 hi = *(const uint4*)(sa + f8_a_at(r, 2 * q + 1));
        b[t][0] = lo.x, b[t][1] = lo.y, b[t][2] = lo.z, b[t][3] = lo.w;
        b[t][4] = hi.x, b[t][5] = hi.y, b[t][6] = hi.z, b[t][7] = hi.w;
      }
      float step[NT][4];
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) step[t][e] = 0.f;
      if (FP4) {
        // Row fr's and row fr + 8's scale codes of the four blocks, as float32 (times 2^6 in the
        // fast pass).
        const uint32_t c0 = *(const uint32_t*)(sws + 4 * fr), c1 = *(const uint32_t*)(sws + 4 * (fr + 8));
        float ws[2][4];
        f8_fp4_scales<EXACT>(c0, c1, ws, code_max);
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // blocks 2h and 2h + 1
          uint32_t r[4];
          ldmatrix_x4(r, st + f8_w_at<true>(ld_slot, 2 * h + ld_chunk));
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const int blk = 2 * h + bb;
            uint32_t lo0, hi0, lo1, hi1;
            fp4x8_to_e4m3(r[2 * bb], lo0, hi0);
            fp4x8_to_e4m3(r[2 * bb + 1], lo1, hi1);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              float d[4];
              mma_e4m3(d, lo0, lo1, hi0, hi1, b[t][2 * blk], b[t][2 * blk + 1]);
              step[t][0] += d[0] * ws[0][blk];
              step[t][1] += d[1] * ws[0][blk];
              step[t][2] += d[2] * ws[1][blk];
              step[t][3] += d[3] * ws[1][blk];
            }
          }
        }
        if (EXACT) {
#pragma unroll
          for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) step[t][e] *= 64.f;
        }
      } else {
#pragma unroll
        for (int m = 0; m < 4; ++m) {  // chunks 2m and 2m + 1
          uint32_t r[4];
          ldmatrix_x4(r, st + f8_w_at<false>(ld_slot, 2 * m + ld_chunk));
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            float d[4];
            mma_e4m3(d, r[0], r[1], r[2], r[3], b[t][2 * m], b[t][2 * m + 1]);
#pragma unroll
            for (int e = 0; e < 4; ++e) step[t][e] += d[e];
          }
        }
        const float w0 = ((const float*)sws)[fr], w1 = ((const float*)sws)[fr + 8];
#pragma unroll
        for (int t = 0; t < NT; ++t) step[t][0] *= w0, step[t][1] *= w0, step[t][2] *= w1, step[t][3] *= w1;
      }
      // The activation scales of the fragment's columns 2q, 2q + 1.
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float s0 = sas[8 * t + 2 * q], s1 = sas[8 * t + 2 * q + 1];
        acc[t][0] += step[t][0] * s0;
        acc[t][1] += step[t][1] * s1;
        acc[t][2] += step[t][2] * s0;
        acc[t][3] += step[t][3] * s1;
      }
    }
    cp_async_wait<0>();
    return __any_sync(0xffffffffu, __vcmpgtu4(code_max, 0xF8F8F8F8u) != 0u);
  };
  const bool large_code = pass(Tag<false>{});
  if constexpr (FP4) {
    if (large_code) {
      __syncwarp();  // every lane is done reading the ring
      pass(Tag<true>{});
    }
  }
  gemv_finish<NT>(p, acc, red, g, row0, rows);
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

extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemm_fp8_m64(const GemmParams p) { dsv4::grid_begin(); qgemm<false, 4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemm_fp4_m64(const GemmParams p) { dsv4::grid_begin(); qgemm<true, 4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp8_n8(const GemmParams p) { dsv4::grid_begin(); qgemv<false, 1>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp8_n16(const GemmParams p) { dsv4::grid_begin(); qgemv<false, 2>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp4_n8(const GemmParams p) { dsv4::grid_begin(); qgemv<true, 1>(p); }
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_BLOCKS_PER_SM) dsv4_qgemv_fp4_n16(const GemmParams p) { dsv4::grid_begin(); qgemv<true, 2>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemv_f8_fp8_n8(const GemmParams p) { dsv4::grid_begin(); qgemv_f8<false, 1>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemv_f8_fp8_n16(const GemmParams p) { dsv4::grid_begin(); qgemv_f8<false, 2>(p); }
// The MXFP4 8-row kernel holds 6 blocks an SM (34 KB of shared memory each): registers capped to match.
constexpr int F8_FP4_N8_BLOCKS_PER_SM = 6;
extern "C" __global__ void __launch_bounds__(THREADS, F8_FP4_N8_BLOCKS_PER_SM) dsv4_qgemv_f8_fp4_n8(const GemmParams p) {
  dsv4::grid_begin();
  qgemv_f8<true, 1>(p);
}
extern "C" __global__ void __launch_bounds__(THREADS) dsv4_qgemv_f8_fp4_n16(const GemmParams p) { dsv4::grid_begin(); qgemv_f8<true, 2>(p); }

// Rows of x [rows, k] (float32 or bfloat16) as exact bf16 values: FP8 e4m3 per 1x128 block with a
// UE8M0 scale (act_fp8), or rounded to bf16, stored in `layout` (an ActLayout: natural, each group
// of 8 in the order v0 v4 v1 v5 v2 v6 v3 v7 for the portable forms over MXFP4 weights (see
// fp4x8_interleaved), or each 128-block in the Hopper tiled form's order, which needs k % 128 == 0).
// With `rows_map` (the MoE's sorted order for the Hopper tiled form), output row i is input row
// rows_map[i] / rows_div for the first *rows_count rows, and zeros past them (rows a tile's box
// may load but whose results are never stored).
// A warp per (row, 128-block), grid (rows / 4, k / 128); k % 32 == 0.
extern "C" __global__ void __launch_bounds__(128) dsv4_act_quant(const void* __restrict__ x, int x_bf16, long long rows,
                                                                 int k, int act_fp8, int layout,
                                                                 uint16_t* __restrict__ out, const int* __restrict__ rows_map,
                                                                 int rows_div, const int* __restrict__ rows_count) {
  dsv4::grid_begin();
  __shared__ __align__(16) uint16_t stage[4][KC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long row = (long long)blockIdx.x * 4 + warp;
  const long long col = (long long)blockIdx.y * KC + 4 * lane;
  if (row >= rows) return;  // whole warps leave together
  if (rows_count && row >= *rows_count) {
    if (col < k) *(uint2*)(out + row * k + col) = make_uint2(0, 0);
    return;
  }
  const long long src_row = rows_map ? rows_map[row] / rows_div : row;
  const bool valid = col < k;  // k % 32 == 0: both lanes of an 8-group are valid or neither
  const char* src = (const char*)x + (src_row * k + col) * (x_bf16 ? 2 : 4);
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
    fp8_round_trip4(v, ue8m0_exponent(m, FP8_MAX));
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = bf16_from_f32(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = bf16_from_f32(v[i]);
  }
  if (layout == ACT_WGMMA_FP8 || layout == ACT_WGMMA_FP4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) stage[warp][wgmma_pos(4 * lane + i, layout == ACT_WGMMA_FP4)] = o[i];
    __syncwarp();
    *(uint2*)(out + row * k + col) = *(const uint2*)&stage[warp][4 * lane];
  } else if (layout == ACT_INTERLEAVED) {
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

// dsv4_act_quant_f8's work of one warp: block `blk` of row `row` (its 128 codes through `stage`,
// the warp's 128 bytes of shared memory, and its scale).
__device__ __forceinline__ void quant_f8_block(const void* __restrict__ x, int x_bf16, long long row, int blk, int k,
                                               int layout, uint8_t* __restrict__ codes, float* __restrict__ scales,
                                               long long scale_rows, int groups, uint8_t* stage) {
  const int lane = threadIdx.x % 32;
  const long long col = (long long)blk * KC + 4 * lane;
  const char* src = (const char*)x + (row * k + col) * (x_bf16 ? 2 : 4);
  float v[4], m = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = load_value(src, i, x_bf16), m = fmaxf(m, fabsf(v[i]));
  m = group_amax(m, 32);
  const int e = ue8m0_exponent(m, FP8_MAX);
  const uint32_t c = fp8_encode4(v, e);
#pragma unroll
  for (int i = 0; i < 4; ++i) stage[f8_act_pos(4 * lane + i, layout)] = (uint8_t)(c >> (8 * i));
  __syncwarp();
  *(uint32_t*)(codes + row * k + col) = *(const uint32_t*)&stage[4 * lane];
  __syncwarp();  // the stage is free again for the warp's next block
  if (lane == 0) {
    const long long at = scale_rows ? ((row % groups) * (k / KC) + blk) * scale_rows + row / groups
                                    : row * (k / KC) + blk;
    scales[at] = exp2i(e);
  }
}

// Rows of x [rows, k] (float32 or bfloat16; k % 128 == 0) as FP8 e4m3 codes per 1x128 block with a
// UE8M0 scale, for the FP8 forms: codes [rows, k] bytes, each 128-wide block stored in the order
// f8_act_pos gives for `layout`, and the scales 2^e as float32, [rows, k / 128] (scale_rows 0: the
// decode forms) or transposed for the Hopper tiled form's TMA loads (scale_rows > 0, at least rows,
// a multiple of 4): row r's scale of block c of its group g = r % groups at
// ((g k / 128 + c) scale_rows + r / groups), so that a step's scales of consecutive rows lie
// together. The same values as dsv4_act_quant's act_fp8. A warp per (row, 128-block), grid
// (rows / 4, k / 128).
extern "C" __global__ void __launch_bounds__(128) dsv4_act_quant_f8(const void* __restrict__ x, int x_bf16, long long rows,
                                                                    int k, int layout, uint8_t* __restrict__ codes,
                                                                    float* __restrict__ scales, long long scale_rows,
                                                                    int groups) {
  dsv4::grid_begin();
  __shared__ __align__(16) uint8_t stage[4][KC];
  const int warp = threadIdx.x / 32;
  const long long row = (long long)blockIdx.x * 4 + warp;
  if (row >= rows) return;  // whole warps leave together
  quant_f8_block(x, x_bf16, row, blockIdx.y, k, layout, codes, scales, scale_rows, groups, stage[warp]);
}

// The wide forms of dsv4_act_quant and dsv4_act_quant_f8, for calls of many rows (a prefill's;
// rust/core/src/gpu/qgemm.rs quant_wide): the same values, read nearer the copy rate. A half warp
// takes a 128-block, 8 values a lane from one 16-byte load (x 16-byte aligned, as the launchers
// check), and a warp makes WIDE_PASSES passes of two consecutive blocks of its row with every load
// of the passes issued before the first is used (1-2 KB in flight a warp). Each block's values
// are staged in shared memory in the reader's order and stored 8 or 16 bytes a lane. At a decode
// step's few rows the narrow forms above are faster (the passes lengthen a call's chain).
namespace {

constexpr int WIDE_PASSES = 2;

}  // namespace

// dsv4_act_quant's values and arguments. A warp per (row, 2 WIDE_PASSES consecutive 128-blocks),
// grid (ceil(rows / 4), ceil(k / (256 WIDE_PASSES))); k % 32 == 0, so a lane's 8 values lie all in
// the row or all past it.
extern "C" __global__ void __launch_bounds__(128) dsv4_act_quant_wide(const void* __restrict__ x, int x_bf16,
                                                                      long long rows, int k, int act_fp8, int layout,
                                                                      uint16_t* __restrict__ out,
                                                                      const int* __restrict__ rows_map, int rows_div,
                                                                      const int* __restrict__ rows_count) {
  dsv4::grid_begin();
  __shared__ __align__(16) uint16_t stage[4][2][KC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16, hl = lane % 16;
  const long long row = (long long)blockIdx.x * 4 + warp;
  if (row >= rows) return;  // whole warps leave together
  const long long col0 = ((long long)blockIdx.y * 2 * WIDE_PASSES + half) * KC + 8 * hl;  // pass 0's first value
  if (rows_count && row >= *rows_count) {
#pragma unroll
    for (int s = 0; s < WIDE_PASSES; ++s)
      if (col0 + 2 * s * KC < k) *(uint4*)(out + row * k + col0 + 2 * s * KC) = make_uint4(0, 0, 0, 0);
    return;
  }
  const long long src_row = rows_map ? rows_map[row] / rows_div : row;
  float v[WIDE_PASSES][2][4];  // pass s: the lane's values col0 + 2 s KC .. + 7, by fours
#pragma unroll
  for (int s = 0; s < WIDE_PASSES; ++s) {
    const long long col = col0 + 2 * s * KC;
    float f[8] = {};
    if (col < k) load8(x, src_row * k + col, x_bf16, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[s][i / 4][i % 4] = f[i];
  }
#pragma unroll
  for (int s = 0; s < WIDE_PASSES; ++s) {
    const long long col = col0 + 2 * s * KC;
    if (act_fp8) {
      float m = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[s][i / 4][i % 4]));
      m = group_amax(m, 16);  // every lane takes part in the shuffles
      const int e = ue8m0_exponent(m, FP8_MAX);
      fp8_round_trip4(v[s][0], e);
      fp8_round_trip4(v[s][1], e);
    }
    uint16_t* st = stage[warp][half];
#pragma unroll
    for (int i = 0; i < 8; ++i) st[act_pos(8 * hl + i, layout)] = bf16_from_f32(v[s][i / 4][i % 4]);
    __syncwarp();
    if (col < k) *(uint4*)(out + row * k + col) = *(const uint4*)&st[8 * hl];
    __syncwarp();  // the stage is free again for the next pass
  }
}

// dsv4_act_quant_f8's values and arguments. A warp per (row, 2 WIDE_PASSES consecutive
// 128-blocks), grid (ceil(rows / 4), ceil(k / (256 WIDE_PASSES))).
extern "C" __global__ void __launch_bounds__(128) dsv4_act_quant_f8_wide(const void* __restrict__ x, int x_bf16,
                                                                         long long rows, int k, int layout,
                                                                         uint8_t* __restrict__ codes,
                                                                         float* __restrict__ scales,
                                                                         long long scale_rows, int groups) {
  dsv4::grid_begin();
  __shared__ __align__(16) uint8_t stage[4][2][KC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16, hl = lane % 16;
  const long long row = (long long)blockIdx.x * 4 + warp;
  if (row >= rows) return;  // whole warps leave together
  const int nblk = k / KC;
  const int blk0 = blockIdx.y * 2 * WIDE_PASSES + half;  // this half warp's block of pass 0
  float v[WIDE_PASSES][2][4];  // pass s: the lane's values 8 hl .. 8 hl + 7 of its block, by fours
#pragma unroll
  for (int s = 0; s < WIDE_PASSES; ++s) {
    const int blk = blk0 + 2 * s;
    float f[8] = {};
    if (blk < nblk) load8(x, row * k + (long long)blk * KC + 8 * hl, x_bf16, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[s][i / 4][i % 4] = f[i];
  }
#pragma unroll
  for (int s = 0; s < WIDE_PASSES; ++s) {
    const int blk = blk0 + 2 * s;
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[s][i / 4][i % 4]));
    m = group_amax(m, 16);  // every lane takes part in the shuffles
    const int e = ue8m0_exponent(m, FP8_MAX);
    const uint32_t c[2] = {fp8_encode4(v[s][0], e), fp8_encode4(v[s][1], e)};
    uint8_t* st = stage[warp][half];
#pragma unroll
    for (int i = 0; i < 8; ++i) st[f8_act_pos(8 * hl + i, layout)] = (uint8_t)(c[i / 4] >> (8 * (i % 4)));
    __syncwarp();
    if (blk < nblk) {
      *(uint2*)(codes + row * k + (long long)blk * KC + 8 * hl) = *(const uint2*)&st[8 * hl];
      if (hl == 0) {
        const long long at = scale_rows ? ((row % groups) * nblk + blk) * scale_rows + row / groups : row * nblk + blk;
        scales[at] = exp2i(e);
      }
    }
    __syncwarp();  // the stage is free again for the next pass
  }
}

// The MoE plan: pairs (token, choice) of idx [pairs] sorted by expert. offsets [experts + 1];
// order[slot] = pair; slot_of[pair] = slot (-1 for ids outside [0, experts), which contribute
// nothing); tiles [*, 3] = (expert, first slot, rows) per bm rows of each expert; tile_count.
// One block; dynamic shared memory 3 * experts ints. With `x` (few tokens) the block also does
// dsv4_act_quant_f8's work on x [q_rows, k] (rows layout of the scales), one launch fewer:
// its warps take the (row, 128-block) pairs in turn, their loads issued before the plan's.
extern "C" __global__ void __launch_bounds__(THREADS_PLAN) dsv4_moe_plan(
    const void* __restrict__ idx, int idx64, long long pairs, int experts, int bm, int* __restrict__ offsets,
    int* __restrict__ order, int* __restrict__ slot_of, int* __restrict__ tiles, int* __restrict__ tile_count,
    const void* __restrict__ x, int x_bf16, int q_rows, int k, int layout, uint8_t* __restrict__ codes,
    float* __restrict__ scales) {
  dsv4::grid_begin();
  extern __shared__ int plan_smem[];
  __shared__ int warp_sums[32];
  if (x) {
    __shared__ __align__(16) uint8_t stage[THREADS_PLAN / 32][KC];
    const int warp = threadIdx.x / 32, blocks = k / KC;
    for (int item = warp; item < q_rows * blocks; item += THREADS_PLAN / 32)
      quant_f8_block(x, x_bf16, item / blocks, item % blocks, k, layout, codes, scales, 0, 1, stage[warp]);
  }
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
// nothing), y read as float32 or (y_bf16) bfloat16, out stored as float32 or bf16. Grid (T, dim /
// 512): a thread per 4 columns (dim % 4 == 0).
extern "C" __global__ void __launch_bounds__(128) dsv4_moe_combine(const void* __restrict__ y, int y_bf16,
                                                                   const int* __restrict__ slot_of,
                                                                   const float* __restrict__ w, int k, int dim,
                                                                   void* __restrict__ out, int out_bf16) {
  dsv4::grid_begin();
  const long long t = blockIdx.x;
  const int c = (blockIdx.y * 128 + threadIdx.x) * 4;
  if (c >= dim) return;
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j = 0; j < k; ++j) {
    const int slot = slot_of[t * k + j];
    if (slot < 0) continue;
    const float wj = w[t * k + j];
    const long long at = (long long)slot * dim + c;
    float4 v;
    if (y_bf16) {
      const uint2 b = *(const uint2*)((const uint16_t*)y + at);
      v = make_float4(bf16_to_f32(b.x), bf16_to_f32(b.x >> 16), bf16_to_f32(b.y), bf16_to_f32(b.y >> 16));
    } else {
      v = *(const float4*)((const float*)y + at);
    }
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
  dsv4::grid_begin();
  const long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int j = 0; j < splits; ++j) s += part[j * n + i];
  if (out_bf16) ((uint16_t*)out)[i] = bf16_from_f32(s);
  else ((float*)out)[i] = s;
}
