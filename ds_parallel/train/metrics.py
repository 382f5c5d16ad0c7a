"""metrics.jsonl, the progress line and the plots of a run directory (rank 0 only).

Each logged step is one JSON object with at least step, loss, lm_loss, lr, grad_norm and
tokens_per_s (DESIGN §3). On resume the file is cut back to the checkpoint's step so that
steps are never logged twice.
"""
from __future__ import annotations

import json
import os
import time


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        if enabled:
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        extra = "".join(
            f" | {k} {record[k]:.4f}" for k in ("aux_loss", "mtp_loss", "expert_load_imbalance") if k in record
        )
        print(
            f"step {step}/{self.total_steps} | loss {record['loss']:.4f}{extra} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
            f"ETA {_fmt_duration(eta)}",
            flush=True,
        )


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_run(out_dir: str) -> list[str]:
    """plots/loss.png (and more as models add metrics). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    if not records:
        return []
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "lm_loss", "mtp_loss"):
        if key in records[0] and (key == "loss" or any(r[key] != r["loss"] for r in records)):
            ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(os.path.basename(os.path.abspath(out_dir)))
    path = os.path.join(plot_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
