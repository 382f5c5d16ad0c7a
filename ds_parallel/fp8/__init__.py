"""FP8 mixed precision (DeepSeek-V3 §3.3): blockwise quantisation (quant), the emulated FP8
linear and grouped GEMMs (linear), the FP8 payload of the MoE dispatch (dispatch), the pure
config -> recipe mapping (recipe), the model swap `apply_fp8` (apply), and Transformer
Engine, imported only by `te`.

Nothing is imported here: config validation reads fp8.recipe without pulling in torch or
the layers, so import the submodule you need."""
