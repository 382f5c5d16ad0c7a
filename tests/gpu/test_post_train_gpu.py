"""GRPO on one GPU through launchers/post_train.py (skipped without CUDA; run by
benchmarks/gpu_suite.sh): the R1-Zero pipeline shrunk (a short pretrain phase, then GRPO
with router replay), in fp32 and bf16. The rollout runs the decode kernels (absorbed MLA over
the cache), the update the training forward: their log-prob gap is rounding, small in fp32
and larger in bf16, and with replay every token is trained on the rollout's experts."""
from __future__ import annotations

import math
import os

from tests.gpu.common import REPO, requires_cuda, train

pytestmark = requires_cuda

POST_TRAIN = os.path.join(REPO, "launchers", "post_train.py")
R1 = os.path.join(REPO, "configs", "r1_zero_cpu.yaml")
SMALL = ("parallel.ep=1", "train.steps=200", "train.log_every=50", "post_train.grpo.prompts_per_step=8",
         "post_train.grpo.group_size=8", "post_train.grpo.eval_every=0",
         "post_train.phases=[{name: base, kind: pretrain}, {name: rl, kind: grpo, overrides: {train.steps: 5, "
         "train.lr: 1.0e-5, train.lr_schedule: constant, train.warmup_steps: 0, train.log_every: 1}}]")


def test_grpo_on_one_gpu_fp32_and_bf16(tmp_path):
    for dtype, bound in (("fp32", 1e-2), ("bf16", 1.0)):
        records = train(str(tmp_path / dtype), *SMALL, f"precision.dtype={dtype}", config=R1, entry=POST_TRAIN,
                        metrics_dir="rl")
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        for r in records:
            assert all(math.isfinite(r[k]) for k in ("loss", "reward", "kl", "grad_norm")), r
            assert r["routing_mismatch"] == 0.0, (dtype, r)
            assert r["logprob_mismatch"] < bound and r["logprob_mismatch_mean_exp"] < 1.0 + bound, (dtype, r)
