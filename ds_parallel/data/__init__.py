"""Data: the built-in arithmetic corpus, Megatron indexed datasets, packing and batching.

Names are imported on first use (PEP 562), so that `ds_parallel.data.prep` (datatrove
workers, launchers/prepare_data.py) does not pay for importing torch."""
import importlib

_HOMES = {
    "ArithmeticCorpus": "corpus", "build_corpus": "corpus", "chance_accuracy": "corpus", "format_problem": "corpus",
    "read_number": "corpus", "IndexedDataset": "indexed", "IndexedDatasetWriter": "indexed",
    "Datasets": "loader", "GlobalBatchLoader": "loader", "PackedSamples": "loader", "build_datasets": "loader",
    "join_documents": "loader", "CharTokenizer": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ds_parallel.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ds_parallel.data.{_HOMES[name]}"), name)
