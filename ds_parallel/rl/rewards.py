r"""Rule rewards for GRPO: each scores one completion from its text, with no model.

R1-Zero (DeepSeek-R1 §2.2.2) trains on two rule rewards: accuracy (the final answer, taken
from a fixed place and checked by rule) and format (the reasoning enclosed in <think> tags).
R1 (§2.3.3) adds a language-consistency reward; DAPO (arXiv 2503.14476, §3.4) a soft
punishment of overlong completions. A run weights them (post_train.grpo.rewards:
{name: weight}) and gives each its keyword options (post_train.grpo.reward_options:
{name: {key: value}}):

    r_i = sum_k  w_k * f_k(sample_i, **options_k)

A name of the form "module:function" is a reward of the user's, imported and called the same
way: fn(sample, **options) -> float.

Answer extraction (accuracy): the text inside the last <answer>...</answer>, else inside the
last \boxed{...} that closes (braces balanced: \boxed{\frac{1}{2}} gives \frac{1}{2}), else
none, which scores 0. Correctness by task:

    arithmetic          exact match after strip (the corpus's backwards-digit answer)
    reasoning_gym:<n>   the dataset's own score_answer, correct iff >= 1: a correct answer
                        scores exactly 1.0, while partial credit (0.01 or 0.05 for any wrong
                        answer in some datasets, len(oracle)/len(answer) for an answer that
                        contains the oracle) is not correctness
    anything else       exact or numeric match, else math-verify: verify(parse(gold), parse(pred)),
                        each in math mode ($...$) unless it already is

Model output is text, never code: no reward evaluates it. Each call runs under a deadline
(signal.setitimer in the main thread; none off it, or while another SIGALRM timer is set); a
reward that raises or overruns scores 0 and is counted in RewardResult.failures, so one
pathological completion (sympy on a huge power) cannot stall a step. The deadline raises a
BaseException, which a library's `except Exception` (math-verify has many) cannot swallow.
math_verify and reasoning_gym are imported on first use.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ds_parallel.data.corpus import ANSWER_TAG
from ds_parallel.rl.losses import overlong_penalty


@dataclass
class Sample:
    """One completion as the rewards see it."""
    prompt: str
    completion: str
    answer: str  # the gold answer
    task: str  # "arithmetic" | "reasoning_gym:<name>" | "jsonl"
    completion_tokens: int
    truncated: bool  # hit max_new_tokens without a stop
    entry: Optional[dict] = None  # reasoning_gym: the dataset entry its scorer reads


@dataclass
class RewardResult:
    total: torch.Tensor  # (n,) float32: the weighted sum
    per_reward: dict[str, torch.Tensor]  # name -> (n,) float32, every weighted reward and accuracy
    correct: torch.Tensor  # (n,) bool: accuracy == 1, computed whatever its weight
    failures: dict[str, int]  # name -> calls that raised, overran or returned a non-finite value


class RewardTimeout(BaseException):
    """A reward overran its deadline (a BaseException: see the module docstring)."""


# ---------------------------------------------------------------------------- extraction

_BOXED = "\\boxed{"


def _last_boxed(text: str) -> Optional[str]:
    start = text.rfind(_BOXED)
    while start != -1:
        depth = 0
        for j in range(start + len(_BOXED) - 1, len(text)):  # from the opening brace
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(_BOXED) : j].strip()
        start = text.rfind(_BOXED, 0, start)  # this one never closes (truncated): an earlier one may
    return None


def extract_answer(completion: str) -> Optional[str]:
    """The last <answer>...</answer>'s text, else the last closed \\boxed{...}'s, stripped; None
    without either."""
    tagged = ANSWER_TAG.findall(completion)
    return tagged[-1].strip() if tagged else _last_boxed(completion)


def _numeric_equal(pred: str, gold: str) -> bool:
    try:
        return float(pred) == float(gold)
    except ValueError:
        return False


def _as_latex(text: str) -> str:
    """Math mode for math-verify's parser: bare, it reads "x+1" as the number 1."""
    return text if any(mark in text for mark in ("$", "\\(", "\\[", _BOXED)) else f"${text}$"


