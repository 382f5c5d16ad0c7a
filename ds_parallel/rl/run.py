"""`launchers/post_train.py`: one post-training run, or a pipeline of phases.

    post_train.kind: sft | grpo            one run in train.out_dir
    post_train.kind: pipeline              phases, each a run in train.out_dir/<name>:
        phases: [{name, kind: pretrain | sft | grpo, overrides: {dotted.key: value}}]

A phase starts from `post_train.init` if it sets one, else from the previous phase's run
directory (its latest checkpoint); the first phase from the top-level init (or the seed).
Every phase's config is built and validated before any process group starts, and all
phases share one parallel layout (the process groups are made once). Rerunning resumes: a
finished phase (summary.json at its last step) is skipped, the current one resumes from its
checkpoint. summary.json of the pipeline holds one entry per phase and the last phase's
held-out accuracy.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from ds_parallel.atomic import write_atomic
from ds_parallel.config import ConfigError
from ds_parallel.config.load import merge_trees, config_from_dict, parse_overrides, read_yaml
from ds_parallel.config.schema import Config
from ds_parallel.config.validate import validate

KINDS = ("pretrain", "sft", "grpo")


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # pretrain | sft | grpo
    cfg: Config
    init: Optional[str]  # starting weights (None: the seed)


def _validate(cfg: Config, kind: str, world_size: Optional[int]) -> None:
    """validate() and the rules of one run of `kind`. A GRPO run is validated as the trainer
    sees it (rl/grpo.py update_config: its global batch is a rollout's minibatch)."""
    try:
        if kind == "grpo":
            from ds_parallel.rl.grpo import check_grpo, update_config
            check_grpo(cfg, world_size or 1)
            validate(update_config(cfg), world_size)
            return
        validate(cfg, world_size)
        if kind == "sft":
            from ds_parallel.rl.sft import check_sft
            check_sft(cfg, world_size or 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def plan_phases(path: Optional[str], overrides: list[str], world_size: Optional[int]) -> list[Phase]:
    """The runs a post-training config describes, each config validated (ConfigError)."""
    data = merge_trees(read_yaml(path) if path else {}, parse_overrides(list(overrides)))
    cfg = config_from_dict(data)
    pt = cfg.post_train
    if pt.kind != "pipeline":
        _validate(cfg, pt.kind, world_size)
        return [Phase(pt.kind, pt.kind, cfg, pt.init)]
    phases = pt.phases
    if not isinstance(phases, list) or not phases:
        raise ConfigError("post_train.phases must be a non-empty list of {name, kind, overrides} with "
                          "post_train.kind=pipeline")
    out: list[Phase] = []
    previous = pt.init
    for i, phase in enumerate(phases):
        where = f"post_train.phases[{i}]"
        if not isinstance(phase, dict) or set(phase) - {"name", "kind", "overrides"} or "kind" not in phase:
            raise ConfigError(f"{where} must be a mapping with kind (and optional name, overrides), got {phase!r}")
        kind, name = phase["kind"], str(phase.get("name", phase["kind"]))
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind={kind!r} is not one of {', '.join(KINDS)}")
        sub = phase.get("overrides") or {}
        if not isinstance(sub, dict) or any("parallel" == k.split(".")[0] for k in sub):
            raise ConfigError(f"{where}.overrides must be a mapping of dotted keys, without parallel.* (the "
                              "phases share one layout)")
        phase_data = copy.deepcopy(data)
        phase_data["post_train"] = {k: v for k, v in data.get("post_train", {}).items() if k not in ("phases", "init")}
        for key, value in sub.items():
            phase_data = merge_trees(phase_data, _nested(key, value))
        phase_data.setdefault("train", {})["out_dir"] = os.path.join(cfg.train.out_dir, name)
        try:
            phase_cfg = config_from_dict(phase_data)
            _validate(phase_cfg, kind, world_size)
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
        init = phase_cfg.post_train.init or previous
        out.append(Phase(name, kind, phase_cfg, init))
        previous = phase_cfg.train.out_dir
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
    return summary if summary.get("step") == phase.cfg.train.steps else None


def run_phases(phases: list[Phase], ctx, top_out_dir: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) the phases in order on context `ctx`; the last phase's summary, and
    for a pipeline one entry per phase in top_out_dir/summary.json."""
    results: dict[str, Any] = {}
    for phase in phases:
        done = _finished(phase)
        if done is not None:
            if ctx.rank == 0:
                print(f"phase {phase.name}: finished earlier ({phase.cfg.train.out_dir})", flush=True)
            results[phase.name] = done
            continue
        if ctx.rank == 0:
            print(f"phase {phase.name} ({phase.kind}) -> {phase.cfg.train.out_dir}"
                  + (f", from {phase.init}" if phase.init else ""), flush=True)
        results[phase.name] = _run(phase, ctx)
        if results[phase.name].get("preempted"):
            break
    last = results[phases[-1].name] if phases[-1].name in results else {}
    if top_out_dir is not None and ctx.rank == 0:
        summary = {"phases": results, "heldout_accuracy": last.get("heldout_accuracy", last.get("exact_match"))}
        os.makedirs(top_out_dir, exist_ok=True)
        write_atomic(os.path.join(top_out_dir, "summary.json"), json.dumps(summary, indent=1))
    return last


def _run(phase: Phase, ctx) -> dict[str, Any]:
    if phase.kind == "pretrain":
        from ds_parallel.train.trainer import train
        return train(phase.cfg, ctx)
    if phase.kind == "sft":
        from ds_parallel.rl.sft import sft
        return sft(phase.cfg, ctx, phase.init)
    from ds_parallel.rl.grpo import grpo
    return grpo(phase.cfg, ctx, phase.init)
