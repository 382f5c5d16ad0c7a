"""The training CLI end to end: exact resume, and no hang when a rank dies.

Real `deepspeed` launcher, real engines, 2 gloo processes, the real run directory.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launchers", "train.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


def deepspeed_train(*overrides, timeout=300, nprocs=2):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()),
           "--num_gpus", str(nprocs), TRAIN, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def test_resume_continues_the_exact_loss_curve(tmp_path):
    """The default tiny DeepSeek-V3 (MTP, MoE) on 4 processes as pp=2 x ep=2 (dp=2, ZeRO-1):
    the stage-0 rank holds the dense layer and the embedding, the last stage the MoE layer,
    head, MTP and the embedding copy. A run stopped early (train.max_steps_this_run) and the
    same command rerun: tests/dist/test_post_train_cli.py."""
    common = ["train.steps=8", "train.log_every=1", "train.save_every=4", "train.warmup_steps=3",
              "train.micro_batch_size=8"]
    pipe = ["parallel.pp=2", "parallel.ep=2"]
    straight = tmp_path / "straight"
    deepspeed_train(*common, *pipe, f"train.out_dir={straight}", nprocs=4)
    a = losses(straight)
    assert sorted(a) == list(range(1, 9)) and a[8] < a[1]
    assert open(straight / "checkpoints" / "latest").read().strip() == "step_8"
    assert (straight / "plots" / "loss.png").exists() and (straight / "config.yaml").exists()

    def resume_from_step_4(name, *layout, nprocs=2):
        """A run directory holding only the straight run's step-4 checkpoint, resumed."""
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight / "checkpoints" / "step_4", run / "checkpoints" / "step_4")
        (run / "checkpoints" / "latest").write_text("step_4\n")
        out = deepspeed_train(*common, f"train.out_dir={run}", *layout, nprocs=nprocs)
        assert "resumed from" in out and "at step 4" in out
        b = losses(run)
        assert sorted(b) == list(range(5, 9))
        return b

    # The same layout continues the curve bit for bit (fp32 CPU).
    b = resume_from_step_4("resumed", *pipe, nprocs=4)
    for step in range(5, 9):
        assert a[step] == b[step], (step, a[step], b[step])

    # Layout-free: the step-4 checkpoint (pp=2, ep=2, dp=2, ZeRO-1) resumes on 2 processes
    # without a pipeline (pp=1, ep=1: dp=2 with ZeRO-2) and under tp=2, and continues the same
    # curve (not bit-identical: reductions differ).
    for layout in (["parallel.pp=1", "parallel.ep=1", "parallel.zero_stage=2"], ["parallel.tp=2", "parallel.ep=1"]):
        c = resume_from_step_4("other_" + "_".join(layout), *layout)
        for step in range(5, 9):
            assert c[step] == pytest.approx(a[step], rel=1e-5), (layout, step, c[step], a[step])

    # launchers/convert.py exports the pipeline checkpoint to the HF layout; transformers'
    # DeepseekV3ForCausalLM on it gives our logits (load_model rebuilds the one-process model).
    from ds_parallel.checkpoint import load_model
    from tests.unit.test_hf import hf_logits, input_ids, our_logits

    hf_dir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "convert.py"), "ds-to-hf", "--ckpt",
                           str(straight / "checkpoints" / "step_4"), "--out", str(hf_dir)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = input_ids(vocab=128)
    ours = our_logits(load_model(str(straight / "checkpoints" / "step_4")), ids)
    torch.testing.assert_close(hf_logits(hf_dir, ids), ours, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_metrics(out_dir, procs, deadline):
    path = out_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= 2:
            return
        assert all(p.poll() is None for p in procs), "training ended before it could be interrupted"
        time.sleep(0.5)
    raise AssertionError("training did not start")


def test_killed_rank_ends_the_job_without_launcher_help(tmp_path):
    """Two bare processes (as srun or mpirun would start them): when rank 1 is SIGKILLed,
    rank 0 must fail on its next collective and exit non-zero, not hang."""
    out_dir = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN, f"train.out_dir={out_dir}", "train.steps=100000", "train.log_every=1",
             "train.save_every=0", "parallel.timeout_s=30"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        _wait_for_metrics(out_dir, procs, time.time() + 120)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert elapsed < 60, elapsed
    assert "rank 0 failed:" in out


def test_killed_rank_ends_the_deepspeed_launcher(tmp_path):
    out_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", TRAIN, f"train.out_dir={out_dir}",
         "train.steps=100000", "train.log_every=1", "train.save_every=0", "parallel.timeout_s=30"],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_metrics(out_dir, [launcher], time.time() + 120)
        ranks = subprocess.run(["pgrep", "-f", f"{TRAIN} --local_rank=1"], capture_output=True, text=True).stdout.split()
        assert ranks, "rank 1 not found"
        os.kill(int(ranks[0]), signal.SIGKILL)
        t0 = time.time()
        launcher.communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert elapsed < 60, elapsed


