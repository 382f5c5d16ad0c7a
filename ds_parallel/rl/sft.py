"""Supervised fine-tuning (R1's cold start; V3 §5.1) on the trainer's parts.

    examples (JSONL prompt/response or multi-turn messages, or the built-in arithmetic chats)
    -> DeepSeek-V3 chat template with a real tokenizer, loss on assistant tokens only
       (data/sft.py) -> rows, packed with sample masking or one example per row
    -> setup_training (from post_train.init: our checkpoint or an HF directory) and train_step
       with train/objective.py's LanguageModeling: the mean over the global batch's supervised
       tokens, the MTP loss kept on so the fine-tuned model can still draft for speculation
    -> held-out loss on the last `eval_fraction` of the examples; metrics, checkpoints,
       summary.json and plots as in pre-training. Rerunning resumes.

The built-in data (`post_train.sft.data: builtin:arithmetic`) are problems of the arithmetic
task of `data` (n_digits, ops) as chats, the answer worked out in R1's output format: user
"21+93=", assistant "<think>2+9+0=11 1+3+1=50</think><answer>150</answer>" (data/corpus.py,
digits backwards), drawn from the corpus's training side: never a held-out problem.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import torch

from ds_parallel import checkpoint as ckpt
from ds_parallel.atomic import write_atomic
from ds_parallel.config.load import dump_yaml, to_dict
from ds_parallel.config.schema import Config
from ds_parallel.data.corpus import build_corpus
from ds_parallel.data.sft import (ARITHMETIC, DEEPSEEK_V3, Example, SFTLoader, SFTRows, deepseek_v3_tokenizer_file,
                                  load_sft_tokenizer, read_sft_jsonl, reference_response, render)
from ds_parallel.moe import moe_layers
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.train.metrics import MetricsLog, plot_run, step_record
from ds_parallel.train.objective import LanguageModeling
from ds_parallel.train.setup import setup_training
from ds_parallel.train.step import to_device, train_step

BUILTIN = "builtin:arithmetic"


def builtin_examples(cfg: Config, n: int = 2000) -> list[dict[str, str]]:
    """n chats of the arithmetic task of cfg.data in R1's output format (module docstring),
    drawn from the training side of its corpus: never one of the held-out problems that
    pre-training (data.n_eval) or GRPO and evaluation (post_train.prompts.n_eval) score."""
    d = cfg.data
    held = max(d.n_eval, cfg.post_train.prompts.n_eval)
    corpus = build_corpus(d.n_digits, d.ops, n, held, cfg.train.seed, cot=1.0)
    out = []
    for text in corpus.train:  # "21+93=<think>...</think><answer>150</answer>"
        cut = text.index("=") + 1
        answer = text[text.index("<answer>") + len("<answer>"): text.index("</answer>")]
        out.append({"prompt": text[:cut], "response": text[cut:], "answer": answer})
    return out


def check_sft(cfg: Config, world_size: int) -> None:
    """Rules of an SFT run, before any process group starts (one-line ValueErrors)."""
    s, m = cfg.post_train.sft, cfg.model
    if s.pack and cfg.parallel.pp > 1:
        raise ValueError(f"post_train.sft.pack=true with parallel.pp={cfg.parallel.pp}: pipeline stages do not carry "
                         "the packing mask yet; set post_train.sft.pack=false or parallel.pp=1")
    if s.pack and m.capacity_factor > 0:
        raise ValueError(f"post_train.sft.pack=true with model.capacity_factor={m.capacity_factor}: expert capacity "
                         "is counted per row, so packing would change which tokens drop; set one of them off")
    if s.data is None or (s.data != BUILTIN and not os.path.isfile(s.data)):
        raise ValueError(f"post_train.sft.data={s.data!r}: give a JSONL file of prompt/response or messages lines, "
                         f"or {BUILTIN!r}")
    if not 0 <= s.eval_fraction < 1:
        raise ValueError(f"post_train.sft.eval_fraction={s.eval_fraction} must lie in [0, 1)")
    tok = load_sft_tokenizer(s.tokenizer)
    if m.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is below the {tok.vocab_size} ids of "
                         f"post_train.sft.tokenizer={s.tokenizer!r}: raise model.vocab_size")


def load_examples(cfg: Config) -> tuple[list[Example], list[Example], int]:
    """(train, held-out, dropped) examples of the run: the last eval_fraction held out."""
    s, t = cfg.post_train.sft, cfg.train
    tok = load_sft_tokenizer(s.tokenizer)
    if s.data == BUILTIN:
        chats = builtin_examples(cfg)
        rendered = [render(reference_response(e) if s.responses == "answer" else e, tok) for e in chats]
        examples = [e for e in rendered if len(e.ids) <= t.seq_len]
        dropped = len(rendered) - len(examples)
    else:
        examples, dropped = read_sft_jsonl(s.data, tok, t.seq_len, s.responses)
    n_eval = int(len(examples) * s.eval_fraction)
    return examples[: len(examples) - n_eval], examples[len(examples) - n_eval:], dropped


def save_tokenizer(spec: str, out_dir: str) -> None:
    """The run's tokenizer beside its checkpoints, so that what loads them later (generation,
    evaluation, the next phase) reads and prompts the model as it was trained: tokenizer.json,
    and tokenizer_config.json with the EOS and the chat template (the DeepSeek-V3 template of
    data/chat.py, or the tokenizer directory's own). The built-in character tokenizer needs
    nothing: the saved config's data.source names it."""
    if spec == ARITHMETIC:
        return
    from ds_parallel.data.chat import DEEPSEEK_V3_TEMPLATE
    from ds_parallel.data.sft import BOS, EOS, TemplateSFTTokenizer

    tok = load_sft_tokenizer(spec)
    source = deepseek_v3_tokenizer_file() if spec == DEEPSEEK_V3 else (
        os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec)
    with open(source, "rb") as fh:
        write_atomic(os.path.join(out_dir, "tokenizer.json"), fh.read())
    if isinstance(tok, TemplateSFTTokenizer):
        t = tok.template
        config = {"bos_token": t.bos_token, "eos_token": t.eos_token, "chat_template": t.source}
    else:
        config = {"bos_token": BOS, "eos_token": EOS, "chat_template": DEEPSEEK_V3_TEMPLATE}
    write_atomic(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=1, ensure_ascii=False))


