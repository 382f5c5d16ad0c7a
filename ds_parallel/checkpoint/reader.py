"""Reading a verified checkpoint under any layout: each full tensor is rebuilt from the
pieces its ShardSpecs place (whatever tp/ep/dp layout saved them), then this rank's piece
is cut with its own specs (docs/architecture.md, "Checkpoints")."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from ds_parallel.checkpoint.format import CheckpointError, verify_checkpoint
from ds_parallel.parallel.shard import ShardSpec, full_shape, local_index, shards_of


class CheckpointReader:
    """Rebuilds full tensors from the saved pieces of any layout and cuts local pieces.
    Construction verifies the checkpoint (verify_checkpoint; free after latest_checkpoint)."""

    def __init__(self, ckpt_dir: str, group=None):
        self.dir = ckpt_dir
        self.meta = verify_checkpoint(ckpt_dir, group)
        self.index: dict[str, list[tuple[str, dict]]] = {}
        for fname in sorted(self.meta["files"]):  # only the listed files: a stray one is never read
            if not fname.startswith("shard-"):
                continue
            path = os.path.join(ckpt_dir, fname)
            with safe_open(path, framework="pt") as f:
                header = json.loads(f.metadata()["specs"])
            for key, spec in header.items():
                self.index.setdefault(key, []).append((path, spec))

    def has(self, key: str) -> bool:
        return key in self.index

    def check(self, wanted: dict[str, torch.Tensor]) -> None:
        """Every key is present at the full shape of its local tensor: checked for all
        before anything is copied."""
        for key, like in wanted.items():
            if key not in self.index:
                raise CheckpointError(f"{self.dir} has no tensor {key!r} (saved from another model?)")
            shape = tuple(self.index[key][0][1]["full_shape"])
            if shape != full_shape(like):
                raise CheckpointError(f"{self.dir}: {key} has shape {shape}, the model's is {full_shape(like)}")

    def full(self, key: str) -> torch.Tensor:
        pieces = self.index.get(key)
        if not pieces:
            raise CheckpointError(f"{self.dir} has no tensor {key!r}")
        shape = tuple(pieces[0][1]["full_shape"])
        out = None
        for path, spec in pieces:  # verified: the pieces cover `shape`, so nothing stays empty
            specs = tuple(ShardSpec(*s) for s in spec["shards"])
            with safe_open(path, framework="pt") as f:
                piece = f.get_tensor(key)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[local_index(specs, shape)] = piece
        return out

    def local(self, key: str, like: torch.Tensor) -> torch.Tensor:
        self.check({key: like})
        full = self.full(key)
        return full[local_index(shards_of(like), tuple(full.shape))]

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        fname = f"rng-{rank:05d}.safetensors"
        if fname not in self.meta["files"]:
            return None
        with safe_open(os.path.join(self.dir, fname), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
