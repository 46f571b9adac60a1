// The candidate rows a decode step's tokens attend (rust/core/src/step_rows.rs has the CPU twin
// and the contract; python/dsv4rs/reference/ops.py the torch form): for token t of batch row
// b = token_seq[t] at position p = positions[t],
//   window j in [0, W): q = p - W + 1 + j; -1 where q < origins[b], else ring row r = max(q, 0) % W
//                       at window_table[b, r / 64] * 64 + r % 64
//   hca    k in [0, K): -1 where k >= floor((p + 1) / ratio), else
//                       hca_table[b, min(k / 64, pages - 1)] * 64 + k % 64
// and -1 throughout for a token whose b is outside [0, B); int64 sums wrap as torch's do. A thread
// per output value.
#include <cstdint>

#include "grid.cuh"

namespace {

constexpr int THREADS = 256;
constexpr long long PAGE = 64;

// b >= 1.
__device__ __forceinline__ long long floor_div(long long a, long long b) {
  const long long q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Two's-complement wrapping, as torch's int64 arithmetic (and the CPU twin's wrapping_*).
__device__ __forceinline__ long long wrap_add(long long a, long long b) {
  return (long long)((unsigned long long)a + (unsigned long long)b);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    dsv4_step_rows(const long long* positions, const long long* token_seq, long long tokens, long long batch,
                   const long long* origins, const int* window_table, long long window_pages, long long window,
                   long long* window_rows, const int* hca_table, long long hca_pages, long long hca_ratio,
                   long long hca_width, long long* hca_rows) {
  dsv4::grid_begin();
  const long long per = window + hca_width;
  const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
  if (i >= tokens * per) return;
  const long long t = i / per, j = i % per;
  const long long b = token_seq[t], p = positions[t];
  const bool known = b >= 0 && b < batch;
  if (j < window) {
    long long row = -1;
    const long long q = wrap_add(p, j + 1 - window);
    if (known && q >= origins[b]) {
      const long long r = (q > 0 ? q : 0) % window;
      row = (long long)window_table[b * window_pages + r / PAGE] * PAGE + r % PAGE;
    }
    window_rows[t * window + j] = row;
  } else {
    const long long k = j - window;
    long long row = -1;
    if (known && k < floor_div(wrap_add(p, 1), hca_ratio)) {
      const long long page = k / PAGE < hca_pages - 1 ? k / PAGE : hca_pages - 1;
      row = (long long)hca_table[b * hca_pages + page] * PAGE + k % PAGE;
    }
    hca_rows[t * hca_width + k] = row;
  }
}
