// Block-scaled GEMM, the Hopper tiled form: wgmma (sm_90a), built for sm_90a alone and picked at
// run time on compute capability 9.0 for the calls the portable tiled form (cuda/qgemm.cu
// dsv4_qgemm_*_m64) would take: many activation rows per weight (prefill), K a multiple of 128.
// Same parameters, work items (dense row tiles or a MoE plan's tiles), epilogues and numerics as
// cuda/qgemm.cu: weights decoded to exact bfloat16 in registers (never to memory), products
// exact, float32 sums (only their order differs from the CPU twin).
//
// dsv4_qgemm_{fp8,fp4}_wgmma: Y^T = W A^T for 64 weight rows a warpgroup (three warpgroups a
// block for MXFP4, two for FP8: see Shape) x 128 activation rows. The roles are the decode
// form's: the weights are wgmma's A operand, taken from registers (each warp 16 weight rows, each
// lane rows fr and fr + 8 of its warp: the mma.sync A fragment layout), and the activation rows
// its N = 128 operand, read from shared memory K-major in 128-byte swizzled rows. A lane decodes
// 32 consecutive K values of each of its two rows per 128-wide K step (fp4x32_lane /
// fp8x32_lane, as the portable forms do); the activations are stored in the matching order
// (wgmma_pos, written by dsv4_act_quant).
//
// Pipeline (STAGES deep): a stage holds the activation tile of a K step, loaded by TMA (the
// kernel's tensor map, whose 128-byte swizzle is wgmma's; rows are contiguous: a dense row tile,
// or a MoE tile of the sorted activations) on the stage's mbarrier, and each lane's own raw
// weight bytes and scales (cp.async), which the lane alone reads back. No block barrier in the
// loop: each stage also has an `empty` mbarrier on which every warp arrives once its wgmma of the
// stage's step are done, and a warpgroup of its own (one thread) waits on it before refilling the
// slot, STAGES steps ahead. Each step: wait for the stage's `full` barrier; the 8 wgmma of step c
// issued asynchronously from one register buffer; the lane waits for its copies of step c + 1
// and decodes them into the other buffer while the tensor cores run; its copies of step
// c + STAGES - 1 issued; then it waits for the wgmma and its warp arrives on the stage's `empty`
// barrier. FP8 weights:
// each step's wgmma sum into a zeroed partial accumulator which the lane's two block scales (rows
// fr and fr + 8) then add into the result.
#include "grid.cuh"
#include "mma.cuh"
#include "qgemm.cuh"
#include "wgmma.cuh"

using namespace dsv4;

namespace {

// Warpgroups a block: three for MXFP4 weights (160 registers a thread; a scheduler then holds
// three warps), two for FP8 (its partial sums need 226).
template <bool FP4>
struct Shape {
  static constexpr int WARPGROUPS = FP4 ? 3 : 2;
  static constexpr int THREADS = 128 * WARPGROUPS;  // the warpgroups that compute
  // and one whose one thread issues the activation tiles' TMA loads; setmaxnreg moves its
  // registers to the others (a warp of each warpgroup shares a quarter of the SM's registers).
  static constexpr int LAUNCH = THREADS + 128;
  static constexpr int LOADER_REGS = 24, REGS = FP4 ? 160 : 240;
  static_assert(LOADER_REGS + WARPGROUPS * REGS <= 512, "a quarter of the SM's 64K registers");
  static constexpr int BN = 64 * WARPGROUPS;  // weight rows a block: 64 a warpgroup (the wgmma M), 16 a warp
};
constexpr int BT = 128;       // activation rows a block (the wgmma N)
constexpr int STAGES = 4;
// The activation tile of step c + STAGES goes to the slot of step c once every warp's wgmma are
// done with that step (its `empty` barrier). (Until the loads had a warpgroup of their own, thread
// 0 issued them between its own steps, two steps behind.) The weights, each thread's own, are
// refilled STAGES - 1 steps ahead.
constexpr int ATOM_ROW = 128;             // bytes of a swizzled row: 64 bf16 K values
constexpr int ACT_TILE = 2 * BT * ATOM_ROW;  // a step's activations: two atoms of 64 K values

template <bool FP4>
struct Stage {
  static constexpr int CHUNKS = FP4 ? 1 : 2;                // a lane's 16-byte weight chunks a row and step
  static constexpr int W_TILE = 2 * CHUNKS * Shape<FP4>::THREADS * 16;  // [row j][chunk][thread] 16 bytes
  static constexpr int S_TILE = 2 * Shape<FP4>::THREADS * 4;             // [row j][thread] the row's 4 scale codes, or its float scale
  static constexpr int BYTES = ACT_TILE + W_TILE + S_TILE;
  static_assert(BYTES % 1024 == 0, "each stage's activation tile must stay 1024-byte aligned (swizzle atoms)");
};

__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ float2 lds_f2(uint32_t a) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void sts32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
}

// The tiled forms' epilogue: each warp's 16 weight rows as the decode forms store theirs, h in
// the bf16 down GEMM's order (ACT_WGMMA_FP4).
template <int BN, bool ODD_H = false>
__device__ __forceinline__ void tiled_store(const GemmParams& p, const float (&acc)[16][4], int g, long long row0, int rows,
                                            int warp) {
  const int col0 = p.swiglu ? blockIdx.x * (BN / 2) + 8 * warp : blockIdx.x * BN + 16 * warp;
  gemv_store<16, ACT_WGMMA_FP4, ODD_H>(p, acc, g, row0, rows, col0);
}

