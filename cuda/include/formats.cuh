// The format codes kernels are told, one enum per fact. The values are the discriminants of the
// matching #[repr(i32)] enums in rust/core/src/formats.rs (rust/core/tests/sources.rs compares
// them); the fixed underlying type keeps them int-sized in parameter blocks and kernel arguments.
#pragma once

namespace dsv4 {

// How a cache stores main KV entries (MainFormat).
enum EntryFormat : int { ENTRIES_FP8 = 0, ENTRIES_BF16 = 1 };

// How a cache stores indexer keys (IndexFormat).
enum IndexFormat : int { KEYS_FP4 = 0, KEYS_FP8 = 1, KEYS_BF16 = 2 };

// The round trip a compressed entry goes through (Quant).
enum Quant : int { QUANT_NONE = 0, QUANT_FP8 = 1, QUANT_FP4 = 2 };

}  // namespace dsv4
