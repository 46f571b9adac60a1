// Sparse attention with sink (see cuda/attention.cu for the contract and the math), the Hopper
// path: wgmma (sm_90a), built for sm_90a alone and picked at run time on compute capability 9.0.
//
// dsv4_sparse_attention_wgmma: grid (splits, head blocks, queries) like the mma.sync kernel, 64
// heads of one query a block, 32 candidates a tile, 512 threads in four warpgroups with their
// own jobs (warp specialization):
// - the producers (warpgroups 0 and 1, 72 registers a thread) stage raw rows by cp.async one tile
//   ahead and decode them (FP8 entries or BF16 rows) into one of two bf16 tile buffers in
//   wgmma's no-swizzle core-matrix layout;
// - the two consumers (warpgroups 2 and 3, 184 registers) each own half of the dims: consumer g
//   computes the partial scores over dims [256 g, 256 g + 256) (16 wgmma m64n32k16, both
//   operands in shared memory), the halves are added through shared memory in a fixed order so
//   both consumers hold the same scores, the online softmax runs in registers, and consumer g
//   adds P V for its output dims (4 wgmma m64n128k16 with P from registers and V read N-major
//   from the same tile).
// Named barriers hand the tile buffers between the producers and the consumers (full: decoded;
// empty: both consumers are done with it) and order the partial-score exchange. Consumer warp
// w holds heads 16 (w % 4) .. +16 in the mma.sync fragment layout, so the softmax step and the
// epilogue are the shared ones. Same partials and combine step as the other kernels.
#include "attention.cuh"
#include "grid.cuh"
#include "wgmma.cuh"

