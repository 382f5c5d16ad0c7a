"""metrics.jsonl, the progress line and the plots of a run directory (rank 0 only).

Each logged step is one JSON object with at least step, loss, lm_loss, lr, grad_norm and
tokens_per_s (docs/architecture.md, "Metrics and the run directory"); `step_record` is the
one schema of that object. On resume the file is cut back to the checkpoint's step so that
steps are never logged twice.

TensorBoard (`train.tensorboard`, on by default when the tensorboard package is installed):
every numeric field of metrics.jsonl and evals.jsonl is also a scalar of the same name
(evaluations under "eval/") in <out_dir>/tensorboard; a resumed run purges the events after
its checkpoint's step, as the JSONL files are cut.

Weights & Biases (`train.wandb_project`): the same scalars, in a W&B run whose id is kept in
<out_dir>/wandb_id, so a resumed training run continues its W&B run (steps already logged
are not logged again: a resumed run starts after its checkpoint's step).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from ds_parallel.atomic import write_atomic

# A step's losses: ModelOutput's fields of these names, summed over the step's micro-batches
# (under pp the last stage returns them as one vector in this order) and averaged over the
# global batch.
LOSSES = ("loss", "lm_loss", "aux_loss", "mtp_loss")
# Metrics only some models report, each with the models it belongs to.
MOE_ONLY = ("aux_loss", "expert_load_imbalance")
MTP_ONLY = ("mtp_loss",)


def step_record(step: int, losses: dict[str, float], lr: float, grad_norm: float, tokens_per_s: float, *,
                moe: bool, mtp: bool, expert_load_imbalance: Optional[float] = None) -> dict:
    """One line of metrics.jsonl, keys in this order: step, loss, lm_loss, aux_loss (MoE),
    mtp_loss (MTP), lr, grad_norm, tokens_per_s, expert_load_imbalance (MoE, logged steps)."""
    record = {"step": step, **{k: losses[k] for k in LOSSES}, "lr": lr, "grad_norm": grad_norm,
              "tokens_per_s": tokens_per_s}
    if expert_load_imbalance is not None:
        record["expert_load_imbalance"] = expert_load_imbalance
    dropped = (() if moe else MOE_ONLY) + (() if mtp else MTP_ONLY)
    return {k: v for k, v in record.items() if k not in dropped}


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """metrics.jsonl (one object per logged step) and, for MoE models, experts.jsonl: the
    per-layer expert loads of the step and the router biases after its update."""

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 show: tuple[str, ...] = (), tensorboard: bool = False, wandb_project: Optional[str] = None,
                 config: Optional[dict] = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.experts_path = os.path.join(out_dir, "experts.jsonl")
        self.evals_path = os.path.join(out_dir, "evals.jsonl")  # held-out evaluations, step 0 included
        self.show = MOE_ONLY + MTP_ONLY + show  # printed after the fixed fields when present
        self.out_dir = out_dir
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.writer = None
        if enabled:
            for path in (self.path, self.experts_path, self.evals_path, os.path.join(out_dir, "samples.jsonl")):
                _truncate_after(path, start_step)
            if tensorboard:
                self.writer = tensorboard_writer(os.path.join(out_dir, "tensorboard"), start_step)
        self.wandb = wandb_run(out_dir, wandb_project, config) if enabled and wandb_project else None

    @classmethod
    def for_run(cls, cfg, enabled: bool, start_step: int, show: tuple[str, ...] = ()) -> "MetricsLog":
        """The log of a run of `cfg` (train.out_dir, steps, tensorboard, wandb_project)."""
        from ds_parallel.config.load import to_dict

        t = cfg.train
        return cls(t.out_dir, enabled, t.steps, start_step, show, tensorboard=t.tensorboard,
                   wandb_project=t.wandb_project, config=to_dict(cfg) if t.wandb_project else None)

    def _scalars(self, record: dict, prefix: str = "") -> None:
        scalars = {prefix + k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def log_experts(self, step: int, loads: dict, biases: dict) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            "load": {str(k): v.tolist() for k, v in loads.items()},
            "bias": {str(k): v.float().tolist() for k, v in biases.items()},
        }
        with open(self.experts_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._scalars(record)
        step = record["step"]
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        extra = "".join(f" | {k} {record[k]:.4f}" for k in self.show if k in record)
        print(
            f"step {step}/{self.total_steps} | loss {record['loss']:.4f}{extra} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
            f"ETA {_fmt_duration(eta)}",
            flush=True,
        )


    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.evals_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._scalars(record, "eval/")
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def evals(self) -> list[dict]:
        return read_metrics(self.out_dir, "evals.jsonl") if self.enabled else []


def tensorboard_writer(log_dir: str, start_step: int):
    """A SummaryWriter on log_dir whose events after start_step are purged (a resumed run), or
    None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # purge_step: TensorBoard drops the events at this step and after, when it reads the files
    return SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)


def wandb_run(out_dir: str, project: str, config: Optional[dict]):
    """A W&B run for the run directory: a new one, or the one its wandb_id names (resume)."""
    import wandb

    id_path = os.path.join(out_dir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as fh:
            run_id = fh.read().strip()
    else:
        import uuid

        run_id = uuid.uuid4().hex[:12]
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(id_path, run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=out_dir, config=config,
                      name=os.path.basename(os.path.abspath(out_dir)))


def _truncate_after(path: str, step: int) -> None:
    """Drop records logged after `step` (a run resumed from an earlier checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(keep))


def read_metrics(out_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (ranks have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, out_dir: str, name: str, dpi: int = 100) -> str:
    """Lay out `fig`, write it to <out_dir>/plots/<name>, close it; the path."""
    fig.tight_layout()
    path = os.path.join(out_dir, "plots", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_run(out_dir: str) -> list[str]:
    """plots/loss.png (and more as models add metrics). Returns the written paths."""
    plt = pyplot()

    records = read_metrics(out_dir)
    if not records:
        return []
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in (k for k in LOSSES if k not in MOE_ONLY):  # aux_loss is orders of magnitude smaller
        if key in records[0] and (key == "loss" or any(r[key] != r["loss"] for r in records)):
            ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(os.path.basename(os.path.abspath(out_dir)))
    paths = [save_plot(fig, out_dir, "loss.png")]
    experts = read_metrics(out_dir, "experts.jsonl")
    if experts:
        paths.append(_plot_expert_load(experts, out_dir, plt))
    return paths


def _plot_expert_load(records: list[dict], out_dir: str, plt) -> str:
    """plots/expert_load.png: per MoE layer, load of each expert relative to the mean
    (1.0 = balanced) over training, and the router bias trajectories under it."""
    import numpy as np

    layers = sorted(records[0]["load"], key=int)[:8]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6), squeeze=False)
    for col, layer in enumerate(layers):
        load = np.array([r["load"][layer] for r in records], dtype=float)  # (S, E)
        rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
        ax = axes[0, col]
        im = ax.imshow(rel.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=max(2.0, rel.max()),
                       extent=(steps[0], steps[-1], -0.5, rel.shape[1] - 0.5), interpolation="nearest")
        ax.set_title(f"layer {layer}: load / mean")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax)
        bias = np.array([r["bias"][layer] for r in records], dtype=float)
        axes[1, col].plot(steps, bias, lw=0.8)
        axes[1, col].set_title(f"layer {layer}: router bias")
        axes[1, col].set_xlabel("step")
    return save_plot(fig, out_dir, "expert_load.png", dpi=90)
