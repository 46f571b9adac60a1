// RoPE angles on the device (docs/model.md section 2), shared by the rope op (cuda/rope.cu), the
// compressor (cuda/compress.cu) and the attention epilogue's de-rotation (attention.cuh).
#pragma once

namespace dsv4 {

// Bits of a kernel's `rope_mode` (RopeTable::kernel_mode in rust/core/src/rope.rs).
constexpr int ROPE_FREQ64 = 1;    // the inverse frequencies are stored as float64 (else float32)
constexpr int ROPE_OFFICIAL = 2;  // DeepSeek's float32 table (else exact angles)

// Sine and cosine of the angle pos * inv_freq[j] (the sine negated when `inverse`), as the
// mode's table has them:
// - official: the float32 product of the position and the frequency, both rounded to float32,
//   its sine and cosine computed in double and rounded to float32;
// - exact: the angle, its sine and cosine in double.
// Both take sincospi of the angle over pi: its range reduction is exact and cheap, where sincos
// would need a slow path (and a local-memory stack frame in every kernel that rotates) for the
// angles of long contexts. The quotient's rounding moves the angle by at most 2e-10 rad at
// position 2^20, far below float32 rounding of the result.
__device__ __forceinline__ void rope_sincos(long long pos, const void* inv_freq, int j, int mode, bool inverse,
                                            double& s, double& c) {
  const double f = mode & ROPE_FREQ64 ? ((const double*)inv_freq)[j] : (double)((const float*)inv_freq)[j];
  if (mode & ROPE_OFFICIAL) {
    const float angle = __fmul_rn(__ll2float_rn(pos), __double2float_rn(f));
    sincospi((double)angle * M_1_PI, &s, &c);
    s = (double)__double2float_rn(s);
    c = (double)__double2float_rn(c);
  } else {
    sincospi((double)pos * f * M_1_PI, &s, &c);
  }
  if (inverse) s = -s;
}

}  // namespace dsv4
