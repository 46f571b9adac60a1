// mHC weights (docs/model.md section 6), one thread per token: from the projected mix of the streams,
// pre = sigmoid(s0 mu[0:n] + b) + eps, post = 2 sigmoid(s1 mu[n:2n] + b), and comb = the rows of
// s2 mu[2n:] + b softmaxed plus eps, then Sinkhorn: columns, and (iters - 1) times rows and
// columns, each divided by its sum plus eps. Mirrors rust/core/src/mhc.rs (float32, same order).
//
// The stream count is a template parameter (1..8, chosen by a switch), so the n x n matrix lives
// in registers and the loops unroll: the n rows (or columns) of a Sinkhorn pass are independent
// chains. With a runtime n the matrix sat in local memory and every pass was one long chain of
// dependent loads, divisions and stores (about 50 us a call for n = 4 and 20 iterations, however
// few the tokens).
#include <cstdint>

namespace {

template <int N>
__device__ __forceinline__ void mhc_token(const float* m, const float* scale, const float* base, int iters, float eps,
                                          float* pre, float* post, float* comb) {
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    pre[j] = 1.f / (1.f + expf(-(m[j] * s0 + base[j]))) + eps;
    post[j] = 2.f * (1.f / (1.f + expf(-(m[N + j] * s1 + base[N + j]))));
  }
  float c[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[i][k] = m[2 * N + i * N + k] * s2 + base[2 * N + i * N + k];
      mx = fmaxf(mx, c[i][k]);
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[i][k] = expf(c[i][k] - mx);
      sum += c[i][k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) c[i][k] = c[i][k] / sum + eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < N; ++k) s += c[i][k];
        s += eps;
#pragma unroll
        for (int k = 0; k < N; ++k) c[i][k] /= s;
      }
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) s += c[i][k];
      s += eps;
#pragma unroll
      for (int i = 0; i < N; ++i) c[i][k] /= s;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int k = 0; k < N; ++k) comb[i * N + k] = c[i][k];
}

}  // namespace

// n in 1..8 (checked by the caller, rust/core/src/mhc.rs MAX_STREAMS); other n write nothing.
extern "C" __global__ void __launch_bounds__(128) dsv4_mhc_weights(const float* mix, const float* scale, const float* base,
                                                                   long long tokens, int n, int iters, float eps,
                                                                   float* pre, float* post, float* comb) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* m = mix + t * (2 + n) * n;
  float* p = pre + t * n;
  float* o = post + t * n;
  float* c = comb + t * n * n;
  switch (n) {
    case 1: mhc_token<1>(m, scale, base, iters, eps, p, o, c); break;
    case 2: mhc_token<2>(m, scale, base, iters, eps, p, o, c); break;
    case 3: mhc_token<3>(m, scale, base, iters, eps, p, o, c); break;
    case 4: mhc_token<4>(m, scale, base, iters, eps, p, o, c); break;
    case 5: mhc_token<5>(m, scale, base, iters, eps, p, o, c); break;
    case 6: mhc_token<6>(m, scale, base, iters, eps, p, o, c); break;
    case 7: mhc_token<7>(m, scale, base, iters, eps, p, o, c); break;
    case 8: mhc_token<8>(m, scale, base, iters, eps, p, o, c); break;
    default: break;
  }
}
