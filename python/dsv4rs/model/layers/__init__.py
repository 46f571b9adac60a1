"""The layers of DeepSeek-V4, each a module of weights under transformers' names and the math
around them:

- :mod:`.norm`: RMSNorm.
- :mod:`.rotary`: RoPE through :func:`dsv4rs.ops.rope` (docs/model.md section 2).
- :mod:`.mhc`: the mHC residual streams (docs/model.md section 6).
- :mod:`.compressor`: the CSA/HCA compressors and the Lightning Indexer's weights
  (docs/model.md sections 3-4).
- :mod:`.attention`: the attention layer over the paged KV cache (docs/model.md section 2) and
  the per-step metadata it reads.
- :mod:`.moe`: routing and the clamped SwiGLU experts (docs/model.md section 7), dense or kept
  in MXFP4 as shipped.
- :mod:`.quant`: linear layers over FP8 or MXFP4 weights as shipped (docs/model.md section 9).
- :mod:`.packed`: linears over one input packed into one storage and run as one GEMM.
- :mod:`.streams`: the second CUDA stream a layer's independent chains run on.
"""
