// mHC weights (docs/model.md section 6), a group of lanes per token: from the projected mix of the
// streams, pre = sigmoid(s0 mu[0:n] + b) + eps, post = 2 sigmoid(s1 mu[n:2n] + b), and comb = the
// rows of s2 mu[2n:] + b softmaxed plus eps, then Sinkhorn: columns, and (iters - 1) times rows and
// columns, each divided by its sum plus eps. Mirrors rust/core/src/mhc.rs (float32, same order),
// except that a Sinkhorn pass multiplies by the sum's approximate reciprocal (within one ulp)
// where the CPU divides: within 2 ulp a pass, against 0.5.
//
// The stream count is a template parameter (1..8, chosen by a switch), so each lane's row lives
// in registers. Latency is what bounds the op (a decode step has a few tokens; each runs 20
// Sinkhorn iterations of two dependent passes), so a token's rows go to separate lanes, and a
// pass takes reciprocals: an IEEE division is a branch around a slow path, and the divisions of
// a pass ran one after another.
#include <cstdint>

#include "floats.cuh"
#include "grid.cuh"
#include "mma.cuh"

using namespace dsv4;

namespace {

// 1 / x within one ulp (MUFU.RCP): no slow-path branch, where `/` and __frcp_rn each take one.
__device__ __forceinline__ float rcp_approx(float x) {
  float r;
  asm("rcp.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// One token over a group of P lanes (P a power of two >= N): lane i < N owns row i of the N x N
// matrix (N values in registers); lanes N .. P - 1 compute on zeros and write nothing. A row sum
// is local; a column sum gathers the column's N values by shuffles and adds them in row order,
// as the CPU does. So a row pass costs a lane one reciprocal and N products, a column pass N
// reciprocals and N products, where a thread a token would spend N^2 of each.
//
// `m` is the token's mix ((2 + N) N values), `pre`, `post` and `comb` its outputs (`post` and
// `comb` null: not stored); `live` says whether this lane owns a row (i < N of a real token).
// Every lane of the warp calls it.
template <int N, int P>
__device__ __forceinline__ void mhc_token(const float* m, bool live, int i, const float* scale, const float* base,
                                          int iters, float eps, float* pre, float* post, float* comb) {
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
  if (live) {
    pre[i] = 1.f / (1.f + expf(-(m[i] * s0 + base[i]))) + eps;
    if (post) post[i] = 2.f * (1.f / (1.f + expf(-(m[N + i] * s1 + base[N + i]))));
  }
  float c[N];
  {
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[k] = live ? m[2 * N + i * N + k] * s2 + base[2 * N + i * N + k] : 0.f;
      mx = fmaxf(mx, c[k]);
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[k] = expf(c[k] - mx);
      sum += c[k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) c[k] = c[k] / sum + eps;
  }
  const int group0 = (threadIdx.x % 32) & ~(P - 1);  // the group's first lane in the warp
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < N; ++k) s += c[k];
      const float inv = rcp_approx(s + eps);
#pragma unroll
      for (int k = 0; k < N; ++k) c[k] *= inv;
    }
    float col[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < N; ++r) s += __shfl_sync(0xffffffffu, c[k], group0 + r);
      col[k] = rcp_approx(s + eps);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) c[k] *= col[k];
  }
  if (live && comb) {
#pragma unroll
    for (int k = 0; k < N; ++k) comb[i * N + k] = c[k];
  }
}

// The tokens of a grid, a group of P lanes each.
template <int N, int P>
__device__ __forceinline__ void mhc_rows(const float* mix, const float* scale, const float* base, long long tokens,
                                         int iters, float eps, float* pre, float* post, float* comb) {
  const long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long t = g / P;
  const int i = (int)(g % P);
  const bool live = t < tokens && i < N;
  const long long u = live ? t : 0;
  mhc_token<N, P>(mix + u * (2 + N) * N, live, i, scale, base, iters, eps, pre + u * N, post + u * N, comb + u * N * N);
}

__host__ __device__ constexpr int group_lanes(int n) { return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8; }

}  // namespace

