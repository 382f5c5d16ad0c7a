"""Plan a layout without processes: `python launchers/plan.py --config configs/v3_671b.yaml --world 2048`.

Validates the config for `--world` ranks and prints parameter counts, per-stage memory
estimates per rank and the pipeline bubble of the chosen schedule (ds_parallel/parallel/plan.py),
and the busiest rank's activations and total under each train.recompute mode.
With `--gpu-mem-gib G` (or parallel.memory_budget_gib) it also says whether the plan fits, by
the same check launchers/train.py runs before training, and which layout would if it does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--gpu-mem-gib", type=float, default=None,
                        help="device memory per GPU in GiB: check the plan against it less the trainer's headroom")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from ds_parallel.config import ConfigError, load_config
    from ds_parallel.parallel.plan import (GPU_HEADROOM, device_budget, memory_budget, memory_verdict, plan,
                                          recompute_modes)

    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world, purpose="plan")
        report = plan(cfg, args.world)
        modes = recompute_modes(cfg, args.world)
        verdict = None
        if args.gpu_mem_gib is not None:
            budget = (device_budget(args.gpu_mem_gib * 2**30),
                      f"--gpu-mem-gib {args.gpu_mem_gib:g} less {GPU_HEADROOM:.0%} headroom")
            verdict = memory_verdict(cfg, args.world, *budget)
        elif cfg.parallel.memory_budget_gib is not None:
            verdict = memory_verdict(cfg, args.world, *memory_budget(cfg))
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        if verdict is not None:
            report["fits"], report["memory"] = verdict
        report["recompute_modes"] = {mode: {"activation_bytes": a, "total_bytes": total}
                                     for mode, (a, total) in modes.items()}
        report = dict(report, stages=[dict(vars(s), total_bytes=s.total_bytes) for s in report["stages"]],
                      layout=[list(stage) for stage in report["layout"].stages])
        print(json.dumps(report, indent=1))
        return 0
    p = report["params"]
    print(f"model: {p['total'] / 1e9:.2f}B parameters, {p['active'] / 1e9:.2f}B activated per token "
          f"(+ MTP {p['mtp_total'] / 1e9:.2f}B, {p['mtp_active'] / 1e9:.2f}B activated)")
    print(f"layout: world {report['world_size']} = tp {report['tp']} x pp {report['pp']} x dp {report['dp']} "
          f"(ep {report['ep']} x edp {report['edp']}), ZeRO-{report['zero_stage']}, "
          f"{report['micro_batches']} micro-batches per step")
    print(f"pipeline: {report['schedule']}, bubble fraction {report['bubble_fraction']:.3f}")
    layout = report["layout"]
    print(" rank  layers        params/rank  weights  grads    optim    activ    total  (GiB per rank)")
    for s in report["stages"]:
        spans = [layout.stages[k] for k in layout.stages_of(s.stage)]
        span = ",".join(f"{ids[0]}-{ids[-1]}" if ids else "-" for ids in spans)
        print(f"{s.stage:5d}  {span:12s}  {s.params / 1e9:9.3f}B {_gib(s.weights_bytes)} {_gib(s.grads_bytes)} "
              f"{_gib(s.optimizer_bytes)} {_gib(s.activation_bytes)} {_gib(s.total_bytes)}")
    t = cfg.train
    for mode, (acts, total) in modes.items():
        what = {"selective": ",".join(t.recompute_modules) or "all modules",
                "full": f"{t.recompute_layers or 'all'} blocks per stage"}.get(mode, "")
        mark = "  <- train.recompute" if mode == t.recompute else ""
        print(f"recompute {mode:9s} activations {_gib(acts).strip()} GiB, total {_gib(total).strip()} GiB "
              f"on the busiest rank{f' ({what})' if what else ''}{mark}")
    if verdict is not None:
        print(f"memory: {verdict[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
