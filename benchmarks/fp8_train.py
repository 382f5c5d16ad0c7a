"""FP8 (emulated blockwise, torch backend) vs BF16 training of the smoke model.

Trains `debug_v3_fp8` (debug_v3 with every FP8 GEMM dimension a multiple of 128) with the
smoke job's schedule (configs/smoke_cpu.yaml, default 1200 steps) once per precision in
PRECISIONS and seed, all from the same initial weights and batches:

    bf16      the reference (--ref): bf16 model, fp32 master weights, fp32 gradient
              accumulation and optimizer, as DeepSpeed's bf16 mode runs it
    fp8       V3's recipe (V3 §3.3): FP8 GEMMs (1x128 activation / 128x128 weight E4M3
              tiles, all three GEMMs of each linear, FP8 MoE dispatch), BF16 elsewhere,
              the same fp32 masters
    fp32      and fp8-fp32 (FP8 GEMMs, fp32 elsewhere), for comparison

and prints the relative gap (run - ref) / ref of the 50-step mean losses over training, the
final losses, and a plot (runs/fp8_train_DATA.png). Exits non-zero when a run's final loss
(mean over seeds) is further than --max-gap from the reference's. V3 App. B.1 reports FP8 vs BF16
relative loss error below 0.25% at 16B / 230B scale.

Data (--data):
  text        (default) the running Python's standard library (.py outside its tests) as
              ASCII tokens, every 20th file held out: a language-modelling loss that falls
              smoothly, plus the held-out LM loss every 200 steps.
  arithmetic  the smoke job's sums, with held-out exact match. Read its final numbers with
              care: the task has a loss plateau near 1.5 that runs leave at a step set by
              small perturbations (seed, schedule length, rounding), so a single-seed gap
              after it says which run escaped first (benchmarks/README.md: fp32 alone spread
              80% of its mean over 3 seeds). Compare several --seeds against the spread of
              the reference, which the script prints.

bf16 costs about what fp32 does at this model's size (dim 128), unlike large matmuls on
these CPUs. One process, plain torch AdamW + clipping + the trainer's lr / MTP / bias
schedules: the same math as the DeepSpeed trainer (tests/dist/test_engine_parity.py shows
the two agree), with the FP8 swap applied exactly as `train/engine.build_engine` applies it.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import base_parser, set_threads, table  # noqa: E402


def smoke_config(steps: int | None, overrides: list[str]):
    from ds_parallel.config import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["model.preset=debug_v3_fp8", "parallel.ep=1", "parallel.zero_stage=0", "precision.fp8.backend=torch"]
    if steps is not None:
        args.append(f"train.steps={steps}")
    return load_config(os.path.join(repo, "configs", "smoke_cpu.yaml"), args + overrides, world_size=1)


# Run name -> (dtype of parameters, activations and gradients outside the FP8 GEMMs, FP8 GEMMs).
# Every run keeps fp32 master weights, fp32 gradient accumulation and an fp32 optimizer.
PRECISIONS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),  # what DeepSpeed's bf16 does: bf16 model, fp32 masters
    "fp8": (torch.bfloat16, True),  # V3 §3.3: FP8 GEMMs, BF16 elsewhere, FP32 masters
    "fp8-fp32": (torch.float32, True),  # FP8 GEMMs, fp32 elsewhere
}


def train_curve(cfg, precision: str, log=print, evaluate: bool = True, heldout_every: int = 200,
                n_heldout: int = 512, stop: int | None = None) -> tuple[list[float], dict]:
    """Global-batch loss of each step for one of PRECISIONS, and (if `evaluate`) at the end
    held-out exact match (arithmetic data) or, for indexed data with `data.path` + "_heldout"
    beside it, the held-out LM loss every `heldout_every` steps and at the end ({step: loss}).
    `stop` ends the run early; the schedules still span train.steps."""
    from ds_parallel.data import GlobalBatchLoader, IndexedDataset, PackedSamples, build_datasets
    from ds_parallel.fp8.apply import apply_fp8
    from ds_parallel.model import build_model
    from ds_parallel.moe import expert_load_imbalance, update_moe_biases
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.train.engine import adamw, optimizer_param_groups
    from ds_parallel.train.evaluate import exact_match, heldout_lm_loss
    from ds_parallel.train.objective import LanguageModeling
    from ds_parallel.train.schedule import bias_update_speed_at, lr_at

    t, ctx = cfg.train, ParallelContext.single()
    dtype, cfg.precision.fp8.enabled = PRECISIONS[precision]
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, ctx, seed=t.seed)
    apply_fp8(model, cfg.precision)  # as train/engine.build_engine: swap, then cast
    model.to(dtype)
    groups = optimizer_param_groups(model, t.weight_decay)
    low = dtype != torch.float32
    if low:  # fp32 masters the optimizer updates; the model holds their rounding
        masters = {p: p.detach().float().requires_grad_() for g in groups for p in g["params"]}
        groups = [{**g, "params": [masters[p] for p in g["params"]]} for g in groups]
    else:
        masters = {p: p for g in groups for p in g["params"]}
    opt = adamw(groups, t)
    data = build_datasets(cfg.data, t, cfg.model.vocab_size)
    loader = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, 0, 1, t.seed)
    heldout, curve = None, {}
    if evaluate and cfg.data.source == "indexed":
        heldout = PackedSamples(IndexedDataset(cfg.data.path + "_heldout").tokens, t.seq_len)
    objective = LanguageModeling(cfg)
    losses, tic = [], time.perf_counter()
    end = min(stop or t.steps, t.steps)
    for step in range(end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        micro = loader.micro_batches(step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for input_ids, labels in micro:  # the trainer's objective: LM + balance + MTP at this step's weight
            bound = partial(objective, batch={"labels": labels}, step=step)
            loss = model(input_ids, objective=lambda m, trunk: bound(m, trunk))[0] / len(micro)
            loss.backward()
            total += loss.item()
            if low:  # accumulate in fp32, as DeepSpeed's bf16 optimizer does
                for p, master in masters.items():
                    if p.grad is not None:
                        master.grad = p.grad.float() if master.grad is None else master.grad + p.grad.float()
                        p.grad = None
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(masters.values()), t.grad_clip)
        opt.step()
        if low:
            with torch.no_grad():
                for p, master in masters.items():
                    p.copy_(master)
        loads = update_moe_biases(model, ctx, bias_update_speed_at(step, cfg.model, t))
        losses.append(total)
        if (step + 1) % t.log_every == 0:
            log(f"  {precision} step {step + 1}/{t.steps} loss {total:.4f} "
                f"expert_load_imbalance {expert_load_imbalance(loads):.2f} "
                f"({time.perf_counter() - tic:.0f}s)")
        if heldout is not None and ((step + 1) % heldout_every == 0 or step + 1 == end):
            curve[step + 1] = heldout_lm_loss(model, heldout, n_heldout)
    if not evaluate:
        return losses, {}
    return losses, {"heldout_loss": curve} if heldout is not None else exact_match(model, ctx, data)


def stdlib_text(prefix: str, heldout_every: int = 20) -> tuple[int, int]:
    """Natural text whose loss falls smoothly (no task to switch on): the `.py` files of the
    running Python's standard library outside its tests, one token per ASCII byte (the
    debug presets' 128-entry vocabulary; other bytes become '?', NUL ends a document), in
    sorted order. Every `heldout_every`-th file by CRC32 of its path goes to
    `<prefix>_heldout`, the rest to `<prefix>`. Returns the two token counts."""
    import sysconfig
    import zlib

    import numpy as np

    from ds_parallel.data import IndexedDataset, IndexedDatasetWriter

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages"}
    files = [f for f in sorted(root.rglob("*.py")) if not skip & set(f.relative_to(root).parts)]
    with IndexedDatasetWriter(prefix, np.uint8) as train, IndexedDatasetWriter(prefix + "_heldout", np.uint8) as held:
        for f in files:
            doc = np.frombuffer(f.read_bytes(), dtype=np.uint8).copy()
            doc[(doc >= 128) | (doc == 0)] = ord("?")
            out = held if zlib.crc32(str(f.relative_to(root)).encode()) % heldout_every == 0 else train
            out.add_document(np.append(doc, 0))
    counts = [len(IndexedDataset(p).tokens) for p in (prefix, prefix + "_heldout")]
    print(f"text: {len(files)} files of {root} (no tests), {counts[0]:,} training / {counts[1]:,} held-out tokens")
    return counts[0], counts[1]


def window_mean(xs: list[float], end: int, width: int) -> float:
    chunk = xs[max(0, end - width):end]
    return sum(chunk) / len(chunk)


def _job(job: tuple) -> tuple:
    """One training run (a worker process): (steps, overrides, seed, precision, threads) ->
    (seed, precision, losses, evaluation, seconds)."""
    steps, overrides, seed, precision, threads = job
    torch.set_num_threads(threads)
    cfg = smoke_config(steps, overrides + [f"train.seed={seed}"])
    tic = time.perf_counter()
    losses, ev = train_curve(cfg, precision, log=lambda line: print(f"  [seed {seed}]{line}", flush=True))
    return seed, precision, losses, ev, time.perf_counter() - tic


def main() -> int:
    parser = base_parser(__doc__, repeats=1, warmup=0)
    parser.add_argument("--steps", type=int, default=None, help="default: configs/smoke_cpu.yaml train.steps")
    parser.add_argument("--data", choices=("arithmetic", "text"), default="text",
                        help="text: Python's standard library as ASCII (smooth loss); arithmetic: the smoke job's sums")
    parser.add_argument("--ref", choices=sorted(PRECISIONS), default="bf16", help="the reference run")
    parser.add_argument("--runs", default="fp8", help=f"comma-separated runs compared with it, of {sorted(PRECISIONS)}")
    parser.add_argument("--window", type=int, default=50, help="steps averaged for the smoothed gap")
    parser.add_argument("--seeds", default=None, help="comma-separated train.seed values (default: the config's)")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel processes (1 thread each)")
    parser.add_argument("--max-gap", type=float, default=None,
                        help="fail when a run's final loss, averaged over seeds, is further than this fraction from "
                             "the reference's (default 0.01 for text data; none for arithmetic, see above)")
    parser.add_argument("--plot", default=None, help="PNG of the curves and gaps (default: runs/fp8_train_DATA.png)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    args.runs = args.runs.split(",")
    if unknown := sorted(set(args.runs) - set(PRECISIONS)):
        parser.error(f"--runs {','.join(unknown)}: choose from {sorted(PRECISIONS)}")
    if args.max_gap is None and args.data == "text":
        args.max_gap = 0.01
    args.plot = args.plot or os.path.join("runs", f"fp8_train_{args.data}.png")
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fp8_train_") as tmp:
        overrides = list(args.overrides)
        if args.data == "text":
            prefix = os.path.join(tmp, "stdlib")
            stdlib_text(prefix)
            overrides = ["data.source=indexed", f"data.path={prefix}", *overrides]
        return report(args, smoke_config(args.steps, overrides), overrides)


def report(args, cfg, overrides: list[str]) -> int:
    t, w, ref, names = cfg.train, args.window, args.ref, args.runs
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [t.seed]
    text = cfg.data.source == "indexed"
    print(f"model {cfg.model.preset}, data {cfg.data.source}, {t.steps} steps, global batch "
          f"{t.global_batch_size} x {t.seq_len}, lr {t.lr}, fp8 block {cfg.precision.fp8.block_size}, "
          f"power_of_two={cfg.precision.fp8.power_of_two_scales}, seeds {seeds}, {', '.join(names)} vs {ref}")
    # The slow FP8 runs first, so that the pool's workers finish together.
    jobs = [(args.steps, overrides, seed, name, args.threads) for name in [*names, ref] for seed in seeds]
    if args.workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.map(_job, jobs, chunksize=1)
    else:
        done = [_job(job) for job in jobs]
    runs = {(seed, name): (losses, ev, secs) for seed, name, losses, ev, secs in done}
    gap = lambda a, b: f"{(b - a) / a:+.2%}"  # noqa: E731
    final = lambda seed, name: window_mean(runs[(seed, name)][0], t.steps, w)  # noqa: E731
    held = lambda seed, name, m: runs[(seed, name)][1]["heldout_loss"].get(m)  # noqa: E731

    marks = sorted({1, 10, 50, 100, *range(200, t.steps + 1, 200), t.steps} & set(range(1, t.steps + 1)))
    for seed in seeds:
        head, rows = ["step", f"{ref} mean{w}"], []
        for name in names:
            head += [f"{name} mean{w}", "gap"] + (["held-out " + ref, "held-out " + name, "gap"] if text else [])
        for m in marks:
            rw = window_mean(runs[(seed, ref)][0], m, w)
            row = [str(m), f"{rw:.4f}"]
            for name in names:
                lw = window_mean(runs[(seed, name)][0], m, w)
                row += [f"{lw:.4f}", gap(rw, lw)]
                if text:
                    rh, lh = held(seed, ref, m), held(seed, name, m)
                    row += [f"{rh:.4f}", f"{lh:.4f}", gap(rh, lh)] if rh is not None else ["", "", ""]
            rows.append(row)
        print(f"\nseed {seed}: mean over the last {w} steps of the global-batch loss (LM + MTP + balance)"
              + (", and the held-out LM loss" if text else ""))
        print(table(head, rows))

    summary, head = [], ["seed", "run", f"{ref} loss", "loss", "gap"]
    head += ["held-out " + ref, "held-out", "held-out gap"] if text else [f"exact {ref}", "exact"]
    for name in names:
        for seed in [*seeds, "mean"] if len(seeds) > 1 else seeds:
            group = seeds if seed == "mean" else [seed]
            avg = lambda f: sum(f(s) for s in group) / len(group)  # noqa: E731,B023
            rf, lf = avg(lambda s: final(s, ref)), avg(lambda s: final(s, name))  # noqa: B023
            row = [str(seed), name, f"{rf:.4f}", f"{lf:.4f}", gap(rf, lf)]
            if text:
                rh, lh = avg(lambda s: held(s, ref, t.steps)), avg(lambda s: held(s, name, t.steps))  # noqa: B023
                row += [f"{rh:.4f}", f"{lh:.4f}", gap(rh, lh)]
            elif seed != "mean":
                row += [f"{runs[(seed, ref)][1]['exact_match']:.3f}", f"{runs[(seed, name)][1]['exact_match']:.3f}"]
            else:
                row += ["", ""]
            summary.append(row)
    what = "held-out LM loss" if text else f"held-out exact match (chance {runs[(seeds[0], ref)][1]['chance']:.4f})"
    print(f"\nfinal loss (mean of the last {w} steps) and {what}")
    print(table(head, summary))
    print("seconds per run: " + ", ".join(f"{name} {sum(runs[(s, name)][2] for s in seeds) / len(seeds):.0f}"
                                          for name in [ref, *names]))
    if len(seeds) > 1:
        finals = [final(s, ref) for s in seeds]
        spread = (max(finals) - min(finals)) / (sum(finals) / len(finals))
        print(f"{ref} alone spreads by {spread:.1%} of its mean across these seeds: compare the gaps with that")
    plot(runs, seeds, ref, names, w, text, args.plot)
    print("the emulation quantises in fp32 on the CPU, so the times say nothing about FP8 speed on a GPU")
    if args.max_gap is not None:
        mean = lambda name: sum(final(s, name) for s in seeds) / len(seeds)  # noqa: E731
        far = [f"{name} {(mean(name) - mean(ref)) / mean(ref):+.2%}" for name in names
               if abs(mean(name) - mean(ref)) > args.max_gap * mean(ref)]
        if far:
            print(f"FAIL: final loss further than {args.max_gap:.2%} from {ref}'s: {', '.join(far)}")
            return 1
    return 0


def plot(runs: dict, seeds: list[int], ref: str, names: list[str], w: int, text: bool, path: str) -> None:
    """Left: each seed's curves (means of `w` steps; the reference solid). Right: each run's
    relative gap to the reference, of those means and (text data) of the held-out loss,
    over a +-1% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(13, 5))
    styles, markers = ["--", ":", "-."], ["o", "s", "^"]
    for i, seed in enumerate(seeds):
        color, base = f"C{i}", runs[(seed, ref)]
        steps = list(range(w, len(base[0]) + 1))
        rm = [window_mean(base[0], m, w) for m in steps]
        ax.plot(steps, rm, color=color, lw=1, label=f"seed {seed} {ref}")
        for name, ls, marker in zip(names, styles, markers):
            run = runs[(seed, name)]
            lm = [window_mean(run[0], m, w) for m in steps]
            ax.plot(steps, lm, color=color, lw=1, ls=ls, label=f"seed {seed} {name}")
            gx.plot(steps, [100 * (b - a) / a for a, b in zip(rm, lm)], color=color, lw=1, ls=ls,
                    label=f"seed {seed} {name}, train mean{w}")
            if text:
                marks = sorted(base[1]["heldout_loss"])
                gaps = [100 * (run[1]["heldout_loss"][m] / base[1]["heldout_loss"][m] - 1) for m in marks]
                gx.plot(marks, gaps, color=color, marker=marker, ls="none", label=f"seed {seed} {name}, held-out")
    ax.set(xlabel="step", ylabel=f"loss, mean of {w} steps", yscale="log", title=f"{', '.join(names)} vs {ref} (solid)")
    gx.axhspan(-1, 1, color="0.9")
    gx.axhline(0, color="0.5", lw=0.8)
    gx.set(xlabel="step", ylabel=f"(run - {ref}) / {ref}, %", title="relative gap (grey: +-1%)")
    for a in (ax, gx):
        a.grid(alpha=0.3)
        a.legend(fontsize=6, ncol=2 if len(seeds) * len(names) > 3 else 1)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
