"""GRPO steps per second: our loop (rl/grpo.py, launched by launchers/post_train.py) against
TRL's `GRPOTrainer` on the same tiny DeepSeek-V3, the same prompts, rewards and settings.

The model. `build_model` on debug_v3 with the vocabulary cut to the 48 ids of the arithmetic
characters (so both sides sample from the same 48 tokens), no MTP depth and no sequence-wise
balance loss (transformers' DeepseekV3 has neither), written with `interop.hf.save_hf` plus a
`tokenizer.json` (one token per character, the EOS prepended to a prompt as our runs encode
it). TRL loads that directory with `from_pretrained`, our loop with `post_train.init=<dir>`
(inference/load.py: HF weights and tokenizer.json). Before anything is timed, transformers'
greedy `generate()` and our `Generator` continue a few prompts and must emit the same tokens
(printed with the largest logit difference of one full forward).

The workload, identical on both sides. GRPO step s takes the P prompts our loop would
(rl/prompts.py: arithmetic "ab+cd=", seeded order; TRL reads them as an unshuffled dataset in
that order), samples G completions each at temperature 1 (top-p 1, no top-k) up to N new
tokens, stopping at EOS; rewards are ds_parallel.rl.rewards' accuracy plus DAPO's soft
overlong punishment (weights 1 and 1; both sides call the same functions, and the overlong
term makes rewards differ within a group although the untrained model is never right); group
advantages reward - mean over the sample std (DeepSeekMath; TRL scale_rewards="group"); one
optimizer step on the whole P x G batch in one micro-batch (TRL per_device_train_batch_size
= P G, steps_per_generation 1), DeepSeekMath's clipped loss (clip 0.2, per-completion token
mean then mean over completions: ours loss=grpo, TRL loss_type="grpo") with the k3 KL to the
initial weights at beta; AdamW (betas 0.9 / 0.95, weight decay 0.1), constant lr, gradient
clip 1; fp32, CPU.

Timing. Ours: the run's metrics.jsonl, one record per step: step_s (rollout to optimizer
step), rollout_s (Generator.generate) and update_s (train_step: forward, backward, optimizer);
the rest of a step ("score") is rewards, old-policy and reference log-probs. TRL: a
TrainerCallback's on_step_begin/on_step_end (the same span: generation to optimizer step),
with its generation (`_generate_single_turn`: transformers' generate()) and its whole
rollout (`_generate_and_score_completions`) timed by wrapping them; update = the step less the
rollout. The first step of every run is dropped (warm-up); medians of the rest. Generated
tokens per step come from each side's own log (ours response_length, TRL
completions/mean_length), since sampled lengths differ between runs.

Generation alone (`generation_alone`): step 0's P x G rows, exactly N new tokens each (no
stop, so both sides do the same work), our Generator against transformers' generate() in this
process, greedy and sampled (temperature 1; top-p 1 as the runs, and 0.95), interleaved
(common.py). Sampled is how each loop draws: ours one seeded generator per row (rl/grpo.py
sample_seed: samples that do not depend on the layout), the rows' distributions and CDF
inversions batched (inference/sampling.py); transformers one batched multinomial. It isolates
the decoding part of the step comparison.

Threads: our launcher gives each of its R processes cpu_count / R intra-op threads; TRL runs
in this process with cpu_count threads, as our 1-process run has. The headline ratio is our
1-process run against TRL (one process too). CPU only: nothing here says anything about GPUs.

    .venv/bin/python benchmarks/grpo_trl.py           # a few minutes on 2 cores
    .venv/bin/python benchmarks/grpo_trl.py --quick   # 3 steps, 1 round, ours on 1 process, P=2, G=4, 16 tokens
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from common import REPO, set_threads, table, time_interleaved  # first: puts the repo on sys.path

from ds_parallel.config import load_config
from ds_parallel.data.tokenizer import CHARS, SPECIALS, CharTokenizer
from ds_parallel.inference import Generator, SamplingParams
from ds_parallel.inference.load import load_for_generation
from ds_parallel.interop.hf import save_hf
from ds_parallel.model import build_model
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.rl.grpo import sample_seed
from ds_parallel.rl.prompts import build_prompts, prompt_indices
from ds_parallel.rl.rewards import Sample, accuracy_reward, overlong_reward

MODEL = {"preset": "debug_v3", "vocab_size": CharTokenizer.vocab_size, "mtp_depth": 0, "seq_aux_alpha": 0.0}
DATA = {"source": "arithmetic", "n_digits": 2, "ops": "+"}
REWARDS = {"accuracy": 1.0, "overlong": 1.0}
PROMPT_TOKENS = 1 + 2 * DATA["n_digits"] + 2  # the longest prompt: EOS + "ab+cd="


@dataclass(frozen=True)
class Workload:
    prompts: int  # P per step
    group: int  # G
    new: int  # max new tokens
    steps: int  # per run, the first dropped
    lr: float
    beta: float
    seed: int

    @property
    def seq_len(self) -> int:
        return PROMPT_TOKENS + self.new + 1  # room for the longest prompt and completion


@dataclass
class Result:
    name: str
    step_s: list[float]  # timed steps (warm-up dropped), all runs
    generate_s: list[float]
    update_s: list[float]
    tokens: list[float]  # generated tokens per step


# ----------------------------------------------------------------------------- the model


def write_char_tokenizer(directory: str) -> None:
    """The arithmetic vocabulary as an HF `tokenizers` file: one token per character (ids as
    data/tokenizer.py's CharTokenizer), EOS prepended by the post-processor (as our runs
    encode prompts), EOS and pad named in tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SPECIALS)} | {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    eos = SPECIALS.index("<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", eos)])
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>"}, fh)


