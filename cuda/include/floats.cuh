// Loads and stores of float32 or bfloat16 rows, one value, four or eight at a time (the four-wide
// forms need 16-byte (float32) or 8-byte (bfloat16) alignment, the eight-wide load 16-byte; the
// launchers check it).
#pragma once
#include <stdint.h>

#include "quant.cuh"

namespace dsv4 {

// Values i .. i + 3 of a float32 (is_bf16 == 0) or bfloat16 row.
__device__ __forceinline__ float4 load4(const void* base, long long i, int is_bf16) {
  if (!is_bf16) return *(const float4*)((const float*)base + i);
  const uint2 r = *(const uint2*)((const uint16_t*)base + i);
  return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xFFFF0000u), __uint_as_float(r.y << 16),
                     __uint_as_float(r.y & 0xFFFF0000u));
}

// Values i .. i + 7 of a float32 or bfloat16 row (16-byte aligned): one 16-byte load (bfloat16)
// or two (float32).
__device__ __forceinline__ void load8(const void* base, long long i, int is_bf16, float (&v)[8]) {
  if (is_bf16) {
    const uint4 r = *(const uint4*)((const char*)base + 2 * i);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
  } else {
    const float4 a = *(const float4*)((const float*)base + i), b = *(const float4*)((const float*)base + i + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
}

__device__ __forceinline__ void store_value(void* base, long long i, int is_bf16, float v) {
  if (is_bf16) {
    ((uint16_t*)base)[i] = bf16_from_f32(v);
  } else {
    ((float*)base)[i] = v;
  }
}

__device__ __forceinline__ void store4(void* base, long long i, int is_bf16, float4 v) {
  if (!is_bf16) {
    *(float4*)((float*)base + i) = v;
    return;
  }
  const uint2 r = make_uint2((uint32_t)bf16_from_f32(v.x) | ((uint32_t)bf16_from_f32(v.y) << 16),
                             (uint32_t)bf16_from_f32(v.z) | ((uint32_t)bf16_from_f32(v.w) << 16));
  *(uint2*)((uint16_t*)base + i) = r;
}

// V consecutive values (V = 1 or 4) from index i, as an array.
template <int V>
__device__ __forceinline__ void load_n(const void* base, long long i, int is_bf16, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 f = load4(base, i, is_bf16);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    v[0] = load_value(base, i, is_bf16);
  }
}

template <int V>
__device__ __forceinline__ void store_n(void* base, long long i, int is_bf16, const float (&v)[V]) {
  if constexpr (V == 4) {
    store4(base, i, is_bf16, make_float4(v[0], v[1], v[2], v[3]));
  } else {
    store_value(base, i, is_bf16, v[0]);
  }
}

}  // namespace dsv4