template <bool FP4>
__device__ __forceinline__ void qgemm_wgmma(const GemmParams& p, const TmaDesc* a_map) {
  using S = Stage<FP4>;
  constexpr int THREADS = Shape<FP4>::THREADS, BN = Shape<FP4>::BN;
  extern __shared__ __align__(1024) uint8_t smem[];
  __shared__ __align__(8) uint64_t full[STAGES];   // a stage's activation tile has landed
  __shared__ __align__(8) uint64_t empty[STAGES];  // every warp's wgmma are done with a stage's activation tile

  int g, rows;
  long long row0;
  if (!work_item(p, BT, g, row0, rows)) return;
  // Stages from the first 1024-byte boundary (the launch asks for 1 KB of slack).
  const uint32_t base = ((uint32_t)__cvta_generic_to_shared(smem) + 1023u) & ~1023u;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q = lane % 4, fr = lane / 4;
  const int k_steps = p.k / KC;  // the launcher takes k % 128 == 0 here
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int c_end = min(k_steps, c_begin + p.k_steps_per_split);
  const long long k = p.k;

  // The lane's weight rows: slots 16 warp + fr (j = 0) and 16 warp + 8 + fr (j = 1).
  const uint8_t* wsrc[2];
  const void* ssrc[2];  // FP4: the row's scale codes; FP8: its 128-row block's scales
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int n = weight_row(p, 16 * warp + 8 * j + fr, BN);
    const long long ng = (long long)g * p.n + n;
    wsrc[j] = n < 0 ? nullptr : p.w + w_row<FP4>(p, ng, k) + (FP4 ? 16 : 32) * q;
    ssrc[j] = n < 0 ? nullptr
                    : FP4 ? (const void*)((const uint8_t*)p.w_scale + ng * (k / 32))
                          : (const void*)((const float*)p.w_scale + (ng / 128) * k_steps);
  }
  // The activation tile of a step comes by TMA: two boxes of 64 K values x 128 rows (the map's
  // 128-byte swizzle is wgmma's), at the tile's first row (a dense row or a sorted MoE slot; the
  // rows past the tile's own are loaded too, and their results never stored) and K column
  // g * a_group_stride + 128 c. One thread issues them and arms the stage's barrier.
  const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(&full[0]);
  const uint32_t empty0 = (uint32_t)__cvta_generic_to_shared(&empty[0]);
  const int a_x0 = (int)(g * p.a_group_stride), a_y = (int)row0;
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full0 + 8 * st, 1);
      mbar_init(empty0 + 8 * st, THREADS / 32);
    }
    mbar_init_fence();
  }
  const uint32_t w_at = ACT_TILE + tid * 16, s_at = ACT_TILE + S::W_TILE + tid * 4;

  // What no copy ever fills, set once in every stage: weight rows past the weights are zeros,
  // their scale codes 127 (2^0), their FP8 scales 0.
  for (int st = 0; st < STAGES && tid < THREADS; ++st) {
    const uint32_t sb = base + st * S::BYTES;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (wsrc[j]) continue;
#pragma unroll
      for (int u = 0; u < S::CHUNKS; ++u) sts128(sb + w_at + (j * S::CHUNKS + u) * THREADS * 16, make_uint4(0, 0, 0, 0));
      sts32(sb + s_at + j * THREADS * 4, FP4 ? 0x7F7F7F7Fu : 0u);
    }
  }

  auto issue_act = [&](int c, int slot) {
    const uint32_t sb = base + slot * S::BYTES, bar = full0 + 8 * slot;
    mbar_arrive_expect_tx(bar, ACT_TILE);
    tma_load_2d(sb, a_map, a_x0 + c * KC, a_y, bar);
    tma_load_2d(sb + BT * ATOM_ROW, a_map, a_x0 + c * KC + KC / 2, a_y, bar);
  };
  // This thread's own weight bytes and scales of step c (read back only by itself).
  auto issue = [&](int c, int slot) {
    const uint32_t sb = base + slot * S::BYTES;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!wsrc[j]) continue;
#pragma unroll
      for (int u = 0; u < S::CHUNKS; ++u)
        cp_async16(sb + w_at + (j * S::CHUNKS + u) * THREADS * 16, wsrc[j] + c * w_step<FP4>(p) + 16 * u);
      cp_async4(sb + s_at + j * THREADS * 4, FP4 ? (const void*)((const uint8_t*)ssrc[j] + 4 * c) : (const void*)((const float*)ssrc[j] + c));
    }
  };

  // This lane's A registers of the 8 k16 steps: rows fr / fr + 8 at lane positions 4 s .. 4 s + 3.
  auto decode = [&](int slot, uint32_t(&a)[8][4]) {
    const uint32_t sb = base + slot * S::BYTES;
    uint32_t b[2][16];
    if (FP4) {
      uint4 raw[2];
      int code[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        raw[j] = lds128(sb + w_at + j * THREADS * 16);
        code[j] = (int)((lds32(sb + s_at + j * THREADS * 4) >> (8 * q)) & 0xFFu);
      }
      // Scales above 2 (never written by a quantizer) take a second multiply; keeping them off the
      // common path leaves both rows' decoding one branch-free block.
      if (max(code[0], code[1]) <= 128) {
        fp4x32_lane_small(raw[0], code[0] - 127, b[0]);
        fp4x32_lane_small(raw[1], code[1] - 127, b[1]);
      } else {
        fp4x32_lane(raw[0], code[0] - 127, b[0]);
        fp4x32_lane(raw[1], code[1] - 127, b[1]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j)
        fp8x32_lane(lds128(sb + w_at + 2 * j * THREADS * 16), lds128(sb + w_at + (2 * j + 1) * THREADS * 16), b[j]);
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      a[s][0] = b[0][2 * s];
      a[s][1] = b[1][2 * s];
      a[s][2] = b[0][2 * s + 1];
      a[s][3] = b[1][2 * s + 1];
    }
  };

  float acc[16][4], part[16][4];  // part: FP8 weights only
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  uint32_t ra[2][8][4];

  __syncthreads();  // the barriers are initialized
  if (tid >= THREADS) {
    // The loading warpgroup: step c's activation tile into its slot once every warp is done with
    // step c - STAGES there (its `empty` barrier).
    run_loader<STAGES, Shape<FP4>::LOADER_REGS>(tid, THREADS, c_begin, c_end, empty0, issue_act);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Shape<FP4>::REGS));
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (c_begin + s < c_end) issue(c_begin + s, s);
    cp_async_commit();
  }
  if (c_begin < c_end) {
    cp_async_wait<STAGES - 2>();
    decode(0, ra[0]);
  }

  // Step c from register buffer B (B = (c - c_begin) % 2).
  auto step = [&](int c, auto buf) {
    constexpr int B = decltype(buf)::value;
    const int slot = (c - c_begin) % STAGES;
    mbar_wait(full0 + 8 * slot, ((c - c_begin) / STAGES) & 1);  // step c's activations have landed
    const uint32_t act = base + slot * S::BYTES;
    const Desc desc0 = swizzled_desc(act);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const Desc desc = desc0 + ((s / 4) * (BT * ATOM_ROW) + (s % 4) * 32) / 16;
      if (FP4) wgmma_m64n128k16_rs<true, false>(acc, ra[B][s], desc);
      else if (s == 0) wgmma_m64n128k16_rs<false, false>(part, ra[B][s], desc);
      else wgmma_m64n128k16_rs<true, false>(part, ra[B][s], desc);
    }
    wgmma_commit();
    if (c + 1 < c_end) {
      cp_async_wait<STAGES - 3>();  // this thread's copies of step c + 1 (step c + 2's may still fly)
      decode((slot + 1) % STAGES, ra[B ^ 1]);
    }
    // The weights of step c + STAGES - 1 go to step c - 1's slot, which this thread has decoded.
    if (c + STAGES - 1 < c_end) issue(c + STAGES - 1, (slot + STAGES - 1) % STAGES);
    cp_async_commit();
    wgmma_wait_all();
    if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // this warp is done with step c's activations
    if (!FP4) {
      float scale[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) scale[j] = __uint_as_float(lds32(act + s_at + j * THREADS * 4));
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[j][0] += part[j][0] * scale[0];
        acc[j][1] += part[j][1] * scale[0];
        acc[j][2] += part[j][2] * scale[1];
        acc[j][3] += part[j][3] * scale[1];
      }
    }
  };
  for (int c = c_begin; c < c_end; c += 2) {
    step(c, Tag<0>{});
    if (c + 1 < c_end) step(c + 1, Tag<1>{});
  }
  cp_async_wait<0>();

  if constexpr (FP4) {
    if (p.out_bf16 == OUT_H_BF16_ODD) {  // the MoE's gate-up GEMM, its h quantized next
      tiled_store<BN, true>(p, acc, g, row0, rows, warp);
      return;
    }
  }
  tiled_store<BN>(p, acc, g, row0, rows, warp);
}

