// Hopper warpgroup MMA primitives shared by the sm_90a kernels (cuda/*_sm90a.cu): the wgmma
// fences, shared-memory matrix descriptors, the m64n{64,128}k16 bf16 and m64n{8,16,32,128}k32 e4m3 forms
// with A from registers (m64n128k32 e4m3 also from shared memory), TMA loads with their mbarriers,
// a loading warpgroup's loop, and the thread-block cluster's barrier.
#pragma once
#include <stdint.h>

namespace dsv4 {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// A shared-memory matrix descriptor as two 32-bit halves: the start address (bits 0-13) and LBO
// (16-29) in `lo`, SBO and the layout (swizzle) mode in `hi`, addresses and offsets in 16-byte
// units. Offsets are added to `lo` alone: shared addresses stay below 2^18 bytes, so the start
// address field never carries into LBO.
struct Desc {
  uint32_t lo, hi;
  __device__ Desc operator+(uint32_t units) const { return {lo + units, hi}; }
};

// No swizzle: core matrices (8 rows of 16 bytes) LBO bytes apart along K, SBO bytes apart along
// M or N.
__device__ __forceinline__ Desc smem_desc(const void* ptr, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(ptr);
  return {((a & 0x3FFFF) >> 4) | ((lbo >> 4) << 16), sbo >> 4};
}

// K-major in 128-byte swizzled rows (8-row groups 1024 bytes apart; LBO unused, 16 bytes) from
// shared address `addr`. A k16 slice within a row's 128 bytes starts 32 bytes further per slice
// (the swizzle acts on the address bits, so its 1024-byte atom must be aligned).
__device__ __forceinline__ Desc swizzled_desc(uint32_t addr) {
  return {((addr & 0x3FFFF) >> 4) | (1u << 16), (1024u >> 4) | (1u << 30)};
}

// The 64 float32 accumulators of an m64n128 wgmma (a [16][4] array per thread): their operand
// numbers in the instruction (%0 .. %63) and their read-write constraints, in that order; a row
// of four (DSV4_WGMMA_D4) also serves the narrower forms.
#define DSV4_WGMMA_D64                                                                    \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "      \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "      \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DSV4_WGMMA_D4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define DSV4_WGMMA_D16X4(d)                                                                                     \
  DSV4_WGMMA_D4(d, 0), DSV4_WGMMA_D4(d, 1), DSV4_WGMMA_D4(d, 2), DSV4_WGMMA_D4(d, 3), DSV4_WGMMA_D4(d, 4),     \
      DSV4_WGMMA_D4(d, 5), DSV4_WGMMA_D4(d, 6), DSV4_WGMMA_D4(d, 7), DSV4_WGMMA_D4(d, 8), DSV4_WGMMA_D4(d, 9),  \
      DSV4_WGMMA_D4(d, 10), DSV4_WGMMA_D4(d, 11), DSV4_WGMMA_D4(d, 12), DSV4_WGMMA_D4(d, 13),                   \
      DSV4_WGMMA_D4(d, 14), DSV4_WGMMA_D4(d, 15)

// d (64 x 128 float32, 16 n8 column tiles of the mma.sync C layout per warp) = A B (+ d when
// ACC), A 64 x 16 bf16 in registers (the mma.sync A layout per warp), B 16 x 128 bf16 in shared
// memory, K-major or (TRANS_B) N-major.
template <bool ACC, bool TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[16][4], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%68, %69};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      DSV4_WGMMA_D64
      "}, {%64, %65, %66, %67}, db, %70, 1, 1, %71;\n}\n"
      : DSV4_WGMMA_D16X4(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi), "n"(ACC ? 1 : 0), "n"(TRANS_B ? 1 : 0));
}

// d (64 x 64 float32, 8 n8 column tiles of the mma.sync C layout per warp) = A B, A 64 x 16 bf16
// in registers (the mma.sync A layout per warp), B 16 x 64 bf16 in shared memory, K-major; d is
// written, not accumulated, unless ACC (the indexer's heads x keys).
template <bool ACC>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[8][4], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%36, %37};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, db, %38, 1, 1, 0;\n}\n"
      : DSV4_WGMMA_D4(d, 0), DSV4_WGMMA_D4(d, 1), DSV4_WGMMA_D4(d, 2), DSV4_WGMMA_D4(d, 3), DSV4_WGMMA_D4(d, 4),
        DSV4_WGMMA_D4(d, 5), DSV4_WGMMA_D4(d, 6), DSV4_WGMMA_D4(d, 7)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi), "n"(ACC ? 1 : 0));
}