// n in 1..8 (checked by the caller, rust/core/src/mhc.rs MAX_STREAMS); other n write nothing.
// A token per group of group_lanes(n) lanes: the grid covers tokens * group_lanes(n) threads.
extern "C" __global__ void __launch_bounds__(128) dsv4_mhc_weights(const float* mix, const float* scale, const float* base,
                                                                   long long tokens, int n, int iters, float eps,
                                                                   float* pre, float* post, float* comb) {
  dsv4::grid_begin();
  // Whole warps stay to the end: the shuffles need every lane of the warp.
  switch (n) {
    case 1: mhc_rows<1, group_lanes(1)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 2: mhc_rows<2, group_lanes(2)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 3: mhc_rows<3, group_lanes(3)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 4: mhc_rows<4, group_lanes(4)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 5: mhc_rows<5, group_lanes(5)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 6: mhc_rows<6, group_lanes(6)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 7: mhc_rows<7, group_lanes(7)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    case 8: mhc_rows<8, group_lanes(8)>(mix, scale, base, tokens, iters, eps, pre, post, comb); break;
    default: break;
  }
}

namespace {

// The collapse and the combine of a token's streams X [n, d] (float32 or bfloat16), V values of a
// stream a thread (4 when d and the pointers allow it), in float32, rounded once.
template <int N, int V>
__device__ __forceinline__ void collapse_values(const void* x, int x_bf16, const float* pre, void* y, long long tokens,
                                                int dim) {
  const long long chunks = dim / V;
  const long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (g >= tokens * chunks) return;
  const long long t = g / chunks;
  const int i = (int)(g % chunks) * V;
  float acc[V];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float v[V];
    load_n<V>(x, (t * N + j) * dim + i, x_bf16, v);
    const float p = pre[t * N + j];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = j == 0 ? __fmul_rn(p, v[k]) : __fadd_rn(acc[k], __fmul_rn(p, v[k]));
  }
  store_n<V>(y, t * dim + i, x_bf16, acc);
}

// ADD: f is the sum of two outputs, f + f2, rounded to f's dtype as a separate add would round
// it (f2 in f's dtype).
template <int N, int V, bool ADD>
__device__ __forceinline__ void combine_values(const void* x, int x_bf16, const void* f, int f_bf16, const void* f2,
                                               const float* post, const float* comb, void* y, long long tokens,
                                               int dim) {
  const long long chunks = dim / V;
  const long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (g >= tokens * chunks) return;
  const long long t = g / chunks;
  const int i = (int)(g % chunks) * V;
  float xs[N][V], fv[V];
#pragma unroll
  for (int j = 0; j < N; ++j) load_n<V>(x, (t * N + j) * dim + i, x_bf16, xs[j]);
  load_n<V>(f, t * dim + i, f_bf16, fv);
  if constexpr (ADD) {
    float gv[V];
    load_n<V>(f2, t * dim + i, f_bf16, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float s = __fadd_rn(fv[e], gv[e]);
      fv[e] = f_bf16 ? bf16_to_f32(bf16_from_f32(s)) : s;
    }
  }
  const float* c = comb + t * N * N;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float p = post[t * N + k];
    float out[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float acc = p * fv[e];
#pragma unroll
      for (int j = 0; j < N; ++j) acc = fmaf(c[j * N + k], xs[j][e], acc);
      out[e] = acc;
    }
    store_n<V>(y, (t * N + k) * dim + i, x_bf16, out);
  }
}

}  // namespace

// The kernels below take the stream count n at run time and call CALL(N) with it as a constant
// (1..8; other n do nothing).
#define DSV4_MHC_STREAMS(CALL) \
  switch (n) {                 \
    case 1: CALL(1); break;    \
    case 2: CALL(2); break;    \
    case 3: CALL(3); break;    \
    case 4: CALL(4); break;    \
    case 5: CALL(5); break;    \
    case 6: CALL(6); break;    \
    case 7: CALL(7); break;    \
    case 8: CALL(8); break;    \
    default: break;            \
  }

// y [T, d] = sum_j pre[t, j] X[t, j, :] (x [T, n, d], y in x's dtype), the products and the sums
// in float32 in stream order, as torch's multiply and sum. n in 1..8; vec4: d % 4 == 0 and x, y
// aligned to four values; the grid covers T * d / (vec4 ? 4 : 1) threads.
extern "C" __global__ void __launch_bounds__(256) dsv4_mhc_collapse(const void* x, int x_bf16, const float* pre, void* y,
                                                                    long long tokens, int n, int dim, int vec4) {
  dsv4::grid_begin();
#define DSV4_COLLAPSE(N) \
  vec4 ? collapse_values<N, 4>(x, x_bf16, pre, y, tokens, dim) : collapse_values<N, 1>(x, x_bf16, pre, y, tokens, dim)
  DSV4_MHC_STREAMS(DSV4_COLLAPSE)
#undef DSV4_COLLAPSE
}

