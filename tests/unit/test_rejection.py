"""Rejection sampling (rl/rejection.py, R1 §2.3.3): the selection rules on hand-written
completions with hand-counted outcomes, and a run on the tiny dense model that is cut after
its first chunk (with a torn line past the recorded end, as a kill mid-write leaves) and
resumed to the same bytes as an uninterrupted run.

The model is untrained, so "verified" is a user reward with a threshold (min_reward) that
varies between random completions: the share of digits in the completion."""
import json
import os
import random
import re

import pytest

from ds_parallel.config import ConfigError
from ds_parallel.config.schema import RejectionConfig
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.rl.prompts import build_prompts
from ds_parallel.rl.rejection import FILTERS, Candidate, rejection_sample, repeat_share, select
from ds_parallel.rl.run import plan_phases

REWARD = "tests.unit.test_rejection:digit_share"
BASE = ["model.preset=debug_dense", "train.seq_len=32", "post_train.kind=rejection_sample",
        "post_train.prompts.n_train=64", "post_train.prompts.n_eval=8", "post_train.rejection.n_prompts=9",
        "post_train.rejection.samples_per_prompt=4", "post_train.rejection.max_new_tokens=10",
        "post_train.rejection.temperature=1.0", "post_train.rejection.top_p=1.0",
        "post_train.rejection.chunk_prompts=4", f"post_train.rejection.rewards={{{REWARD}: 1.0}}",
        "post_train.rejection.min_reward=0.25", "post_train.rejection.format=false",
        "post_train.rejection.drop_truncated=false", "post_train.rejection.pass_rate_min=0.5",
        "post_train.rejection.pass_rate_max=0.75"]


def digit_share(sample, **_):
    text = sample.completion
    return sum(c.isdigit() for c in text) / max(1, len(text))


def _c(pid, s, prompt, completion, verified, tokens=20, truncated=False):
    return Candidate(pid, s, prompt, completion, tokens, truncated, {"accuracy": float(verified)}, verified)


OK = "<think>one plus one</think><answer>2</answer>"
REPEATED = "<think> a b c d a b c d a b c d a b c d </think><answer>6</answer>"
CANDIDATES = [
    # prompt 0: 3 of 4 verified (in the band); the third passing sample is over max_per_prompt=2
    _c(0, 0, "1+1=", OK, True), _c(0, 1, "1+1=", "<think>one and one</think><answer>2</answer>", True),
    _c(0, 2, "1+1=", "<think>add them</think><answer>2</answer>", True),
    _c(0, 3, "1+1=", "<think>x</think><answer>3</answer>", False),
    # prompt 1: 4 of 4 verified (above pass_rate_max=0.75); per-sample rules come first
    _c(1, 0, "2+2=", "<think>two and two</think><answer>4</answer>", True),
    _c(1, 1, "2+2=", "<think>two and two</think><answer>4</answer>", True, truncated=True),
    _c(1, 2, "2+2=", "four", True),
    _c(1, 3, "2+2=", "<think>twice two</think><answer>4</answer>", True),
    # prompt 2: the same text as prompt 0, 2 of 4 verified; prompt 0's first completion again
    _c(2, 0, "1+1=", OK, True), _c(2, 1, "1+1=", "<think>一加一</think><answer>2</answer>", True),
    _c(2, 2, "1+1=", "<think>no</think><answer>5</answer>", False),
    _c(2, 3, "1+1=", "<think>no</think><answer>7</answer>", False),
    # prompt 3: 3 of 4 verified, each dropped by a later per-sample rule
    _c(3, 0, "3+3=", "<think>three and three</think><answer>6</answer>", True, tokens=40),
    _c(3, 1, "3+3=", REPEATED, True),
    _c(3, 2, "3+3=", "<think>code ```print(6)```</think><answer>6</answer>", True),
    _c(3, 3, "3+3=", "<think>```</think><answer>7</answer>", False),
]
STRICT = RejectionConfig(samples_per_prompt=4, format=True, language="en", min_language_share=1.0, max_length=30,
                         max_repeat_share=0.5, repeat_ngram=4, drop_code=True, dedup=True, drop_truncated=True,
                         pass_rate_min=0.25, pass_rate_max=0.75, max_per_prompt=2)


def test_repeat_share_by_hand():
    assert repeat_share("a b a b a b", 2) == pytest.approx(0.6)  # 5 bigrams, 2 distinct
    assert repeat_share("a b c", 4) == 0.0  # no 4-gram
    # 18 words: "<think>", 16 letters, the closing tags; 15 4-grams, 6 distinct
    assert repeat_share(REPEATED, 4) == pytest.approx(9 / 15)