// ---------------------------------------------------------------------------------------------
// The Hopper tiled form on FP8 tensor cores (dsv4_qgemm_fp8_wgf8: FP8 weights, act = "fp8",
// K % 128 == 0, many activation rows per weight; one group, or groups of a multiple of 64 rows):
// Y^T = W A^T for 192 weight rows (three warpgroups of 64: the wgmma M) x 128 activation rows
// (the N), `wgmma m64n128k32` e4m3 with both operands in shared memory, where TMA puts them. A
// stage holds a K step's 192 weight rows (one box of DeepSeek's rows, or three 64-row tiles), the
// 128 activation rows' codes in natural K order, and their float scales (a box over the scales
// stored by step: dsv4_act_quant_f8's `scale_rows`), the first two swizzled as wgmma reads them.
// Dense calls only (a row tile starts at a multiple of 128). The epilogue is the other tiled
// forms' (tiled_store).
//
// No block barrier in the loop. A fourth warpgroup issues a stage's three loads on its `full`
// mbarrier (one thread), F8_STAGES steps ahead, once every consumer warp has arrived on the
// `empty` barrier of the step that last held the slot. (Until it had its own warpgroup this was
// thread 0's work between its own steps, two steps behind: o_b at 4,096 rows took 0.52-0.57 ms
// then, 0.47-0.48 since, on an H100.) A warp's step: wait for `full`, issue the step's four wgmma
// into a zeroed partial, wait for them, read the activation scales, arrive on `empty` and add the
// partial into the result. While one warpgroup adds its partial, the others' wgmma keep the
// tensor cores busy. (Two warpgroups of 128 weight rows a block, each warp issuing a second
// step's wgmma before adding the first's partial, measured 7 % slower on o_b at 4,096 rows; a
// second partial does not fit three warpgroups' registers. Overlapping every step with the next
// across loop iterations makes ptxas serialize the wgmma: the in-flight accumulators are copied
// at the loop's back edge.)
//
// Numerics (DeepSeek's FP8 GEMMs' own: FP8 products summed by the tensor core for 128 values,
// then promoted to float32): each 128-wide K step's four wgmma sum its exact products into a
// zeroed partial, which is scaled by the activation row's scale (a power of two: exact) and then
// by the weight block's float multiplier added in float32 (acc = fma(part * a_scale, w_scale,
// acc)). A warpgroup's first row (groups flattened) is a multiple of 64, so its 64 rows share
// one 128-row scale block. docs/kernels/qgemm.md states the partial's bound.
//
// Tried and not kept: MXFP4 weights on FP8 tensor cores (each row's four 32-blocks of a step as
// e4m3 codes at their largest exponent, by a `prmt` byte table), three times: widened in
// registers, widened into shared memory by each warpgroup on this form, and by a fourth
// warpgroup. Every test passed each time, but the MoE prefill was 1.2x, 1.15-1.2x and 2.3x slower
// than qgemm_wgmma<true> (docs/kernels/qgemm.md).
namespace wgf8 {
constexpr int CONSUMERS = 384;    // three warpgroups of 64 weight rows
// and a warpgroup whose one thread issues the TMA loads. A warp more would cap every thread at 128
// registers (a quarter of the SM's warps share a quarter of its registers), so the loading
// warpgroup gives its registers up (setmaxnreg) to the consumers' 160.
constexpr int THREADS = CONSUMERS + 128;
constexpr int LOADER_REGS = 24, CONSUMER_REGS = 160;
static_assert(LOADER_REGS + 3 * CONSUMER_REGS <= 512, "a quarter of the SM's 64K registers: a warp of each warpgroup");
constexpr int BN = 192;           // weight rows a block: 64 a warpgroup
constexpr int F8_STAGES = 5;
constexpr int WEIGHTS = BN * KC;  // a step's weight rows: 192 x 128 bytes
constexpr int CODES = BT * KC;    // its activation codes: 128 rows x 128 bytes
// Their float scales: a box of the tile's 128 rows (a dense row tile starts at a multiple of 128,
// so the box starts on a 16-byte boundary of its row, as TMA needs).
constexpr int SCALES = BT * 4;
constexpr int BYTES = (WEIGHTS + CODES + SCALES + 1023) / 1024 * 1024;
}  // namespace wgf8

