"""Our checkpoint format, its one home (docs/architecture.md, "Checkpoints"):

    format.py     the files, publishing a step directory atomically, verification
    reader.py     full tensors rebuilt from any layout's pieces, this rank's pieces cut
    optimizer.py  DeepSpeed optimizer state <-> per-parameter fp32 masters and AdamW moments
    writer.py     save_checkpoint: a training state (engine) -> a step directory
    weights.py    a model's weights <-> a checkpoint without an engine (load_model, save_model)
    stream.py     safetensors written tensor by tensor

Training, conversion, generation and post-training all use it; it never imports `train/`.
"""
from ds_parallel.checkpoint.format import (ADAM_KEYS, FORMAT_VERSION, CheckpointError, latest_checkpoint, read_meta,
                                           verify_checkpoint)
from ds_parallel.checkpoint.optimizer import load_optimizer_state
from ds_parallel.checkpoint.reader import CheckpointReader
from ds_parallel.checkpoint.weights import (build_uninitialised, load_model, load_model_weights, resolve_checkpoint,
                                            save_model, saved_model_config)
from ds_parallel.checkpoint.writer import save_checkpoint

__all__ = [
    "ADAM_KEYS", "FORMAT_VERSION", "CheckpointError", "CheckpointReader", "build_uninitialised", "latest_checkpoint",
    "load_model", "load_model_weights", "load_optimizer_state", "read_meta", "resolve_checkpoint", "save_checkpoint",
    "save_model", "saved_model_config", "verify_checkpoint",
]
