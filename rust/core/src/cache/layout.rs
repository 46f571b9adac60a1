//! The geometry of a model's KV cache: which layers hold which cache family, and the bytes of
//! their rows, pages and compressor state (docs/model.md sections 1, 3 and 5).

use crate::error::{Error, Result};
use crate::formats::{IndexFormat, MainFormat};
use crate::quant::{ENTRY_DIM, INDEX_DIM, PAGE_ROWS};

use super::family::{Family, CSA_RATIO, HCA_RATIO};

/// Tokens per prefix-hashing unit: exactly one CSA page (64 entries) and two HCA entries.
pub const UNIT_TOKENS: usize = 256;
/// The longest sliding window a layout takes (V4's is 128): far beyond any model, and small
/// enough that every count derived from it fits in 64 bits.
pub const MAX_WINDOW: usize = 1 << 24;
/// The most layers a layout takes (V4-Pro has 62 with its MTP layer).
pub const MAX_LAYERS: usize = 1 << 12;

/// fp32 kv + score decode state of one compressor (docs/model.md section 3): two `[coff*r, coff*D]`
/// tensors, `coff` = 2 for the overlapping CSA compressor.
const fn compressor_state_bytes(ratio: usize, dim: usize, overlap: bool) -> usize {
    let coff = if overlap { 2 } else { 1 };
    2 * (coff * ratio) * (coff * dim) * 4
}

/// Per layer and sequence: CSA main (64 KiB) + CSA indexer (16 KiB) state.
pub const CSA_STATE_BYTES: usize =
    compressor_state_bytes(CSA_RATIO, ENTRY_DIM, true) + compressor_state_bytes(CSA_RATIO, INDEX_DIM, true);
/// Per layer and sequence: HCA state (512 KiB).
pub const HCA_STATE_BYTES: usize = compressor_state_bytes(HCA_RATIO, ENTRY_DIM, false);

/// A model's cache geometry: one compress ratio per layer (0 = sliding window only, 4 = CSA,
/// 128 = HCA, in depth order), the sliding window and the row formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    pub compress_ratios: Vec<usize>,
    pub window: usize,
    pub main: MainFormat,
    pub index: IndexFormat,
    csa_layers: usize,
    hca_layers: usize,
}

impl CacheLayout {
    pub fn new(compress_ratios: Vec<usize>, window: usize, main: MainFormat, index: IndexFormat) -> Result<Self> {
        if compress_ratios.is_empty() || compress_ratios.len() > MAX_LAYERS {
            return Err(Error::value(
                "compress_ratios",
                format!("expected 1 to {MAX_LAYERS} layers, got {}", compress_ratios.len()),
            ));
        }
        if let Some((i, r)) = compress_ratios.iter().enumerate().find(|(_, r)| ![0, CSA_RATIO, HCA_RATIO].contains(*r))
        {
            return Err(Error::value(
                "compress_ratios",
                format!("layer {i} has ratio {r}; expected 0 (sliding window only), 4 (CSA) or 128 (HCA)"),
            ));
        }
        if window == 0 || window > MAX_WINDOW {
            return Err(Error::value(
                "window",
                format!("expected a sliding window of 1 to {MAX_WINDOW} tokens, got {window}"),
            ));
        }
        let count = |r| compress_ratios.iter().filter(|x| **x == r).count();
        let (csa_layers, hca_layers) = (count(CSA_RATIO), count(HCA_RATIO));
        Ok(CacheLayout { compress_ratios, window, main, index, csa_layers, hca_layers })
    }

    pub fn num_layers(&self) -> usize {
        self.compress_ratios.len()
    }

    /// Layers whose rows one page id of `family` addresses (for `State`: whether any compressor
    /// exists, since one state slot holds every compressor of a sequence).
    pub fn layers(&self, family: Family) -> usize {
        match family {
            Family::Window => self.num_layers(),
            Family::Csa => self.csa_layers,
            Family::Hca => self.hca_layers,
            Family::State => usize::from(self.csa_layers + self.hca_layers > 0),
        }
    }

    /// Pages (slots) a fresh sequence of `len` tokens holds in `family`.
    pub fn pages_for_len(&self, family: Family, len: usize) -> usize {
        if self.layers(family) == 0 {
            return 0;
        }
        match family {
            Family::Window => len.min(self.window).div_ceil(PAGE_ROWS),
            Family::Csa | Family::Hca => family.entries(len).div_ceil(PAGE_ROWS),
            Family::State => usize::from(len > 0),
        }
    }