__device__ __forceinline__ void qgemm_wgf8(const GemmParams& p, const TmaDesc* w_map, const TmaDesc* a_map,
                                           const TmaDesc* s_map) {
  using namespace wgf8;
  extern __shared__ __align__(1024) uint8_t smem[];
  __shared__ __align__(8) uint64_t full[F8_STAGES];   // a stage's weights, activation codes and scales have landed
  __shared__ __align__(8) uint64_t empty[F8_STAGES];  // every warp is done with a stage

  int g, rows;
  long long row0;
  if (!work_item(p, BT, g, row0, rows)) return;
  const uint32_t base = ((uint32_t)__cvta_generic_to_shared(smem) + 1023u) & ~1023u;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4, q = lane % 4;
  const int k_steps = p.k / KC;
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int c_end = min(k_steps, c_begin + p.k_steps_per_split);

  // The block's first weight row, groups flattened, and this warpgroup's scales (those of its
  // first row's 128-row block; a warpgroup past its group's rows stores nothing and takes the
  // first warpgroup's).
  const int n0 = blockIdx.x * BN;
  const long long r0 = (long long)g * p.n + n0;
  const int n_wg = n0 + 64 * wg < p.n ? n0 + 64 * wg : n0;
  const float* w_scale = (const float*)p.w_scale + (((long long)g * p.n + n_wg) / 128) * k_steps;
  const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(&full[0]);
  const uint32_t empty0 = (uint32_t)__cvta_generic_to_shared(&empty[0]);
  // TMA coordinates: the weights' byte column 128 c of row r0 (or step c of tile r0 / 64); the
  // codes' byte column g * a_group_stride + 128 c of row row0; the scales' column row0 of step
  // row g * a_group_stride / 128 + c.
  const int a_x0 = (int)(g * p.a_group_stride), a_y = (int)row0, s_y0 = (int)(g * p.a_group_stride / KC);
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < F8_STAGES; ++st) {
      mbar_init(full0 + 8 * st, 1);
      mbar_init(empty0 + 8 * st, CONSUMERS / 32);
    }
    mbar_init_fence();
  }
  auto issue = [&](int c, int slot) {
    const uint32_t sb = base + slot * BYTES, bar = full0 + 8 * slot;
    mbar_arrive_expect_tx(bar, WEIGHTS + CODES + SCALES);
    if (p.w_tiles)
      tma_load_4d(sb, w_map, 0, 0, c, (int)(r0 / 64), bar);
    else
      tma_load_2d(sb, w_map, c * KC, (int)r0, bar);
    tma_load_2d(sb + WEIGHTS, a_map, a_x0 + c * KC, a_y, bar);
    tma_load_2d(sb + WEIGHTS + CODES, s_map, a_y, s_y0 + c, bar);
  };

  float acc[16][4], part[16][4];
#pragma unroll
  for (int t = 0; t < 16; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
  float ws = 0.f;  // the warpgroup's weight scale of the step in `part`

  __syncthreads();  // the barriers are initialized
  if (warp >= CONSUMERS / 32) {
    // The loading warpgroup: step c into its slot once every consumer warp is done with step
    // c - F8_STAGES there (its `empty` barrier), so that the consumers never wait on each other.
    run_loader<F8_STAGES, LOADER_REGS>(tid, CONSUMERS, c_begin, c_end, empty0, issue);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));

  // Step c's four wgmma into `part` (its weight scale into `ws`).
  auto mma = [&](int c) {
    const int slot = (c - c_begin) % F8_STAGES;
    ws = __ldg(w_scale + c);
    mbar_wait(full0 + 8 * slot, ((c - c_begin) / F8_STAGES) & 1);
    const uint32_t sb = base + slot * BYTES;
    const Desc da = swizzled_desc(sb + wg * 64 * KC), db = swizzled_desc(sb + WEIGHTS);
#pragma unroll
    for (int t = 0; t < 16; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) wgmma_pin(part[t][e]);
    wgmma_fence();
    wgmma_m64n128k32_e4m3_ss<false>(part, da, db);
#pragma unroll
    for (int s = 1; s < 4; ++s) wgmma_m64n128k32_e4m3_ss<true>(part, da + 2 * s, db + 2 * s);
    wgmma_commit();
  };
  // Step c's partial (done) into the result; the warp is then done with its stage.
  auto promote = [&](int c) {
    const int slot = (c - c_begin) % F8_STAGES;
#pragma unroll
    for (int t = 0; t < 16; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) wgmma_pin(part[t][e]);  // written by the tensor cores until now
    // The activation rows' scales of this thread's columns 8 t + 2 q + {0, 1}.
    float2 cs[16];
    const uint32_t cs_at = base + slot * BYTES + WEIGHTS + CODES + 8 * q;
#pragma unroll
    for (int t = 0; t < 16; ++t) cs[t] = lds_f2(cs_at + 32 * t);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // this warp is done with step c's stage
#pragma unroll
    for (int t = 0; t < 16; ++t) {
      acc[t][0] = fmaf(part[t][0] * cs[t].x, ws, acc[t][0]);
      acc[t][1] = fmaf(part[t][1] * cs[t].y, ws, acc[t][1]);
      acc[t][2] = fmaf(part[t][2] * cs[t].x, ws, acc[t][2]);
      acc[t][3] = fmaf(part[t][3] * cs[t].y, ws, acc[t][3]);
    }
  };
  for (int c = c_begin; c < c_end; ++c) {
    mma(c);
    wgmma_wait_all();
    promote(c);
  }
  tiled_store<BN>(p, acc, g, row0, rows, warp);
}

// ---------------------------------------------------------------------------------------------
// The Hopper FP8 decode form (dsv4_qgemv_wg_*; act = "fp8", K % 128 == 0, a few activation rows
// per weight): cuda/qgemm.cu's FP8 decode form (qgemv_f8) with its mma.sync m16n8k32 e4m3
// replaced by wgmma m64n{8,16}k32 e4m3, which on sm_90 is the native FP8 tensor-core path
// (ptxas lowers the mma.sync form to f16 conversions and f16 mma there). A block is one
// warpgroup: 64 weight rows (warp w holds 16, as a warp of qgemv_f8 does: with SwiGLU, 8 gate
// rows and the matching 8 up rows) and 8 NT activation rows, all four warps over the same K
// steps. The weights are wgmma's A operand from registers: each warp streams its 16 rows' bytes
// of a K step into shared memory with cp.async and reads them back with ldmatrix (MXFP4 widened
// to e4m3 times 2^-6, as in qgemv_f8); the step's activation codes, shared by the warpgroup,
// are its B operand, read by wgmma from shared memory K-major without swizzle: 16-byte chunk c
// of activation row r at byte c (8 NT 16) + 16 r, so a k32 slice is two chunks (LBO 8 NT 16 bytes
// apart, 8-row groups SBO 128 bytes apart). dsv4_act_quant_f8 stores each 128-block in the K
// order the A registers give (f8_act_pos, F8_WG_*).
//
// Pipeline: STAGES stages of (activation codes, the 64 rows' weight bytes, their scale words,
// the activation scales), filled STAGES - 1 steps ahead by cp.async. A step: wait for this
// thread's copies, fence them to the async proxy and meet at the block barrier (every copy of
// the step has landed; every warp is done with the previous step, whose slot is refilled now);
// ldmatrix and widen the step's weights; four wgmma, one per 32-wide slice (= one MXFP4 scale
// block), each from a zero accumulator; wait; scale the slice sums and add them in float32.
//
// Numerics as qgemv_f8's: products exact, each slice summed by the tensor core's FP8
// accumulator (docs/kernels/qgemm.md states the bound), slice sums scaled and added in float32
// in the same order. Weights with MXFP4 scale codes above 248 take qgemv_f8's exact pass, here
// for the whole block when any warp met one.
//
// The fused kernels (FUSE, dsv4_qgemv_wg_fused_*: dense linears whose block's activation codes
// fit rust/core/src/gpu/qgemm.rs `WG_FUSED_CODES`) make the whole call one kernel. Each block
// quantizes its own rows and K steps of the unquantized activations (p.x) into shared memory
// while its first weight copies are in flight (quantize_tile: dsv4_act_quant_f8's values, in its
// order), so the stages carry weights alone; and the K splits of a grid column run as one
// thread-block cluster (the launch sets the cluster to the grid's z) whose first block adds the
// others' partial sums from their shared memory in split order (dsv4_splitk_reduce's order: the
// same float32 values) and stores the outputs.
constexpr int MAX_SPLITS_WG = 8;  // K splits of a fused call: a cluster (rust/core/src/gpu/mod.rs MAX_CLUSTER)

