"""The README's main job: `deepspeed --num_gpus 2 launchers/train.py` on the embedded default."""
import json
import os
import time

import pytest

from tests.dist.test_train_cli import deepspeed_train, losses

pytestmark = pytest.mark.dist


def test_default_smoke_job_learns(tmp_path):
    out_dir = tmp_path / "smoke"
    t0 = time.time()
    out = deepspeed_train(f"train.out_dir={out_dir}", timeout=600)  # no --config: the default
    elapsed = time.time() - t0
    curve = losses(out_dir)
    first, last = curve[min(curve)], curve[max(curve)]
    summary = json.loads((out_dir / "summary.json").read_text())
    print(f"smoke: {elapsed:.0f}s, loss {first:.3f} -> {last:.3f}, exact match {summary['exact_match']:.3f} "
          f"(chance {summary['chance']:.4f})")
    assert last <= 0.5 * first
    assert summary["exact_match"] >= max(0.5, 20 * summary["chance"])
    assert "held-out exact match" in out and "ETA" in out
    for path in ("config.yaml", "metrics.jsonl", "plots/loss.png", "checkpoints/latest"):
        assert os.path.exists(out_dir / path), path
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
