"""HF Llama / Qwen2 import and export (interop/hf_dense.py) against transformers itself, the
independent reference: tiny checkpoints written by `save_pretrained`, fp32 on CPU.

Every case has GQA (4 query heads, 2 KV heads) and widths that differ, so a wrong split or
view cannot line up by luck. The Llama 3.1 RoPE case puts the original context (32) inside
the test sequences' reach with a 6-frequency head, so its three bands (kept, ramped, divided)
all occur; the tied cases have no lm_head tensor; Qwen2 has q/k/v biases.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from ds_parallel.checkpoint import load_model  # noqa: E402
from ds_parallel.config.errors import ConfigError  # noqa: E402
from ds_parallel.config.schema import Config, ModelConfig, ParallelConfig  # noqa: E402
from ds_parallel.config.validate import validate  # noqa: E402
from ds_parallel.interop.hf import hf_model_config, load_hf, save_hf  # noqa: E402
from ds_parallel.interop.hf_dense import dense_config_from_hf, hf_config_from_dense  # noqa: E402
from ds_parallel.model.rope import Llama3Scaling, precompute_freqs_cis, rope_frequencies  # noqa: E402
from ds_parallel.parallel.groups import ParallelContext  # noqa: E402
from ds_parallel.parallel.topology import Topology  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEQ, TOL = 24, 1e-5
BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "llama_llama3_untied": ("llama", dict(rope_parameters=LLAMA3, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # head_dim 16: 4 x 16 = 64 query channels from a 48-wide model.
    "llama_head_dim_tied": ("llama", dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                          tie_word_embeddings=True)),
    "qwen2_bias_tied": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                      tie_word_embeddings=True)),
}


def hf_classes(model_type: str):
    if model_type == "llama":
        return transformers.LlamaConfig, transformers.LlamaForCausalLM
    return transformers.Qwen2Config, transformers.Qwen2ForCausalLM


def write_hf(case: str, path: Path) -> Path:
    """A transformers model from its config with a fixed seed, its weights (biases included)
    redrawn well above the init scale so that every term shows, saved by save_pretrained."""
    from tests.unit.test_hf import randomise

    model_type, extra = CASES[case]
    config_cls, model_cls = hf_classes(model_type)
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**BASE, **extra}))
    randomise(model, std=0.15)
    model.save_pretrained(path)
    return path


def hf_model(path):
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    return hf_classes(model_type)[1].from_pretrained(path).eval()


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def input_ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (3, SEQ), generator=torch.Generator().manual_seed(1))


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_llama3_frequencies_match_transformers():
    """model/rope.py's Llama 3.1 scaling against transformers' own, at Llama 3.1's numbers
    (head_dim 128, theta 5e5, s=8, low 1, high 4, L0 8192): all three bands occur."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                      rope_parameters=rope)
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = rope_frequencies(128, 500000.0)
    ours = rope_frequencies(128, 500000.0, llama3=Llama3Scaling(8.0, 8192, 1.0, 4.0))
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    kept, divided = ours == plain, torch.isclose(ours, plain / 8, rtol=1e-6, atol=0)
    assert kept.sum() > 0 and divided.sum() > 0 and (~kept & ~divided).sum() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_load_and_export_match_transformers(case, tmp_path):
    src = write_hf(case, tmp_path / "hf")
    ids = input_ids()
    ref = hf_logits(src, ids)
    model = load_hf(str(src))
    cfg = model.cfg
    assert (cfg.attention, cfg.n_kv_heads, cfg.rope_interleave) == ("mha", 2, False)
    diff = (our_logits(model, ids) - ref).abs().max().item()
    assert diff <= TOL, f"{case}: load_hf logits differ from transformers by {diff:.3g}"

    names = {n for n, _ in model.named_parameters()}
    if cfg.tie_embeddings:  # one Parameter, listed once
        assert model.head.weight is model.embed.weight and "head.weight" not in names
    if CASES[case][0] == "qwen2":  # the biases were loaded and matter
        assert cfg.qkv_bias and {"layers.1.attn.bq", "layers.1.attn.bk", "layers.1.attn.bv"} <= names
        with torch.no_grad():
            for b in ("bq", "bk", "bv"):
                model.layers["1"].attn.get_parameter(b).zero_()
        assert (our_logits(model, ids) - ref).abs().max().item() > 100 * TOL
        model = load_hf(str(src))
    if cfg.rope_scaling == "llama3":  # the scaled frequencies matter at these positions
        assert (cfg.rope_factor, cfg.original_max_seq_len, cfg.norm_eps) == (4.0, 32, 1e-5)
        plain = load_hf(str(src))
        plain.freqs_cis = precompute_freqs_cis(12, 64, 10000.0)
        assert (our_logits(plain, ids) - ref).abs().max().item() > 100 * TOL

    save_hf(model, str(tmp_path / "out"))
    original, exported = tensors(src), tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    assert ("lm_head.weight" in original) == (not cfg.tie_embeddings)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == CASES[case][0] and config["tie_word_embeddings"] == cfg.tie_embeddings
    assert torch.equal(hf_logits(tmp_path / "out", ids), ref)
    assert hf_model_config(str(tmp_path / "out")) == cfg