def test_trains_on_prepared_shards_with_a_blend_and_resumes_exactly(tmp_path):
    """launchers/prepare_data.py's output (a generated two-source corpus, remixed 3:1) trained
    through data.blend: the loss falls, each source's logged tokens follow its weight (within one
    sample of 64 tokens per step, well inside 2%), the held-out loss on data.valid_path is logged
    every 4 steps (also as TensorBoard scalars), and a run resumed from step 6 continues the loss
    curve and the token counts bit for bit."""
    import yaml

    from ds_parallel.config import load_config
    from ds_parallel.data.prep.pipeline import check_prep, run
    from ds_parallel.data.prep.synthetic import make_corpus, write_jsonl

    inputs = write_jsonl(make_corpus(seed=1, n_singletons=150, pairs_per_target=4, n_dumps=2), str(tmp_path / "raw"))
    out = tmp_path / "data" / "demo"
    cfg = load_config(None, [f"data_prep.inputs={json.dumps(inputs)}", f"data_prep.output={out}",
                             "data_prep.tokenizer.vocab_size=500", "data_prep.remix={web: 3, books: 1}",
                             "data_prep.dedup.mode=exact", "data_prep.executor.workers=2"])
    check_prep(cfg.data_prep)
    manifest = run(cfg)
    blend = yaml.safe_load(open(str(out) + ".blend.yaml"))["data"]["blend"]
    flow = "[" + ", ".join(f"{{path: {b['path']}, weight: {b['weight']}, name: {b['name']}}}" for b in blend) + "]"
    common = ["--config", os.path.join(ROOT, "configs", "smoke_dense_cpu.yaml"), "data.source=indexed",
              f"data.blend={flow}", f"data.valid_path={out}_text_document", f"model.vocab_size={manifest['vocab_size']}",
              "train.steps=12", "train.log_every=1", "train.save_every=6", "train.eval_every=4", "train.eval_samples=8",
              "train.lr=3e-3", "train.warmup_steps=2"]
    straight = tmp_path / "straight"
    deepspeed_train(*common, f"train.out_dir={straight}")
    records = {r["step"]: r for r in map(json.loads, open(straight / "metrics.jsonl"))}
    assert records[12]["loss"] < records[1]["loss"]
    for step, r in records.items():
        web, books = r["tokens/web"], r["tokens/books"]
        assert web + books == step * 32 * 64
        assert abs(web - 0.75 * step * 32 * 64) <= 64, (step, web, books)  # within one sample
    assert abs(records[12]["tokens/web"] / (12 * 32 * 64) - 0.75) < 0.02
    evals = [json.loads(line) for line in open(straight / "evals.jsonl")]
    assert [e["step"] for e in evals] == [4, 8, 12] and all(e["valid_loss"] > 0 for e in evals)
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(straight / "tensorboard"))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")
    (resumed / "checkpoints" / "latest").write_text("step_6\n")
    assert "at step 6" in deepspeed_train(*common, f"train.out_dir={resumed}")
    again = {r["step"]: r for r in map(json.loads, open(resumed / "metrics.jsonl"))}
    for step in range(7, 13):
        for key in ("loss", "tokens/web", "tokens/books"):
            assert again[step][key] == records[step][key], (step, key)