def _library_timeout() -> Optional[int]:
    """math-verify's own deadline (signal.alarm, seconds), only where ours is not running: both
    use SIGALRM, and its alarm(0) on return would cancel ours. Off the main thread it raises
    unless given None."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None
    return 5


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(name: str) -> Callable[[Optional[str], dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


# ---------------------------------------------------------------------------- built-in rewards


def accuracy_reward(sample: Sample) -> float:
    """1 if the extracted answer is correct for the sample's task (module docstring), else 0."""
    pred = extract_answer(sample.completion)
    if pred is None:
        return 0.0
    gold = sample.answer.strip()
    if sample.task == "arithmetic":
        return float(pred == gold)
    if sample.task.startswith("reasoning_gym:"):
        if sample.entry is None:
            raise ValueError(f"task {sample.task!r} needs the dataset entry (Sample.entry) for its scorer")
        try:
            return float(_reasoning_gym_scorer(sample.task.split(":", 1)[1])(pred, sample.entry) >= 1.0)
        except Exception:  # a scorer that chokes on a malformed answer (prime_factorization int()s it)
            return 0.0
    if pred == gold or _numeric_equal(pred, gold):
        return 1.0
    from math_verify import parse, verify

    timeout = _library_timeout()
    return float(verify(parse(_as_latex(gold), parsing_timeout=timeout),
                        parse(_as_latex(pred), parsing_timeout=timeout), timeout_seconds=timeout))


_TAG = r"</?(?:think|answer)>"
_BODY = rf"(?:(?!{_TAG}).)*"  # any text without one of the four tags
# Leading whitespace is allowed: after R1's template ("... Assistant:") a subword model's
# first token is usually " <".
_FORMAT = re.compile(rf"\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*", re.DOTALL)


def format_reward(sample: Sample) -> float:
    """1 if the completion is <think>...</think>, optional whitespace, <answer>...</answer> and
    nothing else but whitespace around it (neither part holding another tag), else 0."""
    return float(_FORMAT.fullmatch(sample.completion) is not None)


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK unified ideographs, extension A, compatibility
_WORD = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")  # one ideograph, or a run of other letters
_IN_LANGUAGE = {"en": re.compile(r"[A-Za-z]+"), "zh": re.compile(rf"[{_CJK}]")}
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def language_reward(sample: Sample, language: str = "en") -> float:
    """R1 §2.3.3's language consistency: the share of the words of the chain of thought (the
    first complete <think>...</think>) that are in the target language.

    Words: each CJK ideograph is one (Chinese is not written with spaces), and so is each
    maximal run of other letters; digits, punctuation and symbols are none. "en" counts the
    runs of ASCII letters only ("café" is not English), "zh" the ideographs. 0 without a think
    part or without a word in it: a chain of thought of bare digits shows no language."""
    if language not in _IN_LANGUAGE:
        raise ValueError(f"language={language!r}: expected one of {', '.join(_IN_LANGUAGE)}")
    think = _THINK.search(sample.completion)
    words = _WORD.findall(think.group(1)) if think else []
    if not words:
        return 0.0
    target = _IN_LANGUAGE[language]
    return sum(target.fullmatch(w) is not None for w in words) / len(words)


def overlong_reward(sample: Sample, max_len: int, cache_len: Optional[int] = None) -> float:
    """DAPO's soft overlong punishment of the completion's token count (losses.overlong_penalty):
    0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond. cache_len
    defaults to max_len // 5, DAPO's 4,096 of 20,480."""
    cache = max(1, max_len // 5) if cache_len is None else cache_len
    return float(overlong_penalty(torch.tensor(sample.completion_tokens), max_len, cache))


REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy_reward, "format": format_reward, "language": language_reward, "overlong": overlong_reward}


# ---------------------------------------------------------------------------- combining


