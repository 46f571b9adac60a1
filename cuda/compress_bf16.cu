// The compressor's kernels for bfloat16 projections (`kv`, `score`): cuda/compress.cu's, with
// each input value widened to float32 as it is loaded (exact), so the entries and states are the
// bits the float32 kernels give for the same values. A module of their own keeps the float32
// kernels' code as it was.
#include "compress.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 10) dsv4_compress_pool_bf16(const Params p) {
  dsv4::grid_begin();
  compress_pool<true>(p);
}

extern "C" __global__ void __launch_bounds__(THREADS, 4) dsv4_compress_finish_bf16(const Params p, int finish_blocks,
                                                                                   int parts, int pool, int vec4) {
  dsv4::grid_begin();
  compress_finish<true>(p, finish_blocks, parts, pool, vec4);
}

extern "C" __global__ void __launch_bounds__(ENTRY_THREADS, 2) dsv4_compress_entry_bf16(const Params p,
                                                                                        int state_blocks, int vec4) {
  dsv4::grid_begin();
  compress_entry<true>(p, state_blocks, vec4);
}

extern "C" __global__ void __launch_bounds__(THREADS, 9) dsv4_compress_batch_pool_bf16(const BatchParams bp) {
  dsv4::grid_begin();
  compress_batch_pool<true>(bp);
}

extern "C" __global__ void __launch_bounds__(THREADS, 4) dsv4_compress_batch_finish_bf16(const BatchParams bp,
                                                                                         int finish_blocks, int columns,
                                                                                         int parts, int pool, int vec4) {
  dsv4::grid_begin();
  compress_batch_finish<true>(bp, finish_blocks, columns, parts, pool, vec4);
}