namespace {

constexpr int HEADS = 64;           // the M = 64 operand
constexpr int TILE = 32;            // candidates a tile (the N of S, the K of P V)
constexpr int STAGES = 2;           // raw tiles staged: one ahead of the one being decoded
constexpr int BUFFERS = 2;          // decoded tiles
constexpr int GROUP_DIMS = ENTRY_DIM / 2;  // dims a consumer owns
constexpr int SP_ROW = TILE + 8;    // padded row of partial scores: conflict-free float2 access
constexpr int CHUNK = 8;            // bf16 elements in a 16-byte core-matrix row
constexpr int PRODUCER_THREADS = 256;  // two producer warpgroups
constexpr int WS_THREADS = PRODUCER_THREADS + 256;  // and two consumers
constexpr int MAX_CLUSTER = 8;      // most splits of a cluster kernel (rust/core/src/gpu/mod.rs MAX_CLUSTER)
// Named barriers (0 is __syncthreads): FULL + b (tile buffer b decoded), EMPTY + b (both
// consumers done with it), STAGED (the producers' raw tile landed for all of them), SCORES (both
// consumers' partial scores written), READ + g (consumer 1 - g has read consumer g's partials).
constexpr int BAR_FULL = 1, BAR_EMPTY = BAR_FULL + BUFFERS, BAR_STAGED = BAR_EMPTY + BUFFERS;
constexpr int BAR_SCORES = BAR_STAGED + 1, BAR_READ = BAR_SCORES + 1;
// The cluster kernel's: BAR_DONE (both consumers are past their last tile).
constexpr int BAR_DONE = BAR_READ + 2;
// A split's partials in its block's shared memory (the cluster kernel): o as [64 heads][O_ROW]
// float32, rows padded so that a warp's stores of 8 heads fall in distinct banks, then (row max,
// row sum) a head. They take the place of the queries, the tile buffers and the partial scores.
constexpr int O_ROW = ENTRY_DIM + 8;
constexpr int PARTIALS_BYTES = (HEADS * O_ROW + 2 * HEADS) * 4;
static_assert(PARTIALS_BYTES <= (HEADS + BUFFERS * TILE) * ENTRY_DIM * 2 + 2 * HEADS * SP_ROW * 4,
              "a split's partials fit where the queries, tiles and partial scores were");

// How a block ends: one split's output as float32 or bfloat16, or a split's partials (grid
// (splits, head blocks, queries): finish_rows, and dsv4_attention_combine after the kernel); or
// CLUSTER: grid (head blocks, queries, splits), a query's splits one thread-block cluster that
// folds its partials on chip (fold_in_cluster).
enum Epilogue { STORE_F32, STORE_BF16, CLUSTER };

__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N>
__device__ __forceinline__ void set_max_registers() {
  if constexpr (N < 65536 / WS_THREADS)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
  else
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// s (64 x 32, fp32, mma.sync C layout per warp) = A B^T (ACC: s += A B^T), A and B K-major in
// shared memory.
template <bool ACC>
__device__ __forceinline__ void wgmma_m64n32k16(float (&s)[4][4], Desc a, Desc b) {
  asm volatile("{\n.reg .b64 da, db;\nmov.b64 da, {%16, %17};\nmov.b64 db, {%18, %19};\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, da, db, %20, 1, 1, 0, 0;\n}\n"
               : "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]),
                 "+f"(s[1][0]), "+f"(s[1][1]), "+f"(s[1][2]), "+f"(s[1][3]),
                 "+f"(s[2][0]), "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]),
                 "+f"(s[3][0]), "+f"(s[3][1]), "+f"(s[3][2]), "+f"(s[3][3])
               : "r"(a.lo), "r"(a.hi), "r"(b.lo), "r"(b.hi), "n"(ACC ? 1 : 0));
}

// The end of a cluster kernel's block, by every thread: a cluster barrier (every block's partials
// are in its shared memory), then block `rank` of the C splits folds heads rank, rank + C, ... of
// its query, reading every block's partials through distributed shared memory in split order, as
// dsv4_attention_combine reads them from global memory (the same bits for the same splits); a
// second barrier keeps each block's shared memory until the others have read it. Each consumer
// thread folds 4 dims of a head, the two halves of the consumers every other head, FOLD_HEADS
// heads at once (their loads in flight together). `folds`: a consumer thread.
constexpr int FOLD_HEADS = 2;
__device__ __forceinline__ void fold_in_cluster(const Params& p, uint8_t* smem, long long t, int hb, bool folds) {
  cluster_sync();
  if (folds) {
    const int C = gridDim.z, rank = blockIdx.z, ct = threadIdx.x - PRODUCER_THREADS, d = 4 * (ct % 128);
    const auto live = [&](int h) { return h < HEADS && hb + h < p.heads; };
    const Derotation rot = derotation(p, t, d);  // the same for every head: out of the loop
    for (int h0 = rank + C * (ct / 128); live(h0); h0 += 2 * C * FOLD_HEADS) {
      float ms[FOLD_HEADS][MAX_CLUSTER], ls[FOLD_HEADS][MAX_CLUSTER], sink[FOLD_HEADS];
      float4 v[FOLD_HEADS][MAX_CLUSTER];
#pragma unroll
      for (int k = 0; k < FOLD_HEADS; ++k) {
        const int h = h0 + 2 * C * k;
        if (!live(h)) break;
        sink[k] = p.sink[hb + h];
#pragma unroll
        for (int s = 0; s < MAX_CLUSTER; ++s) {
          if (s >= C) break;
          const float* src = (const float*)__cluster_map_shared_rank((float*)smem, s);
          ms[k][s] = src[HEADS * O_ROW + 2 * h];
          ls[k][s] = src[HEADS * O_ROW + 2 * h + 1];
          v[k][s] = *(const float4*)(src + h * O_ROW + d);
        }
      }
#pragma unroll
      for (int k = 0; k < FOLD_HEADS; ++k) {
        const int h = h0 + 2 * C * k;
        if (!live(h)) break;
        Folded f;
#pragma unroll
        for (int s = 0; s < MAX_CLUSTER; ++s)
          if (s < C) f.m = fmaxf(f.m, ms[k][s]);
#pragma unroll
        for (int s = 0; s < MAX_CLUSTER; ++s)
          if (s < C && ms[k][s] != -INFINITY) fold_split(f, ms[k][s], ls[k][s], v[k][s]);
        store_folded(p, f, t, hb + h, d, d == 0, sink[k], rot);
      }
    }
  }
  cluster_sync();
}

// The kernel's body; E: how a block ends (Epilogue).
template <Epilogue E>
__device__ __forceinline__ void attention_wgmma(const Params& p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint16_t* qs = (uint16_t*)smem;                           // [64 chunks][64 heads][8] bf16 queries
  uint16_t* ks = qs + HEADS * ENTRY_DIM;                    // [BUFFERS][64 chunks][TILE rows][8] bf16 tiles
  float* sp = (float*)(ks + BUFFERS * TILE * ENTRY_DIM);    // [2 groups][64 heads][SP_ROW] partial scores
  uint8_t* stages = (uint8_t*)(sp + 2 * HEADS * SP_ROW);    // [STAGES][TILE][stage row]
  __shared__ int row_fmt[STAGES * TILE];

  const int tid = threadIdx.x;
  const long long t = E == CLUSTER ? blockIdx.y : blockIdx.z;
  const int hb = (E == CLUSTER ? blockIdx.x : blockIdx.y) * HEADS;
  const int split = E == CLUSTER ? blockIdx.z : blockIdx.x;
  const Span span = split_span(p, t, split);
  const int tiles = span.tiles(TILE);

  // The block's queries as bf16 in core-matrix layout: chunk c of head h at qs + 8 (64 c + h).
  for (int i = tid; i < HEADS * ENTRY_DIM / CHUNK; i += WS_THREADS) {
    const int h = i / (ENTRY_DIM / CHUNK), c = i % (ENTRY_DIM / CHUNK);
    load_query_chunk(p, t, hb + h, c, qs + CHUNK * (HEADS * c + h));
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();

  if (tid < PRODUCER_THREADS) {
    // Producer: tile i is decoded into buffer i % 2 once both consumers are done with tile i - 2.
    set_max_registers<72>();
    RowPipeline<TILE, STAGES, CORE_MATRICES, PRODUCER_THREADS> pipe(p, t, span, stages, row_fmt, tid);
    pipe.start();
    for (int i = 0; i < tiles; ++i) {
      const int b = i % BUFFERS;
      cp_async_wait<STAGES - 2>();
      bar_sync(BAR_STAGED, PRODUCER_THREADS);  // tile i staged by every producer thread
      if (i >= BUFFERS) bar_sync(BAR_EMPTY + b, WS_THREADS);
      pipe.decode(i, ks + b * TILE * ENTRY_DIM, nullptr);
      bar_arrive(BAR_FULL + b, WS_THREADS);
    }
    cp_async_wait<0>();
    if constexpr (E == CLUSTER) fold_in_cluster(p, smem, t, hb, false);
    return;
  }

  // Consumers.
  set_max_registers<184>();
  const int ctid = tid - PRODUCER_THREADS, lane = ctid % 32, warp = ctid / 32;
  const int g = warp / 4, wq = warp % 4;  // dims half (of the scores and the output), head tile
  const float qscale = p.scale * LOG2E;   // scores are kept in log2 units

  float o[GROUP_DIMS / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  // Descriptors of this group's dims in tile buffer 0 (buffer b is b TILE_UNITS further). Q (M = heads, K = dims)
  // and the tile as B of S (N = candidates, K = dims) are K-major: the next 8 dims one chunk
  // further (LBO), the next 8 rows 128 bytes further (SBO). The tile as B of P V (K =
  // candidates, N = dims) is N-major: the next 8 candidates 128 bytes further (LBO), the next 8
  // dims one chunk further (SBO). k-steps add their offsets in 16-byte units.
  const int chunk0 = g * GROUP_DIMS / CHUNK;  // this group's first chunk of dims
  const Desc q_desc = smem_desc(qs + CHUNK * HEADS * chunk0, HEADS * 16, 128);
  const Desc k_desc = smem_desc(ks + CHUNK * TILE * chunk0, TILE * 16, 128);
  const Desc v_desc = smem_desc(ks + CHUNK * TILE * chunk0, 128, TILE * 16);
  constexpr uint32_t TILE_UNITS = TILE * ENTRY_DIM * 2 / 16;

  const int r = lane / 4, c2 = (lane % 4) * 2;
  float* mine = sp + (g * HEADS + 16 * wq) * SP_ROW;  // this warp's rows of its group's partial scores
  for (int i = 0; i < tiles; ++i) {
    const int b = i % BUFFERS;
    // Which candidates of the tile are rows: each consumer warp finds out itself, lane l loading
    // candidate l's id here (the producers read it a tile or two before: a cache hit) and a
    // ballot after the scores gathering the 32 answers. Nothing of it passes through shared
    // memory: the producers' per-tile mask did, and its reuse two tiles on was ordered only
    // through the consumers' bar.arrive, which racecheck at times reported as a race.
    int which;
    const long long id = tile_candidate(p, t, span, i, TILE, lane, which);
    bar_sync(BAR_FULL + b, WS_THREADS);
    float s[4][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < GROUP_DIMS / 16; ++kk) {
      if (kk == 0)
        wgmma_m64n32k16<false>(s, q_desc, k_desc + b * TILE_UNITS);
      else
        wgmma_m64n32k16<true>(s, q_desc + kk * (2 * HEADS), k_desc + b * TILE_UNITS + kk * (2 * TILE));
    }
    wgmma_commit();
    wgmma_wait_all();

    // Full scores: group 0's half plus group 1's, in that order in both groups, masked. The
    // other group must have read this group's previous partials before they are overwritten.
    if (i > 0) bar_sync(BAR_READ + g, 256);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      *(float2*)(mine + r * SP_ROW + 8 * n + c2) = make_float2(s[n][0], s[n][1]);
      *(float2*)(mine + (r + 8) * SP_ROW + 8 * n + c2) = make_float2(s[n][2], s[n][3]);
    }
    bar_sync(BAR_SCORES, 256);
    const uint32_t rows = __ballot_sync(0xffffffffu, masked_row(id, which ? p.b : p.a) >= 0);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float2 m = make_float2((rows >> (8 * n + c2)) & 1 ? 0.f : -INFINITY, (rows >> (8 * n + c2 + 1)) & 1 ? 0.f : -INFINITY);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * wq + r + 8 * h, col = 8 * n + c2;
        const float2 x = *(const float2*)(sp + row * SP_ROW + col);
        const float2 y = *(const float2*)(sp + (HEADS + row) * SP_ROW + col);
        s[n][2 * h] = (x.x + y.x) * qscale + m.x;
        s[n][2 * h + 1] = (x.y + y.y) * qscale + m.y;
      }
    }
    if (i + 1 < tiles) bar_arrive(BAR_READ + (1 - g), 256);  // the other group's partials are read
    uint32_t pa[2][4];
    softmax_step(s, row_max, row_sum, o, pa);

    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; ++kk) {
      // o[0 .. 16) and o[16 .. 32): 128 output dims each (N = 128 rather than 256: ptxas needs
      // the kernel-wide register cap to hold one instruction's accumulators, and 512 threads cap
      // it at 128).
      wgmma_m64n128k16_rs<true, true>(*reinterpret_cast<float(*)[16][4]>(&o[0]), pa[kk], v_desc + b * TILE_UNITS + kk * 16);
      wgmma_m64n128k16_rs<true, true>(*reinterpret_cast<float(*)[16][4]>(&o[16]), pa[kk],
                                      v_desc + b * TILE_UNITS + kk * 16 + 16 * TILE);
    }
    wgmma_commit();
    // P V completes within the iteration: ptxas serializes every wgmma of a kernel in which one
    // is still in flight at the loop's back edge (warning C7515), which costs far more.
    wgmma_wait_all();
    if (i + BUFFERS < tiles) bar_arrive(BAR_EMPTY + b, WS_THREADS);  // the producer waits for it
  }
  if constexpr (E == CLUSTER) {
    // This split's partials into shared memory once both consumers are past their last tile.
    bar_sync(BAR_DONE, 256);
    float* po = (float*)smem;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 1);
      row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 2);
      const int h = 16 * wq + r + 8 * j;
