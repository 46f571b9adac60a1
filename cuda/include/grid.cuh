// Programmatic dependent launch (compute capability 9.0 and later).
//
// On such GPUs the kernels of this library are launched with CUDA's programmatic stream
// serialization (rust/core/src/gpu/mod.rs `launch_with`, where the kernel's code was compiled
// for compute_90 or later; `launch_after` opts a launch out): a kernel may start while the kernel
// before it on the stream is still running, once each block of that kernel has called
// `grid_begin` (or exited). So:
//
// - every kernel calls `grid_begin()` before it touches global memory that another kernel may
//   write (its inputs, its outputs, its workspace): `griddepcontrol.wait` returns once the grids
//   it depends on have completed and their writes are visible; then it lets the next kernel
//   start its blocks (`griddepcontrol.launch_dependents`), which wait in turn. At most two
//   kernels overlap: the running one and the next one's blocks, waiting or in their prologue;
// - before `grid_begin` a kernel may only compute from its parameters and hint the L2 about bytes
//   no kernel writes during a step (the weights: `prefetch_l2`). A prefetch only moves bytes from
//   memory into the L2, the point where every SM's accesses meet, so it cannot make a later read
//   see an older value.
//
// Without the launch attribute (older GPUs, portable PTX run by a newer GPU, DSV4RS_PDL=off)
// both instructions return at once, and on GPUs below compute capability 9.0 they are not
// compiled at all.
#pragma once

namespace dsv4 {

__device__ __forceinline__ void grid_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Asks the L2 to hold the 128-byte line at `p` (a global address); no value is read.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

}  // namespace dsv4
