"""rl/evaluate.py: R1's pass@1 and greedy accuracy, counted by hand and split over ranks."""
import pytest
import torch

from ds_parallel.config.load import config_from_dict
from ds_parallel.inference import Generator
from ds_parallel.inference.load import char_tokenizer
from ds_parallel.model import build_model
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.topology import Topology
from ds_parallel.rl.evaluate import EvalResult, evaluate, results_table, tally
from ds_parallel.rl.prompts import Prompt
from ds_parallel.rl.rewards import Sample


def _sample(completion: str, answer: str, tokens: int) -> Sample:
    return Sample(prompt="q", completion=completion, answer=answer, task="jsonl", completion_tokens=tokens,
                  truncated=False)


def test_tally_counts_by_hand():
    greedy = [_sample("<think>2+2</think><answer>4</answer>", "4", 10),  # right, in format
              _sample("<answer>5</answer>", "4", 3),  # wrong
              _sample("the answer is \\boxed{7}", "7", 6)]  # right (boxed), not in format
    # k = 2 samples of each of the three prompts
    scored = [_sample("<think>a</think><answer>4</answer>", "4", 8), _sample("<think>a</think><answer>4.0</answer>", "4", 9),
              _sample("<think>b</think><answer>3</answer>", "4", 8), _sample("no answer", "4", 20),
              _sample("<think>c</think> <answer>\\frac{14}{2}</answer>", "7", 12), _sample("<answer>8</answer>", "7", 4)]
    counts = tally(greedy, scored)
    # greedy right: 2 of 3; sampled right: 4, 4.0, 14/2 = 3 of 6; in format: 4 (samples 1, 2, 3, 5);
    # tokens: 8 + 9 + 8 + 20 + 12 + 4 = 61
    assert counts.tolist() == [2.0, 3.0, 4.0, 61.0]
    table = results_table([("sft", EvalResult(3, 2, 2 / 3, 0.5, 4 / 6, 61 / 6).as_dict())])
    assert "| sft | 3 | 0.667 | 0.500 (2) | 0.667 | 10.2 |" in table


@pytest.mark.parametrize("k", [0, 3])
def test_ranks_split_the_prompts_and_their_counts_add_up(k):
    """Evaluated as one rank, or as rank 0 and rank 1 of dp=2 with the reduction left out (no
    process group): the two ranks' figures add up to the single rank's, because every sample
    draws from a seed of its prompt's place in the list, not of the rank's share."""
    cfg = config_from_dict({"model": dict(preset="debug_v3", vocab_size=48, mtp_depth=0, max_seq_len=64)}).model
    single = ParallelContext.single()
    model = build_model(cfg, single, seed=0).eval()
    tok = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(text=f"{int(a)}+{int(b)}=", answer=str(int(a + b)), task="arithmetic")
               for a, b in torch.randint(10, 99, (7, 2), generator=g)]

    def run(ctx):  # the generator stays single-rank: only evaluate's sharding sees dp=2
        gen = Generator(model, single, max_batch=8, max_len=64, vocab_size=tok.vocab_size, seed=5)
        return evaluate(gen, tok, prompts, ctx, max_new_tokens=24, k=k, seed=11)

    whole = run(single)
    parts = [run(ParallelContext(Topology(2), rank=r)) for r in (0, 1)]
    assert whole.n_prompts == 7 and whole.k == k and 0 < whole.mean_length <= 24
    for field in ("greedy_accuracy", "format_rate", "mean_length") + (("pass_at_1",) if k else ()):
        assert getattr(parts[0], field) + getattr(parts[1], field) == pytest.approx(getattr(whole, field), abs=1e-12), field
    assert (whole.pass_at_1 is None) == (k == 0)
    if k:  # the samples differ from one another (seeds per sample), so lengths are not all equal
        gen = Generator(model, single, max_batch=8, max_len=64, vocab_size=tok.vocab_size)
        lengths = {evaluate(gen, tok, prompts[:1], single, 24, k=1, seed=s).mean_length for s in range(6)}
        assert len(lengths) > 1, lengths


def test_cli_equals_the_api_and_refuses_bad_input_in_one_line(tmp_path):
    """launchers/evaluate.py on a run directory (the arithmetic task, read from the saved
    config) gives the result of evaluate_heldout in this process; a bad value exits 2 naming
    the key."""
    import json
    import os
    import subprocess
    import sys

    from ds_parallel.checkpoint import save_model
    from ds_parallel.config import load_config
    from ds_parallel.inference.load import load_for_generation
    from ds_parallel.rl.evaluate import evaluate_heldout

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(None, ["model.preset=debug_v3", "parallel.ep=1", "train.seq_len=32",
                             "post_train.prompts.n_eval=6", "post_train.eval.k=2", "post_train.grpo.max_new_tokens=16"])
    run = str(tmp_path / "run")
    save_model(build_model(cfg.model, ParallelContext.single(), seed=1), run, cfg)
    loaded = load_for_generation(ckpt=run)
    want = evaluate_heldout(loaded.model, loaded.tokenizer, cfg, ParallelContext.single()).as_dict()

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cli = [sys.executable, os.path.join(root, "launchers", "evaluate.py"), "--ckpt", run]
    proc = subprocess.run([*cli, "--out", str(tmp_path / "r.json")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "r.json").read_text())
    assert {k: got[k] for k in want} == want and want["n_prompts"] == 6 and want["k"] == 2
    assert "| run | prompts | greedy accuracy |" in proc.stdout

    bad = subprocess.run([*cli, "post_train.eval.top_p=0"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "post_train.eval.top_p=0" in bad.stderr, bad.stderr[-2000:]
    assert len([line for line in bad.stderr.splitlines() if "error" in line]) == 1