def reward_fn(name: str) -> Callable[..., float]:
    """The built-in reward `name`, or the function a "module:function" name imports."""
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not (sep and module and attr):
        raise ValueError(f"post_train.grpo.rewards: unknown reward {name!r}: use one of {', '.join(REWARDS)}, "
                         f"or 'module:function' for a function fn(sample, **options) -> float of your own")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"post_train.grpo.rewards: {name!r} cannot be imported ({exc}): put module {module!r} "
                         f"on the Python path and define {attr} in it") from None
    if not callable(fn):
        raise ValueError(f"post_train.grpo.rewards: {name!r} is a {type(fn).__name__}, not a function "
                         f"fn(sample, **options)")
    return fn


def check_rewards(weights: dict[str, float], options: dict[str, dict],
                  max_new_tokens: Optional[int] = None) -> dict[str, dict]:
    """Validate post_train.grpo.rewards and .reward_options (one-line ValueErrors) and return
    the options each reward is called with: every weighted reward and accuracy (always
    computed, for RewardResult.correct), overlong's max_len defaulting to `max_new_tokens`.
    The built-in rewards are tried once on an empty completion, so a bad option value fails
    here too."""
    if not weights:
        raise ValueError("post_train.grpo.rewards is empty: weight at least one reward, e.g. {accuracy: 1.0}")
    for name, weight in weights.items():
        reward_fn(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"post_train.grpo.rewards.{name}={weight!r} must be a finite number (the reward's "
                             f"weight)")
    names = list(dict.fromkeys([*weights, "accuracy"]))
    for name, opts in options.items():
        if name not in names:
            raise ValueError(f"post_train.grpo.reward_options.{name} names no reward of post_train.grpo.rewards "
                             f"({', '.join(weights)})")
        if not isinstance(opts, dict):
            raise ValueError(f"post_train.grpo.reward_options.{name}={opts!r} must be a mapping of keyword arguments")
    resolved = {name: dict(options.get(name, {})) for name in names}
    if "overlong" in resolved and max_new_tokens is not None:
        resolved["overlong"].setdefault("max_len", max_new_tokens)
    probe = Sample(prompt="", completion="", answer="", task="arithmetic", completion_tokens=0, truncated=False)
    for name, opts in resolved.items():
        fn = reward_fn(name)
        try:
            inspect.signature(fn).bind(probe, **opts)
            if name in REWARDS:
                fn(probe, **opts)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"post_train.grpo.reward_options.{name}={opts}: {exc} (the reward is "
                             f"{fn.__name__}{inspect.signature(fn)})") from None
    return resolved


def _on_alarm(signum, frame):
    raise RewardTimeout()


def _call(fn: Callable[..., float], sample: Sample, opts: dict, timeout_s: float) -> float:
    if timeout_s:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        value = float(fn(sample, **opts))
    finally:
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if not math.isfinite(value):
        raise ValueError(f"reward returned {value}")
    return value


def score(samples: list[Sample], weights: dict[str, float], options: dict[str, dict],
          timeout_s: float = 5.0) -> RewardResult:
    """Every reward of `weights` (and accuracy) on every sample, and their weighted sum.
    `options` as check_rewards returns them; a call that raises, overruns timeout_s seconds
    or returns a non-finite value scores 0 and counts as a failure."""
    options = check_rewards(weights, options)
    fns = {name: reward_fn(name) for name in options}
    values = {name: [0.0] * len(samples) for name in options}
    failures = dict.fromkeys(options, 0)
    armed = (timeout_s > 0 and threading.current_thread() is threading.main_thread()
             and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    previous = signal.signal(signal.SIGALRM, _on_alarm) if armed else None
    try:
        for i, sample in enumerate(samples):
            for name, fn in fns.items():
                try:
                    values[name][i] = _call(fn, sample, options[name], timeout_s if armed else 0)
                except (Exception, RewardTimeout):
                    failures[name] += 1
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
    per_reward = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
    total = torch.zeros(len(samples), dtype=torch.float64)
    for name, weight in weights.items():
        total += weight * per_reward[name].double()
    return RewardResult(total=total.float(), per_reward=per_reward, correct=per_reward["accuracy"] == 1.0,
                        failures=failures)