def test_each_rule_drops_what_it_should_and_is_counted_once():
    shuffled = CANDIDATES[:]
    random.Random(0).shuffle(shuffled)  # selection does not depend on arrival order
    sel = select(shuffled, STRICT, set())
    assert [(c.prompt_id, c.sample_index) for c in sel.kept] == [(0, 0), (0, 1)]
    expected = {"unverified": 4, "truncated": 1, "format": 1, "language": 1, "length": 1, "repetition": 1,
                "code": 1, "pass_rate": 2, "duplicate": 1, "max_per_prompt": 1}
    assert sel.dropped == expected and list(sel.dropped) == list(FILTERS)
    assert len(sel.kept) + sum(sel.dropped.values()) == len(CANDIDATES)
    assert sel.histogram == [0, 0, 1, 2, 1]  # prompts with 0..4 verified samples

    # Every rule switched off: every verified sample is kept, in (prompt, sample) order.
    off = RejectionConfig(samples_per_prompt=4, format=False, language=None, max_length=0, max_repeat_share=None,
                          drop_code=False, dedup=False, drop_truncated=False)
    sel = select(shuffled, off, set())
    assert [(c.prompt_id, c.sample_index) for c in sel.kept] == [(c.prompt_id, c.sample_index) for c in CANDIDATES
                                                                 if c.verified]
    assert sel.dropped == {**dict.fromkeys(FILTERS, 0), "unverified": 4}

    # Pairs kept by an earlier chunk count as duplicates (resume rebuilds this set).
    sel = select(CANDIDATES[:4], STRICT, {("1+1=", OK)})
    assert [(c.prompt_id, c.sample_index) for c in sel.kept] == [(0, 1), (0, 2)] and sel.dropped["duplicate"] == 1


