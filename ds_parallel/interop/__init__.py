"""Checkpoint interoperability with other frameworks' formats: Hugging Face DeepSeek-V2/V3
(MLA, MoE, MTP) and Llama / Qwen2 (the dense model: R1's distillation students); load_hf and
save_hf dispatch on config.json's model_type. Our own format: ds_parallel.checkpoint."""
from ds_parallel.interop.hf import config_from_hf, hf_config_from_model, load_hf, save_hf

__all__ = ["config_from_hf", "hf_config_from_model", "load_hf", "save_hf"]
