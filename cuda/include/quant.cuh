// KV-entry formats of docs/model.md section 5 on the device; mirrors rust/core/src/quant.rs bit for bit.
// Scales: smallest 2^e with max(amax, 1e-4) <= qmax * 2^e. Values: exact scaling by 2^-e, then
// round-to-nearest-even on the FP8 e4m3 / FP4 e2m1 grid, saturating.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "formats.cuh"

namespace dsv4 {

constexpr int PAGE_ROWS = 64;
constexpr int ENTRY_DIM = 512;
constexpr int NOPE_DIM = 448;
constexpr int ROPE_DIM = 64;
constexpr int FP8_BLOCK = 64;
constexpr int INDEX_DIM = 128;
constexpr int FP4_BLOCK = 32;
constexpr float FP8_MAX = 448.0f;
constexpr float FP4_MAX = 6.0f;
constexpr float AMAX_FLOOR = 1e-4f;
// FP4's floor, as DeepSeek's FP4 quantizer: 6 * 2^-126 (rust/core/src/quant.rs FP4_AMAX_FLOOR).
constexpr float FP4_AMAX_FLOOR = 6.0f * 1.17549435e-38f;
constexpr float HADAMARD_SCALE = 0.08838835f;

// Byte layout of a cache family: a page holds PAGE_ROWS rows of data, then their scales.
struct RowFormat {
  int data_bytes;
  int scale_bytes;
  __host__ __device__ constexpr long long page_bytes() const {
    return (long long)PAGE_ROWS * (data_bytes + scale_bytes);
  }
  __host__ __device__ constexpr long long data_offset(long long row) const {
    return (row / PAGE_ROWS) * page_bytes() + (row % PAGE_ROWS) * data_bytes;
  }
  __host__ __device__ constexpr long long scale_offset(long long row) const {
    return (row / PAGE_ROWS) * page_bytes() + (long long)PAGE_ROWS * data_bytes +
           (row % PAGE_ROWS) * scale_bytes;
  }
};
__device__ constexpr RowFormat MAIN_ENTRY{NOPE_DIM + 2 * ROPE_DIM, 8};
__device__ constexpr RowFormat INDEX_KEY_FP4{INDEX_DIM / 2, 4};
__device__ constexpr RowFormat INDEX_KEY_FP8{INDEX_DIM, 4};

__device__ __forceinline__ float exp2i(int e) { return __int_as_float((e + 127) << 23); }

// The smallest e with max(amax, floor) <= qmax 2^e (amax a maximum of magnitudes; NaN counts as
// 0). A block holding an infinity gets e = 128, the UE8M0 code 255 (NaN), so its row reads back
// non-finite: the GPU cannot raise. By integer moves: with max(amax, floor) = 1.a 2^A and qmax =
// 1.q 2^Q (both normal), e = A - Q, or A - Q + 1 when 1.a > 1.q. The same value as the CPU
// twin's double-precision search (rust/core/src/quant.rs) for every float, FP8 and FP4 alike:
// checked over all 2^32 bit patterns.
__device__ __forceinline__ int ue8m0_exponent(float amax, float qmax) {
  if (isinf(amax)) return 128;
  const float floor = qmax == FP4_MAX ? FP4_AMAX_FLOOR : AMAX_FLOOR;
  const uint32_t a = __float_as_uint(fmaxf(amax, floor)), q = __float_as_uint(qmax);
  return (int)(a >> 23) - (int)(q >> 23) + ((a & 0x7FFFFFu) > (q & 0x7FFFFFu) ? 1 : 0);
}

__device__ __forceinline__ unsigned minifloat_code(float a, int man, int bias) {
  int min_e = 1 - bias;
  int bits_e = (int)((__float_as_uint(a) >> 23) & 0xFF) - 127;
  int e = max(bits_e, min_e);
  unsigned q = (unsigned)__float2int_rn(a * exp2i(man - e));
  return ((unsigned)(e - min_e) << man) + q;
}

__device__ __forceinline__ float minifloat_value(unsigned code, int man, int bias) {
  int exp = (int)(code >> man);
  unsigned m = code & ((1u << man) - 1);
  if (exp == 0) return (float)m * exp2i(1 - bias - man);
  return (1.0f + (float)m / (float)(1 << man)) * exp2i(exp - bias);
}

__device__ __forceinline__ uint8_t fp8_encode(float x, int e) {
  float a = fminf(fabsf(x) * exp2i(-e), FP8_MAX);
  return (uint8_t)((signbit(x) ? 0x80u : 0u) | minifloat_code(a, 3, 7));
}

__device__ __forceinline__ float fp8_decode(uint8_t b) {
  float v = minifloat_value(b & 0x7Fu, 3, 7);
  return (b & 0x80u) ? -v : v;
}

// FP8 by the hardware's conversions (sm_89 on): the same codes and values as fp8_encode and
// fp8_decode, a pair of values an instruction instead of a dozen instructions a value.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define DSV4_HW_E4M3 1
// Two non-negative floats, NaN excluded, as e4m3 codes (lo in the low byte), rounded to nearest
// even and saturated at 448: for such values fp8_encode's magnitude code.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;\n" : "=h"(r) : "f"(lo), "f"(hi));
  return r;
}