BAD = [
    (["parallel.pp=2"], "parallel.pp=2: generation needs the whole model"),
    (["post_train.rejection.temperature=0"], "post_train.rejection.temperature=0"),
    (["post_train.rejection.pass_rate_min=0.8"], "post_train.rejection.pass_rate_min=0.8"),
    (["post_train.rejection.samples_per_prompt=0"], "post_train.rejection.samples_per_prompt=0"),
    (["post_train.rejection.language=fr"], "post_train.rejection.language"),
    (["post_train.rejection.max_new_tokens=300"], "post_train.rejection.max_new_tokens=300"),
    (["post_train.rejection.rewards={nope: 1.0}"], "post_train.rejection.rewards: unknown reward 'nope'"),
    (["post_train.rejection.reward_options={format: {x: 1}}"], "post_train.rejection.reward_options.format"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_rejection_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        plan_phases(None, BASE + overrides, 1)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def _pipeline(tmp_path, phases):
    return plan_phases(None, BASE + [f"train.out_dir={tmp_path}", "post_train.kind=pipeline",
                                     "post_train.sft.tokenizer=arithmetic", "post_train.grpo.max_new_tokens=8",
                                     f"post_train.phases={phases}"], 2)


def test_plans_as_a_phase_feeding_sft(tmp_path):
    """R1 §2.3.3's lineage: sample from the RL model, then SFT the base model on the samples."""
    phases = _pipeline(tmp_path, "[{name: base, kind: pretrain}, {name: rl, kind: grpo}, "
                                 "{name: rs, kind: rejection_sample}, {name: again, kind: sft, init: base, data: rs}, "
                                 "{name: rl2, kind: grpo}]")
    assert [(p.name, p.init) for p in phases] == [
        ("base", None), ("rl", f"{tmp_path}/base"), ("rs", f"{tmp_path}/rl"), ("again", f"{tmp_path}/base"),
        ("rl2", f"{tmp_path}/again")]
    assert phases[3].cfg.post_train.sft.data == f"{tmp_path}/rs/samples.jsonl"  # written by rs, checked later
    # Without init, a phase after rejection sampling starts from the weights it sampled.
    phases = _pipeline(tmp_path, "[{name: base, kind: pretrain}, {name: rs, kind: rejection_sample}, "
                                 "{name: rl, kind: grpo}]")
    assert [p.init for p in phases] == [None, f"{tmp_path}/base", f"{tmp_path}/base"]
    for phases, message in [
            ("[{kind: sft, overrides: {post_train.sft.data: /no/such.jsonl}}]", "post_train.sft.data='/no/such.jsonl'"),
            ("[{name: base, kind: pretrain}, {kind: sft, data: base}]", "data='base' names no earlier rejection"),
            ("[{name: rs, kind: rejection_sample}, {kind: grpo, data: rs}]", "data is for kind sft"),
            ("[{kind: sft, init: later}, {name: later, kind: pretrain}]", "init='later' names no earlier phase")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _pipeline(tmp_path, phases)


def _run(out_dir, *extra):
    cfg = plan_phases(None, BASE + [f"train.out_dir={out_dir}", *extra], 1)[0].cfg
    return rejection_sample(cfg, ParallelContext.single())


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_interrupted_run_resumes_to_the_same_output(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    done = _run(straight)
    assert done["finished"] and done["chunks"] == 3 and done["drawn"] == 36
    first = _run(cut, "post_train.rejection.max_chunks_this_run=1")
    assert not first["finished"] and first["chunks_done"] == 1
    written = (cut / "samples.jsonl").read_bytes()
    assert json.loads((cut / "progress.json").read_text())["bytes"] == len(written)
    with open(cut / "samples.jsonl", "a") as fh:  # killed while writing chunk 1: a torn line past the record
        fh.write('{"prompt": "12+3')
    assert _run(cut) == done
    assert (cut / "samples.jsonl").read_bytes() == (straight / "samples.jsonl").read_bytes()
    assert (cut / "samples.jsonl").read_bytes().startswith(written)
    stats = json.loads((straight / "rejection_stats.json").read_text())
    assert json.loads((cut / "rejection_stats.json").read_text()) == stats

    # The output, checked against its own definition.
    rows = _lines(straight / "samples.jsonl")
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert keys == sorted(set(keys)) and 0 < len(rows) < 36, keys  # each sample once, in order; some dropped
    cfg = plan_phases(None, BASE, 1)[0].cfg
    prompts, _ = build_prompts(cfg.post_train.prompts, cfg.train.seed, cfg.data)
    for r in rows:
        assert r["prompt"] == prompts[r["prompt_id"]].text and r["source_checkpoint"] is None
        assert r["answer"] == prompts[r["prompt_id"]].answer
        share = sum(ch.isdigit() for ch in r["response"]) / max(1, len(r["response"]))
        assert r["rewards"][REWARD] == pytest.approx(share) and share >= 0.25
        assert set(r) == {"prompt", "response", "answer", "source_checkpoint", "prompt_id", "sample_index", "rewards"}
    assert stats["kept"] == len(rows) and stats["kept"] + sum(stats["dropped"].values()) == stats["drawn"] == 36
    assert sum(stats["pass_rate_histogram"].values()) == stats["prompts"] == 9
    # Random text has no backticks and too few words for a repeated 4-gram, so every verified
    # sample reaches the band [0.5, 0.75]: those of prompts with 2 or 3 of 4 are kept.
    hist = stats["pass_rate_histogram"]
    assert stats["dropped"]["pass_rate"] == hist["1/4"] + 4 * hist["4/4"] > 0
    assert stats["kept"] == 2 * hist["2/4"] + 3 * hist["3/4"]
    assert (straight / "plots" / "pass_rate.png").stat().st_size > 0

    # A finished run reruns as a no-op; other settings in the same directory are refused.
    before = {p: os.stat(cut / p).st_mtime_ns for p in ("samples.jsonl", "progress.json", "summary.json")}
    assert _run(cut) == done
    assert {p: os.stat(cut / p).st_mtime_ns for p in before} == before
    with pytest.raises(ValueError, match=r"other settings \(rejection.max_new_tokens\)"):
        _run(cut, "post_train.rejection.max_new_tokens=8")


def test_samples_come_from_the_init_checkpoint(tmp_path):
    """post_train.init: the seed's weights saved as a checkpoint give the seed run's samples,
    with the step directory as provenance; other weights give other samples."""
    from ds_parallel.checkpoint import save_model
    from ds_parallel.model import build_model

    cfg = plan_phases(None, BASE, 1)[0].cfg
    _run(tmp_path / "seed")
    seed_rows = _lines(tmp_path / "seed" / "samples.jsonl")
    assert {r.pop("source_checkpoint") for r in seed_rows} == {None}
    for seed in (cfg.train.seed, 7):
        model = build_model(cfg.model, ParallelContext.single(), seed=seed)
        step_dir = save_model(model, str(tmp_path / f"w{seed}"), cfg)
        _run(tmp_path / f"from{seed}", f"post_train.init={tmp_path}/w{seed}")
        rows = _lines(tmp_path / f"from{seed}" / "samples.jsonl")
        assert {r.pop("source_checkpoint") for r in rows} == {os.path.abspath(step_dir)}
        assert (rows == seed_rows) == (seed == cfg.train.seed), seed
