// The compressor's kernels for bfloat16 projections (`kv`, `score`): cuda/compress.cu's, with
// each input value widened to float32 as it is loaded (exact), so the entries and states are the
// bits the float32 kernels give for the same values. A module of their own keeps the float32
// kernels' code as it was.
#include "compress.cuh"

DSV4_COMPRESS_KERNELS(_bf16, true)