def write_model(directory: str, seed: int) -> str:
    """The tiny V3 as an HF directory with its tokenizer; returns a line describing it."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in MODEL.items()]).model
    model = build_model(cfg, ParallelContext.single(), seed=seed)
    save_hf(model, directory)
    write_char_tokenizer(directory)
    return (f"{cfg.preset} as an HF DeepSeek-V3 directory, {sum(p.numel() for p in model.parameters()):,} parameters "
            f"(dim {cfg.dim}, {cfg.n_layers} layers with {cfg.n_dense_layers} dense, MLA {cfg.kv_lora_rank}+"
            f"{cfg.qk_rope_head_dim}, {cfg.n_routed_experts} routed experts top-{cfg.n_activated_experts} + "
            f"{cfg.n_shared_experts} shared, vocab {cfg.vocab_size}), fp32")


@torch.no_grad()
def check_same_model(directory: str, texts: list[str], new: int) -> None:
    """transformers' greedy generate() and our Generator on the directory emit the same tokens;
    printed with the largest |logit| difference of a full forward over prompt + completion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    ours = load_for_generation(hf=directory)
    prompts = [ours.tokenizer.encode(t) for t in texts]
    assert prompts == [tok(t)["input_ids"] for t in texts], "our tokenizer.json reader and transformers' disagree"
    gen = Generator(ours.model, ParallelContext.single(), max_batch=len(prompts), vocab_size=ours.vocab_size)
    completions = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0))
    same, gap = 0, 0.0
    for ids, c in zip(prompts, completions):
        x = torch.tensor([ids])
        theirs = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        same += theirs == c.token_ids
        full = torch.tensor([ids + c.token_ids])
        gap = max(gap, float((hf(full).logits - ours.model(full).logits).abs().max()))
    print(f"same model: transformers {type(hf).__name__} (attention {hf.config._attn_implementation}, experts "
          f"{getattr(hf.config, '_experts_implementation', 'eager')}) and our Generator, greedy {new} tokens: "
          f"{same}/{len(prompts)} prompts identical, max |logit difference| {gap:.2e}", flush=True)
    assert same == len(prompts), "transformers and our Generator emit different greedy tokens on the same weights"


