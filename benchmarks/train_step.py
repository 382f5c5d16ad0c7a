"""One training step (forward + backward + AdamW step) of a small DeepSeek-V3 (preset
debug_v3 widened to 64 routed experts, top-6, 8 groups keep 4; `--experts` etc.) vs
transformers' `DeepseekV3ForCausalLM` holding the same weights, on the same batch (4 x 256
tokens), fp32, CPU.

Each side runs in its own worker process, with the process-wide runtime it is run with:
ours as the trainer sets up a single CPU rank (parallel/init.py: intra-op threads from the
cores it owns, and `keep_freed_memory`, which stops a step's activations being page-faulted
in again each step), transformers with torch's defaults (intra-op threads: the machine's
cores), as its users run it; `--threads N` sets both to N instead. The parent sends "one step
of candidate X" round-robin; each worker times its own steps (wall and CPU time).

Fairness choices:
  * mtp_depth = 0 (transformers has no MTP) and seq_aux_alpha = 0 (transformers has no
    balance loss), so both compute exactly the same loss; the aux-loss-free bias update is
    a trainer call outside the step and is not run here.
  * The transformers twin is built by the project's own exporter (`interop.hf.save_hf`)
    and loaded with `from_pretrained`, once per experts implementation: "grouped_mm"
    (transformers' default for a whole model) and "eager"; attention is SDPA on both sides.
  * Both losses are a mean token cross-entropy over the same (input, next-token) pairs:
    ours from `Transformer(ids, labels)`, theirs as `F.cross_entropy` on its logits (its
    built-in loss would shift the labels and drop the last position).
  * torch's fused AdamW (same hyper-parameters) on both, as each trainer runs it (our engine;
    HF Trainer's default `adamw_torch_fused`), no DeepSpeed engine: this times the model
    code and the optimizer step, not the engine.

With --compile, three more candidates: ours under train.compile (model/compile.py: each
block's dense parts, the router's scoring and the experts' SwiGLU compiled by inductor; the
dispatch and the grouped expert GEMMs eager), transformers' grouped_mm model compiled the
same way (`compile_hf_regions`), and that compiled model again in a third process with our
allocator setting ("-keep": everything ours has but the model code), all on the same weights
and compiled in their first step, before the timing; the ratios are then against ours
compiled.
With --load the rounds are timed again (twice as many: the load makes them noisy) under a
competing load, one busy process per core,
and the ratios under load are printed against the quiet ones.

The losses of the first step must agree to 1e-4, and the losses after 10 steps (every
candidate the same steps, before the timed rounds) to 1e-3, which checks gradients and
optimizer updates as well.

    .venv/bin/python benchmarks/train_step.py [--bsz 4 --seqlen 256 --threads N --repeats 15 --compile --load]
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from common import (  # first: puts the repo on sys.path
    Measured, add_experts_args, base_parser, experts_fields, set_threads, table, time_interleaved)
from transformers import DeepseekV3ForCausalLM
from transformers.utils import logging as hf_logging

from ds_parallel.config.presets import MODEL_PRESETS
from ds_parallel.config.schema import ModelConfig, ParallelConfig
from ds_parallel.interop.hf import save_hf
from ds_parallel.model.compile import apply_compile
from ds_parallel.model.init import init_weights
from ds_parallel.model.transformer import Transformer
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.init import DistEnv, intra_op_threads, keep_freed_memory

TOL = 1e-4  # step 1: the same weights, the same batch
# Over more steps a routing decision near a tie can flip between implementations (fused
# AdamW, grouped vs looped GEMMs round differently; one repeated batch at lr 1e-3), so the
# curves are compared to 1e-3 after CURVE_STEPS steps, before the timed rounds.
TOL_LAST = 1e-3
CURVE_STEPS = 10


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch's fused AdamW on both sides: what our engine runs (train/engine.py `adamw`) and
    HF Trainer's default (adamw_torch_fused)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)


def ours_step(model: Transformer, opt, ids: torch.Tensor, labels: torch.Tensor):
    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def hf_step(model, opt, ids: torch.Tensor, labels: torch.Tensor):
    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    return step


# Worker processes and their candidates. Each side runs in its own process so that each has
# the process-wide runtime it is run with: "ours" as the trainer sets up a CPU rank
# (parallel/init.py: intra-op threads and `keep_freed_memory`), "hf" as transformers' users
# run it (torch's defaults), and "hf-keep" transformers compiled the same way as ours and with
# the same allocator setting, the comparison that leaves only the model code.
SIDES = {"ours": ("ours", "ours-compiled"), "hf": ("hf-grouped_mm", "hf-eager", "hf-grouped_mm-compiled"),
         "hf-keep": ("hf-grouped_mm-compiled-keep",)}


def ours_model(cfg: ModelConfig) -> Transformer:
    """The benchmark's weights, the same in every process: seeded init and a non-zero router
    bias, as after some training."""
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg, ParallelContext.single()), seed=1234).train()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.01)
    return model


def candidates(side: str, cfg: ModelConfig, ids, labels, compiled: bool) -> tuple[dict, list[str]]:
    """side -> ({name: step function}, lines to print), built in that side's process."""
    if side in ("ours", "hf-keep"):
        keep_freed_memory(ParallelConfig().cpu_malloc_keep_mib)  # what init_parallel does on CPU
    ours = ours_model(cfg)
    if side == "ours":
        fns = {"ours": ours_step(ours, adamw(ours), ids, labels)}
        if compiled:
            twin = ours_model(cfg)
            apply_compile(twin, verbose=True)
            fns["ours-compiled"] = ours_step(twin, adamw(twin), ids, labels)
        return fns, [f"  ours: {sum(p.numel() for p in ours.parameters()):,} parameters"]
    fns, lines = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        for name in SIDES[side]:
            if "compiled" in name and not compiled:
                continue
            impl = "eager" if name == "hf-eager" else "grouped_mm"
            hf = DeepseekV3ForCausalLM.from_pretrained(tmp, experts_implementation=impl, attn_implementation="sdpa",
                                                       dtype=torch.float32).train()
            n_hf = sum(p.numel() for p in hf.parameters())
            assert n_hf == sum(p.numel() for p in ours.parameters()), "the twin does not hold the same parameters"
            if "compiled" in name:
                compile_hf_regions(hf)
            fns[name] = hf_step(hf, adamw(hf), ids, labels)
            lines.append(f"  {name}: experts_implementation={hf.config._experts_implementation}, "
                         f"attn_implementation={hf.config._attn_implementation}, {n_hf:,} parameters")
    return fns, lines


