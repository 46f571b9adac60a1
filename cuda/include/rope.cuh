// RoPE angles on the device (docs/model.md section 2), shared by the rope op (cuda/rope.cu), the
// compressor (cuda/compress.cu) and the attention epilogue's de-rotation (attention.cuh).
#pragma once

namespace dsv4 {

// Inverse frequency j of a table stored as float64 (is64 != 0) or float32.
__device__ __forceinline__ double load_freq(const void* inv_freq, int j, int is64) {
  return is64 ? ((const double*)inv_freq)[j] : (double)((const float*)inv_freq)[j];
}

// Sine and cosine of the angle pos * inv_freq in double (positions reach 2^20, where a float
// angle would be off by up to 0.06 rad); the pi-scaled argument makes range reduction cheap.
__device__ __forceinline__ void rope_sincos(double pos, double inv_freq, double& s, double& c) {
  sincospi(pos * inv_freq * M_1_PI, &s, &c);
}

}  // namespace dsv4
