// The compressor on the GPU (docs/model.md section 3), one form for prefill and decode, mirroring
// rust/core/src/compress.rs: a call consumes the tokens at positions start .. start + S and
// emits the entries they complete; tokens of blocks not pooled yet come from the decode state
// (kv_state, score_state: [coff r, coff D], logits stored as score + ape).
//
// dsv4_compress_pool: a thread per (entry, channel): one softmax over the entry's candidates
// (own block, and the previous block for the overlapping ratio-4 form), one pass over the
// projections. dsv4_compress_finish: a warp per entry: RMSNorm, RoPE at the block's first
// position, and the FP8 (D = 512) or Hadamard + FP4 (D = 128) round trip, in place; its last
// blocks advance the state in place exactly as feeding the tokens one by one would (a thread per
// channel column, so reads of the old state precede its writes), after the pool has read it.
// For long calls of the overlapping form the finish kernel's warps pool their entries themselves
// (the pool kernel is not launched) and the state blocks take a launch of their own after them,
// or the same launch where no entry reads the old state (a call from the sequence's start).
// For long calls of the non-overlapping form (r = 128) dsv4_compress_entry pools an entry a block
// (a thread a channel) and finishes it there, with the state blocks in the same launch where they
// may run beside the entries.
//
// dsv4_compress_batch_{pool,finish}: the same for B sequences in one launch each (tokens
// concatenated, states in a pool of slots): a block per (token, channel group), then a warp per
// token and a block per (sequence, column group, part) of the states. Each builds the sequence's
// own `Params` and runs the device functions the single-sequence kernels run (pool_channel,
// pool_entry4, finish_values, advance_state), so a batch gives exactly what one call per
// sequence gives.
// Nothing is read from the host: slots outside the pool mark padding rows and every offset read
// from device memory is clamped into its tensor.
//
// The float32 kernels; cuda/compress_bf16.cu has the same kernels for bfloat16 projections (the
// device code is cuda/include/compress.cuh).
#include "compress.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 10) dsv4_compress_pool(const Params p) {
  dsv4::grid_begin();
  compress_pool<false>(p);
}

extern "C" __global__ void __launch_bounds__(THREADS, 4) dsv4_compress_finish(const Params p, int finish_blocks,
                                                                              int parts, int pool, int vec4) {
  dsv4::grid_begin();
  compress_finish<false>(p, finish_blocks, parts, pool, vec4);
}

extern "C" __global__ void __launch_bounds__(ENTRY_THREADS, 2) dsv4_compress_entry(const Params p, int state_blocks,
                                                                                   int vec4) {
  dsv4::grid_begin();
  compress_entry<false>(p, state_blocks, vec4);
}

extern "C" __global__ void __launch_bounds__(THREADS, 9) dsv4_compress_batch_pool(const BatchParams bp) {
  dsv4::grid_begin();
  compress_batch_pool<false>(bp);
}

extern "C" __global__ void __launch_bounds__(THREADS, 4) dsv4_compress_batch_finish(const BatchParams bp,
                                                                                    int finish_blocks, int columns,
                                                                                    int parts, int pool, int vec4) {
  dsv4::grid_begin();
  compress_batch_finish<false>(bp, finish_blocks, columns, parts, pool, vec4);
}
