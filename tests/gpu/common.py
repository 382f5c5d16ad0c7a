"""Shared by the GPU tests: the skip rule and a launcher run in a subprocess.

Every test here trains through the real entry point (`launchers/train.py`) on one CUDA
device, so the device handling of the trainer, pipeline runner, metrics, norms, checkpoints
and evaluation is what is exercised, not a test harness of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launchers", "train.py")
SMOKE_1GPU = os.path.join(REPO, "configs", "smoke_1gpu.yaml")

requires_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu runs on GPU machines)"),
]


def train(out_dir: str, *overrides: str, config: str = SMOKE_1GPU, cpu: bool = False,
          timeout: int = 600, entry: str = TRAIN, metrics_dir: str = "") -> list[dict]:
    """One process of launchers/train.py; returns metrics.jsonl's records. `cpu=True` hides
    the GPUs (gloo, CPU tensors): the fp32 reference on the same batches. `entry`: another
    launcher (launchers/post_train.py); `metrics_dir`: where under out_dir its metrics are."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    else:
        env["DS_ACCELERATOR"] = "cuda"
    cmd = [sys.executable, entry, "--config", config, f"train.out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(os.path.join(out_dir, metrics_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]
