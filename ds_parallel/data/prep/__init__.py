"""Data preparation the DeepSeek LLM way (arXiv:2401.02954 §2.1): deduplication, quality
filters, remixing, byte-level BPE tokenizer training and Megatron indexed shards, as datatrove
pipeline steps (docs/architecture.md, "Data preparation")."""
