"""rl/rewards.py against values worked out by hand: answer extraction, each built-in reward,
the weighted sum, and the failure handling (a raising reward, an overrunning one, one that
swallows exceptions, a non-finite one), with one-line errors for bad reward configs."""
import threading
import time

import pytest
import torch

from ds_parallel.rl.rewards import RewardResult, Sample, check_rewards, extract_answer, score


def _sample(completion, answer="150", task="arithmetic", tokens=10, entry=None):
    return Sample(prompt="21+93=", completion=completion, answer=answer, task=task, completion_tokens=tokens,
                  truncated=False, entry=entry)


def _one(name, completion, weights=None, options=None, **kw):
    """The value of reward `name` on one sample, through score()."""
    weights = weights or {name: 1.0}
    result = score([_sample(completion, **kw)], weights, check_rewards(weights, options or {}))
    assert sum(result.failures.values()) == 0, result.failures
    return result.per_reward[name].item()


# Rewards of a user's, imported by "module:function" (this module's name as pytest imports it).
def raising_reward(sample):
    raise RuntimeError("planted")


def sleeping_reward(sample, seconds=2.0):
    time.sleep(seconds)
    return 1.0


def swallowing_reward(sample):
    try:
        time.sleep(2.0)
    except Exception:  # a deadline that is an Exception would end up here and score 1
        return 1.0
    return 1.0


def nan_reward(sample):
    return float("nan")


def length_reward(sample, scale=1.0):
    return scale * len(sample.completion)


USER = f"{__name__}:"


