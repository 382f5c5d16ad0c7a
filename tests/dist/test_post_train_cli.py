"""Post-training end to end through `deepspeed --num_gpus 2 launchers/post_train.py`: the
R1-Zero pipeline in miniature (a pretrain phase, then GRPO from its checkpoint, ep=2 with
router replay), exact resume in the middle of the GRPO phase, rerunning a finished pipeline,
and a bad config refused before any process group starts. Packed SFT through the launcher:
tests/slurm/test_slurm.py (slurm/post_train.sh). The long R1-Zero run is
benchmarks/r1_zero_cpu.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.dist.test_train_cli import ENV, ROOT, _free_port

pytestmark = pytest.mark.dist

POST_TRAIN = os.path.join(ROOT, "launchers", "post_train.py")
R1 = os.path.join(ROOT, "configs", "r1_zero_cpu.yaml")
# The R1-Zero config shrunk: a short base phase, a few small GRPO steps.
SMALL = ["train.steps=20", "train.log_every=20", "data.n_train=2000", "post_train.prompts.n_eval=16",
         "post_train.grpo.prompts_per_step=4", "post_train.grpo.group_size=4", "post_train.grpo.max_new_tokens=56",
         "train.micro_batch_size=4", "post_train.grpo.eval_every=0", "post_train.grpo.sample_every=1"]
RL = "post_train.phases=[{name: base, kind: pretrain}, {name: rl, kind: grpo, overrides: {train.steps: 4, " \
     "train.lr: 1.0e-4, train.lr_schedule: constant, train.warmup_steps: 0, train.log_every: 1, train.save_every: 0}}]"


def post_train(config, *overrides, timeout=600, expect=0):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()),
           "--num_gpus", "2", POST_TRAIN, "--config", config, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_r1_zero_pipeline_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    post_train(R1, *SMALL, RL, f"train.out_dir={straight}")
    # The same pipeline stopped after 2 GRPO steps and rerun: the base phase is skipped, the
    # GRPO phase resumes from its step-2 checkpoint (weights, optimizer, reference, prompts).
    stop_rl = RL.replace("train.save_every: 0}", "train.save_every: 0, train.max_steps_this_run: 2}")
    shutil.copytree(straight / "base", resumed / "base")  # the same finished base phase, not trained again
    first = post_train(R1, *SMALL, stop_rl, f"train.out_dir={resumed}")
    assert "phase base: finished earlier" in first
    second = post_train(R1, *SMALL, RL, f"train.out_dir={resumed}")
    assert "resumed from" in second

    a, b = records(straight / "rl" / "metrics.jsonl"), records(resumed / "rl" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["loss", "reward", "accuracy", "format_reward", "kl", "clip_fraction", "response_length", "entropy",
            "grad_norm", "zero_variance_groups"]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, (ra["step"], ra, rb)  # bit-identical
    for r in a:
        assert r["logprob_mismatch"] == 0.0 and r["logprob_mismatch_mean_exp"] == 1.0, r  # kernels.batch_invariant
        assert r["routing_mismatch"] == 0.0, r  # router replay: the rollout's experts, every token
        assert 0.0 <= r["format_reward"] <= 1.0 and r["response_length"] > 0 and r["reward_failures"] == 0
    assert a[-1]["kl"] > 0  # the policy moved away from the reference

    summary = json.loads((straight / "summary.json").read_text())
    assert set(summary["phases"]) == {"base", "rl"} and 0.0 <= summary["heldout_accuracy"] <= 1.0
    assert (straight / "rl" / "plots" / "grpo.png").exists()
    samples = records(straight / "rl" / "samples.jsonl")
    assert samples and {"prompt", "completion", "reward", "correct"} <= set(samples[0])
    evals = records(straight / "rl" / "evals.jsonl")
    assert [e["step"] for e in evals] == [0, 4]
    # A finished pipeline reruns as a no-op.
    third = post_train(R1, *SMALL, RL, f"train.out_dir={straight}")
    assert "phase rl: finished earlier" in third


def test_bad_post_train_config_fails_before_start(tmp_path):
    err = post_train(R1, "post_train.kind=grpo", "post_train.grpo.minibatches=3", f"train.out_dir={tmp_path}",
                     expect=2)
    assert "post_train.grpo.minibatches=3 must divide" in err
    assert not os.path.exists(tmp_path / "checkpoints")
