"""Checkpoint interoperability with other frameworks' formats (Hugging Face DeepSeek-V2/V3).
Our own format: ds_parallel.checkpoint."""
from ds_parallel.interop.hf import config_from_hf, hf_config_from_model, load_hf, save_hf

__all__ = ["config_from_hf", "hf_config_from_model", "load_hf", "save_hf"]
