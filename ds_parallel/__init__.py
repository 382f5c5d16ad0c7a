"""ds_parallel: DeepSeek-family training on DeepSpeed and Megatron-style parallelism."""
__version__ = "0.1.0"
