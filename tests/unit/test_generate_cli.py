"""launchers/generate.py against the Python API, and evaluate.greedy_answers against a naive
greedy loop, on a tiny DeepSeek-V3 (MLA, MoE, one MTP depth) saved as a run directory with
the arithmetic data config (so it has the character tokenizer; EOS stops).

The CLI runs as the user runs it: one process, `torchrun` with two ranks (expert parallel,
prompts split over data-parallel ranks, speculative decoding with the MTP depth), and an HF
export with a `tokenizer.json`. Every run must give the greedy completions of one
`Generator` call in this process, token for token.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ds_parallel.checkpoint import save_model
from ds_parallel.config import load_config
from ds_parallel.config.schema import DataConfig
from ds_parallel.data.loader import build_datasets
from ds_parallel.data.tokenizer import CHARS, SPECIALS, CharTokenizer
from ds_parallel.inference import Generator, SamplingParams
from ds_parallel.inference.load import load_for_generation
from ds_parallel.interop.hf import save_hf
from ds_parallel.model import build_model
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.train.evaluate import greedy_answers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "launchers", "generate.py")
MAX_NEW = 12
# Text and id prompts of different lengths; the ids are "2+3" after an EOS.
LINES = [{"prompt": "12+34="}, {"prompt_ids": [2, 5, 13, 6]}, {"prompt": "45+67="}, {"prompt": "1+2="},
         {"prompt": "99+99="}, {"prompt": "5+"}, {"prompt": "11+11="}]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run directory (arithmetic data: the char tokenizer), one with indexed data (no
    tokenizer), an HF export with a char-level tokenizer.json, and the reference: greedy
    completions of one Generator call on the loaded model."""
    root = tmp_path_factory.mktemp("generate")
    cfg = load_config(None, ["model.preset=debug_v3", "parallel.ep=1", "train.seq_len=32"])
    model = build_model(cfg.model, ParallelContext.single(), seed=1)  # a seed whose greedy runs hit both stops
    paths = {name: str(root / name) for name in ("run", "plain", "hf")}
    save_model(model, paths["run"], cfg)
    save_model(model, paths["plain"], dataclasses.replace(cfg, data=DataConfig(source="indexed", path="unused")))
    save_hf(model, paths["hf"])
    _write_char_tokenizer_json(paths["hf"])
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(line) + "\n" for line in LINES))

    loaded = load_for_generation(ckpt=paths["run"])
    tok = loaded.tokenizer
    prompts = [tok.encode(x["prompt"]) if "prompt" in x else x["prompt_ids"] for x in LINES]
    gen = Generator(loaded.model, ParallelContext.single(), max_batch=3, vocab_size=loaded.vocab_size)
    ref = gen.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0, stop_token_ids=tok.eos_ids))
    return {**paths, "root": root, "prompts": str(prompts_file), "ref": ref, "tok": tok}


