"""The defect classes tests/test_fuzz.py found outside its files (in the Rust core, the bindings,
the ops and the cache manager, which are fixed elsewhere). Each has a strict xfail reproducer in
tests/test_fuzz.py; when a fix lands, that test fails (XPASS) and the class comes off this list.
No torch import here: the parent test and the child process both read it."""

from __future__ import annotations

KNOWN_CRASHES: dict[str, tuple[frozenset[str], str]] = {
    "page-tables-width": (frozenset({"cache:page_tables", "width", "int-huge"}),
                          "KVCacheManager.page_tables with a huge width (2^32) aborts the process (SIGABRT: the "
                          "Rust allocation of width x sequences entries fails) instead of raising ValueError"),
    "mhc-iters-hang": (frozenset({"op:mhc_weights", "int-huge"}),
                       "mhc_weights with a huge iters (2^62) runs that many Sinkhorn iterations (the process "
                       "hangs) instead of refusing an absurd count"),
    "manager-huge-pages": (frozenset({"cache:manager", "huge-pages"}),
                           "KVCacheManager with a huge page count (2^31 state slots) aborts the process (SIGABRT: "
                           "the Rust bookkeeping allocation fails) instead of raising ValueError"),
}
"""Crashing defect classes (fixed outside this test's files): a case whose tags hold all of a
class's tags is not run in the random batches; tests/test_fuzz.py holds a strict xfail each."""


KNOWN_OUTCOMES: dict[str, str] = {
    "binding-conversion": "a negative or too large int given to a cache-manager or cache-geometry call "
                          "raises OverflowError (\"can't convert negative int to unsigned\", \"int too big to "
                          "convert\") from the binding's conversion instead of a ValueError naming the argument",
    "meta-mixed-silent": "an op given meta tensors beside real ones returns without an error (torch dispatches the "
                         "whole call to the op's fake implementation): kv_write, index_key_write and copy_rows "
                         "silently write nothing, the others return meta outputs",
    "alias-silent": "kv_write with entries that are a view of the cache it writes, and compress with an input or "
                    "one state overlapping the other state, run without an error (the kernels then read memory "
                    "they are writing); only copy_rows and identical kv_state/score_state are refused",
    "derotate-half-silent": "sparse_attention(derotate=(positions, None)) or (None, inv_freq) runs without an error "
                            "and without the de-rotation asked for",
    "corrupt-cache-rows": "kv_read of rows whose bytes are corrupt (a BF16 NaN in the RoPE part, a UE8M0 scale code "
                          "0xff) returns NaN or inf without an error, where sparse_attention refuses the same rows "
                          "(ValueError naming the row)",
    "cache-arithmetic-wrap": "CacheConfig byte accounting wraps around on huge inputs: footprint(2^62) with "
                             "window=2^62 reports a window of 0 bytes, footprint(2^63) fewer CSA bytes than "
                             "footprint(2^62)",
    "allocation:indexer_topk": "indexer_topk with a huge k (2^32) allocates its [T, k] outputs before any check "
                               "(a 34 GB allocation attempt) instead of raising ValueError naming k",
    "fp8-nan-code": "an FP8 e4m3 NaN code (0x7f) in a cache row decodes in kv_read as a finite value (480 times "
                    "the block scale) without an error (found by a reproducer, not by the random batches)",
}
"""Defect classes (by outcome) fixed elsewhere: reported, not failed, in the random batches."""
