"""Generation: the batched decode engine (engine.py) and sampling (sampling.py)."""
from ds_parallel.inference.engine import Completion, GenerationStats, Generator
from ds_parallel.inference.sampling import SamplingParams

__all__ = ["Completion", "GenerationStats", "Generator", "SamplingParams"]