// The values of two e4m3 magnitude codes (lo in the low byte; not 0x7F, which fp8_decode reads as
// 480 and the hardware as NaN), exact: e4m3 to float16 to float32.
__device__ __forceinline__ float2 e4m3x2_value(uint32_t codes) {
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"((uint16_t)codes));
  return __half22float2(*(const __half2*)&h);
}

// fp8_encode's magnitude codes of four values (code k in byte k; e < 128): the hardware's
// conversion of |v| 2^-e clamped at 448 (fminf takes a NaN to 448, as fp8_encode does).
__device__ __forceinline__ uint32_t e4m3x4_magnitudes(const float (&v)[4], int e) {
  const float mult = exp2i(-e);
  float a[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) a[k] = fminf(fabsf(v[k]) * mult, FP8_MAX);
  return e4m3x2(a[0], a[1]) | e4m3x2(a[2], a[3]) << 16;
}
#endif

// Four values' fp8_encode(v[k], e) codes, code k in byte k. With the hardware conversion the
// magnitudes' codes, then the values' sign bits; a block holding an infinity (e = 128) takes
// fp8_encode itself.
__device__ __forceinline__ uint32_t fp8_encode4(const float (&v)[4], int e) {
#ifdef DSV4_HW_E4M3
  if (e < 128) {
    uint32_t c = e4m3x4_magnitudes(v, e);
#pragma unroll
    for (int k = 0; k < 4; ++k) c |= (__float_as_uint(v[k]) >> 31) << (8 * k + 7);
    return c;
  }
#endif
  uint32_t c = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) c |= (uint32_t)fp8_encode(v[k], e) << (8 * k);
  return c;
}

// v[k] = fp8_decode(fp8_encode(v[k], e)) * exp2i(e) for four values: what they read back after
// an FP8 write with scale 2^e. With the hardware conversions, the magnitude's code and its value
// (never the code 0x7F: the encoding saturates at 448), then the value's own sign.
__device__ __forceinline__ void fp8_round_trip4(float (&v)[4], int e) {
  const float s = exp2i(e);
#ifdef DSV4_HW_E4M3
  if (e < 128) {
    const uint32_t c = e4m3x4_magnitudes(v, e);
    const float2 lo = e4m3x2_value(c & 0xFFFFu), hi = e4m3x2_value(c >> 16);
    const float r[4] = {lo.x, lo.y, hi.x, hi.y};
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = copysignf(r[k], v[k]) * s;
    return;
  }
#endif
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = fp8_decode(fp8_encode(v[k], e)) * s;
}

__device__ __forceinline__ uint8_t fp4_encode(float x, int e) {
  float a = fminf(fabsf(x) * exp2i(-e), FP4_MAX);
  return (uint8_t)((signbit(x) ? 0x8u : 0u) | minifloat_code(a, 1, 1));
}

__device__ __forceinline__ float fp4_decode(uint8_t nibble) {
  float v = minifloat_value(nibble & 0x7u, 1, 1);
  return (nibble & 0x8u) ? -v : v;
}

