"""Data: the built-in arithmetic corpus, Megatron indexed datasets, packing and batching."""
from ds_parallel.data.corpus import ArithmeticCorpus, build_corpus, chance_accuracy, format_problem, read_number
from ds_parallel.data.indexed import IndexedDataset, IndexedDatasetWriter
from ds_parallel.data.loader import Datasets, GlobalBatchLoader, PackedSamples, build_datasets, join_documents
from ds_parallel.data.tokenizer import CharTokenizer

__all__ = [
    "ArithmeticCorpus", "CharTokenizer", "Datasets", "GlobalBatchLoader", "IndexedDataset",
    "IndexedDatasetWriter", "PackedSamples", "build_corpus", "build_datasets", "chance_accuracy",
    "format_problem", "join_documents", "read_number",
]