// d (64 x 8 NT float32: NT n8 column tiles of the mma.sync C layout per warp) = A B from a zero
// accumulator, A 64 x 32 e4m3 in registers (the mma.sync m16n8k32 A layout per warp), B 32 x 8 NT
// e4m3 in shared memory, K-major (FP8 operands have no transposed form).
__device__ __forceinline__ void wgmma_m64n8k32_e4m3_rs(float (&d)[4], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%8, %9};\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, db, 0, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi));
}
__device__ __forceinline__ void wgmma_m64n16k32_e4m3_rs(float (&d)[8], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%12, %13};\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, db, 0, 1, "
      "1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi));
}
__device__ __forceinline__ void wgmma_m64n32k32_e4m3_rs(float (&d)[16], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%20, %21};\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, "
      "%14, %15}, {%16, %17, %18, %19}, db, 0, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]),
        "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi));
}

// d (64 x 128 float32, 16 n8 column tiles of the mma.sync C layout per warp) = A B (+ d when
// ACC), A 64 x 32 e4m3 in registers (the mma.sync m16n8k32 A layout per warp), B 32 x 128 e4m3 in
// shared memory, K-major (the Hopper tiled form on FP8 tensor cores).
template <bool ACC>
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_rs(float (&d)[16][4], const uint32_t (&a)[4], Desc b) {
  asm volatile(
      "{\n.reg .b64 db;\nmov.b64 db, {%68, %69};\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      DSV4_WGMMA_D64
      "}, {%64, %65, %66, %67}, db, %70, 1, 1;\n}\n"
      : DSV4_WGMMA_D16X4(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.lo), "r"(b.hi), "n"(ACC ? 1 : 0));
}

// d (64 x 128 float32) = A B (+ d when ACC), A 64 x 32 e4m3 and B 32 x 128 e4m3 both in shared
// memory, K-major (the Hopper tiled form on FP8 tensor cores, its weights and activations by TMA).
template <bool ACC>
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_ss(float (&d)[16][4], Desc a, Desc b) {
  asm volatile(
      "{\n.reg .b64 da, db;\nmov.b64 da, {%64, %65};\nmov.b64 db, {%66, %67};\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      DSV4_WGMMA_D64
      "}, da, db, %68, 1, 1;\n}\n"
      : DSV4_WGMMA_D16X4(d)
      : "r"(a.lo), "r"(a.hi), "r"(b.lo), "r"(b.hi), "n"(ACC ? 1 : 0));
}

// Keeps a register's value where it is until this point: after a wgmma wait, so that the compiler
// neither reads an accumulator before the wgmma has written it nor reuses an A register the
// wgmma may still be reading.
__device__ __forceinline__ void wgmma_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void wgmma_pin(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// A TMA tensor map (CUtensorMap, encoded on the host by cuTensorMapEncodeTiled), passed by value
// as a __grid_constant__ kernel parameter.
struct alignas(64) TmaDesc {
  uint64_t words[16];
};

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the async proxy (the TMA unit's completions).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also expects `bytes` of transactions (the TMA loads' sizes) before the phase ends.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One plain arrival (release: the arriving thread's earlier shared-memory reads, wgmma's included
// once waited for, are ordered before it).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// A 2-D box of the tensor map at element coordinates (x, y) into shared memory at `dst`
// (swizzled as the map says), completing `bytes` on barrier `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaDesc* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(map), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

// A 4-D box of the tensor map at element coordinates (x, y, z, w), as tma_load_2d.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaDesc* map, int x, int y, int z, int w,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(map), "r"(x), "r"(y), "r"(z), "r"(w), "r"(bar)
      : "memory");
}

// The work of a block's loading warpgroup (its threads from `loader` on, all calling this): it
// gives its registers up to the warpgroups that compute (setmaxnreg: LOADER_REGS a thread here;
// a warp of each warpgroup shares a quarter of the SM's registers, and those warpgroups take them
// with setmaxnreg.inc), and its first thread loads step c into stage slot (c - c_begin) % STAGES,
// once every computing warp has arrived on that slot's `empty` barrier for step c - STAGES, by
// `issue(c, slot)`.
template <int STAGES, int LOADER_REGS, typename Issue>
__device__ __forceinline__ void run_loader(int tid, int loader, int c_begin, int c_end, uint32_t empty0, Issue& issue) {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(LOADER_REGS));
  if (tid == loader)
    for (int c = c_begin; c < c_end; ++c) {
      const int i = c - c_begin, slot = i % STAGES;
      if (i >= STAGES) mbar_wait(empty0 + 8 * slot, (i / STAGES - 1) & 1);
      issue(c, slot);
    }
}

// Thread-block clusters (another block's shared memory: __cluster_map_shared_rank). Every thread
// of every block of the cluster arrives, then waits: the release / acquire orders each thread's
// earlier shared-memory writes before any other block's reads after the barrier.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

}  // namespace dsv4
