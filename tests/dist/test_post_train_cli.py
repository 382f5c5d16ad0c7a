"""Post-training end to end through `deepspeed --num_gpus 2 launchers/post_train.py`: the
DeepSeek-R1 pipeline of configs/r1_cpu.yaml in miniature (a pretrain phase making the base,
cold-start SFT, GRPO, rejection sampling, SFT of the base again on the samples, GRPO again;
ep=2 with router replay), each phase evaluated the R1 way; exact resume in the middle of the
first GRPO phase, rerunning a finished pipeline, and a bad config refused before any process
group starts. R1-Zero is the pipeline's first and third phase alone (configs/r1_zero_cpu.yaml;
the long runs are benchmarks/r1_zero_cpu.py and the `slow` test below). Packed SFT through
the launcher: tests/slurm/test_slurm.py (slurm/post_train.sh)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.dist.test_train_cli import ENV, ROOT, _free_port

pytestmark = pytest.mark.dist

POST_TRAIN = os.path.join(ROOT, "launchers", "post_train.py")
R1 = os.path.join(ROOT, "configs", "r1_cpu.yaml")
# The R1 config shrunk: a short base phase, a few small steps in every phase after it.
N_EVAL = 8  # held-out prompts each phase is evaluated on
SMALL = ["train.steps=20", "train.log_every=20", "data.n_train=2000", f"post_train.prompts.n_eval={N_EVAL}",
         "post_train.eval.k=2", "post_train.grpo.prompts_per_step=4", "post_train.grpo.group_size=4",
         "post_train.grpo.max_new_tokens=56", "train.micro_batch_size=4", "post_train.grpo.eval_every=0",
         "post_train.grpo.sample_every=1"]
_STEPS = "train.lr_schedule: constant, train.warmup_steps: 0, train.log_every: 1, train.save_every: 0"
# A base this short answers nothing right: the rejection phase keeps every sample (no
# verification, no filter), so that the SFT after it has data.
_KEEP_ALL = ("post_train.rejection.n_prompts: 8, post_train.rejection.samples_per_prompt: 2, "
             "post_train.rejection.min_reward: 0.0, post_train.rejection.drop_truncated: false, "
             "post_train.rejection.format: false, post_train.rejection.max_repeat_share: null")
PHASES = ("post_train.phases=["
          "{name: base, kind: pretrain}, "
          f"{{name: cold_start, kind: sft, overrides: {{train.steps: 2, train.lr: 1.0e-4, {_STEPS}}}}}, "
          f"{{name: reasoning, kind: grpo, overrides: {{train.steps: 4, train.lr: 1.0e-4, {_STEPS}}}}}, "
          f"{{name: sampled, kind: rejection_sample, overrides: {{{_KEEP_ALL}}}}}, "
          f"{{name: sft_again, kind: sft, init: base, data: sampled, overrides: {{train.steps: 2, train.lr: 1.0e-4, "
          f"{_STEPS}}}}}, "
          f"{{name: all, kind: grpo, overrides: {{train.steps: 2, train.lr: 1.0e-4, {_STEPS}}}}}]")
NAMES = ["base", "cold_start", "reasoning", "sampled", "sft_again", "all"]


def post_train(config, *overrides, timeout=600, expect=0):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()),
           "--num_gpus", "2", POST_TRAIN, "--config", config, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_r1_pipeline_runs_every_phase_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = post_train(R1, *SMALL, PHASES, f"train.out_dir={straight}")
    # The same pipeline stopped after 2 steps of its first GRPO phase and rerun: base and
    # cold_start are skipped, reasoning resumes from its step-2 checkpoint (weights,
    # optimizer, reference, prompts), and every later phase gives the same bytes.
    stop = PHASES.replace("train.steps: 4, train.lr: 1.0e-4, train.lr_schedule",
                          "train.steps: 4, train.max_steps_this_run: 2, train.lr: 1.0e-4, train.lr_schedule")
    assert stop != PHASES
    for name in ("base", "cold_start"):  # the same finished phases, not trained again
        shutil.copytree(straight / name, resumed / name)
    first = post_train(R1, *SMALL, stop, f"train.out_dir={resumed}")
    assert "phase base: finished earlier" in first and "phase cold_start: finished earlier" in first
    assert "phase sampled" not in first  # the pipeline stops with the stopped phase
    second = post_train(R1, *SMALL, PHASES, f"train.out_dir={resumed}")
    assert "resumed from" in second

    a, b = records(straight / "reasoning" / "metrics.jsonl"), records(resumed / "reasoning" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["loss", "reward", "accuracy", "format_reward", "kl", "clip_fraction", "response_length", "entropy",
            "grad_norm", "zero_variance_groups"]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, (ra["step"], ra, rb)  # bit-identical
    for r in a + records(straight / "all" / "metrics.jsonl"):
        assert r["logprob_mismatch"] == 0.0 and r["logprob_mismatch_mean_exp"] == 1.0, r  # kernels.batch_invariant
        assert r["routing_mismatch"] == 0.0, r  # router replay: the rollout's experts, every token
        assert 0.0 <= r["format_reward"] <= 1.0 and r["response_length"] > 0 and r["reward_failures"] == 0
    assert a[-1]["kl"] > 0  # the policy moved away from the reference
    # The same samples (but for the run directory's name in their provenance), losses, rewards
    # and evaluation after the resumed phase; only the timings differ.
    samples = (resumed / "sampled" / "samples.jsonl").read_text().replace(str(resumed), str(straight))
    assert (straight / "sampled" / "samples.jsonl").read_text() == samples
    assert (straight / "all" / "eval.json").read_text() == (resumed / "all" / "eval.json").read_text()
    for name in ("sft_again", "all"):
        untimed = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in records(run / name / "metrics.jsonl")]
                   for run in (straight, resumed)]
        assert untimed[0] == untimed[1], name

    # Lineage: R1 retrains the base on the samples of the RL model.
    lineage = {n: json.loads((straight / n / "lineage.json").read_text()) for n in NAMES}
    assert lineage["base"]["init"] is None
    assert lineage["sampled"]["init"] == str(straight / "reasoning")
    assert lineage["sft_again"]["init"] == str(straight / "base")
    assert lineage["sft_again"]["data"] == str(straight / "sampled" / "samples.jsonl")
    assert lineage["all"]["init"] == str(straight / "sft_again")
    samples = records(straight / "sampled" / "samples.jsonl")
    assert len(samples) == 16 and samples[0]["source_checkpoint"].startswith(str(straight / "reasoning"))

    # Every phase with weights of its own evaluated the R1 way; the table and plot at the top.
    summary = json.loads((straight / "summary.json").read_text())
    assert list(summary["phases"]) == NAMES
    for name in NAMES:
        result = summary["phases"][name].get("eval")
        if name == "sampled":
            assert result is None
            continue
        assert result == json.loads((straight / name / "eval.json").read_text())
        assert result["n_prompts"] == N_EVAL and result["k"] == 2 and 0 <= result["pass_at_1"] <= 1
        assert f"| {name} | {N_EVAL} |" in out
    results = (straight / "results.md").read_text()
    assert results.count("\n| ") == 6 and (straight / "plots" / "phases.png").exists()
    # launchers/evaluate.py on a phase's run directory gives that phase's figures.
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "evaluate.py"), "--ckpt",
                          str(straight / "all"), "--out", str(tmp_path / "all.json")], capture_output=True, text=True,
                         timeout=300, env=ENV, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    got = json.loads((tmp_path / "all.json").read_text())
    assert {k: got[k] for k in summary["phases"]["all"]["eval"]} == summary["phases"]["all"]["eval"]

    assert (straight / "reasoning" / "plots" / "grpo.png").exists()
    assert [e["step"] for e in records(straight / "reasoning" / "evals.jsonl")] == [0, 4]


@pytest.mark.slow
def test_distillation_miniature_through_the_launcher(tmp_path):
    """configs/distill_cpu.yaml shrunk, from a short base model (the R1 pipeline's first
    phase): the teacher sampled, then our dense student from the seed on the reference answers
    alone, and an HF Llama student (transformers' weights, its own BPE and chat template) on the
    traces re-rendered in its format (the benchmark trains each student on both; the chat
    template's ids are checked against transformers in tests/unit). Slow: two launches, ~1 min."""
    straight = tmp_path / "teacher"
    post_train(R1, *SMALL, "post_train.phases=[{name: all, kind: pretrain}]", f"train.out_dir={straight}")
    from benchmarks.distill_cpu import LLAMA3_TEMPLATE, task_texts, write_llama_student

    distill, student = tmp_path / "distill", tmp_path / "distill" / "llama_student"
    write_llama_student(str(student), task_texts()[:300])
    llama = (f"post_train.init: {student}, post_train.sft.tokenizer: {student}, post_train.prompts.template: chat, "
             f"model.preset: debug_dense_gqa, model.vocab_size: 384")
    phases = (f"post_train.phases=[{{name: teacher_samples, kind: rejection_sample, overrides: {{model.preset: "
              f"debug_v3, {_KEEP_ALL}}}}}, "
              "{name: ours_answers, kind: sft, init: seed, data: teacher_samples, "
              "overrides: {post_train.sft.responses: answer}}, "
              f"{{name: llama_traces, kind: sft, data: teacher_samples, overrides: {{{llama}}}}}]")
    out = post_train(os.path.join(ROOT, "configs", "distill_cpu.yaml"), "train.steps=2", "train.log_every=1",
                     "train.micro_batch_size=4", "post_train.prompts.n_eval=16", "post_train.eval.k=2",
                     f"post_train.init={straight / 'all'}", f"train.out_dir={distill}", phases)
    assert out.count("sft: 16 examples") == 2, out[-3000:]
    for name in ("ours_answers", "llama_traces"):
        lineage = json.loads((distill / name / "lineage.json").read_text())
        assert lineage["init"] == (str(student) if name.startswith("llama") else None), lineage
        assert lineage["data"] == str(distill / "teacher_samples" / "samples.jsonl")
        assert json.loads((distill / name / "eval.json").read_text())["n_prompts"] == 16
    # The student's run directory keeps its tokenizer and template for whatever loads it next.
    assert (distill / "llama_traces" / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    assert json.loads((distill / "llama_traces" / "tokenizer_config.json").read_text())["chat_template"] == \
        LLAMA3_TEMPLATE


@pytest.mark.slow
def test_r1_cpu_pipeline_killed_in_phase_2_resumes_and_phase_4_beats_phase_1(tmp_path):
    """configs/r1_cpu.yaml as it is (about 10 minutes on 2 quiet cores), killed (SIGKILL to the
    whole launcher process group) in its first GRPO phase after that phase's first
    checkpoint, then the same command again: base and cold_start are skipped, reasoning resumes
    from its checkpoint, and at the end the last phase's held-out accuracy (greedy and pass@1)
    is above the cold start's."""
    out = tmp_path / "r1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", "2",
           POST_TRAIN, "--config", R1, f"train.out_dir={out}"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 1800
        while not (out / "reasoning" / "checkpoints" / "latest").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(1)
        time.sleep(3)  # a step or two past the checkpoint
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "reasoning" / "summary.json").exists()
    second = post_train(R1, f"train.out_dir={out}", timeout=1800)
    assert "phase base: finished earlier" in second and "phase cold_start: finished earlier" in second
    assert "resumed from" in second
    evals = {name: json.loads((out / name / "eval.json").read_text()) for name in NAMES if name != "sampled"}
    print((out / "results.md").read_text())
    assert evals["all"]["greedy_accuracy"] > evals["cold_start"]["greedy_accuracy"], evals
    assert evals["all"]["pass_at_1"] > evals["cold_start"]["pass_at_1"], evals


def test_bad_post_train_config_fails_before_start(tmp_path):
    err = post_train(R1, "post_train.kind=grpo", "post_train.grpo.minibatches=3", f"train.out_dir={tmp_path}",
                     expect=2)
    assert "post_train.grpo.minibatches=3 must divide" in err
    assert not os.path.exists(tmp_path / "checkpoints")