template <bool FP4, int NT, bool FUSE = false>
struct WgLayout {
  static constexpr int ROWS = 8 * NT;          // activation rows a block (the wgmma N)
  static constexpr int ROW = FP4 ? 64 : 128;   // bytes of a weight row per K step
  static constexpr int A = FUSE ? 0 : ROWS * KC;  // the step's activation codes (first: 128-byte aligned)
  static constexpr int W = 64 * ROW;           // the 64 weight rows; warp w's 16 at 16 w ROW
  static constexpr int WS = 64 * 4;            // a word per weight slot: 4 UE8M0 codes, or the FP8 block's float
  static constexpr int AS = FUSE ? 0 : ROWS * 4;  // activation scales (float)
  static constexpr int STAGE = (A + W + WS + AS + 127) / 128 * 128;
  // Mirrored by rust/core/src/gpu/qgemm.rs `gemm_shared_bytes`, `wg_decode_stages` and
  // `WG_FUSED_CODES`. FUSE: the block's activation codes, ROWS KC bytes a step, then their scales,
  // ROWS floats a step, follow the stages.
  // GROUP: the steps whose copies a block issues at once, every GROUP-th step. The MXFP4 kernels
  // (the MoE's) take three: a weight row's 64 bytes a step are three times as long a contiguous
  // request, which the memory serves faster (docs/kernels/qgemm.md), in 6 stages (6 blocks of 6
  // x 5.5 KB an SM at 8 rows), still three steps ahead at the least. The FP8 and fused kernels
  // issue a step at a time, three ahead (grouped by two in 5 stages, the FP8 linears measured
  // 1-2 us slower at one row).
  static constexpr int GROUP = FP4 && !FUSE ? 3 : 1;
  static constexpr int STAGES = GROUP + 3;
  static_assert(STAGES - GROUP >= 3, "three steps in flight at the least");
};

// The fused kernels' activations: A(x) of activation rows row0 .. row0 + rows of group g over K
// steps c_begin .. c_begin + nsteps (rows past the tile: zero codes and scales) into shared memory
// as qgemv_wg reads them: step j's codes at q + j ROWS KC, 16-byte chunk c of row r at c ROWS 16 +
// 16 r (each 128-block in f8_act_pos order for F8_WG_FP8 / F8_WG_FP4), its scales at
// qs[j ROWS + r]. The values are dsv4_act_quant_f8's, bit for bit: the same amax and exponent,
// the codes by fp8_encode4, as that kernel takes them. A thread takes a 16-byte chunk of x (8
// bfloat16 or 4 float32 values) at a time, a 128-block spanning CG = 128 / V consecutive lanes,
// four chunks' loads in flight.
template <int ROWS, bool FP4>
__device__ __forceinline__ void quantize_tile(const GemmParams& p, int g, long long row0, int rows, int c_begin, int nsteps,
                                              uint8_t* q, float* qs) {
  const bool bf16 = p.x_bf16 != 0;
  const int V = bf16 ? 8 : 4, CG = KC / V;
  const int total = ROWS * nsteps * CG;  // a multiple of 128: ROWS CG >= 8 16
  const int elem = bf16 ? 2 : 4;
  constexpr int BATCH = 4;
  for (int base = 0; base < total; base += BATCH * 128) {
    uint4 raw[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const int j = base + 128 * u + threadIdx.x, grp = j / CG, r = grp / nsteps;
      raw[u] = make_uint4(0, 0, 0, 0);
      if (j < total && r < rows) {
        const long long col = (long long)(c_begin + grp % nsteps) * KC + (j % CG) * V;
        raw[u] = __ldg((const uint4*)((const char*)p.x + ((row0 + r) * p.a_row_stride + g * p.a_group_stride + col) * elem));
      }
    }
    float v[BATCH][8], m[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const uint32_t w[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
      m[u] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[u][i] = bf16 ? __uint_as_float(i % 2 ? w[i / 2] & 0xFFFF0000u : w[i / 2] << 16) : __uint_as_float(w[i % 4]);
        if (bf16 || i < 4) m[u] = fmaxf(m[u], fabsf(v[u][i]));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      if (off >= CG) continue;  // the same for the whole block
#pragma unroll
      for (int u = 0; u < BATCH; ++u) m[u] = fmaxf(m[u], __shfl_xor_sync(0xffffffffu, m[u], off));
    }
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      if (base + 128 * u >= total) break;  // the same for the whole block
      const int j = base + 128 * u + threadIdx.x, grp = j / CG, within = j % CG, r = grp / nsteps, s = grp % nsteps;
      const int e = ue8m0_exponent(m[u], FP8_MAX);
      uint32_t c[2];  // codes of values 0..7 of the chunk (0..3 for float32), a byte each
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float q[4] = {v[u][4 * h], v[u][4 * h + 1], v[u][4 * h + 2], v[u][4 * h + 3]};
        c[h] = fp8_encode4(q, e);
      }
      uint8_t* qrow = q + s * ROWS * KC + 16 * r;
      auto at = [&](int pos) { return qrow + (pos / 16) * ROWS * 16 + pos % 16; };
      const int p0 = within * V;
      if (!FP4) {  // natural order: the chunk's codes are consecutive
        if (bf16) *(uint2*)at(p0) = make_uint2(c[0], c[1]);
        else *(uint32_t*)at(p0) = c[0];
      } else {  // F8_WG_FP4: the even values' codes consecutive, the odd ones' 16 bytes on
        if (bf16) {
          *(uint32_t*)at(f8_act_pos(p0, F8_WG_FP4)) = __byte_perm(c[0], c[1], 0x6420);
          *(uint32_t*)at(f8_act_pos(p0 + 1, F8_WG_FP4)) = __byte_perm(c[0], c[1], 0x7531);
        } else {
          *(uint16_t*)at(f8_act_pos(p0, F8_WG_FP4)) = (uint16_t)__byte_perm(c[0], 0, 0x0020);
          *(uint16_t*)at(f8_act_pos(p0 + 1, F8_WG_FP4)) = (uint16_t)__byte_perm(c[0], 0, 0x0031);
        }
      }
      if (within == 0) qs[s * ROWS + r] = r < rows ? exp2i(e) : 0.f;
    }
  }
}