@pytest.mark.parametrize("completion,expected", [
    ("<think>x</think><answer> 150 </answer>", "150"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last one
    ("so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{1} or \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
    ("\\boxed{7} and then \\boxed{\\frac{1}{", "7"),  # the last never closes: the one before
    ("<answer>3</answer> \\boxed{4}", "3"),  # the tags first
    ("150", None),
    ("<answer>150", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_accuracy_per_task():
    assert _one("accuracy", "<think>w</think><answer>150</answer>") == 1.0
    assert _one("accuracy", "<answer> 150\n</answer>", answer=" 150") == 1.0  # both stripped
    assert _one("accuracy", "<answer>151</answer>") == 0.0
    assert _one("accuracy", "<answer>15</answer>") == 0.0  # arithmetic: exact, not numeric (backwards digits)
    assert _one("accuracy", "150") == 0.0  # no answer found
    assert _one("accuracy", "\\boxed{150}") == 1.0
    # General answers: numeric match first, then math-verify equivalence.
    assert _one("accuracy", "<answer>2.50</answer>", answer="2.5", task="jsonl") == 1.0
    assert _one("accuracy", "<answer>\\frac{1}{2}</answer>", answer="0.5", task="jsonl") == 1.0
    assert _one("accuracy", "the answer is \\boxed{0.5}", answer="\\frac{1}{2}", task="jsonl") == 1.0
    assert _one("accuracy", "<answer>\\frac{1}{3}</answer>", answer="0.5", task="jsonl") == 0.0
    assert _one("accuracy", "<answer>x+1</answer>", answer="1+x", task="jsonl") == 1.0
    assert _one("accuracy", "0.5", answer="0.5", task="jsonl") == 0.0  # no answer found


def test_accuracy_reasoning_gym_thresholds_the_scorer():
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=3)
    for entry in dataset:
        kw = dict(answer=entry["answer"], task="reasoning_gym:basic_arithmetic", entry=entry)
        assert dataset.score_answer(entry["answer"], entry) == 1.0  # what a correct answer scores
        assert _one("accuracy", f"<answer>{entry['answer']}</answer>", **kw) == 1.0
        assert _one("accuracy", f"<answer>{int(entry['answer']) + 1}</answer>", **kw) == 0.0
        # An answer that contains the oracle gets partial credit from the scorer, not correctness.
        padded = f"= {entry['answer']}"
        assert 0 < dataset.score_answer(padded, entry) < 1
        assert _one("accuracy", f"<answer>{padded}</answer>", **kw) == 0.0
    # A dataset that gives 0.01 for any wrong answer (see the module docstring).
    dataset = reasoning_gym.create_dataset("fraction_simplification", size=2, seed=0)
    entry = dataset[0]
    assert dataset.score_answer("nonsense", entry) == 0.01
    kw = dict(answer=entry["answer"], task="reasoning_gym:fraction_simplification", entry=entry)
    assert _one("accuracy", "<answer>nonsense</answer>", **kw) == 0.0
    assert _one("accuracy", f"<answer>{entry['answer']}</answer>", **kw) == 1.0


@pytest.mark.parametrize("completion,expected", [
    ("<think>2+9+0=11</think><answer>150</answer>", 1.0),
    ("<think>a\nb</think>\n\n<answer>150</answer>\n", 1.0),  # whitespace between and after
    (" <think>a</think> <answer>1</answer>", 1.0),  # a leading space, as after "Assistant:"
    ("<think></think><answer></answer>", 1.0),  # the structure only
    ("<answer>150</answer>", 0.0),  # no think
    ("<think>a</think>", 0.0),  # no answer
    ("<think>a</think><answer>1</answer>x", 0.0),  # trailing text
    ("x<think>a</think><answer>1</answer>", 0.0),  # leading text
    ("<think>a</think>b<answer>1</answer>", 0.0),  # text between
    ("<answer>1</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
    ("<think>a<think>b</think><answer>1</answer>", 0.0),  # a tag inside the think
    ("<think>a</think><answer>1", 0.0),  # truncated
])
def test_format(completion, expected):
    assert _one("format", completion) == expected


def test_language_share_counted_by_hand():
    # Words: The, answer, is, 数, 学, obviously (digits and '+' are not words): 4 English, 2 Chinese.
    text = "<think>The answer is 数学, obviously 42+1</think><answer>43</answer>"
    assert _one("language", text) == pytest.approx(4 / 6)
    assert _one("language", text, options={"language": {"language": "zh"}}) == pytest.approx(2 / 6)
    assert _one("language", "<think>café au lait</think>") == pytest.approx(2 / 3)  # é is not ASCII
    # No spaces between scripts: 用, English, 写 are three words.
    zh = {"language": {"language": "zh"}}
    assert _one("language", "<think>用English写</think>", options=zh) == pytest.approx(2 / 3)
    assert _one("language", "<think>2+9+0=11</think><answer>150</answer>") == 0.0  # no words
    assert _one("language", "no think part at all") == 0.0
    assert _one("language", "<think>words but never closed") == 0.0


def test_overlong_regimes():
    opts = {"overlong": {"max_len": 20, "cache_len": 5}}  # punishment from 15 tokens, -1 at 20
    for tokens, expected in [(3, 0.0), (15, 0.0), (16, -0.2), (18, -0.6), (20, -1.0), (21, -1.0), (99, -1.0)]:
        assert _one("overlong", "x", options=opts, tokens=tokens) == pytest.approx(expected), tokens
    # Defaults: max_len from the completion budget, cache_len max_len // 5 (4): from 16 tokens.
    weights = {"overlong": 1.0}
    options = check_rewards(weights, {}, max_new_tokens=20)
    assert options["overlong"] == {"max_len": 20}
    values = score([_sample("x", tokens=t) for t in (16, 18, 19)], weights, options).per_reward["overlong"]
    assert values.tolist() == pytest.approx([0.0, -0.5, -0.75])


def test_weighted_sum_and_correct():
    weights = {"accuracy": 1.0, "format": 0.5, "overlong": 2.0, USER + "length_reward": -0.01}
    options = check_rewards(weights, {"overlong": {"cache_len": 10}, USER + "length_reward": {"scale": 2.0}},
                            max_new_tokens=30)
    completions = ["<think>w</think><answer>150</answer>",  # right, formatted, 7+1+8+8+3+9 = 36 chars
                   "<answer>150</answer>",  # right, unformatted, 20 chars
                   "<think>w</think><answer>151</answer>"]  # wrong, formatted
    tokens = [22, 10, 30]  # overlong: (20 - L) / 10 from 20: -0.2, 0, -1
    result = score([_sample(c, tokens=t) for c, t in zip(completions, tokens)], weights, options)
    assert isinstance(result, RewardResult) and result.total.dtype == torch.float32
    expected = [1 + 0.5 - 0.4 - 0.72, 1 + 0 + 0 - 0.4, 0 + 0.5 - 2.0 - 0.72]
    assert result.total.tolist() == pytest.approx(expected)
    assert result.per_reward[USER + "length_reward"].tolist() == [72.0, 40.0, 72.0]
    assert result.correct.tolist() == [True, True, False]
    # Accuracy is computed (for `correct`) even where it has no weight, and adds nothing.
    result = score([_sample(c) for c in completions], {"format": 1.0}, check_rewards({"format": 1.0}, {}))
    assert result.correct.tolist() == [True, True, False] and result.total.tolist() == [1.0, 0.0, 1.0]
    assert set(result.per_reward) == {"format", "accuracy"}
    empty = score([], weights, options)
    assert empty.total.shape == (0,) and empty.correct.shape == (0,)


def test_failures_score_zero_and_are_counted():
    weights = {"format": 1.0, USER + "raising_reward": 1.0, USER + "sleeping_reward": 1.0,
               USER + "swallowing_reward": 1.0, USER + "nan_reward": 1.0}
    samples = [_sample("<think>w</think><answer>150</answer>")]
    start = time.perf_counter()
    result = score(samples, weights, check_rewards(weights, {}), timeout_s=0.1)
    assert time.perf_counter() - start < 1.0  # both sleepers were cut at 0.1 s, not 2 s
    assert result.failures == {"format": 0, "accuracy": 0, USER + "raising_reward": 1, USER + "sleeping_reward": 1,
                               USER + "swallowing_reward": 1, USER + "nan_reward": 1}
    assert result.total.tolist() == [1.0] and result.correct.tolist() == [True]
    # A reward that finishes within the deadline is not cut, and no timer is left behind.
    options = check_rewards({USER + "sleeping_reward": 1.0}, {USER + "sleeping_reward": {"seconds": 0.05}})
    result = score(samples * 2, {USER + "sleeping_reward": 1.0}, options, timeout_s=0.5)
    assert result.total.tolist() == [1.0, 1.0] and sum(result.failures.values()) == 0
    time.sleep(0.6)  # an armed timer would raise here


def test_off_the_main_thread_there_is_no_deadline():
    weights = {USER + "sleeping_reward": 1.0}
    options = check_rewards(weights, {USER + "sleeping_reward": {"seconds": 0.3}})
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=score([_sample("x")], weights, options, timeout_s=0.05)))
    thread.start()
    thread.join()
    assert out["r"].total.tolist() == [1.0] and sum(out["r"].failures.values()) == 0


@pytest.mark.parametrize("weights,options,message", [
    ({"acuracy": 1.0}, {}, "unknown reward 'acuracy': use one of accuracy, format, language, overlong, or "
                           "'module:function'"),
    ({"no_such_module_xyz:f": 1.0}, {}, "'no_such_module_xyz:f' cannot be imported"),
    ({USER + "missing": 1.0}, {}, "cannot be imported"),
    ({"accuracy": "1"}, {}, "grpo.rewards.accuracy='1' must be a finite number"),
    ({}, {}, "grpo.rewards is empty"),
    ({"format": 1.0}, {"language": {}}, "grpo.reward_options.language names no reward of post_train.grpo.rewards"),
    ({"format": 1.0}, {"format": 3}, "grpo.reward_options.format=3 must be a mapping"),
    ({"overlong": 1.0}, {}, "grpo.reward_options.overlong={}: missing a required argument: 'max_len'"),
    ({"overlong": 1.0}, {"overlong": {"max_len": 8, "cache_len": 9}}, "cache_len=9 must be in (0, max_len=8]"),
    ({"language": 1.0}, {"language": {"language": "fr"}}, "language='fr': expected one of en, zh"),
    ({"format": 1.0}, {"format": {"strict": True}}, "unexpected keyword argument 'strict'"),
    ({USER + "length_reward": 1.0}, {USER + "length_reward": {"scal": 2}}, "unexpected keyword argument 'scal'"),
])
def test_reward_config_errors(weights, options, message):
    with pytest.raises(ValueError) as err:
        check_rewards(weights, options)
    assert message in str(err.value) and "\n" not in str(err.value)
