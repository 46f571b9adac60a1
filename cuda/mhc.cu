// mHC weights (docs/model.md section 6), one thread per token: from the projected mix of the streams,
// pre = sigmoid(s0 mu[0:n] + b) + eps, post = 2 sigmoid(s1 mu[n:2n] + b), and comb = the rows of
// s2 mu[2n:] + b softmaxed plus eps, then Sinkhorn: columns, and (iters - 1) times rows and
// columns, each divided by its sum plus eps. Mirrors rust/core/src/mhc.rs (float32, same order).
#include <cstdint>

namespace {
constexpr int MAX_STREAMS = 8;
}

extern "C" __global__ void __launch_bounds__(128) dsv4_mhc_weights(const float* mix, const float* scale, const float* base,
                                                                   long long tokens, int n, int iters, float eps,
                                                                   float* pre, float* post, float* comb) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int width = (2 + n) * n;
  const float* m = mix + t * width;
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
  for (int j = 0; j < n; ++j) {
    pre[t * n + j] = 1.f / (1.f + expf(-(m[j] * s0 + base[j]))) + eps;
    post[t * n + j] = 2.f * (1.f / (1.f + expf(-(m[n + j] * s1 + base[n + j]))));
  }
  float c[MAX_STREAMS * MAX_STREAMS];
  for (int i = 0; i < n; ++i) {
    float mx = -INFINITY;
    for (int k = 0; k < n; ++k) {
      c[i * n + k] = m[2 * n + i * n + k] * s2 + base[2 * n + i * n + k];
      mx = fmaxf(mx, c[i * n + k]);
    }
    float sum = 0.f;
    for (int k = 0; k < n; ++k) {
      c[i * n + k] = expf(c[i * n + k] - mx);
      sum += c[i * n + k];
    }
    for (int k = 0; k < n; ++k) c[i * n + k] = c[i * n + k] / sum + eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
      for (int i = 0; i < n; ++i) {
        float s = 0.f;
        for (int k = 0; k < n; ++k) s += c[i * n + k];
        s += eps;
        for (int k = 0; k < n; ++k) c[i * n + k] /= s;
      }
    }
    for (int k = 0; k < n; ++k) {
      float s = 0.f;
      for (int i = 0; i < n; ++i) s += c[i * n + k];
      s += eps;
      for (int i = 0; i < n; ++i) c[i * n + k] /= s;
    }
  }
  for (int i = 0; i < n * n; ++i) comb[t * n * n + i] = c[i];
}
