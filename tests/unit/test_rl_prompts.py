"""rl/prompts.py: each prompt source's split (sizes, disjoint, the held-out set independent of
n_train, gold answers that the accuracy reward accepts), the R1 template, one-line errors, and
the per-step prompt order (a pure function of (seed, step), a permutation per epoch)."""
import json

import numpy as np
import pytest

from ds_parallel.config.schema import DataConfig, PromptConfig
from ds_parallel.data.corpus import build_corpus, read_number
from ds_parallel.rl.prompts import R1_TEMPLATE, build_prompts, prompt_indices
from ds_parallel.rl.rewards import Sample, accuracy_reward


def _correct(prompt, answer):
    return accuracy_reward(Sample(prompt=prompt.text, completion=f"<answer>{answer}</answer>", answer=prompt.answer,
                                  task=prompt.task, completion_tokens=1, truncated=False, entry=prompt.entry))


def test_arithmetic_prompts_are_the_corpus_problems():
    data = DataConfig(n_digits=2, ops="+-")
    train, heldout = build_prompts(PromptConfig(n_train=400, n_eval=50), seed=3, data_cfg=data)
    assert len(train) == 400 and len(heldout) == 50 and {p.task for p in train + heldout} == {"arithmetic"}
    assert not {p.text for p in train} & {p.text for p in heldout}
    corpus = build_corpus(2, "+-", 400, 50, seed=3)
    assert [(p.text, p.answer) for p in heldout] == corpus.heldout
    assert [p.text + p.answer for p in train] == corpus.train
    for p in train[:100] + heldout:  # the gold answer is the arithmetic, read independently
        a, op, b = read_number(p.text[:2]), p.text[2], read_number(p.text[3:5])
        assert p.text[5] == "=" and read_number(p.answer) == (a + b if op == "+" else a - b)
        assert _correct(p, p.answer) == 1.0 and p.entry is None
    # The pretraining run's held-out problems (same seed, data.n_eval >= n_eval) stay held out.
    pretrain = build_corpus(2, "+-", 5000, 256, seed=3)
    assert {(p.text, p.answer) for p in heldout} <= set(pretrain.heldout)


def test_reasoning_gym_prompts():
    import reasoning_gym

    cfg = PromptConfig(source="reasoning_gym", task="leg_counting", n_train=40, n_eval=8)
    train, heldout = build_prompts(cfg, seed=11)
    reference = reasoning_gym.create_dataset("leg_counting", size=48, seed=11)
    assert [p.text for p in heldout] == [reference[i]["question"] for i in range(8)]
    assert 35 <= len(train) <= 40 and not {p.text for p in train} & {p.text for p in heldout}
    assert all(p.task == "reasoning_gym:leg_counting" and p.answer == p.entry["answer"] for p in train + heldout)
    assert _correct(train[0], train[0].answer) == 1.0
    assert _correct(train[0], str(int(train[0].answer) + 1)) == 0.0
    # The held-out set does not move with n_train; the template wraps the question.
    more, same = build_prompts(PromptConfig(source="reasoning_gym", task="leg_counting", n_train=60, n_eval=8), 11)
    assert same == heldout and len(more) > len(train)
    r1, r1_heldout = build_prompts(PromptConfig(source="reasoning_gym", task="leg_counting", n_train=40, n_eval=8,
                                                template="r1"), 11)
    assert r1_heldout[0].text == R1_TEMPLATE.format(prompt=heldout[0].text)
    assert r1_heldout[0].text.startswith("A conversation between User and Assistant.")
    assert r1_heldout[0].text.endswith(f"User: {heldout[0].text}. Assistant:")


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"q{i}", "answer": i} for i in range(6)] + [{"prompt": "q5", "answer": 5}, {"prompt": "q7",
                                                                                                     "answer": "7"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[3:]))
    train, heldout = build_prompts(PromptConfig(source="jsonl", path=str(path), n_eval=2), seed=0)
    assert [(p.text, p.answer) for p in heldout] == [("q5", "5"), ("q7", "7")]  # the last lines
    assert [p.text for p in train] == ["q0", "q1", "q2", "q3", "q4"]  # q5 is held out, so dropped from training
    assert {p.task for p in train} == {"jsonl"} and _correct(train[2], "2.0") == 1.0


@pytest.mark.parametrize("lines,overrides,message", [
    (['{"prompt": "a", "answer": 1}', '{"prompt": "b"}'], {}, "line 2 has no 'answer' field"),
    (['{"answer": 1}'], {}, "line 1 has no 'prompt' field"),
    (['{"prompt": "a", "answer": 1}', '', 'not json'], {}, "line 3 is not JSON"),
    (['{"prompt": "a", "answer": 1}'], {"n_eval": 1}, "post_train.prompts.n_eval=1 must lie in [0, 0]"),
    (['{"prompt": "a", "answer": 1}', '{"prompt": "a", "answer": 1}'], {"n_eval": 1}, "every training prompt"),
])
def test_jsonl_errors(tmp_path, lines, overrides, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        build_prompts(PromptConfig(source="jsonl", path=str(path), **{"n_eval": 0, **overrides}), seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg,data,message", [
    (PromptConfig(template="r1"), DataConfig(), "post_train.prompts.template='r1' has characters outside"),
    (PromptConfig(), None, "needs the base model's data config"),
    (PromptConfig(n_eval=100), DataConfig(n_digits=1, ops="+"), "post_train.prompts.n_eval=100 must lie in [0, 99]"),
    (PromptConfig(n_train=0), DataConfig(), "post_train.prompts.n_train=0 must be >= 1"),
    (PromptConfig(source="reasoning_gym"), None, "needs post_train.prompts.task"),
    (PromptConfig(source="reasoning_gym", task="no_such_task"), None, "post_train.prompts.task='no_such_task'"),
    (PromptConfig(source="jsonl"), None, "needs post_train.prompts.path"),
    (PromptConfig(source="jsonl", path="/nonexistent/p.jsonl"), None, "cannot be read"),
])
def test_prompt_config_errors(cfg, data, message):
    with pytest.raises(ValueError) as err:
        build_prompts(cfg, seed=0, data_cfg=data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_prompt_indices_are_a_pure_function_of_seed_and_step():
    n, per_step = 10, 4  # steps 2, 4, 7 straddle epoch ends (slots 10, 20, 30)
    steps = [prompt_indices(n, s, per_step, seed=5) for s in range(10)]
    assert all(len(s) == per_step and all(isinstance(i, int) for i in s) for s in steps)
    flat = sum(steps, [])
    for epoch in range(4):  # each epoch visits every prompt exactly once
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n : 2 * n]  # a fresh permutation per epoch
    assert flat[:n] == np.random.default_rng([5, 0]).permutation(n).tolist()
    assert prompt_indices(n, 7, per_step, seed=5) == steps[7]  # resume: nothing but the step
    assert prompt_indices(n, 0, per_step, seed=6) != steps[0]
    # A step longer than an epoch: slots 7..13 of 3 prompts are epoch 2's last two, all of epoch 3,
    # epoch 4's first two.
    perm = [np.random.default_rng([0, e]).permutation(3).tolist() for e in range(5)]
    assert prompt_indices(3, 1, 7, seed=0) == perm[2][1:] + perm[3] + perm[4][:2]
    with pytest.raises(ValueError, match="n_prompts=0"):
        prompt_indices(0, 0, 4, seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        prompt_indices(10, -1, 4, seed=0)