@torch.no_grad()
def generation_alone(directory: str, w: Workload, texts: list[str], repeats: int = 3) -> str:
    """One rollout's generation without the rest of the step: the P x G rows of step 0 (each
    prompt G times), exactly `new` tokens each (no stop, so both sides emit the same count),
    greedy and sampled at temperature 1, with top-p 1 (as the GRPO runs) and 0.95 (ours: a
    seeded generator per row, as GRPO samples; transformers: one batched multinomial, as TRL
    samples). Medians of interleaved rounds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    ours = load_for_generation(hf=directory)
    rows = [t for t in texts for _ in range(w.group)]
    prompts = [ours.tokenizer.encode(t) for t in rows]
    gen = Generator(ours.model, ParallelContext.single(), max_batch=len(rows), max_len=w.seq_len + 1,
                    vocab_size=ours.vocab_size)
    batch = tok(rows, padding=True, padding_side="left", return_tensors="pt")
    modes = {"greedy": (0.0, 1.0), "sampled": (1.0, 1.0), "sampled top-p 0.95": (1.0, 0.95)}  # temperature, top-p
    fns = {}
    for mode, (temperature, top_p) in modes.items():
        params = [SamplingParams(max_new_tokens=w.new, temperature=temperature, top_p=top_p,
                                 seed=sample_seed(w.seed, 0, j)) for j in range(len(rows))]
        fns[f"ours {mode}"] = lambda params=params: gen.generate(prompts, params)
        fns[f"transformers {mode}"] = lambda temperature=temperature, top_p=top_p: hf.generate(
            **batch, max_new_tokens=w.new, min_new_tokens=w.new, do_sample=temperature > 0,
            temperature=temperature or 1.0, top_p=top_p, top_k=0, pad_token_id=tok.pad_token_id)
    ms = time_interleaved(fns, warmup=1, repeats=repeats, label="generation alone ")
    tokens = len(rows) * w.new
    out = []
    for mode in modes:
        a, b = ms[f"ours {mode}"].wall_ms, ms[f"transformers {mode}"].wall_ms
        out.append([mode, f"{a / 1e3:.2f}", f"{b / 1e3:.2f}", f"{tokens / a * 1e3:.0f}", f"{tokens / b * 1e3:.0f}",
                    f"{b / a:.2f}x"])
    header = ["decoding", "ours s", "transformers s", "ours tok/s", "transformers tok/s", "ours vs transformers"]
    title = f"generation alone: {len(rows)} rows x {w.new} new tokens, no stop, medians of {repeats}"
    return title + "\n" + table(header, out)


# ----------------------------------------------------------------------------- ours


def our_config(w: Workload, init: str, out_dir: str, ep: int) -> dict:
    batch = w.prompts * w.group
    return {
        "model": MODEL,
        "parallel": {"ep": ep, "zero_stage": 1},  # ZeRO-1: exact gradient clipping with ep > 1
        "train": {"steps": w.steps, "global_batch_size": batch, "micro_batch_size": batch // ep,
                  "seq_len": w.seq_len, "lr": w.lr, "lr_schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": w.seed,
                  "log_every": 1, "save_every": 0, "out_dir": out_dir},
        "data": DATA,
        "precision": {"dtype": "fp32"},
        "post_train": {"kind": "grpo", "init": init, "prompts": {"source": "arithmetic", "n_eval": 16},
                       "grpo": {"loss": "grpo", "prompts_per_step": w.prompts, "group_size": w.group,
                                "max_new_tokens": w.new, "temperature": 1.0, "top_p": 1.0, "kl_coef": w.beta,
                                "rewards": REWARDS, "generation_batch": batch, "sample_every": w.steps,
                                # torch's kernels, as TRL runs; the exact-log-prob mode
                                # (ds_parallel/kernels.py) costs extra and TRL has no counterpart
                                "batch_invariant": False}},
    }


def run_ours(w: Workload, init: str, root: str, procs: int) -> Result:
    """launchers/post_train.py in a subprocess (1 process: plain python; R: the DeepSpeed
    launcher, ep = R); per-step seconds from its metrics.jsonl."""
    import yaml

    out_dir = os.path.join(root, f"ours_{procs}")
    path = os.path.join(root, f"ours_{procs}.yaml")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(our_config(w, init, out_dir, ep=procs), fh)
    script = os.path.join(REPO, "launchers", "post_train.py")
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", str(procs)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launcher, script, "--config", path], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ours ({procs} process(es)) exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        records = [r for r in map(json.loads, fh) if "step_s" in r]
    assert [r["step"] for r in records] == list(range(1, w.steps + 1)), [r["step"] for r in records]
    timed = records[1:]
    return Result(f"ours, {procs} process{'es' if procs > 1 else ''}" + (f" (ep={procs})" if procs > 1 else ""),
                  [r["step_s"] for r in timed], [r["rollout_s"] for r in timed], [r["update_s"] for r in timed],
                  [r["response_length"] * w.prompts * w.group for r in timed])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- TRL


def trl_rewards(max_len: int):
    """accuracy and overlong of ds_parallel.rl.rewards as TRL reward functions."""
    def sample(prompt, completion, answer, ids) -> Sample:
        return Sample(prompt=prompt, completion=completion, answer=answer, task="arithmetic",
                      completion_tokens=len(ids), truncated=len(ids) >= max_len and ids[-1] != SPECIALS.index("<eos>"))

    def accuracy(prompts, completions, completion_ids, answer, **_):
        return [accuracy_reward(sample(*row)) for row in zip(prompts, completions, answer, completion_ids)]

    def overlong(prompts, completions, completion_ids, answer, **_):
        rows = zip(prompts, completions, answer, completion_ids)
        return [overlong_reward(sample(*row), max_len=max_len) for row in rows]

    return [accuracy, overlong]


def run_trl(w: Workload, init: str, root: str, prompts: list) -> Result:
    """TRL's GRPOTrainer in this process on `prompts` (step_prompts), timed by a callback."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    timings: dict[str, list[float]] = {"generate": [], "rollout": [], "step": [], "tokens": []}
    seen: list[list[str]] = []  # each step's prompts, in order

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):
            tic = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            timings["generate"].append(time.perf_counter() - tic)
            return out

        def _generate_and_score_completions(self, inputs):
            seen.append([x["prompt"] for x in inputs[::w.group]])  # each prompt's G copies are adjacent
            tic = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timings["rollout"].append(time.perf_counter() - tic)
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["step"].append(time.perf_counter() - self.tic)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                timings["tokens"].append(logs["completions/mean_length"] * w.prompts * w.group)

    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "answer": [p.answer for p in prompts]})
    config = GRPOConfig(
        output_dir=os.path.join(root, "trl"), use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", max_steps=w.steps, per_device_train_batch_size=w.prompts * w.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=w.group,
        max_completion_length=w.new, temperature=1.0, top_p=1.0, beta=w.beta, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", reward_weights=[REWARDS["accuracy"], REWARDS["overlong"]], learning_rate=w.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, shuffle_dataset=False, seed=w.seed, dataloader_num_workers=0, disable_dropout=True,
        disable_tqdm=True, model_init_kwargs={"dtype": torch.float32})
    trainer = Timed(model=init, reward_funcs=trl_rewards(w.new), args=config, train_dataset=dataset,
                    callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    n = len(timings["step"])
    assert n == w.steps and len(timings["rollout"]) == n and len(timings["tokens"]) == n, {
        k: len(v) for k, v in timings.items()}
    ours = [[p.text for p in prompts[s * w.prompts:(s + 1) * w.prompts]] for s in range(w.steps)]
    assert seen == ours, "TRL's steps read other prompts than our loop's"
    steps, rollouts = timings["step"][1:], timings["rollout"][1:]
    return Result("TRL GRPOTrainer", steps, timings["generate"][1:], [s - r for s, r in zip(steps, rollouts)],
                  timings["tokens"][1:])


def step_prompts(w: Workload) -> list:
    """The prompts our loop takes at steps 0 .. steps-1, in order (rl/grpo.py GRPO.rollout)."""
    cfg = load_config(None, [f"train.seed={w.seed}", *(f"data.{k}={v}" for k, v in DATA.items()),
                             "post_train.prompts.n_eval=16"])
    train, _ = build_prompts(cfg.post_train.prompts, w.seed, cfg.data)
    return [train[i] for s in range(w.steps) for i in prompt_indices(len(train), s, w.prompts, w.seed)]


# ----------------------------------------------------------------------------- report


def report(results: list[Result], reference: Result) -> str:
    median = statistics.median
    rows = []
    for r in results:
        step, gen, upd, tokens = median(r.step_s), median(r.generate_s), median(r.update_s), median(r.tokens)
        rows.append([r.name, len(r.step_s), f"{1 / step:.3f}", f"{step:.2f}", f"{gen:.2f}",
                     f"{step - gen - upd:.2f}", f"{upd:.2f}", f"{tokens:.0f}", f"{tokens / gen:.0f}",
                     f"{median(reference.step_s) / step:.2f}x"])
    return table(["run", "timed steps", "steps/s", "step s", "generate s", "score s", "update s", "tokens/step",
                  "generate tok/s", "steps/s vs TRL"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps per run, P=2, G=4, 16 new tokens (< 60 s)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--new", type=int, default=64, help="max new tokens per sample")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per run; the first is dropped")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=1e-3, help="KL coefficient (R1: 0.001)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--procs", default="1,2", help="our process counts, comma-separated (2 and more: ep=R)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per candidate, interleaved")
    parser.add_argument("--keep", default=None, help="write the model and run directories here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.new, args.steps, args.procs, args.rounds = 2, 4, 16, 3, "1", 1
    w = Workload(args.prompts, args.group, args.new, args.steps, args.lr, args.beta, args.seed)
    procs = [int(p) for p in args.procs.split(",")]
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    set_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        os.makedirs(root, exist_ok=True)
        model_dir = os.path.join(root, "model")
        print(f"model: {write_model(model_dir, args.seed)}", flush=True)
        print(f"workload: {w.prompts} prompts x {w.group} samples per step, <= {w.new} new tokens, temperature 1, "
              f"rewards {REWARDS}, beta {w.beta}, lr {w.lr}, 1 optimizer step per rollout, {w.steps} steps per run "
              f"(first dropped)", flush=True)
        check_same_model(model_dir, ["12+34=", "99+1="], new=8)
        prompts = step_prompts(w)
        alone = generation_alone(model_dir, w, [p.text for p in prompts[:w.prompts]])
        runs: dict[str, list[Result]] = {}
        for r in range(args.rounds):  # candidates in turn, so a burst of load hits all of them
            for n in [*procs, 0]:
                tic = time.perf_counter()
                out = os.path.join(root, f"round{r + 1}")
                res = run_ours(w, model_dir, out, n) if n else run_trl(w, model_dir, out, prompts)
                runs.setdefault(res.name, []).append(res)
                print(f"round {r + 1}/{args.rounds}, {res.name}: {time.perf_counter() - tic:.0f} s wall in all, "
                      f"step seconds {' '.join(f'{x:.2f}' for x in res.step_s)}, load average after "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
    results = [Result(name, *(sum((getattr(x, f) for x in rs), []) for f in ("step_s", "generate_s", "update_s",
                                                                            "tokens")))
               for name, rs in runs.items()]
    print()
    print(f"medians over the timed steps; steps/s vs TRL = TRL's step seconds / ours (> 1: ours faster); "
          f"score = step - generate - update (rewards, reference and old-policy log-probs); load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(report(results, results[-1]))
    print()
    print(alone)


if __name__ == "__main__":
    main()
