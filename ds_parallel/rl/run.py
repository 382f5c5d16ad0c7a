"""`launchers/post_train.py`: one post-training run, or a pipeline of phases.

    post_train.kind: sft | grpo | rejection_sample    one run in train.out_dir
    post_train.kind: pipeline                         phases, each a run in train.out_dir/<name>:
        phases: [{name, kind: pretrain | sft | grpo | rejection_sample, overrides: {dotted.key: value},
                  init: <earlier phase> | seed | start, data: <earlier rejection_sample phase> (sft only)}]

A phase starts from `post_train.init` if it sets one, else from the phase its `init` names
(`init: seed`: fresh weights, as a student trained from scratch; `init: start`: the
pipeline's own post_train.init), else from the previous phase: its run directory's latest checkpoint, or for a
rejection-sampling phase, which trains nothing, the weights it sampled; the first phase from
the top-level init (or the seed). `data` makes an SFT phase train on a rejection-sampling
phase's samples.jsonl (R1 §2.3.3 retrains the base model on them: init the base phase).
Every phase's config is built and validated before any process group starts, and all
phases share one parallel layout (the process groups are made once). Rerunning resumes: a
finished phase (summary.json at its last step) is skipped, the current one resumes from its
checkpoint; a phase stopped early (train.max_steps_this_run, a rejection-sampling phase's
max_chunks_this_run, preemption) ends the pipeline there, since the next phase would start
from its unfinished output. A file an earlier rejection-sampling phase writes is checked as
the built-in data until then. summary.json of the pipeline holds one entry per phase and the
last phase's held-out accuracy.

Lineage and evaluation: each phase's run directory gets lineage.json (kind, the weights it
starts from, its data, seed, steps). With post_train.eval.at_phase_end every phase that has
weights of its own (all but rejection sampling) ends with the R1 evaluation of its last
checkpoint (rl/evaluate.py: greedy accuracy, pass@1 over k samples) in <phase>/eval.json and
its summary; the pipeline writes results.md (one row per phase) and plots/phases.png.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, replace
from typing import Any, Optional

from ds_parallel.atomic import write_atomic
from ds_parallel.config import ConfigError
from ds_parallel.config.load import merge_trees, config_from_dict, parse_overrides, read_yaml
from ds_parallel.config.schema import Config
from ds_parallel.config.validate import validate

KINDS = ("pretrain", "sft", "grpo", "rejection_sample")
SEED = "seed"  # a phase's `init: seed`: fresh weights from train.seed, not an earlier phase's
START = "start"  # a phase's `init: start`: the pipeline's own post_train.init (R1 retrains the base)
PHASE_KEYS = {"name", "kind", "overrides", "init", "data"}


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # KINDS
    cfg: Config
    init: Optional[str]  # starting weights (None: the seed)


def _validate(cfg: Config, kind: str, world_size: Optional[int], produced: frozenset[str] = frozenset()) -> None:
    """validate() and the rules of one run of `kind`. A GRPO run is validated as the trainer
    sees it (rl/grpo.py update_config: its global batch is a rollout's minibatch); a
    rejection-sampling run, which takes no optimizer step, with one sequence per dp rank.
    `produced`: files earlier phases will write (module docstring)."""
    try:
        if cfg.post_train.eval.at_phase_end:
            from ds_parallel.rl.evaluate import check_eval
            check_eval(cfg.post_train.eval)
            if cfg.parallel.pp > 1:
                raise ValueError(f"post_train.eval.at_phase_end=true with parallel.pp={cfg.parallel.pp}: generation "
                                 f"needs the whole model on each rank: set parallel.pp=1 or turn the evaluation off")
        if kind == "grpo":
            from ds_parallel.rl.grpo import check_grpo, update_config
            check_grpo(cfg, world_size or 1)
            validate(update_config(cfg), world_size)
            return
        if kind == "rejection_sample":
            from ds_parallel.rl.rejection import check_rejection
            p = cfg.parallel
            dp = max(1, (world_size or 1) // (p.tp * p.pp * p.cp))
            check_rejection(cfg, world_size or 1)
            validate(replace(cfg, train=replace(cfg.train, global_batch_size=dp, micro_batch_size=1)), world_size)
            return
        validate(cfg, world_size)
        if kind == "sft":
            from ds_parallel.rl.sft import BUILTIN, check_sft
            s = cfg.post_train.sft
            if s.data is not None and os.path.abspath(s.data) in produced:
                cfg = replace(cfg, post_train=replace(cfg.post_train, sft=replace(s, data=BUILTIN)))
            check_sft(cfg, world_size or 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# The ModelConfig fields that fix the parameters' shapes (and the ones with none).
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "inter_dim", "qkv_bias",
                "tie_embeddings", "attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "n_routed_experts", "n_shared_experts", "moe_inter_dim", "n_dense_layers")


def check_init_shape(model, init: Optional[str]) -> None:
    """An HF directory at post_train.init must hold the model the config builds (a student of
    another family is described in `model`): one-line ValueError naming the first field that
    differs, before any process group starts."""
    from ds_parallel.interop.hf import hf_model_config, is_hf_directory

    if not init or not is_hf_directory(init):
        return
    theirs = hf_model_config(init)
    for name in SHAPE_FIELDS:
        if getattr(model, name) != getattr(theirs, name):
            raise ValueError(f"model.{name}={getattr(model, name)!r}, but the HF checkpoint at post_train.init={init} "
                             f"has {getattr(theirs, name)!r}: set model.{name}={getattr(theirs, name)!r}")


def plan_phases(path: Optional[str], overrides: list[str], world_size: Optional[int]) -> list[Phase]:
    """The runs a post-training config describes, each config validated (ConfigError)."""
    data = merge_trees(read_yaml(path) if path else {}, parse_overrides(list(overrides)))
    cfg = config_from_dict(data)
    pt = cfg.post_train
    if pt.kind != "pipeline":
        _validate(cfg, pt.kind, world_size)
        if pt.kind in ("sft", "grpo"):
            try:
                check_init_shape(cfg.model, pt.init)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return [Phase(pt.kind, pt.kind, cfg, pt.init)]
    phases = pt.phases
    if not isinstance(phases, list) or not phases:
        raise ConfigError("post_train.phases must be a non-empty list of {name, kind, overrides} with "
                          "post_train.kind=pipeline")
    out: list[Phase] = []
    previous = pt.init
    weights: dict[str, Optional[str]] = {}  # phase name -> the weights a later phase starting from it loads
    produced: dict[str, str] = {}  # rejection-sampling phase name -> its samples.jsonl
    for i, phase in enumerate(phases):
        where = f"post_train.phases[{i}]"
        if not isinstance(phase, dict) or set(phase) - PHASE_KEYS or "kind" not in phase:
            optional = ", ".join(sorted(PHASE_KEYS - {"kind"}))
            raise ConfigError(f"{where} must be a mapping with kind (and optional {optional}), got {phase!r}")
        kind, name = phase["kind"], str(phase.get("name", phase["kind"]))
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind={kind!r} is not one of {', '.join(KINDS)}")
        if name in (SEED, START):
            raise ConfigError(f"{where}.name={name!r} is reserved (init: {SEED} / {START}): rename the phase")
        sub = phase.get("overrides") or {}
        if not isinstance(sub, dict) or any("parallel" == k.split(".")[0] for k in sub):
            raise ConfigError(f"{where}.overrides must be a mapping of dotted keys, without parallel.* (the "
                              "phases share one layout)")
        for key, allowed in (("init", weights), ("data", produced)):
            if key == "init" and phase.get("init") in (SEED, START):
                continue
            if key in phase and phase[key] not in allowed:
                what = "phase (nor is it seed or start)" if key == "init" else "rejection_sample phase"
                raise ConfigError(f"{where}.{key}={phase[key]!r} names no earlier {what} (earlier: "
                                  f"{', '.join(allowed) or 'none'})")
        if "data" in phase and kind != "sft":
            raise ConfigError(f"{where}.data is for kind sft (SFT on a rejection-sampling phase's samples), not {kind}")
        phase_data = copy.deepcopy(data)
        phase_data["post_train"] = {k: v for k, v in data.get("post_train", {}).items() if k not in ("phases", "init")}
        for key, value in sub.items():
            phase_data = merge_trees(phase_data, _nested(key, value))
        if "data" in phase:
            phase_data = merge_trees(phase_data, _nested("post_train.sft.data", produced[phase["data"]]))
        phase_data.setdefault("train", {})["out_dir"] = os.path.join(cfg.train.out_dir, name)
        try:
            phase_cfg = config_from_dict(phase_data)
            if "init" in phase and phase_cfg.post_train.init:
                raise ConfigError(f"init={phase['init']!r} and post_train.init={phase_cfg.post_train.init!r}: give one")
            _validate(phase_cfg, kind, world_size, frozenset(map(os.path.abspath, produced.values())))
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
        named = {SEED: None, START: pt.init, **weights}
        init = phase_cfg.post_train.init or (named[phase["init"]] if "init" in phase else previous)
        if kind in ("sft", "grpo"):
            try:
                check_init_shape(phase_cfg.model, init)
            except ValueError as exc:
                raise ConfigError(f"{where} ({name}): {exc}") from None
        out.append(Phase(name, kind, phase_cfg, init))
        if kind == "rejection_sample":  # it trains nothing: a phase after it starts from its weights
            produced[name] = os.path.join(phase_cfg.train.out_dir, "samples.jsonl")
            weights[name] = init
        else:
            weights[name] = phase_cfg.train.out_dir
        previous = weights[name]
    if len({p.name for p in out}) != len(out):
        raise ConfigError("post_train.phases: names must be unique (each is a run directory)")
    return out


def _nested(key: str, value: Any) -> dict[str, Any]:
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}} (values kept as given: mappings, lists)."""
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _finished(phase: Phase) -> Optional[dict]:
    path = os.path.join(phase.cfg.train.out_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        summary = json.load(fh)
    return summary if _complete(phase, summary) else None


def _complete(phase: Phase, summary: dict) -> bool:
    """Whether a phase's summary says it ran to its end (not stopped early or preempted)."""
    if phase.kind == "rejection_sample":
        return bool(summary.get("finished"))
    return summary.get("step") == phase.cfg.train.steps and not summary.get("preempted")


def run_phases(phases: list[Phase], ctx, top_out_dir: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) the phases in order on context `ctx`; the last phase's summary, and
    for a pipeline one entry per phase in top_out_dir/summary.json, with results.md and
    plots/phases.png when the phases are evaluated (post_train.eval.at_phase_end)."""
    results: dict[str, Any] = {}
    evals: list[tuple[str, dict]] = []
    for phase in phases:
        done = _finished(phase)
        if done is not None:
            if ctx.rank == 0:
                print(f"phase {phase.name}: finished earlier ({phase.cfg.train.out_dir})", flush=True)
            results[phase.name] = done
        else:
            if ctx.rank == 0:
                print(f"phase {phase.name} ({phase.kind}) -> {phase.cfg.train.out_dir}"
                      + (f", from {phase.init}" if phase.init else ""), flush=True)
                _write_lineage(phase, top_out_dir)
            results[phase.name] = _run(phase, ctx)
            if not _complete(phase, results[phase.name]):  # stopped early or preempted: rerun to resume
                break
        if phase.cfg.post_train.eval.at_phase_end and phase.kind != "rejection_sample":
            result = _evaluate_phase(phase, ctx)
            results[phase.name]["eval"] = result
            evals.append((phase.name, result))
    last = results[phases[-1].name] if phases[-1].name in results else {}
    if top_out_dir is not None and ctx.rank == 0:
        summary = {"phases": results, "heldout_accuracy": last.get("heldout_accuracy", last.get("exact_match"))}
        os.makedirs(top_out_dir, exist_ok=True)
        write_atomic(os.path.join(top_out_dir, "summary.json"), json.dumps(summary, indent=1))
        if evals:
            _report(top_out_dir, evals, phases[0].cfg)
    return last


def _write_lineage(phase: Phase, top_out_dir: Optional[str]) -> None:
    """<phase dir>/lineage.json: where the phase's weights and data come from."""
    cfg, pt = phase.cfg, phase.cfg.post_train
    data = {"sft": pt.sft.data, "grpo": f"prompts: {pt.prompts.source}", "rejection_sample":
            f"prompts: {pt.prompts.source}", "pretrain": f"data: {cfg.data.source}"}[phase.kind]
    lineage = {"phase": phase.name, "kind": phase.kind, "pipeline": top_out_dir,
               "init": os.path.abspath(phase.init) if phase.init else None, "data": data,
               "seed": cfg.train.seed, "steps": cfg.train.steps}
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.train.out_dir, "lineage.json"), json.dumps(lineage, indent=1))