@torch.no_grad()
def heldout_loss(model, rows: SFTRows, ctx, batch_size: int = 8) -> float:
    """Mean next-token loss over every supervised target of the held-out rows. Every rank
    runs all rows (the same forwards everywhere, as expert parallelism needs)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_size):
        batch = to_device([rows.batch(range(lo, min(lo + batch_size, len(rows))))], ctx.device)[0]
        n = int((batch["labels"] != -100).sum())
        out = model(batch["input_ids"], batch["labels"], segment_ids=batch.get("segment_ids"))
        total += float(out.lm_loss) * n
        count += n
    for layer in moe_layers(model):
        layer.gate.reset_load()
    model.train(was_training)
    return total / max(count, 1)


def sft(cfg: Config, ctx: ParallelContext, init: Optional[str] = None) -> dict[str, Any]:
    """The SFT loop: config + parallel context -> run directory."""
    t, s, m = cfg.train, cfg.post_train.sft, cfg.model
    init = init if init is not None else cfg.post_train.init
    out_dir, is_rank0 = t.out_dir, ctx.rank == 0
    train_examples, eval_examples, dropped = load_examples(cfg)
    tok = load_sft_tokenizer(s.tokenizer)
    rows = SFTRows(train_examples, t.seq_len, s.pack, pad_id=tok.eos_id)
    loader = SFTLoader(rows, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    parts = setup_training(cfg, ctx, LanguageModeling(cfg), init=init)
    if is_rank0:
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(os.path.join(out_dir, "config.yaml"), dump_yaml(cfg))
        save_tokenizer(s.tokenizer, out_dir)
        print(f"sft: {len(train_examples)} examples in {len(rows)} rows of {t.seq_len} "
              f"({'packed' if s.pack else 'one per row'}), {len(eval_examples)} held out, {dropped} longer than "
              f"train.seq_len dropped", flush=True)
    metrics = MetricsLog.for_run(cfg, is_rank0, parts.start_step)
    last = parts.start_step
    stop_at = t.steps if not t.max_steps_this_run else min(t.steps, parts.start_step + t.max_steps_this_run)
    for step in range(parts.start_step, stop_at):
        tic = time.perf_counter()
        micro = loader.micro_batches(step)
        result = train_step(parts, micro, step)
        tokens_per_s = t.global_batch_size * t.seq_len / (time.perf_counter() - tic)
        last = step + 1
        if last == 1 or last % t.log_every == 0 or last == t.steps:
            metrics.log(step_record(last, result.losses, result.lr, result.grad_norm, tokens_per_s,
                                    moe=bool(m.moe_layer_ids()), mtp=bool(m.mtp_depth)))
        if last == stop_at or (t.save_every and last % t.save_every == 0):
            ckpt.save_checkpoint(out_dir, last, parts.engine, ctx, to_dict(cfg))
    summary: dict[str, Any] = {"step": last, "examples": len(train_examples), "rows": len(rows), "dropped": dropped}
    if last == t.steps and eval_examples and parts.runner is None:
        summary["heldout_loss"] = heldout_loss(parts.model, SFTRows(eval_examples, t.seq_len, False, tok.eos_id), ctx)
        if is_rank0:
            print(f"held-out loss: {summary['heldout_loss']:.4f} over {len(eval_examples)} examples", flush=True)
    if is_rank0:
        write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        plot_run(out_dir)
    return summary
