"""Activation recomputation (train.recompute): for each mode, the bytes one forward keeps for
backward, measured and as the planner predicts them, and the training step's time against
`none`, on the training benchmarks' model (debug_v3 with 64 experts top-6, no MTP), single
process, fp32, CPU.

Modes: none; selective with each of its modules alone and with all three (V3's set); full
(every block). Every model starts from the same weights and takes the same steps on the same
batch; the step-1 losses must be equal to 1e-6 (recomputation changes what is kept, not the
numbers) and so must the losses after the timed steps.

Measured bytes: the distinct storages autograd saves during one forward (parameters
excluded; model/recompute.py `saved_activation_bytes`). Planned: parallel/plan.py's
activation bytes of the stage, which also count the head's (it cancels in the savings).

    .venv/bin/python benchmarks/recompute.py [--bsz 4 --seqlen 256 --threads 1 --repeats 5]
"""
from __future__ import annotations

import torch
from common import add_experts_args, base_parser, experts_fields, set_threads, table, time_interleaved

from ds_parallel.config.load import config_from_dict
from ds_parallel.config.validate import RECOMPUTE_MODULES
from ds_parallel.model.init import init_weights
from ds_parallel.model.recompute import apply_recompute, saved_activation_bytes
from ds_parallel.model.transformer import Transformer
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.plan import plan

TOL = 1e-6
MODES = [("none", ())] + [("selective", (m,)) for m in RECOMPUTE_MODULES] + [("selective", RECOMPUTE_MODULES),
                                                                             ("full", ())]


def main() -> None:
    parser = base_parser(__doc__, repeats=5, warmup=1)
    parser.add_argument("--bsz", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    add_experts_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    def config(mode: str, modules):
        return config_from_dict({
            "model": {"preset": "debug_v3", "mtp_depth": 0, "max_seq_len": args.seqlen, **experts_fields(args)},
            "train": {"micro_batch_size": args.bsz, "global_batch_size": args.bsz, "seq_len": args.seqlen,
                      "recompute": mode, "recompute_modules": list(modules) or list(RECOMPUTE_MODULES)}})

    base = config("none", ())
    torch.manual_seed(0)
    reference = init_weights(Transformer(base.model, ParallelContext.single()), seed=1234).state_dict()
    tokens = torch.randint(0, base.model.vocab_size, (args.bsz, args.seqlen + 1),
                           generator=torch.Generator().manual_seed(2))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    print(f"debug_v3 (mtp_depth=0), {args.experts} experts top-{args.topk}, batch {args.bsz}x{args.seqlen}", flush=True)

    fns, measured, planned = {}, {}, {}
    for mode, modules in MODES:
        name = mode if mode != "selective" else "selective: " + "+".join(modules)
        cfg = config(mode, modules)
        model = Transformer(cfg.model, ParallelContext.single()).train()
        model.load_state_dict(reference)
        apply_recompute(model, mode, modules)
        measured[name] = saved_activation_bytes(model, lambda: model(ids, labels))
        planned[name] = plan(cfg, 1)["stages"][0].activation_bytes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

        def step(model=model, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            loss = model(ids, labels).loss
            loss.backward()
            opt.step()
            return loss.item()

        fns[name] = step

    first = {name: fn() for name, fn in fns.items()}
    for name, v in first.items():
        assert abs(v - first["none"]) <= TOL, f"step-1 loss of {name}: {v} vs none {first['none']}"
    ms = time_interleaved(fns, args.warmup, args.repeats, label="train step ")
    last = {name: fn() for name, fn in fns.items()}
    for name, v in last.items():
        assert abs(v - last["none"]) <= TOL, f"last loss of {name}: {v} vs none {last['none']}"
    steps = 2 + args.warmup + args.repeats
    print(f"  losses equal to {TOL:g}: step 1 {first['none']:.6f}, step {steps} {last['none']:.6f}")

    mib = 2.0**20
    none_m, none_p, none_t = measured["none"], planned["none"], ms["none"]
    rows = []
    for name in fns:
        saved_m, saved_p = none_m - measured[name], none_p - planned[name]
        rows.append([name, f"{measured[name] / mib:.2f}", f"{planned[name] / mib:.2f}",
                     f"{measured[name] / none_m:.2f}", f"{saved_m / mib:.2f}", f"{saved_p / mib:.2f}",
                     "-" if name == "none" else f"{saved_p / saved_m:.2f}",
                     f"{ms[name].cpu_ms:.1f}", f"{ms[name].cpu_ms / none_t.cpu_ms:.2f}x"])
    print()
    print(f"saved activations of one forward (MiB) and step time (CPU ms, medians of {args.repeats} interleaved "
          f"rounds, {args.threads} thread(s))")
    print(table(["mode", "kept MiB", "planned MiB", "kept / none", "saved MiB", "planned saved MiB",
                 "planned / measured saving", "step ms", "time / none"], rows))


if __name__ == "__main__":
    main()