def test_tied_and_biased_model_trains():
    """Gradients through a tied head and q/k/v biases: the tied embedding's gradient is the
    sum of an untied copy's embedding and head gradients; every bias gets one."""
    from dataclasses import replace

    from ds_parallel.model.init import init_weights
    from ds_parallel.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=40, max_seq_len=64,
                      qkv_bias=True, tie_embeddings=True, init_std=0.1)
    ctx = ParallelContext.single()
    tied = init_weights(Transformer(cfg, ctx), seed=0)
    untied = Transformer(replace(cfg, tie_embeddings=False), ctx)
    with torch.no_grad():
        for name, p in untied.named_parameters():
            p.copy_(tied.embed.weight if name == "head.weight" else tied.get_parameter(name))
    ids = input_ids()
    for model in (tied, untied):
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    torch.testing.assert_close(tied.embed.weight.grad, untied.embed.weight.grad + untied.head.weight.grad,
                               rtol=1e-5, atol=1e-7)
    assert all(tied.get_parameter(f"layers.{i}.attn.{b}").grad.abs().sum() > 0
               for i in (0, 1) for b in ("bq", "bk", "bv"))


def test_config_round_trip():
    for case, (model_type, extra) in CASES.items():
        hf_config = hf_classes(model_type)[0](**{**BASE, **extra}).to_dict()
        cfg = dense_config_from_hf(hf_config)
        assert dense_config_from_hf(hf_config_from_dense(cfg)) == cfg, case
    cfg = dense_config_from_hf(hf_classes("llama")[0](**{**BASE, **CASES["llama_head_dim_tied"][1]}).to_dict())
    assert (cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.tie_embeddings) == (16, 500.0, 1.0, True)
    # Older spelling: rope_scaling with "type", a top-level rope_theta and original context.
    old = {**BASE, "model_type": "llama", "rope_theta": 5e5, "original_max_position_embeddings": 16,
           "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 32}}
    old["rope_scaling"].pop("rope_theta")
    old["rope_scaling"]["type"] = old["rope_scaling"].pop("rope_type")
    cfg = dense_config_from_hf(old)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.original_max_seq_len, cfg.n_kv_heads) == (5e5, "llama3", 16, 2)


@pytest.mark.parametrize("model_type, change, key", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ("llama", {"rope_parameters": {**LLAMA3, "rope_type": "yarn"}}, "rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama", {"rope_parameters": {**LLAMA3, "low_freq_factor": None}}, "low_freq_factor"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention",
                                                                                "sliding_attention"]},
     "use_sliding_window"),
    ("mistral", {}, "model_type"),
])
def test_config_rejections(model_type, change, key):
    with pytest.raises(ValueError, match=key) as err:
        dense_config_from_hf({**BASE, "model_type": model_type, **change})
    assert "\n" not in str(err.value)


def test_sliding_window_below_every_layer_is_accepted():
    """Qwen2 slides only from max_window_layers on: past the last layer, nothing slides."""
    cfg = dense_config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2})
    assert cfg.qkv_bias and cfg.n_layers == 2