namespace {

// The combine kernels' body: combine_values for the run-time stream count n and vec4, with f2
// added to f first where ADD.
template <bool ADD>
__device__ __forceinline__ void combine_streams(const void* x, int x_bf16, const void* f, int f_bf16, const void* f2,
                                                const float* post, const float* comb, void* y, long long tokens, int n,
                                                int dim, int vec4) {
#define DSV4_COMBINE(N)                                                                 \
  vec4 ? combine_values<N, 4, ADD>(x, x_bf16, f, f_bf16, f2, post, comb, y, tokens, dim) \
       : combine_values<N, 1, ADD>(x, x_bf16, f, f_bf16, f2, post, comb, y, tokens, dim)
  DSV4_MHC_STREAMS(DSV4_COMBINE)
#undef DSV4_COMBINE
}

}  // namespace

// y [T, n, d]: y[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] X[t, j] (x [T, n, d], f [T, d] the
// sublayer's output, y in x's dtype), in float32 with the weights unrounded, rounded once. n in
// 1..8; vec4 as above (f included).
extern "C" __global__ void __launch_bounds__(256) dsv4_mhc_combine(const void* x, int x_bf16, const void* f, int f_bf16,
                                                                   const float* post, const float* comb, void* y,
                                                                   long long tokens, int n, int dim, int vec4) {
  dsv4::grid_begin();
  combine_streams<false>(x, x_bf16, f, f_bf16, nullptr, post, comb, y, tokens, n, dim, vec4);
}

// dsv4_mhc_combine of the sum of two sublayer outputs, f + f2 (both in f's dtype), rounded to that
// dtype first, as adding them apart would: the MoE's routed and shared experts, one launch fewer.
extern "C" __global__ void __launch_bounds__(256) dsv4_mhc_combine_add(const void* x, int x_bf16, const void* f,
                                                                       int f_bf16, const void* f2, const float* post,
                                                                       const float* comb, void* y, long long tokens,
                                                                       int n, int dim, int vec4) {
  dsv4::grid_begin();
  combine_streams<true>(x, x_bf16, f, f_bf16, f2, post, comb, y, tokens, n, dim, vec4);
}

// The mHC input of a sublayer in two kernels (decode: a few tokens): from the streams x [T, n, d]
// (K = n d values a token) and the projection fn [(2 + n) n, K] (float32), the mix
// mu = rsqrt(mean(x^2) + norm_eps) (fn x), the weights as dsv4_mhc_weights, and the collapse
// y = sum_j pre_j x_j. Replaces the norm, the projection (two cuBLAS kernels), the weights and
// the collapse: five launches.

namespace {

constexpr int PRE_THREADS = 256;
constexpr int MIX_CHUNK = 4 * PRE_THREADS;  // values of K a block of the first kernel covers
constexpr int MIX_GROUPS = 4;               // blocks that share a chunk's M dot products

// Block (s, t, z): dot products o = z G, ..., z G + G - 1 (G = ceil(M / MIX_GROUPS), those below
// M) of fn with x[t] over values [s MIX_CHUNK, (s + 1) MIX_CHUNK), and for z = 0 their sum of
// squares, in partial[t, s, 0 .. M] (M + 1 floats): each thread 4 values, then the warps'
// shuffles, then the 8 warps' sums in warp order. The groups split the projection's bytes (1.5
// MB a token at V4-Flash width) over more SMs; each sum is the same whatever block computes it.
template <int N, bool VEC>
__device__ __forceinline__ void mix_partials(const void* x, int x_bf16, const float* fn, long long width, float* partial) {
  constexpr int M = (2 + N) * N;
  constexpr int G = (M + MIX_GROUPS - 1) / MIX_GROUPS;
  __shared__ float warp_sums[PRE_THREADS / 32][G + 1];
  const long long t = blockIdx.y;
  const int o0 = blockIdx.z * G;
  if (o0 >= M) return;  // the whole block
  const long long k0 = blockIdx.x * (long long)MIX_CHUNK + threadIdx.x * 4;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (VEC) {
    if (k0 < width) load_n<4>(x, t * width + k0, x_bf16, v);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = k0 + e < width ? load_value(x, t * width + k0 + e, x_bf16) : 0.f;
  }
  float acc[G + 1];
  acc[G] = 0.f;
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[G] = fmaf(v[e], v[e], acc[G]);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int o = min(o0 + g, M - 1);  // past M: a repeat, never stored
    float w[4] = {0.f, 0.f, 0.f, 0.f};
    if (VEC) {
      if (k0 < width) load_n<4>(fn, o * width + k0, 0, w);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) w[e] = k0 + e < width ? fn[o * width + k0 + e] : 0.f;
    }
    acc[g] = v[0] * w[0];
#pragma unroll
    for (int e = 1; e < 4; ++e) acc[g] = fmaf(v[e], w[e], acc[g]);
  }
