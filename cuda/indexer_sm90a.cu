// The Lightning Indexer's score kernels for Hopper (sm_90a): the body of cuda/indexer.cu's, with
// each page's products taken by warpgroup MMAs (wgmma, the query as the register operand, the
// decoded key tile read from shared memory) instead of mma.sync. The merge is cuda/indexer.cu's.
#include "grid.cuh"
#include "indexer_score.cuh"

using namespace dsv4;

extern "C" __global__ void __launch_bounds__(indexer::THREADS, indexer::MIN_BLOCKS)
    dsv4_indexer_score_wgmma(DSV4_INDEXER_SCORE_PARAMS) {
  dsv4::grid_begin();
  DSV4_INDEXER_SCORE_BY_FORMAT(false, true)
}

extern "C" __global__ void __launch_bounds__(indexer::THREADS, indexer::MIN_BLOCKS)
    dsv4_indexer_score_wgmma_dense(DSV4_INDEXER_SCORE_PARAMS) {
  dsv4::grid_begin();
  DSV4_INDEXER_SCORE_BY_FORMAT(true, true)
}