def _write_char_tokenizer_json(directory: str) -> None:
    """The arithmetic vocabulary as an HF `tokenizers` file: one token per character, EOS
    prepended by the post-processor (as our run directories encode prompts), EOS named in
    tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SPECIALS)} | {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 2)])
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"eos_token": "<eos>"}, fh)


def _cli(args: list[str], launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, CLI, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _check_output(out_path: str, runs, text: bool = True) -> list[dict]:
    """Every line equals the reference completion: ids, text, finish reason, logprobs."""
    rows = [json.loads(line) for line in open(out_path)]
    assert len(rows) == len(LINES)
    for row, ref in zip(rows, runs["ref"]):
        assert set(row) == {"prompt_ids", "completion_ids", "completion", "logprobs", "finish_reason"}
        assert row["prompt_ids"] == ref.prompt_ids and row["completion_ids"] == ref.token_ids
        assert row["finish_reason"] == ref.finish_reason
        assert row["logprobs"] == pytest.approx(ref.logprobs, abs=1e-4)
        if text:
            assert row["completion"] == runs["tok"].decode(ref.token_ids)
    return rows


def test_reference_has_both_finish_reasons(runs):
    """The reference itself: EOS (id 2) ends a "stop" completion, "length" ones run to
    MAX_NEW without it; the fixed seed gives both kinds."""
    reasons = [c.finish_reason for c in runs["ref"]]
    assert set(reasons) == {"stop", "length"}, reasons
    for c in runs["ref"]:
        eos_at = c.token_ids.index(2) if 2 in c.token_ids else None
        if c.finish_reason == "stop":
            assert eos_at == len(c.token_ids) - 1 and len(c.token_ids) <= MAX_NEW
        else:
            assert eos_at is None and len(c.token_ids) == MAX_NEW
        assert all(t < CharTokenizer.vocab_size for t in c.token_ids)  # the tokenizer's ids only, not the padded 128


def test_cli_single_process_matches_the_api(runs):
    out = os.path.join(runs["root"], "single.jsonl")
    proc = _cli(["--ckpt", runs["run"], "--prompts", runs["prompts"], "--out", out, "--temperature", "0",
                 "--max-new-tokens", str(MAX_NEW), "--max-batch", "2"])
    assert proc.returncode == 0, proc.stderr
    _check_output(out, runs)
    assert "tokens/s" in proc.stdout and "7/7 sequences" in proc.stderr


@pytest.mark.dist
def test_cli_two_ranks_expert_parallel_speculative_matches_the_api(runs):
    """torchrun, 2 ranks, ep=2 (dp=2: each rank decodes every other prompt), MTP drafts
    verified by the main model: the same greedy tokens, gathered in input order."""
    out = os.path.join(runs["root"], "ep2.jsonl")
    proc = _cli(["--ckpt", runs["run"], "--prompts", runs["prompts"], "--out", out, "--temperature", "0",
                 "--max-new-tokens", str(MAX_NEW), "--speculative", "mtp", "parallel.ep=2"],
                launcher=(os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                          "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(out, runs)
    assert "acceptance per draft position [" in proc.stdout and "tokens per main-model forward" in proc.stdout


def test_cli_hf_directory_with_tokenizer_json_matches_the_api(runs):
    out = os.path.join(runs["root"], "hf.jsonl")
    proc = _cli(["--hf", runs["hf"], "--prompts", runs["prompts"], "--out", out, "--temperature", "0",
                 "--max-new-tokens", str(MAX_NEW)])
    assert proc.returncode == 0, proc.stderr
    _check_output(out, runs)


def _load_cli_module():
    spec = importlib.util.spec_from_file_location("generate_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_one_line_naming_the_field_and_exit_2(runs, capsys):
    """Refused before any process group starts (main returns before init_parallel); one
    case also through a real process for the exit status."""
    root = runs["root"]
    (root / "neither.jsonl").write_text('{"prompt_ids": [2, 5]}\n{"text": "1+2="}\n')
    (root / "text.jsonl").write_text('{"prompt": "1+2="}\n')
    (root / "big.jsonl").write_text('{"prompt_ids": [2, 500]}\n')
    common = ["--out", str(root / "never.jsonl")]
    cases = [
        (["--ckpt", runs["run"], "--prompts", str(root / "missing.jsonl")], "--prompts"),
        (["--ckpt", runs["run"], "--prompts", str(root / "neither.jsonl")], 'line 2: give exactly one of "prompt"'),
        (["--ckpt", runs["plain"], "--prompts", str(root / "text.jsonl")], '"prompt" is text but the checkpoint has '
                                                                            'no tokenizer: give "prompt_ids"'),
        (["--ckpt", runs["run"], "--hf", runs["hf"], "--prompts", runs["prompts"]], "--ckpt"),
        (["--prompts", runs["prompts"]], "--hf"),
        (["--ckpt", runs["run"], "--prompts", str(root / "big.jsonl")], '"prompt_ids" must be a list of token ids'),
        (["--ckpt", runs["run"], "--prompts", runs["prompts"], "--max-new-tokens", "300"], "model.max_seq_len=256"),
        (["--ckpt", runs["plain"] + "/nowhere", "--prompts", runs["prompts"]], "--ckpt"),
        (["--ckpt", runs["run"], "--prompts", runs["prompts"], "parallel.pp=2"], "parallel.pp=2"),
        (["--ckpt", runs["run"], "--prompts", runs["prompts"], "model.dim=64"], "parallel.* overrides only"),
        (["--ckpt", runs["run"], "--prompts", runs["prompts"], "--temperature", "-1"], "temperature"),
    ]
    cli = _load_cli_module()
    for argv, needle in cases:
        assert cli.main(argv + common) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("generate: error: ") and needle in err, (argv, err)
    assert not (root / "never.jsonl").exists()
    proc = _cli(["--ckpt", runs["run"], "--prompts", str(root / "neither.jsonl"), *common])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and '"prompt_ids"' in proc.stderr, proc.stderr


def test_greedy_answers_equal_a_naive_full_recompute_loop():
    """evaluate.greedy_answers (one batched Generator call) against greedy decoding that
    re-runs the whole prefix for every token, one prompt at a time, on prompts of four
    lengths: the same answers, character for character (each cut at EOS, then at a newline)."""
    cfg = load_config(None, ["model.preset=debug_v3", "parallel.ep=1", "train.seq_len=32", "data.n_train=64",
                             "data.n_eval=8"])
    model = build_model(cfg.model, ParallelContext.single(), seed=4).eval()
    data = build_datasets(cfg.data, cfg.train, cfg.model.vocab_size)
    prompts = ["1+2=", "12+34=", "123+456=", "5", "99+99=", "7+", "40+04=", "3*"]
    max_new = 6
    naive, cut = [], 0
    with torch.no_grad():
        for p in prompts:
            ids = data.prompt_ids(p)
            for _ in range(max_new):
                logits = model(torch.tensor([ids])).logits[0, -1, : data.tokenizer.vocab_size]
                ids.append(int(logits.argmax()))
            new = ids[-max_new:]
            if data.tokenizer.eos_id in new:  # the end of the document: what follows is another problem
                new, cut = new[:new.index(data.tokenizer.eos_id)], cut + 1
            naive.append(data.tokenizer.decode(new).split("\n")[0])
    assert len(set(naive)) > 2 and 0 < cut < len(prompts), (naive, cut)  # distinct answers, both endings
    assert greedy_answers(model, ParallelContext.single(), data, prompts, max_new) == naive