#pragma unroll
  for (int g = 0; g <= G; ++g) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
  }
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int g = 0; g <= G; ++g) warp_sums[threadIdx.x / 32][g] = acc[g];
  }
  __syncthreads();
  const int g = threadIdx.x;
  const int o = g < G ? o0 + g : M;  // g == G: the sum of squares
  if (g <= G && o < M + (g == G && blockIdx.z == 0)) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < PRE_THREADS / 32; ++w) sum += warp_sums[w][g];
    partial[(t * gridDim.x + blockIdx.x) * (M + 1) + o] = sum;
  }
}

// Block (t, c): token t's S partial sums added in split order, the mix scaled by the norm, the
// weights by the first warp (pre to shared memory; post and comb out from block c = 0 only), then
// the collapse of y's values [c PRE_THREADS V, (c + 1) PRE_THREADS V), V = 4 with vec4 else 1:
// a value a thread (four with vec4). Every block of a token computes the same weights, bit for
// bit; a thread loads its streams' values first, so their latency hides under the weights'.
template <int N, bool VEC>
__device__ __forceinline__ void pre_token(const float* partial, int splits, const float* scale, const float* base,
                                          int iters, float eps, float norm_eps, const void* x, int x_bf16, int dim,
                                          float* post, float* comb, void* y) {
  constexpr int M = (2 + N) * N;
  constexpr int P = group_lanes(N);
  constexpr int V = VEC ? 4 : 1;
  __shared__ float mix[M + 1];
  __shared__ float pre[N];
  const long long t = blockIdx.x;
  const int i = (blockIdx.y * PRE_THREADS + threadIdx.x) * V;  // dim % V == 0 (vec4)
  float v[N][V];
  if (i < dim) {
#pragma unroll
    for (int j = 0; j < N; ++j) load_n<V>(x, (t * N + j) * dim + i, x_bf16, v[j]);
  }
  if (threadIdx.x <= M) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += partial[(t * splits + s) * (M + 1) + threadIdx.x];
    mix[threadIdx.x] = sum;
  }
  __syncthreads();
  const float r = rsqrtf(mix[M] / (float)(N * dim) + norm_eps);
  __syncthreads();  // every thread has read mix[M]
  if (threadIdx.x < M) mix[threadIdx.x] *= r;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const bool first = blockIdx.y == 0;
    mhc_token<N, P>(mix, lane < N, lane, scale, base, iters, eps, pre, first ? post + t * N : nullptr,
                    first ? comb + t * N * N : nullptr);
  }
  __syncthreads();
  if (i < dim) {
    float acc[V];
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = j == 0 ? __fmul_rn(pre[j], v[j][k]) : __fadd_rn(acc[k], __fmul_rn(pre[j], v[j][k]));
    }
    store_n<V>(y, t * dim + i, x_bf16, acc);
  }
}

}  // namespace


// Grid (ceil(n d / MIX_CHUNK), T, MIX_GROUPS), PRE_THREADS threads; partial [T, gridDim.x,
// (2 + n) n + 1]. vec4: n d % 4 == 0 and x, fn aligned to four values.
extern "C" __global__ void __launch_bounds__(PRE_THREADS) dsv4_mhc_mix(const void* x, int x_bf16, const float* fn,
                                                                       int n, int dim, int vec4, float* partial) {
  dsv4::grid_begin();
  const long long width = (long long)n * dim;
#define DSV4_MIX(N) \
  vec4 ? mix_partials<N, true>(x, x_bf16, fn, width, partial) : mix_partials<N, false>(x, x_bf16, fn, width, partial)
  DSV4_MHC_STREAMS(DSV4_MIX)
#undef DSV4_MIX
}

// Grid (T, ceil(d / (PRE_THREADS V))), V = 4 with vec4 else 1, PRE_THREADS threads: post [T, n],
// comb [T, n, n], y [T, d] in x's dtype. vec4: d % 4 == 0 and x, y aligned to four values.
extern "C" __global__ void __launch_bounds__(PRE_THREADS, 1) dsv4_mhc_pre(const float* partial, int splits,
                                                                       const float* scale, const float* base, int iters,
                                                                       float eps, float norm_eps, const void* x,
                                                                       int x_bf16, int n, int dim, int vec4,
                                                                       float* post, float* comb, void* y) {
  dsv4::grid_begin();
#define DSV4_PRE(N)                                                                                          \
  vec4 ? pre_token<N, true>(partial, splits, scale, base, iters, eps, norm_eps, x, x_bf16, dim, post, comb, y) \
       : pre_token<N, false>(partial, splits, scale, base, iters, eps, norm_eps, x, x_bf16, dim, post, comb, y)
  DSV4_MHC_STREAMS(DSV4_PRE)
#undef DSV4_PRE
}
#undef DSV4_MHC_STREAMS