#pragma unroll
      for (int n = 0; n < GROUP_DIMS / 8; ++n)
        *(float2*)(po + h * O_ROW + g * GROUP_DIMS + 8 * n + c2) = make_float2(o[n][2 * j], o[n][2 * j + 1]);
      if (g == 0 && lane % 4 == 0) {
        po[HEADS * O_ROW + 2 * h] = row_max[j];
        po[HEADS * O_ROW + 2 * h + 1] = row_sum[j];
      }
    }
    fold_in_cluster(p, smem, t, hb, true);
  } else {
    finish_rows<GROUP_DIMS / 8, E == STORE_BF16>(p, o, row_max, row_sum, t, split, hb + 16 * wq, g * GROUP_DIMS,
                                                 g == 0);
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) dsv4_sparse_attention_wgmma(const Params p) {
  dsv4::grid_begin();
  attention_wgmma<STORE_F32>(p);
}

// The same for a single-split call whose output is bfloat16 (p.out_bf16; rust/core/src/gpu/attention.rs).
extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) dsv4_sparse_attention_wgmma_bf16(const Params p) {
  dsv4::grid_begin();
  attention_wgmma<STORE_BF16>(p);
}

// A query's splits as one thread-block cluster (grid (head blocks, queries, splits), the cluster
// along z, at most MAX_CLUSTER splits) that folds its partials on chip: no partials in global
// memory and no combine kernel after it. The output float32, or bfloat16 where p.out_bf16.
extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) dsv4_sparse_attention_wgmma_cluster(const Params p) {
  dsv4::grid_begin();
  attention_wgmma<CLUSTER>(p);
}
