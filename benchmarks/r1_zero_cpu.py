"""R1-Zero in miniature on 2 CPU processes, end to end, against its acceptance numbers.

    .venv/bin/python benchmarks/r1_zero_cpu.py            # configs/r1_zero_cpu.yaml, ~12-15 min
    .venv/bin/python benchmarks/r1_zero_cpu.py --out runs/r1_zero_cpu key=value ...

Runs `deepspeed --num_gpus 2 launchers/post_train.py --config configs/r1_zero_cpu.yaml` in a
fresh run directory (a pretrain phase, then GRPO from its checkpoint), then prints the
held-out greedy accuracy of the RL phase before its first update and at its end, the rise,
the format reward of the last steps, the wall time, and some of the last completions, so the
rise can be seen to come from correct answers. Exits 1 unless the rise is at least 20 points
and the format reward at least 0.95. The curves: <out>/rl/plots/grpo.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/r1_zero_bench", help="run directory (emptied first)")
    parser.add_argument("--config", default="configs/r1_zero_cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = os.path.join(ROOT, args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", "2",
           os.path.join(ROOT, "launchers", "post_train.py"), "--config", args.config, f"train.out_dir={out}",
           *args.overrides]
    tic = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    wall = time.time() - tic
    if proc.returncode:
        print(f"post_train.py exited {proc.returncode}")
        return 1
    rl = os.path.join(out, "rl")
    evals = _records(os.path.join(rl, "evals.jsonl"))
    steps = [r for r in _records(os.path.join(rl, "metrics.jsonl")) if "reward" in r]
    start, end = evals[0]["heldout_accuracy"], evals[-1]["heldout_accuracy"]
    last = steps[-min(5, len(steps)):]
    fmt = sum(r["format_reward"] for r in last) / len(last)
    acc = sum(r["accuracy"] for r in last) / len(last)
    print(f"\nR1-Zero on 2 CPU processes, {wall / 60:.1f} min in total (both phases)")
    print("held-out greedy accuracy (RL phase): " + ", ".join(f"step {e['step']}: {e['heldout_accuracy']:.3f}"
                                                            for e in evals))
    print(f"rise: {100 * (end - start):+.1f} points ({start:.3f} -> {end:.3f})")
    print(f"last {len(last)} steps: format reward {fmt:.3f}, sampled accuracy {acc:.3f}, "
          f"response length {last[-1]['response_length']:.1f}, kl {last[-1]['kl']:.4f}, "
          f"logprob_mismatch {max(r['logprob_mismatch'] for r in steps):.2e}, "
          f"routing_mismatch {max(r.get('routing_mismatch', 0.0) for r in steps):.3f}")
    samples = _records(os.path.join(rl, "samples.jsonl"))
    print("last completions:")
    for s in [s for s in samples if s["step"] == samples[-1]["step"]][:6]:
        print(f"  {s['prompt']!r} -> {s['completion']!r}  (gold {s['answer']}, {'right' if s['correct'] else 'wrong'})")
    print(f"plot: {os.path.relpath(os.path.join(rl, 'plots', 'grpo.png'), ROOT)}")
    ok = end - start >= 0.20 and fmt >= 0.95
    print("PASS" if ok else "FAIL: needs a rise of >= 20 points and a format reward >= 0.95")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