    /// Tokens a sequence that reuses a cached prefix must re-run to rebuild its window rings and
    /// compressor state, which are never shared.
    ///
    /// Only the window carries information between tokens outside the compressed entries, but it
    /// does so at every layer: layer `l`'s rows of the last `window - 1` tokens depend on layer
    /// `l - 1`'s rows of the `window - 1` tokens before each of them, and so on down to the token
    /// embeddings. Exact rows at every layer therefore need `(window - 1)` tokens per layer of
    /// depth (the MTP layer counts as one). The last layer's own rows need `window - 1` tokens,
    /// or 4 if more: the CSA compressor state holds the last 4 tokens of its layer. (HCA state
    /// needs none: a cached prefix ends on a 128-token boundary.)
    pub fn rebuild_tokens(&self) -> usize {
        (self.window - 1) * (self.num_layers() - 1) + (self.window - 1).max(CSA_RATIO)
    }
}

/// Compress ratios of DeepSeek-V4-Pro as its config.json lists them: 61 layers (layers 0 and 1
/// HCA, then CSA on even and HCA on odd ids: 30 CSA + 31 HCA) and the SWA-only MTP layer.
pub fn v4_pro_ratios() -> Vec<usize> {
    alternating_ratios(61, HCA_RATIO)
}

/// Compress ratios of DeepSeek-V4-Flash: 43 layers (layers 0 and 1 sliding-window only, then CSA
/// on even and HCA on odd ids: 21 CSA + 20 HCA + 2 SWA) and the SWA-only MTP layer.
pub fn v4_flash_ratios() -> Vec<usize> {
    alternating_ratios(43, 0)
}

/// `first_two` for layers 0 and 1, then CSA on even and HCA on odd ids, then the MTP layer (0).
fn alternating_ratios(layers: usize, first_two: usize) -> Vec<usize> {
    let body = (2..layers).map(|i| if i % 2 == 0 { CSA_RATIO } else { HCA_RATIO });
    [first_two, first_two].into_iter().chain(body).chain([0]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(ratios: &[usize], r: usize) -> usize {
        ratios.iter().filter(|x| **x == r).count()
    }

    #[test]
    fn presets_have_the_layer_counts_of_spec_section_1() {
        let pro = v4_pro_ratios();
        assert_eq!(pro.len(), 62);
        assert_eq!((count(&pro[..61], 4), count(&pro[..61], 128), count(&pro[..61], 0)), (30, 31, 0));
        assert_eq!(&pro[..4], &[128, 128, 4, 128]);
        let flash = v4_flash_ratios();
        assert_eq!(flash.len(), 44);
        assert_eq!((count(&flash[..43], 4), count(&flash[..43], 128), count(&flash[..43], 0)), (21, 20, 2));
        assert_eq!(&flash[..4], &[0, 0, 4, 128]);
        assert_eq!((pro[61], flash[43]), (0, 0));
    }

    #[test]
    fn state_sizes_match_spec_section_5() {
        assert_eq!(CSA_STATE_BYTES, 64 * 1024 + 16 * 1024);
        assert_eq!(HCA_STATE_BYTES, 512 * 1024);
    }

    #[test]
    fn rejects_unknown_ratios_and_empty_windows() {
        let e = CacheLayout::new(vec![4, 7], 128, MainFormat::Fp8, IndexFormat::Fp4).unwrap_err();
        assert!(e.to_string().contains("layer 1 has ratio 7"), "{e}");
        assert!(CacheLayout::new(vec![], 128, MainFormat::Fp8, IndexFormat::Fp4).is_err());
        assert!(CacheLayout::new(vec![4], 0, MainFormat::Fp8, IndexFormat::Fp4).is_err());
    }

    #[test]
    fn rebuild_covers_one_window_per_layer() {
        let pro = CacheLayout::new(v4_pro_ratios(), 128, MainFormat::Fp8, IndexFormat::Fp4).unwrap();
        assert_eq!(pro.rebuild_tokens(), 127 * 62);
        let tiny = CacheLayout::new(vec![4, 128], 3, MainFormat::Fp8, IndexFormat::Fp4).unwrap();
        assert_eq!(tiny.rebuild_tokens(), 2 + 4);
    }
}