def side_threads(side: str, threads: int) -> int:
    """The intra-op threads `side` runs with: `threads` if set (--threads); else each side's
    own default, as its users run it: ours what the trainer gives a single CPU rank
    (parallel/init.py `intra_op_threads`: the cores it owns), transformers torch's default."""
    if threads > 0:
        return threads
    if side == "ours":
        return intra_op_threads(DistEnv(0, 1, 0, "localhost", 0, "single", 1))
    return torch.get_num_threads()  # a fresh (spawned) process: torch's default


def worker(side: str, cfg: ModelConfig, threads: int, ids, labels, compiled: bool, conn) -> None:
    """Builds `side`'s candidates, then runs one step of the named one per request and sends
    back (loss, wall ms, cpu ms), timed here; None ends it."""
    torch.set_num_threads(side_threads(side, threads))
    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    fns, lines = candidates(side, cfg, ids, labels, compiled)
    lines.append(f"  {side} process: {torch.get_num_threads()} intra-op thread(s)")
    conn.send((list(fns), lines))
    while (name := conn.recv()) is not None:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = fns[name]()
        conn.send((loss, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))


def main() -> None:
    parser = base_parser(__doc__, repeats=15, warmup=2, threads=0)
    parser.add_argument("--bsz", type=int, default=4)
    add_experts_args(parser)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with train.compile and transformers compiled the same way (regional)")
    parser.add_argument("--load", action="store_true",
                        help="time again under a competing load: one busy process per core")
    args = parser.parse_args()
    set_threads(args.threads)

    cfg = ModelConfig(**{**MODEL_PRESETS["debug_v3"], "preset": "debug_v3", "mtp_depth": 0, "seq_aux_alpha": 0.0,
                         **experts_fields(args)})
    print(f"debug_v3 (mtp_depth=0): {cfg.n_layers} layers ({cfg.n_dense_layers} dense), dim {cfg.dim}, "
          f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts}, vocab {cfg.vocab_size}; "
          f"batch {args.bsz}x{args.seqlen}", flush=True)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (args.bsz, args.seqlen + 1), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]  # labels[:, t] follows ids[:, :t+1]

    mp = multiprocessing.get_context("spawn")
    conns, procs = {}, []
    try:
        for side in SIDES if args.compile else ("ours", "hf"):
            parent, child = mp.Pipe()
            proc = mp.Process(target=worker, args=(side, cfg, args.threads, ids, labels, args.compile, child))
            proc.start()
            procs.append(proc)
            names, lines = parent.recv()
            print("\n".join(lines), flush=True)
            conns.update({name: parent for name in names})
        run(args, conns)
    finally:
        for conn in set(conns.values()):
            conn.send(None)
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def run(args, conns: dict) -> None:
    """The loss checks, then the timed rounds, quiet and (--load) under load, and the ratios."""
    def step(name: str) -> tuple[float, float, float]:
        conns[name].send(name)
        return conns[name].recv()

    first = {name: step(name)[0] for name in conns}  # step 1 of every candidate, from identical weights
    print("  step-1 loss: " + ", ".join(f"{n} {v:.7f}" for n, v in first.items()), flush=True)
    for name, v in first.items():
        assert abs(v - first["ours"]) < TOL, f"step-1 loss of {name} differs from ours: {v} vs {first['ours']}"
    for _ in range(CURVE_STEPS - 2):
        for name in conns:
            step(name)
    last = {name: step(name)[0] for name in conns}  # every candidate has now taken the same steps
    print(f"  step-{CURVE_STEPS} loss: " + ", ".join(f"{n} {v:.7f}" for n, v in last.items()), flush=True)
    for name, v in last.items():
        assert abs(v - last["ours"]) < TOL_LAST, f"step-{CURVE_STEPS} loss of {name} differs from ours: {v} vs {last['ours']}"
    d1 = max(abs(v - first["ours"]) for v in first.values())
    dn = max(abs(v - last["ours"]) for v in last.values())
    print(f"  max |loss - ours loss|: step 1 {d1:.2e}, step {CURVE_STEPS} {dn:.2e}", flush=True)

    fns = {name: (lambda name=name: Measured(*step(name)[1:])) for name in conns}
    rounds = {"quiet": args.repeats, "loaded": 2 * args.repeats}  # the load makes rounds noisy
    runs = {"quiet": time_interleaved(fns, args.warmup, rounds["quiet"], label="train step ")}
    if args.load:
        with busy_processes(os.cpu_count()) as n_busy:
            print(f"  under load: {n_busy} busy processes (one per core)", flush=True)
            runs["loaded"] = time_interleaved(fns, 1, rounds["loaded"], label="train step, loaded ")

    ref = "ours-compiled" if args.compile else "ours"
    threads = f"{args.threads} thread(s)" if args.threads else "each side's default threads"
    ratios = {}
    for run_name, ms in runs.items():
        o, rows = ms[ref], []
        for name in (n for n in fns if n != ref):
            t = ms[name]
            ratios[run_name, name] = t.wall_ms / o.wall_ms
            rows.append([name, f"{o.wall_ms:.1f}", f"{t.wall_ms:.1f}", f"{t.wall_ms / o.wall_ms:.2f}x",
                         f"{o.cpu_ms:.1f}", f"{t.cpu_ms:.1f}", f"{t.cpu_ms / o.cpu_ms:.2f}x"])
        print()
        print(f"{run_name}: debug_v3 training step (fwd+bwd+AdamW), batch {args.bsz}x{args.seqlen}, medians of "
              f"{rounds[run_name]} interleaved rounds (CPU, fp32, {threads}); ratio = theirs / {ref} "
              f"(> 1: {ref} faster); losses equal to {TOL:g} at step 1 and to {TOL_LAST:g} at step {CURVE_STEPS}")
        print(table(["vs", f"{ref} wall ms", "theirs wall ms", "ratio wall", f"{ref} cpu ms", "theirs cpu ms",
                     "ratio cpu"], rows))
    if args.load:
        print()
        print("wall-time ratio under load / quiet (1.00: the load costs both sides alike): " + ", ".join(
            f"{name} {ratios['loaded', name] / ratios['quiet', name]:.2f}" for name in fns if name != ref))


def compile_hf_regions(model) -> None:
    """transformers' model compiled the way train.compile compiles ours (model/compile.py):
    dense decoder layers whole; in MoE layers the attention, both norms and the shared
    experts, while routing and the routed experts (grouped_mm) stay eager."""
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            for module in (layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm,
                           layer.mlp.shared_experts):
                module.compile()
        else:
            layer.compile()


@contextmanager
def busy_processes(n: int):
    """`n` processes spinning on one core each, as other users' jobs would; stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)
    try:
        yield n
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
