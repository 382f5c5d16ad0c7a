"""Distillation the R1 way on CPU: students fine-tuned on the teacher's reasoning traces vs on
reference answers alone, same prompts, same steps (DeepSeek-R1 §2.4, §4.1).

    deepspeed --num_gpus 2 launchers/post_train.py --config configs/r1_cpu.yaml   # the teacher (~11 min)
    python benchmarks/distill_cpu.py                                               # ~15 min

The teacher is configs/r1_cpu.yaml's final model (runs/r1_cpu/all; --teacher). The
pipeline of configs/distill_cpu.yaml samples it once per training prompt and keeps the
verified samples (rejection sampling, R1 §2.3.3: R1 distils on that stage's samples), then
trains two students, each twice:

    ours     the dense (V1) model from the seed, the built-in character tokenizer
    llama    a random LlamaForCausalLM written by transformers (GQA) with a tokenizer and
             chat template of its own: a byte-level BPE trained here on the task's text, Llama
             3's header/eot format. Its samples are re-rendered in its template and tokens
             (data/chat.py): the teacher's character ids mean nothing to it.

    *_traces   SFT on the samples' responses: "<think>...</think><answer>150</answer>"
    *_answers  SFT on the same prompts with the reference answer alone, "<answer>150</answer>"
               (post_train.sft.responses=answer)

and prints each phase's R1 evaluation (greedy accuracy and pass@1 over 4 samples at T 0.6,
top-p 0.95 on 256 held-out sums, prompted in each student's format). The student is written
by `write_llama_student`, which the tests also use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Llama 3's chat format (its special tokens and header layout), without the date preamble.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONFIG = "configs/distill_cpu.yaml"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE (tokenizers) trained on `texts`, with SPECIALS as ids 0..4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_llama_student(path: str, texts, vocab_size: int = 384, bpe_size: int = 320, seed: int = 0) -> dict:
    """A random LlamaForCausalLM (dim 128, 2 layers, 4 heads / 2 KV heads: configs/distill_cpu's
    `debug_dense_gqa` shape) with its own BPE tokenizer and Llama 3 chat template, written by
    transformers into `path`. Returns the model overrides that describe it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = train_bpe(list(texts) + ["user", "assistant", "system"], bpe_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                         eos_token_id=tok.token_to_id("<|eot_id|>"))
    LlamaForCausalLM(config).save_pretrained(path)
    return {"model.preset": "debug_dense_gqa", "model.vocab_size": vocab_size}


def task_texts(config: str = CONFIG) -> list[str]:
    """The task's text (problems worked in R1's format, from the training side of the corpus):
    what the student's BPE is trained on."""
    from ds_parallel.config.load import config_from_dict, read_yaml
    from ds_parallel.rl.sft import builtin_examples

    tree = read_yaml(os.path.join(REPO, config))
    cfg = config_from_dict({k: tree[k] for k in ("data", "train") if k in tree})
    return [e["prompt"] + e["response"] for e in builtin_examples(cfg)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/r1_cpu/all",
                        help="the teacher's run directory (configs/r1_cpu.yaml's last phase)")
    parser.add_argument("--out", default="runs/distill_cpu", help="run directory of the distillation pipeline (the "
                                                                  "student is written where the config reads it)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for configs/distill_cpu.yaml")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(REPO, args.teacher)):
        sys.exit(f"{args.teacher} not found: train the teacher first (deepspeed --num_gpus 2 launchers/post_train.py "
                 f"--config configs/r1_cpu.yaml), or pass --teacher")
    from ds_parallel.config.load import read_yaml

    phases = read_yaml(os.path.join(REPO, CONFIG))["post_train"]["phases"]
    student = next(p["overrides"]["post_train.init"] for p in phases if p["name"] == "llama_traces")
    student = os.path.join(REPO, student)  # the config's path: its phases load the student from there
    if not os.path.isfile(os.path.join(student, "config.json")):
        write_llama_student(student, task_texts())
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.nproc),
           "launchers/post_train.py", "--config", CONFIG, f"train.out_dir={args.out}",
           f"post_train.init={args.teacher}", *args.overrides]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc:
        return rc
    rows = {}
    for phase in ("ours_traces", "ours_answers", "llama_traces", "llama_answers"):
        with open(os.path.join(args.out, phase, "eval.json")) as fh:
            rows[phase] = json.load(fh)
    print("\n| student | data | greedy | pass@1 (k=4) |\n|---|---|---|---|")
    for phase, r in rows.items():
        who, data = phase.split("_")
        print(f"| {who} | {'teacher traces' if data == 'traces' else 'reference answers'} | "
              f"{r['greedy_accuracy']:.3f} | {r['pass_at_1']:.3f} |")
    for who in ("ours", "llama"):
        gain = rows[f"{who}_traces"]["greedy_accuracy"] - rows[f"{who}_answers"]["greedy_accuracy"]
        print(f"{who}: traces - answers = {gain:+.3f} greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