// Nearest even; NaN stays NaN (0x7FC0, as the CPU twin's): rounding the GPU's NaN, 0x7FFFFFFF,
// would carry into the sign and give -0.
__device__ __forceinline__ uint16_t bf16_from_f32(float x) {
  uint32_t b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// x rounded to bfloat16 by round-to-odd: truncated, the last kept bit set when any dropped bit
// was (NaN as bf16_from_f32's 0x7FC0, its sign kept). A value so rounded and then rounded to
// nearest even at 6 or fewer significant bits gets what x would get directly (the dropped bits
// are kept as a sticky bit two places below any such precision), and it lies on the same side of
// every bfloat16 value with a zero last bit (448 2^j among them), so FP8 e4m3 quantization per
// block reads it as the same codes and scale as x (the MoE stores h so: docs/kernels/qgemm.md).
__device__ __forceinline__ uint16_t bf16_round_odd(float x) {
  const uint32_t b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(((b >> 16) & 0x8000u) | 0x7FC0u);
  return (uint16_t)((b >> 16) | ((b & 0xFFFFu) != 0u));
}

__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

// Tile decoders: FP8 e4m3 / FP4 e2m1 codes times 2^se as packed bf16, exact. Moving an e4m3
// code's magnitude bits into bf16 position gives a bf16 of the code's value times 2^-120,
// subnormals and zero included; two exact power-of-two multiplies restore it. 2^se is a bf16
// for se in -126..127 (se = -127, a zero UE8M0 byte, multiplies by zero).
__device__ __forceinline__ uint32_t bf16x2_mul_pow2(uint32_t x, int e) {
  const __nv_bfloat162 s = __bfloat162bfloat162(__ushort_as_bfloat16((unsigned short)((e + 127) << 7)));
  __nv_bfloat162 v = *(__nv_bfloat162*)&x;
  v = __hmul2(v, s);
  return *(uint32_t*)&v;
}

// Eight FP8 codes (little-endian in `raw`) times 2^se as eight packed bf16 (16 bytes): each pair
// of codes moves into bf16 position (value * 2^-120), then is multiplied by 2^120 and by 2^se.
// SMALL (the caller knows se <= 7, i.e. the block's amax is at most 448 * 2^7) takes one
// multiply by 2^(120 + se), which is then a bf16.
template <bool SMALL = false>
__device__ __forceinline__ uint4 fp8x8_to_bf16(uint2 raw, int se) {
  const uint32_t w[4] = {__byte_perm(raw.x, 0, 0x4140), __byte_perm(raw.x, 0, 0x4342), __byte_perm(raw.y, 0, 0x4140),
                         __byte_perm(raw.y, 0, 0x4342)};
  uint32_t v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = ((w[i] & 0x007F007Fu) << 4) | ((w[i] & 0x00800080u) << 8);
    v[i] = SMALL ? bf16x2_mul_pow2(bits, 120 + se) : bf16x2_mul_pow2(bf16x2_mul_pow2(bits, 120), se);
  }
  return make_uint4(v[0], v[1], v[2], v[3]);
}

// Eight FP4 codes (a 32-bit word, two per byte, even index in the low nibble) times 2^se as eight
// packed bf16, in an order of their own: bf16 pair j (j = 0..3) holds codes j and j + 4, so
// output element p of a run of such words is code fp4_paired_code(p); a dot
// product is the same with the other operand in that order. Shifting the word left by 12 - 4j
// puts code j's nibble at bits 12-15 and code j + 4's at 28-31; the sign bits are then where
// bf16 keeps them and the magnitude bits, 6 lower, become the lowest two exponent bits and the
// highest mantissa bit: a bf16 of the code's value times 2^-126 (code 0.5 as a subnormal). One
// exact multiply by 2^(126 + se), a bf16 for se in -125..1, restores it (about 5 instructions a
// pair, where table lookups took about 9); other scales take two multiplies.
__host__ __device__ constexpr int fp4_paired_code(int p) { return (p & ~7) | ((p & 7) >> 1) | ((p & 1) << 2); }

__device__ __forceinline__ uint4 fp4x8_to_bf16_paired(uint32_t word, int se) {
  uint32_t v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t t = word << (12 - 4 * j);
    v[j] = (t & 0x80008000u) | ((t >> 6) & 0x01C001C0u);
  }
  if (se >= -125 && se <= 1) {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = bf16x2_mul_pow2(v[j], 126 + se);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = bf16x2_mul_pow2(bf16x2_mul_pow2(v[j], 126), se);
  }
  return make_uint4(v[0], v[1], v[2], v[3]);
}

// Loads element i of a row given as float32 (is_bf16 == 0) or bfloat16 bits.
__device__ __forceinline__ float load_value(const void* base, long long i, int is_bf16) {
  return is_bf16 ? bf16_to_f32(((const uint16_t*)base)[i]) : ((const float*)base)[i];
}

// Element i of an index tensor given as int64 (is64 != 0) or int32.
__device__ __forceinline__ long long load_id(const void* base, long long i, int is64) {
  return is64 ? ((const long long*)base)[i] : (long long)((const int*)base)[i];
}

// Max of |v| over `width` consecutive lanes (width a power of two dividing 32).
__device__ __forceinline__ float group_amax(float v, int width) {
  v = fabsf(v);
  for (int off = width / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// A compile-time value as a value, for a generic lambda instantiated on it.
template <int V>
struct Tag {
  static constexpr int value = V;
};

}  // namespace dsv4
