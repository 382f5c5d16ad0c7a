"""Prompt sources for GRPO: what the policy is asked, with the gold answer its rewards check.

Sources (post_train.prompts.source):

    arithmetic      the built-in corpus (data/corpus.py) with the n_digits and ops of the
                    DataConfig the base model pretrained on: text "21+93=", answer "150"
    reasoning_gym   a seeded reasoning-gym generator (offline): text the entry's question,
                    answer its oracle answer, the entry kept for the dataset's scorer
    jsonl           a file of {"prompt": ..., "answer": ...} lines

Held-out prompts are disjoint from training ones: arithmetic by construction (build_corpus
draws the held-out problems first and trains on everything else; with the pretraining run's
seed and an n_eval no larger than data.n_eval they are among the base model's held-out
problems too, so neither phase trained on them); reasoning_gym holds out the first n_eval
entries and jsonl the last n_eval lines, and training drops any prompt whose text a held-out
one has. The held-out set does not depend on n_train.

Template "r1" wraps a question in R1-Zero's conversation template (DeepSeek-R1 Table 1);
the character vocabulary of the arithmetic base model cannot spell it. Template "chat" leaves
the text as it is: the policy's tokenizer renders it in the policy's own chat template when
encoding (inference/load.py policy_tokenizer), as a distilled student learned it.

Order (prompt_indices): as the data loader orders samples (data/loader.py), a seeded
permutation per epoch with the epochs laid end to end; GRPO step s takes slots
[s*P, (s+1)*P) for P prompts per step, a pure function of (seed, s), so resuming needs
nothing but the step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ds_parallel.data.corpus import build_corpus, problem_space

R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)


@dataclass(frozen=True)
class Prompt:
    text: str  # what the model is fed, template applied
    answer: str  # the gold answer
    task: str  # "arithmetic" | "reasoning_gym:<name>" | "jsonl": how rewards.accuracy_reward checks it
    entry: Optional[dict] = None  # reasoning_gym: the dataset entry its scorer reads


def apply_template(question: str, template: str) -> str:
    if template in ("plain", "chat"):
        return question
    if template == "r1":
        return R1_TEMPLATE.format(prompt=question)
    raise ValueError(f"post_train.prompts.template={template!r} must be 'plain', 'r1' or 'chat'")


def _arithmetic(pcfg, seed: int, data_cfg) -> tuple[list[Prompt], list[Prompt]]:
    if data_cfg is None:
        raise ValueError("post_train.prompts.source=arithmetic needs the base model's data config (data.n_digits, "
                         "data.ops)")
    if pcfg.template == "r1":
        raise ValueError(f"post_train.prompts.template={pcfg.template!r} has characters outside the arithmetic "
                         f"vocabulary: use post_train.prompts.template=plain with source=arithmetic")
    space = problem_space(data_cfg.n_digits, data_cfg.ops)
    if pcfg.n_train < 1:
        raise ValueError(f"post_train.prompts.n_train={pcfg.n_train} must be >= 1")
    if not 0 <= pcfg.n_eval < space:
        raise ValueError(f"post_train.prompts.n_eval={pcfg.n_eval} must lie in [0, {space - 1}]: data.n_digits="
                         f"{data_cfg.n_digits} with data.ops={data_cfg.ops!r} has {space} distinct problems")
    corpus = build_corpus(data_cfg.n_digits, data_cfg.ops, pcfg.n_train, pcfg.n_eval, seed)
    train = []
    for text in corpus.train:  # "21+93=150": the prompt ends at the '='
        cut = text.index("=") + 1
        train.append(Prompt(text[:cut], text[cut:], "arithmetic"))
    return train, [Prompt(p, a, "arithmetic") for p, a in corpus.heldout]


Row = tuple[str, str, str, Optional[dict]]  # (question, answer, task, entry)


def _reasoning_gym(pcfg, seed: int) -> tuple[list[Row], list[Row]]:
    if pcfg.n_train < 1:
        raise ValueError(f"post_train.prompts.n_train={pcfg.n_train} must be >= 1")
    if not pcfg.task:
        raise ValueError("post_train.prompts.source=reasoning_gym needs post_train.prompts.task, a dataset name "
                         "such as basic_arithmetic")
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(pcfg.task, size=pcfg.n_train + pcfg.n_eval, seed=seed)
    except ValueError as exc:
        raise ValueError(f"post_train.prompts.task={pcfg.task!r}: {exc} (reasoning_gym.factory.DATASETS lists "
                         f"the names)") from None
    task = f"reasoning_gym:{pcfg.task}"
    rows = [(e["question"], "" if e["answer"] is None else str(e["answer"]), task, e) for e in dataset]
    return rows[pcfg.n_eval :], rows[: pcfg.n_eval]


def _jsonl(pcfg) -> tuple[list[Row], list[Row]]:
    path = pcfg.path
    if not path:
        raise ValueError("post_train.prompts.source=jsonl needs post_train.prompts.path, a file of "
                         "{\"prompt\": ..., \"answer\": ...} lines")
    try:
        with open(path) as fh:
            lines = list(enumerate(fh, 1))
    except OSError as exc:
        raise ValueError(f"post_train.prompts.path={path!r} cannot be read ({exc.strerror})") from None
    rows = []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"post_train.prompts.path={path!r} line {lineno} is not JSON ({exc.msg})") from None
        for key in ("prompt", "answer"):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"post_train.prompts.path={path!r} line {lineno} has no {key!r} field: each line "
                                 f"needs \"prompt\" and \"answer\"")
        if not isinstance(row["prompt"], str):
            raise ValueError(f"post_train.prompts.path={path!r} line {lineno}: \"prompt\" must be a string")
        rows.append((row["prompt"], str(row["answer"]), "jsonl", None))
    if not 0 <= pcfg.n_eval < len(rows):
        raise ValueError(f"post_train.prompts.n_eval={pcfg.n_eval} must lie in [0, {len(rows) - 1}]: "
                         f"post_train.prompts.path={path!r} holds {len(rows)} prompts and training needs some")
    cut = len(rows) - pcfg.n_eval
    return rows[:cut], rows[cut:]


def _prompts(rows: list[Row], template: str) -> list[Prompt]:
    return [Prompt(apply_template(q, template), a, task, entry) for q, a, task, entry in rows]


def build_prompts(pcfg, seed: int, data_cfg=None) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout) prompts of `pcfg` (a PromptConfig); `data_cfg`, the base model's
    DataConfig, for source=arithmetic. See the module docstring."""
    if pcfg.n_eval < 0:
        raise ValueError(f"post_train.prompts.n_eval={pcfg.n_eval} must be >= 0")
    if pcfg.source == "arithmetic":
        return _arithmetic(pcfg, seed, data_cfg)
    if pcfg.source == "reasoning_gym":
        train_rows, heldout_rows = _reasoning_gym(pcfg, seed)
    elif pcfg.source == "jsonl":
        train_rows, heldout_rows = _jsonl(pcfg)
    else:
        raise ValueError(f"post_train.prompts.source={pcfg.source!r} must be arithmetic, reasoning_gym or jsonl")
    heldout = _prompts(heldout_rows, pcfg.template)
    held = {p.text for p in heldout}
    train = [p for p in _prompts(train_rows, pcfg.template) if p.text not in held]
    if not train:
        raise ValueError("post_train.prompts: every training prompt is also held out: lower post_train.prompts.n_eval")
    return train, heldout


def prompt_indices(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices into the training prompts for GRPO step `step` (module docstring, "Order")."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts={n_prompts} must be >= 1")
    if step < 0 or per_step < 1:
        raise ValueError(f"step={step} must be >= 0 and per_step={per_step} >= 1")
    slots = step * per_step + np.arange(per_step, dtype=np.int64)
    epochs, within = np.divmod(slots, n_prompts)
    out = np.empty(per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = np.random.default_rng([seed, int(epoch)]).permutation(n_prompts)[within[here]]
    return out.tolist()