// qgemv_wg's wait for step i's copies, the step's place in its issue group being `phase`: the
// copies issued so far reach step i + S - 1 - G at phase 0, else i + S - 1 - phase, so that many
// of the newest commit groups (a step each) may still be pending.
template <int S, int G>
__device__ __forceinline__ void cp_async_wait_phase(int phase) {
  static_assert(G >= 1 && G <= 3 && S - G >= 1, "groups of at most three steps, a step in flight");
  if (phase == 0) cp_async_wait<S - 1 - G>();
  else if constexpr (G > 1) {
    if (phase == 1) cp_async_wait<S - 2>();
    else if constexpr (G > 2) cp_async_wait<S - 3>();
  }
}

template <bool FP4, int NT, bool FUSE>
__device__ __forceinline__ void qgemv_wg(const GemmParams& p) {
  using L = WgLayout<FP4, NT, FUSE>;
  constexpr int S = L::STAGES, G = L::GROUP, ROWS = L::ROWS;
  constexpr int ROW_CHUNKS = L::ROW / 16;
  constexpr int W_COPIES = 16 * ROW_CHUNKS / 32;  // a lane's 16-byte weight copies a step
  constexpr int A_CHUNKS = ROWS * KC / 16;        // the step's activation chunks
  constexpr int A_COPIES = (A_CHUNKS + 127) / 128;  // a thread's (one up to 16 rows)
  static_assert(A_CHUNKS < 128 || A_CHUNKS % 128 == 0, "whole activation chunks a thread");
  constexpr int NB = NT < 4 ? NT : 4;  // n8 tiles a wgmma (n8, n16 or n32); NT / NB wgmma batches a step
  static_assert(NT % NB == 0, "whole wgmma batches");
  extern __shared__ __align__(1024) uint8_t smem[];  // (1024: the declaration qgemm_wgmma shares)

  // The MoE's work items are its plan's (written by a kernel before): wait first, unless the plan
  // is known complete (p.weights_first: the down GEMM, launched as a programmatic dependent of h's
  // quantization, which started after the gate-up GEMM, which started after the plan completed);
  // then the block issues its first steps' weight copies before it waits, and its activations'
  // after. A dense call's work items come from the block's index alone, and its weights are
  // constants of the step, so its blocks ask the L2 for their first steps' weight bytes before
  // they wait (cuda/include/grid.cuh).
  const bool dense = p.tiles == nullptr, weights_first = !dense && p.weights_first;
  if (!dense && !weights_first) grid_begin();
  int g, rows;
  long long row0;
  if (!work_item(p, ROWS, g, row0, rows)) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q = lane % 4, fr = lane / 4;
  const long long k = p.k;
  const int k_steps = p.k / KC;
  const int c_begin = blockIdx.z * p.k_steps_per_split;
  const int nsteps = max(0, min(k_steps, c_begin + p.k_steps_per_split) - c_begin);
  const int w_off = L::A + warp * 16 * L::ROW;  // this warp's weight rows in a stage
  const int ws_off = L::A + L::W, as_off = ws_off + L::WS;
  // FUSE: the block's activation codes and scales after the stages.
  uint8_t* const fq = smem + S * L::STAGE;
  float* const fqs = (float*)(fq + p.k_steps_per_split * ROWS * KC);

  // This warp's first weight row (with SwiGLU its first h column).
  const int col0 = p.swiglu ? blockIdx.x * 32 + 8 * warp : blockIdx.x * 64 + 16 * warp;
  auto weight_of = [&](int r) { return f8_weight_row(p, col0, r); };
  auto act_of = [&](int r) { return f8_act_row(p, g, row0, rows, r); };

  // This thread's copies: its warp's weight chunks, up to A_COPIES activation chunks (chunk
  // tid + 128 u: chunk (tid + 128 u) / ROWS of row (tid + 128 u) % ROWS), a weight scale word
  // (lanes below 16: the warp's slot `lane`) and an activation scale (threads below ROWS).
  const uint8_t* w_src[W_COPIES];
  int w_dst[W_COPIES];
#pragma unroll
  for (int u = 0; u < W_COPIES; ++u) {
    const int idx = lane + 32 * u, r = idx / ROW_CHUNKS, c = idx % ROW_CHUNKS;
    const int n = weight_of(r);
    w_dst[u] = w_off + f8_w_at<FP4>(r, c);
    w_src[u] = n < 0 ? nullptr : p.w + w_row<FP4>(p, (long long)g * p.n + n, k) + 16 * c;
  }
  if (dense) {
    // A 128-byte line a lane's copies start (a row's bytes of a step are 64 or 128, 16-byte chunks).
#pragma unroll
    for (int u = 0; u < W_COPIES; ++u)
      if (w_src[u] && (lane + 32 * u) % ROW_CHUNKS == 0)
        for (int s = 0; s < min(S - G, nsteps); ++s) prefetch_l2(w_src[u] + (long long)(c_begin + s) * w_step<FP4>(p));
    grid_begin();
  }
  const uint8_t* a_src[A_COPIES];
  int a_dst[A_COPIES];
#pragma unroll
  for (int u = 0; u < A_COPIES; ++u) {
    const int idx = tid + 128 * u;
    a_dst[u] = (idx / ROWS) * (ROWS * 16) + 16 * (idx % ROWS);
    a_src[u] = nullptr;
    if (!FUSE && idx < A_CHUNKS) {
      const long long off = act_of(idx % ROWS);
      if (off >= 0) a_src[u] = (const uint8_t*)p.a + off + 16 * (idx / ROWS);
    }
  }
  const uint8_t* ws_src = lane < 16 ? f8_scale_src<FP4>(p, g, weight_of(lane)) : nullptr;
  const float* as_src = nullptr;
  if (!FUSE && tid < ROWS) {
    const long long off = act_of(tid);
    if (off >= 0) as_src = p.a_scale + off / KC;
  }

  // Slots no copy fills (past the weights or the rows) hold zeros in every stage.
  for (int s = 0; s < S; ++s) {
    uint8_t* st = smem + s * L::STAGE;
#pragma unroll
    for (int u = 0; u < W_COPIES; ++u)
      if (!w_src[u]) *(uint4*)(st + w_dst[u]) = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < A_COPIES; ++u)
      if (!FUSE && tid + 128 * u < A_CHUNKS && !a_src[u]) *(uint4*)(st + a_dst[u]) = make_uint4(0, 0, 0, 0);
    if (lane < 16 && !ws_src) *(uint32_t*)(st + ws_off + 4 * (16 * warp + lane)) = 0;
    if (!FUSE && tid < ROWS && !as_src) *(float*)(st + as_off + 4 * tid) = 0.f;
  }

  const uint32_t smem_at = (uint32_t)__cvta_generic_to_shared(smem);
  // Step c's copies into stage s: the weights and their scale words, then the activations and
  // theirs.
  auto issue_weights = [&](int c, int s) {
    const uint32_t st = smem_at + s * L::STAGE;
#pragma unroll
    for (int u = 0; u < W_COPIES; ++u)
      if (w_src[u]) cp_async16(st + w_dst[u], w_src[u] + c * w_step<FP4>(p));
    if (ws_src) cp_async4(st + ws_off + 4 * (16 * warp + lane), ws_src + 4 * c);
  };
  auto issue_acts = [&](int c, int s) {
    const uint32_t st = smem_at + s * L::STAGE;
#pragma unroll
    for (int u = 0; u < A_COPIES; ++u)
      if (a_src[u]) cp_async16(st + a_dst[u], a_src[u] + (long long)c * KC);
    if (as_src) cp_async4(st + as_off + 4 * tid, as_src + c);
  };
  auto issue = [&](int c, int s) {
    issue_weights(c, s);
    issue_acts(c, s);
  };

  float acc[NT][4];
  // ldmatrix row address of this lane: matrix lane / 8 (slots 8 (m & 1) .., chunk offset m / 2).
  const int ld_slot = (lane & 7) + 8 * ((lane >> 3) & 1), ld_chunk = lane >> 4;
  // One pass over the block's K steps into acc (qgemv_f8's fast and exact passes).
  auto pass = [&](auto exact_tag) -> bool {
    constexpr bool EXACT = decltype(exact_tag)::value;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
    uint32_t code_max = 0;  // bytewise maximum of the scale codes met (fast pass)
    // (Two loops: one with `early ? issue_acts : issue` spills the 8-row MXFP4 kernel at 80 registers.)
    if (weights_first && !EXACT) {
      // The first steps' weights before the wait, in the first step's commit group (which the
      // first step then waits for whole), each step's activations after it.
#pragma unroll
      for (int s = 0; s < S - G; ++s)
        if (s < nsteps) issue_weights(c_begin + s, s);
      grid_begin();
#pragma unroll
      for (int s = 0; s < S - G; ++s) {
        if (s < nsteps) issue_acts(c_begin + s, s);
        cp_async_commit();
      }
    } else {
#pragma unroll
      for (int s = 0; s < S - G; ++s) {
        if (s < nsteps) issue(c_begin + s, s);
        cp_async_commit();
      }
    }
    // (Made visible to wgmma by the first step's fence and barrier; the exact pass reuses them.)
    if (FUSE && !EXACT) quantize_tile<ROWS, FP4>(p, g, row0, rows, c_begin, nsteps, fq, fqs);
    for (int i = 0, slot = 0, phase = 0; i < nsteps; ++i, slot = slot == S - 1 ? 0 : slot + 1, phase = phase == G - 1 ? 0 : phase + 1) {
      // A commit group a step: issued so far are the steps up to i + S - 1 - phase, or up to
      // i + S - 1 - G at a group's first step (phase 0), which leaves that many groups pending.
      cp_async_wait_phase<S, G>(phase);
      fence_async_shared();  // this thread's copies (and zeros) are visible to wgmma
      __syncthreads();       // step i has landed for every thread; every warp is done with step i - 1
      if (phase == 0) {
        // Steps i + S - G .. i + S - 1 go to the slots of steps i - G .. i - 1.
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const int to = slot + S - G + j;
          if (i + S - G + j < nsteps) issue(c_begin + i + S - G + j, to >= S ? to - S : to);
          cp_async_commit();
        }
      }
      const uint8_t* st = smem + slot * L::STAGE;
      const uint8_t* sws = st + ws_off;
      const float* sas = FUSE ? fqs + i * ROWS : (const float*)(st + as_off);

      // The warp's A registers of the four 32-wide slices.
      uint32_t a[4][4];
      if (FP4) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // blocks 2h and 2h + 1
          uint32_t r[4];
          ldmatrix_x4(r, st + w_off + f8_w_at<true>(ld_slot, 2 * h + ld_chunk));
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            uint32_t(&ab)[4] = a[2 * h + bb];
            fp4x8_to_e4m3(r[2 * bb], ab[0], ab[2]);
            fp4x8_to_e4m3(r[2 * bb + 1], ab[1], ab[3]);
          }
        }
      } else {
#pragma unroll
        for (int m = 0; m < 4; ++m) ldmatrix_x4(a[m], st + w_off + f8_w_at<false>(ld_slot, 2 * m + ld_chunk));
      }
      // The step's sums a weight row and activation column, in NT / NB batches of four wgmma
      // (NB n8 tiles, one a 32-wide slice, each from a zero accumulator), each batch waited for,
      // its slices scaled and added in float32 and its sums added into acc before the next.
      float ws[2][4];  // MXFP4: rows fr's and fr + 8's scales of the four blocks (after the first wait)
