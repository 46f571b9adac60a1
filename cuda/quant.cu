// KV-entry quantization kernels: write entries / indexer keys into paged caches, read them back,
// the indexer-key round trip without a cache, row copies between caches, and the Hadamard-128
// transform. Formats: cuda/include/quant.cuh (docs/model.md section 5).
// Row ids outside [0, num_rows) are skipped on write and read back as zeros: the kernels never
// touch memory outside the cache, whatever the indices.
#include "floats.cuh"
#include "grid.cuh"
#include "quant.cuh"

using namespace dsv4;

namespace {

// The row kernels below (a row of 32 or 64 threads) run several rows a block: blocks of one or
// two warps are started more slowly than such short rows finish (`rows_launch` in
// rust/core/src/gpu/quant.rs sizes the blocks, 256 threads at most, and gives the measurements).
// The block's row for this thread (rows of `threads` threads) and, in `t`, its thread within it.
__device__ __forceinline__ long long block_row(int threads, int& t) {
  t = threadIdx.x % threads;
  return (long long)blockIdx.x * (blockDim.x / threads) + threadIdx.x / threads;
}

}  // namespace

// 64 threads an entry (block_row). Thread t reads values [4t, 4t + 4) and [256 + 4t, 256 + 4t + 4)
// of the entry (vec4: one 16-byte float32 or 8-byte bfloat16 load each, so each of the block's
// two loads sweeps half the row contiguously), which puts a 64-value FP8 block on 16 consecutive
// threads: in the first half thread t holds block t / 16 (0-3), in the second threads t < 48
// hold block 4 + t / 16 (4-6) and threads t >= 48 the 64 BF16 RoPE values. The block's amax is a
// 16-lane maximum, its codes 4 bytes a thread, its scale byte the first thread's.
extern "C" __global__ void __launch_bounds__(256) dsv4_kv_write(
    const void* __restrict__ x, int x_bf16, long long n, const long long* __restrict__ slots,
    uint8_t* __restrict__ cache, long long num_rows, int vec4) {
  dsv4::grid_begin();
  int t;
  const long long i = block_row(64, t);
  if (i >= n) return;
  const long long slot = slots[i];
  if (slot < 0 || slot >= num_rows) return;
  float v[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long at = i * ENTRY_DIM + 256 * h + 4 * t;
    if (vec4) {
      const float4 f = load4(x, at, x_bf16);
      v[h][0] = f.x, v[h][1] = f.y, v[h][2] = f.z, v[h][3] = f.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) v[h][k] = load_value(x, at + k, x_bf16);
    }
  }
  uint8_t* data = cache + MAIN_ENTRY.data_offset(slot);
  uint8_t* scales = cache + MAIN_ENTRY.scale_offset(slot);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) m = fmaxf(m, fabsf(v[h][k]));
    m = group_amax(m, 16);  // every lane takes part (the RoPE lanes among themselves)
    if (h == 0 || t < 48) {
      const int e = ue8m0_exponent(m, FP8_MAX);
      *(uint32_t*)(data + 256 * h + 4 * t) = fp8_encode4(v[h], e);
      if (t % 16 == 0) scales[4 * h + t / 16] = (uint8_t)(e + 127);
    } else {
      const uint2 r = make_uint2((uint32_t)bf16_from_f32(v[h][0]) | ((uint32_t)bf16_from_f32(v[h][1]) << 16),
                                 (uint32_t)bf16_from_f32(v[h][2]) | ((uint32_t)bf16_from_f32(v[h][3]) << 16));
      *(uint2*)(data + NOPE_DIM + 8 * (t - 48)) = r;
      if (t == 48) scales[7] = 0;
    }
  }
}

// dsv4_kv_read: 64 threads a row (block_row); thread t owns values [8t, 8t + 8): t < 56 the seven
// FP8 blocks (8 threads each), t >= 56 the BF16 RoPE part.
extern "C" __global__ void __launch_bounds__(256) dsv4_kv_read(
    const uint8_t* __restrict__ cache, long long num_rows, const long long* __restrict__ rows,
    long long m, float* __restrict__ out) {
  dsv4::grid_begin();
  int t;
  const long long i = block_row(64, t);
  if (i >= m) return;
  long long row = rows[i];
  float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (row >= 0 && row < num_rows) {
    const uint8_t* data = cache + MAIN_ENTRY.data_offset(row);
    if (t < NOPE_DIM / 8) {
      uint2 raw = *(const uint2*)(data + 8 * t);
      const uint8_t* q = (const uint8_t*)&raw;
      float s = exp2i((int)cache[MAIN_ENTRY.scale_offset(row) + t / 8] - 127);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = fp8_decode(q[k]) * s;
    } else {
      uint4 raw = *(const uint4*)(data + NOPE_DIM + 16 * (t - NOPE_DIM / 8));
      const uint16_t* h = (const uint16_t*)&raw;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = bf16_to_f32(h[k]);
    }
  }
  float4* o = (float4*)(out + i * ENTRY_DIM + 8 * t);
  o[0] = make_float4(v[0], v[1], v[2], v[3]);
  o[1] = make_float4(v[4], v[5], v[6], v[7]);
}