// The mix alone for many tokens (ops.mhc_mix: a prefill, a large batch): from x [T, K] (float32 or
// bfloat16) and proj [m, K] (float32, m <= 80), mu[t] = rsqrt(mean(x[t]^2) + norm_eps) (proj x[t])
// in two kernels: partial sums over chunks of K, then per token their sum in chunk order times
// the norm (dsv4_mhc_pre's formula). Where dsv4_mhc_mix reads the whole projection for every
// token, a block here holds one chunk of it in shared memory for 128 or 256 tokens.

namespace {

constexpr int ROWS_THREADS = 128;
constexpr int ROW_BYTES = 64;              // a token's bytes a staged step
constexpr int ROW_PITCH = ROW_BYTES + 16;  // padded: the 16-byte reads of 8 consecutive rows hit distinct banks

// MB: the projection rows a thread's sums cover (m rounded up to 8, 24, 48 or 80; rows past m are
// zeros). Up to 24 a thread takes two tokens, which halves the shared reads a product.
template <int MB>
struct MixRows {
  static constexpr int TOK = MB <= 24 ? 2 : 1;
  static constexpr int TOKENS = ROWS_THREADS * TOK;  // tokens a block
};

// Step i's values of tokens [t0, t0 + TOKENS) into buf (a token ROW_PITCH apart, ROW_BYTES of
// it: values [i STEP, (i + 1) STEP) of the chunk from k0, kc long), as one cp.async group: 16-byte
// copies where VEC (K ESZ a multiple of 16 and x 16-byte aligned), else value by value; zeros past
// T and past the chunk.
template <int TOKENS, bool BF16, bool VEC>
__device__ __forceinline__ void stage_values(unsigned char* buf, const void* x, long long t0, long long tokens,
                                             long long width, long long k0, int kc, int i) {
  constexpr int ESZ = BF16 ? 2 : 4;
  constexpr int STEP = ROW_BYTES / ESZ, PIECE = 16 / ESZ, PIECES = ROW_BYTES / 16;
  const unsigned char* xb = static_cast<const unsigned char*>(x);
  for (int c = threadIdx.x; c < TOKENS * PIECES; c += ROWS_THREADS) {
    const int j = c / PIECES, k = i * STEP + c % PIECES * PIECE;
    unsigned char* dst = buf + j * ROW_PITCH + c % PIECES * 16;
    const long long t = t0 + j;
    if constexpr (VEC) {
      if (t < tokens && k < kc) {
        cp_async16(dst, xb + (t * width + k0 + k) * ESZ);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    } else {
#pragma unroll
      for (int e = 0; e < PIECE; ++e) {
        const bool in = t < tokens && k + e < kc;
        if constexpr (BF16) {
          reinterpret_cast<uint16_t*>(dst)[e] = in ? static_cast<const uint16_t*>(x)[t * width + k0 + k + e] : 0;
        } else {
          reinterpret_cast<float*>(dst)[e] = in ? static_cast<const float*>(x)[t * width + k0 + k + e] : 0.f;
        }
      }
    }
  }
  cp_async_commit();
}

// Column k of the projection's chunk: its m rows, zeros past m and past the chunk's kc values.
template <int MB>
__device__ __forceinline__ void projection_column(float (&w)[MB], const float* fn, long long width, long long k0,
                                                  int kc, int m, int k) {
#pragma unroll
  for (int o = 0; o < MB; ++o) w[o] = o < m && k < kc ? __ldg(fn + o * width + k0 + k) : 0.f;
}

// The head of step i of the two staging buffers: step i + 1's copies go out (after the last step
// an empty group, so that the wait counts alike), then step i's values (and, the first time, the
// projection) are in for every thread.
template <class Stage>
__device__ __forceinline__ void await_step(int i, int steps, const Stage& stage_step) {
  if (i + 1 < steps) {
    stage_step(i + 1);
  } else {
    cp_async_commit();
  }
  cp_async_wait<1>();
  __syncthreads();
}

// Block (s, r): values [s chunk, (s + 1) chunk) of tokens [r TOKENS, (r + 1) TOKENS). The chunk
// of the projection goes to shared memory K-major (a value's MB rows as float4s, read by every
// lane at once), the tokens' values through two staging buffers, ROW_BYTES of each token a step
// (cp.async where VEC: K ESZ a multiple of 16 and x 16-byte aligned; zeros past T and past the
// chunk). Thread i sums tokens i (and i + 128): each product and square by fmaf, in K order, from
// zero; partial[t, s, 0 .. m - 1] the dot products, partial[t, s, m] the sum of squares.
template <int MB, bool BF16, bool VEC>
__device__ __forceinline__ void mix_rows(const void* x, const float* fn, long long tokens, long long width, int m,
                                         int chunk, float* partial) {
  constexpr int TOK = MixRows<MB>::TOK, TOKENS = MixRows<MB>::TOKENS;
  constexpr int ESZ = BF16 ? 2 : 4;
  constexpr int STEP = ROW_BYTES / ESZ;  // values of a token a step
  constexpr int PIECE = 16 / ESZ;        // values a 16-byte piece
  constexpr int PIECES = ROW_BYTES / 16;
  extern __shared__ __align__(16) unsigned char smem[];
  float* phi = reinterpret_cast<float*>(smem);                       // [chunk][MB]
  unsigned char* stage = smem + (size_t)chunk * MB * sizeof(float);  // [2][TOKENS][ROW_PITCH]
  const long long k0 = blockIdx.x * (long long)chunk;
  const long long t0 = blockIdx.y * (long long)TOKENS;
  const int kc = (int)min((long long)chunk, width - k0);  // the last chunk may be short
  const int steps = (kc + STEP - 1) / STEP;

  auto stage_step = [&](int i) {
    stage_values<TOKENS, BF16, VEC>(stage + (i & 1) * TOKENS * ROW_PITCH, x, t0, tokens, width, k0, kc, i);
  };

  grid_begin();
  stage_step(0);
  for (int k = threadIdx.x; k < chunk; k += ROWS_THREADS) {
    float w[MB];
    projection_column(w, fn, width, k0, kc, m, k);
#pragma unroll
    for (int o = 0; o < MB; o += 4) {
      *reinterpret_cast<float4*>(phi + k * MB + o) = make_float4(w[o], w[o + 1], w[o + 2], w[o + 3]);
    }
  }

  float acc[TOK][MB + 1];
#pragma unroll
  for (int u = 0; u < TOK; ++u) {
#pragma unroll
    for (int o = 0; o <= MB; ++o) acc[u][o] = 0.f;
  }
  for (int i = 0; i < steps; ++i) {
    await_step(i, steps, stage_step);
    const unsigned char* buf = stage + (i & 1) * TOKENS * ROW_PITCH;
#pragma unroll
    for (int q = 0; q < PIECES; ++q) {
      float v[TOK][PIECE];
#pragma unroll
      for (int u = 0; u < TOK; ++u) {
        const uint4 r = *reinterpret_cast<const uint4*>(buf + (threadIdx.x + u * ROWS_THREADS) * ROW_PITCH + q * 16);
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (BF16) {
            v[u][2 * e] = __uint_as_float(words[e] << 16);
            v[u][2 * e + 1] = __uint_as_float(words[e] & 0xFFFF0000u);
          } else {
            v[u][e] = __uint_as_float(words[e]);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < PIECE; ++e) {
        const float* w = phi + (i * STEP + q * PIECE + e) * MB;
#pragma unroll
        for (int o = 0; o < MB; o += 4) {
          const float4 w4 = *reinterpret_cast<const float4*>(w + o);
#pragma unroll
          for (int u = 0; u < TOK; ++u) {
            acc[u][o] = fmaf(v[u][e], w4.x, acc[u][o]);
            acc[u][o + 1] = fmaf(v[u][e], w4.y, acc[u][o + 1]);
            acc[u][o + 2] = fmaf(v[u][e], w4.z, acc[u][o + 2]);
            acc[u][o + 3] = fmaf(v[u][e], w4.w, acc[u][o + 3]);
          }
        }
#pragma unroll
        for (int u = 0; u < TOK; ++u) acc[u][MB] = fmaf(v[u][e], v[u][e], acc[u][MB]);
      }
    }
    __syncthreads();  // every thread is done with buffer i & 1 before step i + 2 refills it
  }
#pragma unroll
  for (int u = 0; u < TOK; ++u) {
    const long long t = t0 + threadIdx.x + u * ROWS_THREADS;
    if (t >= tokens) continue;
    float* p = partial + (t * gridDim.x + blockIdx.x) * (m + 1);
#pragma unroll
    for (int o = 0; o < MB; ++o) {
      if (o < m) p[o] = acc[u][o];
    }
    p[m] = acc[u][MB];
  }
}

constexpr int MMA_TOKENS = 128;  // a block of the tensor-core form: 4 warps of two 16-token tiles

// mix_rows's partial sums on the tensor cores, for bfloat16 streams, m <= 24 and 16-byte copies.
// The projection's chunk goes to shared memory as three bfloat16 parts, p1 = bf16(v), p2 =
// bf16(v - p1), p3 = bf16(v - p1 - p2) (v - p1 and v - p1 - p2 are exact in float32, so p1 + p2 +
// p3 is v to within float32's rounding), rows of `chunk` values 16 bytes apart from a multiple of
// 32 (so ldmatrix's eight rows hit distinct banks). A warp takes 32 tokens as two m16 tiles and
// all 3 MB projection rows as n8 tiles: `mma.sync m16n8k16` bf16, products exact, float32 sums;
// a token's three part sums are added per output, (d1 + d2) + d3. The sums of squares come from
// the same A fragments in float32, a lane's values in K order, then the four lanes of a row.
template <int MB>
__device__ __forceinline__ void mix_mma(const void* x, const float* fn, long long tokens, long long width, int m,
                                        int chunk, float* partial) {
  constexpr int NT = 3 * MB / 8;       // n8 tiles: the three parts' rows
  constexpr int STEP = ROW_BYTES / 2;  // values of a token a staged step: two k16 slices
  const int pitch = chunk * 2 + 16;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* phi = smem;                                    // [3 MB][pitch]: part-major rows
  unsigned char* stage = smem + (size_t)3 * MB * pitch;         // [2][MMA_TOKENS][ROW_PITCH]
  const long long k0 = blockIdx.x * (long long)chunk;
  const long long t0 = blockIdx.y * (long long)MMA_TOKENS;
  const int kc = (int)min((long long)chunk, width - k0);
  const int steps = (kc + STEP - 1) / STEP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  auto stage_step = [&](int i) {
    stage_values<MMA_TOKENS, true, true>(stage + (i & 1) * MMA_TOKENS * ROW_PITCH, x, t0, tokens, width, k0, kc, i);
  };

  grid_begin();
  stage_step(0);
  for (int k = threadIdx.x; k < chunk; k += ROWS_THREADS) {
    float w[MB];
    projection_column(w, fn, width, k0, kc, m, k);
#pragma unroll
    for (int o = 0; o < MB; ++o) {
      const uint16_t p1 = bf16_from_f32(w[o]);
      const float r1 = w[o] - bf16_to_f32(p1);
      const uint16_t p2 = bf16_from_f32(r1);
      const uint16_t p3 = bf16_from_f32(r1 - bf16_to_f32(p2));
      *reinterpret_cast<uint16_t*>(phi + o * pitch + 2 * k) = p1;
      *reinterpret_cast<uint16_t*>(phi + (MB + o) * pitch + 2 * k) = p2;
      *reinterpret_cast<uint16_t*>(phi + (2 * MB + o) * pitch + 2 * k) = p3;
    }
  }

  float acc[2][NT][4];
  float ss[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [m tile][row g, row g + 8]
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[u][j][0] = acc[u][j][1] = acc[u][j][2] = acc[u][j][3] = 0.f;
  }
  for (int i = 0; i < steps; ++i) {
    await_step(i, steps, stage_step);
    const unsigned char* buf = stage + (i & 1) * MMA_TOKENS * ROW_PITCH;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint32_t a[2][4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        ldmatrix_x4(a[u], buf + (warp * 32 + u * 16 + lane % 16) * ROW_PITCH + s * 32 + lane / 16 * 16);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float lo = __uint_as_float(a[u][r] << 16), hi = __uint_as_float(a[u][r] & 0xFFFF0000u);
          ss[u][r & 1] = fmaf(hi, hi, fmaf(lo, lo, ss[u][r & 1]));
        }
      }
      const int kb = (i * STEP + s * 16) * 2 + (lane / 8 % 2) * 16;  // this lane's row address, bytes
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        const int tile = j + 1 < NT ? j + lane / 16 : j;  // an odd last tile: both halves read it
        uint32_t b[4];
        ldmatrix_x4(b, phi + (tile * 8 + lane % 8) * pitch + kb);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          mma_bf16(acc[u][j], a[u][0], a[u][1], a[u][2], a[u][3], b[0], b[1]);
          if (j + 1 < NT) mma_bf16(acc[u][j + 1], a[u][0], a[u][1], a[u][2], a[u][3], b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sq = ss[u][h];
      sq += __shfl_xor_sync(0xffffffffu, sq, 1);
      sq += __shfl_xor_sync(0xffffffffu, sq, 2);
      const long long t = t0 + warp * 32 + u * 16 + g + 8 * h;
      if (t >= tokens) continue;
      float* p = partial + (t * gridDim.x + blockIdx.x) * (m + 1);
#pragma unroll
      for (int j = 0; j < MB / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int o = j * 8 + 2 * q + e;
          const float d = (acc[u][j][2 * h + e] + acc[u][j + MB / 8][2 * h + e]) + acc[u][j + 2 * MB / 8][2 * h + e];
          if (o < m) p[o] = d;
        }
      }
      if (q == 0) p[m] = sq;
    }
  }
}

}  // namespace