def _evaluate_phase(phase: Phase, ctx) -> dict[str, Any]:
    """The R1 evaluation (rl/evaluate.py) of the phase's last checkpoint, on the run's
    layout; kept in <phase dir>/eval.json, so a resumed pipeline does not redo it."""
    path = os.path.join(phase.cfg.train.out_dir, "eval.json")
    if os.path.isfile(path):
        with open(path) as fh:
            return json.load(fh)
    import torch

    from ds_parallel.inference.load import load_source, open_source, policy_tokenizer
    from ds_parallel.rl.evaluate import evaluate_heldout, results_table

    source = open_source(ckpt=phase.cfg.train.out_dir)
    dtype = torch.bfloat16 if phase.cfg.precision.dtype == "bf16" else torch.float32
    model = load_source(source, dtype, ctx).model
    tokenizer = policy_tokenizer(phase.cfg.train.out_dir, phase.cfg.post_train.prompts, "evaluation")
    result = evaluate_heldout(model, tokenizer, phase.cfg, ctx).as_dict()
    del model
    if ctx.rank == 0:
        print(results_table([(phase.name, result)]).splitlines()[-1], flush=True)
        write_atomic(path, json.dumps(result, indent=1))
    return result


def _report(top_out_dir: str, evals: list[tuple[str, dict]], cfg: Config) -> None:
    """results.md (one row per evaluated phase) and plots/phases.png."""
    from ds_parallel.rl.evaluate import results_table
    from ds_parallel.train.metrics import pyplot, save_plot

    plt = pyplot()

    e = cfg.post_train.eval
    table = results_table(evals)
    head = (f"Held-out evaluation after each phase: {evals[0][1]['n_prompts']} prompts "
            f"({cfg.post_train.prompts.source}), greedy and pass@1 over k={e.k} samples at temperature "
            f"{e.temperature}, top-p {e.top_p} (R1 §3.1).\n\n")
    write_atomic(os.path.join(top_out_dir, "results.md"), head + table + "\n")
    print(table, flush=True)
    names = [n for n, _ in evals]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    ax.plot(names, [r["greedy_accuracy"] for _, r in evals], "o-", label="greedy accuracy")
    if e.k:
        ax.plot(names, [r["pass_at_1"] for _, r in evals], "s-", label=f"pass@1 (k={e.k}, T={e.temperature})")
    ax.plot(names, [r["format_rate"] for _, r in evals], "^--", alpha=0.6, label="R1 format")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(os.path.basename(os.path.abspath(top_out_dir)))
    save_plot(fig, top_out_dir, "phases.png")


def _run(phase: Phase, ctx) -> dict[str, Any]:
    if phase.kind == "pretrain":
        from ds_parallel.train.trainer import train
        return train(phase.cfg, ctx)
    if phase.kind == "sft":
        from ds_parallel.rl.sft import sft
        return sft(phase.cfg, ctx, phase.init)
    if phase.kind == "rejection_sample":
        from ds_parallel.rl.rejection import rejection_sample
        return rejection_sample(phase.cfg, ctx, phase.init)
    from ds_parallel.rl.grpo import grpo
    return grpo(phase.cfg, ctx, phase.init)