namespace {

// Lane l's four values [4l, 4l + 4) of row i of [n, 128] float32/bfloat16 keys.
__device__ __forceinline__ void load_key_lane(const void* x, int x_bf16, long long i, int l, float (&v)[4]) {
  const void* row = (const char*)x + i * INDEX_DIM * (x_bf16 ? 2 : 4);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = load_value(row, 4 * l + k, x_bf16);
}

// A lane's four key values encoded in `fmt`: their codes as stored (KEYS_FP4: four nibbles in
// the low 16 bits, KEYS_FP8: four bytes; little-endian) and in `e` the exponent of their scale
// (KEYS_FP4: per 32 values, KEYS_FP8: per key). Every lane of the warp calls it (the block
// maxima are warp reductions).
__device__ __forceinline__ uint32_t encode_key_lane(const float (&v)[4], IndexFormat fmt, int& e) {
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) m = fmaxf(m, fabsf(v[k]));
  uint32_t codes = 0;
  if (fmt == KEYS_FP4) {
    e = ue8m0_exponent(group_amax(m, FP4_BLOCK / 4), FP4_MAX);
#pragma unroll
    for (int k = 0; k < 4; ++k) codes |= (uint32_t)fp4_encode(v[k], e) << (4 * k);
  } else {
    e = ue8m0_exponent(group_amax(m, 32), FP8_MAX);
    codes = fp8_encode4(v, e);
  }
  return codes;
}

// The values of a lane's codes (as encode_key_lane gives them) at scale s.
__device__ __forceinline__ void decode_key_lane(uint32_t codes, IndexFormat fmt, float s, float (&v)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    v[k] = (fmt == KEYS_FP4 ? fp4_decode((codes >> (4 * k)) & 0xFu) : fp8_decode((codes >> (8 * k)) & 0xFFu)) * s;
}

// The FP4 scale 2^e as the cache holds it: one UE8M0 byte.
__device__ __forceinline__ float fp4_stored_scale(int e) { return exp2i((int)(uint8_t)(e + 127) - 127); }

// `bytes` bytes from src to dst by the 32 lanes of a warp, `T` (16, 8, 4, 2 or 1 bytes) at a time.
template <typename T>
__device__ __forceinline__ void copy_units(uint8_t* dst, const uint8_t* src, int bytes, int lane) {
#pragma unroll 1  // a few units a lane; unrolled, the ten inlined loops spilled registers on sm_90
  for (int k = lane; k < bytes / (int)sizeof(T); k += 32) ((T*)dst)[k] = ((const T*)src)[k];
}

// `bytes` bytes from src to dst by a warp, in the widest units both addresses and the length allow.
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int bytes, int lane) {
  const unsigned long long bits = (unsigned long long)dst | (unsigned long long)src | (unsigned long long)bytes;
  if (bits % 16 == 0) copy_units<uint4>(dst, src, bytes, lane);
  else if (bits % 8 == 0) copy_units<uint2>(dst, src, bytes, lane);
  else if (bits % 4 == 0) copy_units<uint32_t>(dst, src, bytes, lane);
  else if (bits % 2 == 0) copy_units<uint16_t>(dst, src, bytes, lane);
  else copy_units<uint8_t>(dst, src, bytes, lane);
}

}  // namespace

// A warp per key (block_row); lane l owns values [4l, 4l + 4). KEYS_FP4: 68 B, KEYS_FP8: 132 B.
extern "C" __global__ void __launch_bounds__(256) dsv4_index_key_write(
    const void* __restrict__ x, int x_bf16, long long n, const long long* __restrict__ slots,
    uint8_t* __restrict__ cache, long long num_rows, IndexFormat fmt) {
  dsv4::grid_begin();
  int l;
  const long long i = block_row(32, l);
  if (i >= n) return;
  long long slot = slots[i];
  if (slot < 0 || slot >= num_rows) return;
  float v[4];
  load_key_lane(x, x_bf16, i, l, v);
  int e;
  const uint32_t codes = encode_key_lane(v, fmt, e);
  if (fmt == KEYS_FP4) {
    *(uint16_t*)(cache + INDEX_KEY_FP4.data_offset(slot) + 2 * l) = (uint16_t)codes;
    if (l % 8 == 0) cache[INDEX_KEY_FP4.scale_offset(slot) + l / 8] = (uint8_t)(e + 127);
  } else {
    *(uint32_t*)(cache + INDEX_KEY_FP8.data_offset(slot) + 4 * l) = codes;
    if (l == 0) *(float*)(cache + INDEX_KEY_FP8.scale_offset(slot)) = exp2i(e);
  }
}