// Grid (ceil(K / chunk), ceil(T / MMA_TOKENS)), ROWS_THREADS threads, 3 MB (2 chunk + 16) + 2
// MMA_TOKENS ROW_PITCH bytes of dynamic shared memory (MB: 8 for m <= 8, else 24; m <= 24); x
// bfloat16, 16-byte aligned, K a multiple of 8; chunk a multiple of 64; partial as
// dsv4_mhc_mix_rows's.
extern "C" __global__ void __launch_bounds__(ROWS_THREADS, 2) dsv4_mhc_mix_mma(const void* x, const float* fn,
                                                                           long long tokens, long long width, int m,
                                                                           int chunk, float* partial) {
  if (m <= 8) {
    mix_mma<8>(x, fn, tokens, width, m, chunk, partial);
  } else if (m <= 24) {
    mix_mma<24>(x, fn, tokens, width, m, chunk, partial);
  }
}

// Grid (ceil(K / chunk), ceil(T / TOKENS)), ROWS_THREADS threads, chunk * MB * 4 + 2 * TOKENS *
// ROW_PITCH bytes of dynamic shared memory (MB, TOKENS: MixRows of m's bucket); chunk a multiple
// of 64; partial [T, ceil(K / chunk), m + 1]. vec: K * (bf16 ? 2 : 4) a multiple of 16 and x
// 16-byte aligned.
extern "C" __global__ void __launch_bounds__(ROWS_THREADS) dsv4_mhc_mix_rows(const void* x, int x_bf16, const float* fn,
                                                                            long long tokens, long long width, int m,
                                                                            int chunk, int vec, float* partial) {
#define DSV4_MIX_ROWS(MB)                                                                          \
  if (x_bf16) {                                                                                    \
    vec ? mix_rows<MB, true, true>(x, fn, tokens, width, m, chunk, partial)                        \
        : mix_rows<MB, true, false>(x, fn, tokens, width, m, chunk, partial);                      \
  } else {                                                                                         \
    vec ? mix_rows<MB, false, true>(x, fn, tokens, width, m, chunk, partial)                       \
        : mix_rows<MB, false, false>(x, fn, tokens, width, m, chunk, partial);                     \
  }
  if (m <= 8) {
    DSV4_MIX_ROWS(8)
  } else if (m <= 24) {
    DSV4_MIX_ROWS(24)
  } else if (m <= 48) {
    DSV4_MIX_ROWS(48)
  } else if (m <= 80) {
    DSV4_MIX_ROWS(80)
  }
#undef DSV4_MIX_ROWS
}

// A warp a token (256 threads a block): mix[t, o] = rsqrt(ss / K + norm_eps) sum_s partial[t, s, o],
// ss = sum_s partial[t, s, m], each sum over the chunks in order (every lane adds ss alike).
extern "C" __global__ void __launch_bounds__(256) dsv4_mhc_mix_finish(const float* partial, int splits,
                                                                     long long tokens, int m, long long width,
                                                                     float norm_eps, float* mix) {
  dsv4::grid_begin();
  const long long t = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  if (t >= tokens) return;
  const float* p = partial + t * splits * (long long)(m + 1);
  float ss = 0.f;
  for (int s = 0; s < splits; ++s) ss += p[s * (long long)(m + 1) + m];
  const float r = rsqrtf(ss / (float)width + norm_eps);
  for (int o = threadIdx.x % 32; o < m; o += 32) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += p[s * (long long)(m + 1) + o];
    mix[t * m + o] = sum * r;
  }
}