def test_export_and_config_rejections():
    dense = ModelConfig(vocab_size=96, dim=48, n_heads=4, n_kv_heads=2)
    for change, key in (({"rope_interleave": True}, "rope_interleave"), ({"mtp_depth": 1}, "mtp_depth"),
                        ({"attention": "mla"}, "attention"),
                        ({"n_routed_experts": 4, "n_activated_experts": 2}, "n_routed_experts")):
        with pytest.raises(ValueError, match=key):
            hf_config_from_dense(ModelConfig(**{**dense.__dict__, **change}))
    from ds_parallel.interop.hf_config import hf_config_from_model

    with pytest.raises(ValueError, match="tie_embeddings"):
        hf_config_from_model(ModelConfig(attention="mla", rope_interleave=True, tie_embeddings=True))
    for model, parallel, key in ((dict(tie_embeddings=True), dict(pp=2, zero_stage=1), "tie_embeddings"),
                                 (dict(rope_scaling="llama3", attention="mla"), {}, "rope_scaling"),
                                 (dict(rope_factor=4.0), {}, "rope_factor"),
                                 (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), {}, "rope_low_freq_factor"),
                                 (dict(qkv_bias=True, attention="mla"), {}, "qkv_bias")):
        with pytest.raises(ConfigError, match=key):
            validate(Config(model=ModelConfig(**model), parallel=ParallelConfig(**parallel)))


def _tp2_load(rank, world_size, root, references):
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.tensor_parallel import gather_logits

    ctx = build_parallel_context(Topology(world_size, tp=2))
    for case, reference in references.items():
        model = load_hf(os.path.join(root, case), ctx=ctx)
        assert model.embed.weight.shape[0] == BASE["vocab_size"] // 2
        if model.cfg.qkv_bias:
            assert model.layers["0"].attn.bk.shape == (12,)  # one of the two KV heads of 12 channels
        logits = gather_logits(our_logits(model, input_ids()), ctx)
        torch.testing.assert_close(logits, reference, rtol=0, atol=TOL)
        save_hf(model, os.path.join(root, f"{case}_tp2"))  # collective; rank 0 writes


@pytest.mark.dist
def test_tp2_load_matches_one_process(tmp_path):
    """Each rank reads its heads (biases cut like their weight's rows) and vocab rows; the
    gathered logits equal one process's and the gathered export its files."""
    from tests.harness import run_dist

    references = {}
    for case in CASES:
        src = write_hf(case, tmp_path / case)
        references[case] = our_logits(load_hf(str(src)), input_ids())
    run_dist(_tp2_load, 2, str(tmp_path), references)
    for case in CASES:
        original, exported = tensors(tmp_path / case), tensors(tmp_path / f"{case}_tp2")
        assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_convert_cli_round_trip(tmp_path):
    """HF Llama (tied, GQA, head_dim 16) -> our run directory -> HF through the launcher: the
    same tensors, the run directory holds the same model, and training resumes from it."""
    src = write_hf("llama_head_dim_tied", tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv in (["hf-to-ds", "--hf", str(src), "--out", str(tmp_path / "run")],
                 ["ds-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "back")]):
        proc = subprocess.run([sys.executable, str(REPO / "launchers" / "convert.py"), *argv],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = tensors(src), tensors(tmp_path / "back")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "step_0" / "meta.json").read_text())
    assert meta["config"]["model"]["tie_embeddings"] is True and meta["config"]["model"]["head_dim"] == 16
    ids = input_ids()
    assert torch.equal(our_logits(load_model(str(run)), ids), our_logits(load_hf(str(src)), ids))

    # The trainer resumes from it (DeepSpeed holds the tied Parameter once): two steps.
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    train_env = {k: v for k, v in env.items() if k not in launcher_vars}  # one process: it picks its own port
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "train.py"), "--config", str(run / "config.yaml"), "train.steps=2",
         "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=16", "train.log_every=1"],
        capture_output=True, text=True, env=train_env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0'} at step 0" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(case, tmp_path):
    """ds_parallel.inference.Generator on the loaded model (cached decoding, biases and tied
    head included) against transformers' greedy generate(): 2 prompts, 8 new tokens."""
    from ds_parallel.inference import Generator, SamplingParams

    src = write_hf(case, tmp_path / "hf")
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 5)]
    width, new = max(map(len, prompts)), 8
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model(src).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     min_new_tokens=new, eos_token_id=None, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
    logits = torch.stack(ref.logits, 1).float()  # (B, new, V)
    top2 = logits.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "near-tied argmax: pick another seed"
    tokens = ref.sequences[:, width:]
    ref_logprobs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = Generator(load_hf(str(src)), ParallelContext.single(), max_batch=2, max_len=32).generate(
        prompts, SamplingParams(max_new_tokens=new, temperature=0))
    for i, c in enumerate(out):
        assert c.token_ids == tokens[i].tolist(), f"{case}: prompt {i}"
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_logprobs[i], rtol=0, atol=1e-5)