#pragma unroll
      for (int h = 0; h < NT / NB; ++h) {
        float d[4][4 * NB];
        // Batch h reads activation rows 8 NB h .. 8 NB (h + 1) - 1: 16 bytes a row further each.
        const Desc desc = smem_desc(FUSE ? fq + i * ROWS * KC : st, ROWS * 16, 128) + 8 * NB * h;
        wgmma_fence();
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          if constexpr (NB == 1) wgmma_m64n8k32_e4m3_rs(d[b], a[b], desc + b * 2 * ROWS);
          else if constexpr (NB == 2) wgmma_m64n16k32_e4m3_rs(d[b], a[b], desc + b * 2 * ROWS);
          else wgmma_m64n32k32_e4m3_rs(d[b], a[b], desc + b * 2 * ROWS);
        }
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int b = 0; b < 4; ++b) {
#pragma unroll
          for (int e = 0; e < 4; ++e) wgmma_pin(a[b][e]);
#pragma unroll
          for (int e = 0; e < 4 * NB; ++e) wgmma_pin(d[b][e]);
        }
        float step[NB][4];
        if (FP4) {
          if (h == 0) {
            // As float32 (times 2^6 in the fast pass).
            const uint32_t c0 = *(const uint32_t*)(sws + 4 * (16 * warp + fr));
            const uint32_t c1 = *(const uint32_t*)(sws + 4 * (16 * warp + fr + 8));
            f8_fp4_scales<EXACT>(c0, c1, ws, code_max);
          }
#pragma unroll
          for (int t = 0; t < NB; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) step[t][e] = 0.f;
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int t = 0; t < NB; ++t) {
              step[t][0] += d[b][4 * t + 0] * ws[0][b];
              step[t][1] += d[b][4 * t + 1] * ws[0][b];
              step[t][2] += d[b][4 * t + 2] * ws[1][b];
              step[t][3] += d[b][4 * t + 3] * ws[1][b];
            }
          if (EXACT) {
#pragma unroll
            for (int t = 0; t < NB; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) step[t][e] *= 64.f;
          }
        } else {
          const float w0 = ((const float*)sws)[16 * warp + fr], w1 = ((const float*)sws)[16 * warp + fr + 8];
#pragma unroll
          for (int t = 0; t < NB; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              step[t][e] = ((0.f + d[0][4 * t + e]) + d[1][4 * t + e]) + d[2][4 * t + e] + d[3][4 * t + e];
            step[t][0] *= w0, step[t][1] *= w0, step[t][2] *= w1, step[t][3] *= w1;
          }
        }
        // The activation scales of the fragment's columns 2q, 2q + 1.
