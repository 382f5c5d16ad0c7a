"""FP8 mixed precision (DeepSeek-V3 §3.3): blockwise quantisation (quant), the emulated FP8
linear and grouped GEMMs (linear), FP8 MoE dispatch (dispatch), config -> backend and
`apply_fp8` (recipe), and Transformer Engine, imported only by `te`."""
from ds_parallel.fp8.linear import BlockwiseFP8Gemm, BlockwiseFP8GroupedGemm, fp8_gemm
from ds_parallel.fp8.quant import (
    FP8_MAX,
    dequantize,
    quantize,
    quantize_blocks,
    quantize_columns,
    quantize_tensor,
    quantize_tiles,
)
from ds_parallel.fp8.recipe import apply_fp8, resolve_backend, te_recipe_spec
from ds_parallel.fp8.te import te_available

__all__ = [
    "BlockwiseFP8Gemm", "BlockwiseFP8GroupedGemm", "FP8_MAX", "apply_fp8", "dequantize", "fp8_gemm", "quantize",
    "quantize_blocks", "quantize_columns", "quantize_tensor", "quantize_tiles", "resolve_backend", "te_available",
    "te_recipe_spec",
]