extern "C" __global__ void __launch_bounds__(256) dsv4_index_key_read(
    const uint8_t* __restrict__ cache, long long num_rows, const long long* __restrict__ rows,
    long long m, float* __restrict__ out, IndexFormat fmt) {
  dsv4::grid_begin();
  int l;
  const long long i = block_row(32, l);
  if (i >= m) return;
  long long row = rows[i];
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (row >= 0 && row < num_rows) {
    if (fmt == KEYS_FP4) {
      const uint32_t codes = *(const uint16_t*)(cache + INDEX_KEY_FP4.data_offset(row) + 2 * l);
      decode_key_lane(codes, fmt, exp2i((int)cache[INDEX_KEY_FP4.scale_offset(row) + l / 8] - 127), v);
    } else {
      const uint32_t codes = *(const uint32_t*)(cache + INDEX_KEY_FP8.data_offset(row) + 4 * l);
      decode_key_lane(codes, fmt, *(const float*)(cache + INDEX_KEY_FP8.scale_offset(row)), v);
    }
  }
  *(float4*)(out + i * INDEX_DIM + 4 * l) = make_float4(v[0], v[1], v[2], v[3]);
}

// dsv4_index_key_write then dsv4_index_key_read of the same keys, without a cache: the same
// codes, decoded at the scale the cache would hold.
extern "C" __global__ void __launch_bounds__(256) dsv4_index_key_round_trip(
    const void* __restrict__ x, int x_bf16, long long n, float* __restrict__ out, IndexFormat fmt) {
  dsv4::grid_begin();
  int l;
  const long long i = block_row(32, l);
  if (i >= n) return;
  float v[4];
  load_key_lane(x, x_bf16, i, l, v);
  int e;
  const uint32_t codes = encode_key_lane(v, fmt, e);
  decode_key_lane(codes, fmt, fmt == KEYS_FP4 ? fp4_stored_scale(e) : exp2i(e), v);
  *(float4*)(out + i * INDEX_DIM + 4 * l) = make_float4(v[0], v[1], v[2], v[3]);
}

// One warp per pair (4 a block): row src_rows[i] of src to row dst_rows[i] of dst, byte for byte,
// its data part and its scale part (rows of plain caches have none: scale_bytes 0). Pairs with -1
// or an id outside its cache are skipped. dst and src do not overlap (the caller checks).
extern "C" __global__ void __launch_bounds__(128) dsv4_copy_rows(
    uint8_t* __restrict__ dst, long long dst_total, const long long* __restrict__ dst_rows,
    const uint8_t* __restrict__ src, long long src_total, const long long* __restrict__ src_rows, long long n,
    int data_bytes, int scale_bytes) {
  dsv4::grid_begin();
  const long long i = blockIdx.x * 4LL + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const long long d = dst_rows[i], s = src_rows[i];
  if (d < 0 || d >= dst_total || s < 0 || s >= src_total) return;
  const RowFormat f{data_bytes, scale_bytes};
  warp_copy(dst + f.data_offset(d), src + f.data_offset(s), data_bytes, lane);
  if (scale_bytes > 0) warp_copy(dst + f.scale_offset(d), src + f.scale_offset(s), scale_bytes, lane);
}

// A warp per 128-vector (block_row). Same butterflies as rust/core/src/quant.rs::hadamard128, so the
// results are bit-identical: stages h = 1, 2 inside a lane, h = 4..64 across lanes.
extern "C" __global__ void __launch_bounds__(256) dsv4_hadamard128(
    const void* __restrict__ x, int x_bf16, long long n, float* __restrict__ out) {
  dsv4::grid_begin();
  int l;
  const long long i = block_row(32, l);
  if (i >= n) return;
  float v[4];
  load_key_lane(x, x_bf16, i, l, v);
  float a0 = v[0] + v[1], b0 = v[0] - v[1], a1 = v[2] + v[3], b1 = v[2] - v[3];
  v[0] = a0 + a1; v[2] = a0 - a1; v[1] = b0 + b1; v[3] = b0 - b1;
  for (int h = 4; h < INDEX_DIM; h *= 2) {
    int mask = h / 4;
    bool upper = (l & mask) != 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float other = __shfl_xor_sync(0xffffffffu, v[k], mask);
      v[k] = upper ? other - v[k] : v[k] + other;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] *= HADAMARD_SCALE;
  *(float4*)(out + i * INDEX_DIM + 4 * l) = make_float4(v[0], v[1], v[2], v[3]);
}