#pragma unroll
        for (int t = 0; t < NB; ++t) {
          const int c = 8 * (NB * h + t) + 2 * q;
          const float s0 = sas[c], s1 = sas[c + 1];
          acc[NB * h + t][0] += step[t][0] * s0;
          acc[NB * h + t][1] += step[t][1] * s1;
          acc[NB * h + t][2] += step[t][2] * s0;
          acc[NB * h + t][3] += step[t][3] * s1;
        }
      }
    }
    cp_async_wait<0>();
    // Block-wide (the exact pass runs wgmma, which needs the whole warpgroup); also the barrier
    // after which the stages may be refilled.
    return __syncthreads_or(__vcmpgtu4(code_max, 0xF8F8F8F8u) != 0u) != 0;
  };
  const bool large_code = pass(Tag<false>{});
  if constexpr (FP4) {
    if (large_code) pass(Tag<true>{});
  }
  if constexpr (FUSE) {
    if (gridDim.z > 1) {
      // The cluster is this grid column's K splits, block rank = split (blockIdx.z). Each block
      // leaves its sums in its (now idle) stages; the first adds them in split order.
      float* red = (float*)smem;
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(4 * t + e) * 128 + tid] = acc[t][e];
      cluster_sync();
      if (blockIdx.z == 0) {
        // Every block's values loaded first (at most MAX_SPLITS_WG blocks), then added in order.
        float part[MAX_SPLITS_WG][NT][4];
#pragma unroll
        for (int r = 0; r < MAX_SPLITS_WG; ++r) {
          if (r >= (int)gridDim.z) break;
          const float* src = (const float*)__cluster_map_shared_rank(red, r);
#pragma unroll
          for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[r][t][e] = src[(4 * t + e) * 128 + tid];
        }
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
#pragma unroll
        for (int r = 0; r < MAX_SPLITS_WG; ++r) {
          if (r >= (int)gridDim.z) break;
#pragma unroll
          for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][e] += part[r][t][e];
        }
      }
      cluster_sync();  // the other blocks' shared memory stays until the first has read it
      if (blockIdx.z != 0) return;
    }
  }
  gemv_store<NT>(p, acc, g, row0, rows, col0);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(Shape<false>::LAUNCH, 1) dsv4_qgemm_fp8_wgmma(const GemmParams p, const __grid_constant__ TmaDesc a_map) {
  dsv4::grid_begin();
  qgemm_wgmma<false>(p, &a_map);
}
extern "C" __global__ void __launch_bounds__(Shape<true>::LAUNCH, 1) dsv4_qgemm_fp4_wgmma(const GemmParams p, const __grid_constant__ TmaDesc a_map) {
  dsv4::grid_begin();
  qgemm_wgmma<true>(p, &a_map);
}
// The tiled form on FP8 tensor cores (FP8 weights): the weights', the activation codes' and their
// scales' tensor maps.
extern "C" __global__ void __launch_bounds__(wgf8::THREADS, 1)
    dsv4_qgemm_fp8_wgf8(const GemmParams p, const __grid_constant__ TmaDesc w_map,
                        const __grid_constant__ TmaDesc a_map, const __grid_constant__ TmaDesc s_map) {
  dsv4::grid_begin();
  qgemm_wgf8(p, &w_map, &a_map, &s_map);
}

// The Hopper FP8 decode form: MXFP4 or FP8 weights, 8 or 16 activation rows a block. The MoE's
// decode kernel (MXFP4, 8 rows) fits 80 registers, 6 blocks an SM; the others would spill there.
extern "C" __global__ void __launch_bounds__(128, 6) dsv4_qgemv_wg_fp4_n8(const GemmParams p) { qgemv_wg<true, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) dsv4_qgemv_wg_fp4_n16(const GemmParams p) { qgemv_wg<true, 2, false>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) dsv4_qgemv_wg_fp8_n8(const GemmParams p) { qgemv_wg<false, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) dsv4_qgemv_wg_fp8_n16(const GemmParams p) { qgemv_wg<false, 2, false>(p); }
extern "C" __global__ void __launch_bounds__(128, 3) dsv4_qgemv_wg_fp8_n32(const GemmParams p) { qgemv_wg<false, 4, false>(p); }
extern "C" __global__ void __launch_bounds__(128, 3) dsv4_qgemv_wg_fp8_n64(const GemmParams p) { qgemv_wg<false, 8, false>(p); }
// The fused kernels (a dense linear in one launch, K splits as a cluster: see WgLayout). Five
// blocks an SM, as the three-kernel form's GEMM holds (86 registers): at 102 registers (four
// blocks an SM) grids of 512-640 blocks, o_a's and o_b's at one row, needed a second wave.
extern "C" __global__ void __launch_bounds__(128, 5) dsv4_qgemv_wg_fused_fp4_n8(const GemmParams p) { qgemv_wg<true, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(128, 5) dsv4_qgemv_wg_fused_fp4_n16(const GemmParams p) { qgemv_wg<true, 2, true>(p); }
extern "C" __global__ void __launch_bounds__(128, 5) dsv4_qgemv_wg_fused_fp8_n8(const GemmParams p) { qgemv_wg<false, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(128, 5) dsv4_qgemv_wg_fused_fp8_n16(const GemmParams p) { qgemv_wg<false, 2, true>(p); }
