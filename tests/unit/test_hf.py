"""HF DeepSeek-V2/V3 import / export against transformers itself (the independent reference):
tiny checkpoints written by `save_pretrained`, logits compared in fp32 on CPU."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ds_parallel.checkpoint import load_model  # noqa: E402
from ds_parallel.config.schema import ModelConfig  # noqa: E402
from ds_parallel.interop.hf import (  # noqa: E402
    HFCheckpoint, config_from_hf, hf_config_from_model, load_hf, load_hf_weights, named_tensors, save_hf,
)
from ds_parallel.model.init import init_weights  # noqa: E402
from ds_parallel.model.transformer import Transformer  # noqa: E402
from ds_parallel.parallel.groups import ParallelContext  # noqa: E402
from ds_parallel.parallel.shard import local_slice, shards_of  # noqa: E402
from ds_parallel.parallel.topology import Topology  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEQ, TOL = 24, 1e-4
# Every width different, so a wrong split or view cannot line up by luck.
BASE = dict(
    vocab_size=96, hidden_size=48, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
    v_head_dim=10, max_position_embeddings=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# YaRN with the original context (8) shorter than the test sequence (24).
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    "v3_qlora_grouped": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5)),
    "v3_no_qlora": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                               routed_scaling_factor=1.5)),
    "v3_yarn": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1, rope_parameters=YARN)),
    "v3_split_half_rope_no_shared": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_interleave=False,
                                                n_shared_experts=0)),
    "v2_greedy": ("v2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2)),
    "v2_group_limited_yarn": ("v2", dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
}


def hf_classes(version: str):
    if version == "v3":
        return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Weights well above 0.006 std so that differences show; norm gains around 1; a
    non-zero router bias, so that bias handling is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def write_hf(case: str, path: Path) -> Path:
    version, extra = CASES[case]
    config_cls, model_cls = hf_classes(version)
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**BASE, **extra}))
    randomise(model)
    model.save_pretrained(path)
    return path


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    config = json.loads((Path(path) / "config.json").read_text())
    model_cls = hf_classes("v3" if config["model_type"] == "deepseek_v3" else "v2")[1]
    with torch.no_grad():
        return model_cls.from_pretrained(path).eval()(ids).logits


def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def input_ids(vocab: int = BASE["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers, n_shared_experts=0
@pytest.mark.parametrize("case", list(CASES))
def test_load_and_save_match_transformers(case, tmp_path):
    src = write_hf(case, tmp_path / "hf")
    ids = input_ids()
    ref = hf_logits(src, ids)
    model = load_hf(str(src))
    diff = (our_logits(model, ids) - ref).abs().max().item()
    assert diff <= TOL, f"{case}: load_hf logits differ from transformers by {diff:.3g}"
    if CASES[case][0] == "v3":  # the (non-zero) router bias was loaded and changes the routing
        biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        saved = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        assert (our_logits(model, ids) - ref).abs().max().item() > 100 * TOL
        for b, value in zip(biases, saved):
            b.copy_(value)

    save_hf(model, str(tmp_path / "out"))
    exported = hf_logits(tmp_path / "out", ids)
    diff = (exported - ref).abs().max().item()
    assert diff <= TOL, f"{case}: transformers on save_hf output differs by {diff:.3g}"
    if CASES[case][1].get("rope_interleave", True):  # 1:1 weights: the export is exact
        assert torch.equal(exported, ref)


def test_convert_cli_round_trip(tmp_path):
    """HF -> our run directory -> HF through the launcher keeps the logits bit for bit."""
    src = write_hf("v3_qlora_grouped", tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["hf-to-ds", "--hf", str(src), "--out", str(tmp_path / "run")],
                 ["ds-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "back")]):
        proc = subprocess.run([sys.executable, str(REPO / "launchers" / "convert.py"), *argv],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ids = input_ids()
    ref = hf_logits(src, ids)
    assert torch.equal(hf_logits(tmp_path / "back", ids), ref)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "step_0" / "meta.json").read_text())
    assert meta["step"] == 0 and meta["config"]["model"]["n_routed_experts"] == 8
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0"
    assert (run / "config.yaml").is_file()
    assert torch.equal(our_logits(load_model(str(run)), ids), our_logits(load_hf(str(src)), ids))
    # The trainer resumes from zero moments: they are there, for every parameter.
    from ds_parallel.checkpoint import CheckpointReader

    reader = CheckpointReader(str(run / "checkpoints" / "step_0"))
    for name, p in load_model(str(run)).named_parameters():
        assert torch.equal(reader.full(f"{name}::exp_avg_sq"), torch.zeros(p.shape))

    # ... and does: one process, two steps from the converted weights.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    train_env = dict(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "train.py"), "--config", str(run / "config.yaml"), "train.steps=2",
         "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=16"],
        capture_output=True, text=True, env=train_env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0'} at step 0" in proc.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1


def test_convert_cli_reports_failure(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "convert.py"), "hf-to-ds", "--hf",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no config.json" in proc.stderr.splitlines()[-1]


def test_sharded_export_and_bf16(tmp_path):
    src = write_hf("v2_group_limited_yarn", tmp_path / "hf")
    model = load_hf(str(src))
    save_hf(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "sharded" / f).is_file() for f in files)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ids = input_ids()
    assert torch.equal(hf_logits(tmp_path / "sharded", ids), hf_logits(src, ids))
    assert torch.equal(our_logits(load_hf(str(tmp_path / "sharded")), ids), our_logits(model, ids))

    save_hf(model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    with HFCheckpoint(str(tmp_path / "bf16")) as hf:
        dtypes = {k: hf.read(k).dtype for k in hf.weight_map}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32  # the router stays fp32
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight"] == torch.bfloat16
    bf16 = load_hf(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16
    assert bf16.layers["1"].ffn.gate.e_score_correction_bias.dtype == torch.float32


def test_loader_streams_one_tensor_at_a_time(tmp_path):
    """Every checkpoint tensor is read exactly once, each read is a single tensor, and under a
    parallel layout each read is only this rank's slice (never the full tensor)."""
    src = write_hf("v3_qlora_grouped", tmp_path / "hf")
    full = load_hf(str(src))
    with HFCheckpoint(str(src)) as hf:
        load_hf_weights(Transformer(full.cfg, ParallelContext.single()), hf)
        names = [name for name, _ in hf.reads]
        assert sorted(names) == sorted(hf.weight_map)  # each once, and nothing else
        reads = list(hf.reads)
        assert all(n == hf.read(name).numel() for name, n in reads)

    # tp=2 x ep=2, rank 3 (tp rank 1, ep rank 1): no processes needed to allocate and load.
    ctx = ParallelContext(topo=Topology(world_size=4, tp=2, ep=2), rank=3)
    assert (ctx.tp_rank, ctx.ep_rank) == (1, 1)
    sharded = Transformer(full.cfg, ctx)
    with HFCheckpoint(str(src)) as hf:
        load_hf_weights(sharded, hf)
        read_sizes = dict(hf.reads)
    full_tensors = dict(named_tensors(full))
    for name, t in named_tensors(sharded):
        expected = local_slice(full_tensors[name], shards_of(t))
        assert torch.equal(t, expected), name
    assert read_sizes["model.embed_tokens.weight"] == BASE["vocab_size"] * BASE["hidden_size"] // 2
    assert read_sizes["model.layers.1.self_attn.o_proj.weight"] == BASE["hidden_size"] * 4 * 10 // 2
    experts = {n for n, _ in hf.reads if ".mlp.experts." in n}
    assert experts == {f"model.layers.{i}.mlp.experts.{e}.{w}_proj.weight"
                       for i in (1, 2) for e in (4, 5, 6, 7) for w in ("gate", "up", "down")}
    assert sharded.layers["1"].ffn.experts.w1.shape[0] == 4 and shards_of(sharded.layers["1"].ffn.experts.w1)


def test_mtp_export_and_import(tmp_path):
    """Our MTP module <-> HF layer num_hidden_layers + k, with the official names; transformers
    loads the main model and ignores that layer."""
    src = write_hf("v3_qlora_grouped", tmp_path / "hf")
    cfg = dataclasses.replace(config_from_hf(json.loads((src / "config.json").read_text())), mtp_depth=1)
    model = init_weights(Transformer(cfg, ParallelContext.single()), seed=3, std=0.1).eval()
    save_hf(model, str(tmp_path / "mtp"))
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    with HFCheckpoint(str(tmp_path / "mtp")) as hf:
        def layer(i):
            prefix = f"model.layers.{i}."
            return {k.removeprefix(prefix) for k in hf.weight_map if k.startswith(prefix)}

        extra = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight"}
        assert layer(3) == layer(2) | extra
        assert hf.shape("model.layers.3.eh_proj.weight") == (48, 96)
        assert torch.equal(hf.read("model.layers.3.shared_head.head.weight"), model.head.weight)
    ids = input_ids()
    assert (hf_logits(tmp_path / "mtp", ids) - our_logits(model, ids)).abs().max().item() <= TOL

    back = load_hf(str(tmp_path / "mtp"))
    assert back.cfg.mtp_depth == 1
    mine = dict(model.state_dict())
    assert all(torch.equal(t, mine[name]) for name, t in back.state_dict().items())
    assert any(name.startswith("mtp.0.block.ffn.experts") for name in mine)

    # The MTP layer's head copy must equal the shared head; stray tensors are not ignored.
    from safetensors.torch import load_file, save_file

    file = tmp_path / "mtp" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.3.shared_head.head.weight"] = tensors["model.layers.3.shared_head.head.weight"] + 1
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="differs from head.weight"):
        load_hf(str(tmp_path / "mtp"))
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    tensors["model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(16, 48)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="no place in the model"):
        load_hf(str(tmp_path / "mtp"))

    # A checkpoint written by transformers claims num_nextn_predict_layers=1 but has no MTP
    # weights: nothing to build.
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert load_hf(str(src)).cfg.mtp_depth == 0


def test_fp8_checkpoint_is_dequantised(tmp_path):
    """DeepSeek's released fp8 layout: e4m3 weights with a (ceil(out/128), ceil(in/128))
    `weight_scale_inv`; here with 16 x 16 blocks so that partial blocks occur."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = write_hf("v3_no_qlora", tmp_path / "hf")
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [16, 16]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    tensors, expected = {}, {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            w = f.get_tensor(key)
            if key.endswith("proj.weight") and w.dim() == 2:
                rows, cols = -(-w.shape[0] // 16), -(-w.shape[1] // 16)
                scale = torch.rand(rows, cols) * 0.01 + 0.005
                q = (w / scale.repeat_interleave(16, 0)[: w.shape[0]].repeat_interleave(16, 1)[:, : w.shape[1]])
                q = q.to(torch.float8_e4m3fn)
                tensors[key], tensors[key + "_scale_inv"] = q, scale
                deq = torch.empty(w.shape)
                for i in range(rows):
                    for j in range(cols):
                        block = (slice(16 * i, 16 * i + 16), slice(16 * j, 16 * j + 16))
                        deq[block] = q[block].float() * scale[i, j]
                expected[key] = deq
            else:
                tensors[key] = w
    save_file(tensors, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    model = load_hf(str(fp8_dir))
    assert torch.equal(model.layers["0"].attn.wq.weight, expected["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(model.layers["2"].ffn.experts.w2[5], expected["model.layers.2.mlp.experts.5.down_proj.weight"])


def test_config_round_trip():
    for case, (version, extra) in CASES.items():
        config_cls = hf_classes(version)[0]
        hf_config = config_cls(**{**BASE, **extra}).to_dict()
        cfg = config_from_hf(hf_config)
        assert config_from_hf(hf_config_from_model(cfg)) == cfg, case
    cfg = config_from_hf(hf_classes("v2")[0](**{**BASE, **CASES["v2_greedy"][1]}).to_dict())
    assert (cfg.score_func, cfg.n_expert_groups, cfg.norm_topk_prob, cfg.q_lora_rank) == ("softmax", 1, False, 0)
    cfg = config_from_hf(hf_classes("v3")[0](**{**BASE, **CASES["v3_yarn"][1]}).to_dict())
    assert (cfg.rope_factor, cfg.original_max_seq_len, cfg.mscale_all_dim, cfg.n_dense_layers) == (4.0, 8, 1.0, 1)
    # Older config.json spelling: rope_scaling with "type" and a top-level rope_theta.
    old = {**BASE, "model_type": "deepseek_v3", "n_group": 2, "topk_group": 1, "rope_theta": 50000.0, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0, "mscale_all_dim": 1.0}}
    del old["rope_parameters"]
    assert (config_from_hf(old).rope_theta, config_from_hf(old).rope_factor) == (50000.0, 4.0)


@pytest.mark.parametrize("change, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"rope_parameters": {**YARN, "mscale": 0.707}}, "mscale"),  # cos/sin factor != 1
    ({"rope_parameters": {**YARN, "mscale_all_dim": None}}, "mscale"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_config_rejections(change, key):
    with pytest.raises(ValueError, match=key):
        config_from_hf({**BASE, "model_type": "deepseek_v3", **change})


@pytest.mark.parametrize("change, key", [
    ({"norm_topk_prob": True}, "norm_topk_prob"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
])
def test_v2_config_rejections(change, key):
    with pytest.raises(ValueError, match=key):
        config_from_hf({**BASE, "model_type": "deepseek_v2", **change})


def test_export_rejections(tmp_path):
    with pytest.raises(ValueError, match="attention"):
        hf_config_from_model(ModelConfig())
    src = write_hf("v2_greedy", tmp_path / "hf")
    model = load_hf(str(src))
    model.layers["1"].ffn.gate.e_score_correction_bias.fill_(0.1)
    with pytest.raises(ValueError, match="no router bias"):
        save_hf(model, str(tmp_path / "out"))


def test_dense_mla_model_exports_as_v3(tmp_path):
    """No routed experts: every layer (and the MTP block) dense, first_k_dense_replace = all."""
    cfg = ModelConfig(attention="mla", rope_interleave=True, dim=48, n_heads=4, n_layers=2, vocab_size=96,
                      inter_dim=40, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
                      v_head_dim=10, max_seq_len=32, mtp_depth=1)
    model = init_weights(Transformer(cfg, ParallelContext.single()), seed=0, std=0.1).eval()
    save_hf(model, str(tmp_path / "dense"))
    ids = input_ids()
    assert (hf_logits(tmp_path / "dense", ids) - our_logits(model, ids)).abs().max().item() <= TOL
    back = load_hf(str(tmp_path / "dense"))
    assert (back.cfg.n_routed_experts, back.cfg.mtp_depth) == (0, 1)
    assert torch.equal(our_logits(back, ids), our_logits(model, ids))


def _load_and_save_sharded(rank, world_size, src, out_root, reference_logits):
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.tensor_parallel import gather_logits

    for name, topo in (("tp2", Topology(world_size, tp=2)), ("ep2", Topology(world_size, ep=2))):
        ctx = build_parallel_context(topo)
        model = load_hf(src, ctx=ctx)
        logits = gather_logits(our_logits(model, input_ids()), ctx)
        torch.testing.assert_close(logits, reference_logits, rtol=0, atol=TOL)
        save_hf(model, os.path.join(out_root, name))  # collective; rank 0 writes


@pytest.mark.dist
def test_parallel_load_and_gathered_save(tmp_path):
    """Each rank loads its tp / ep slices; save_hf gathers them back into the same files a
    single process writes."""
    from tests.harness import run_dist

    src = write_hf("v3_qlora_grouped", tmp_path / "hf")
    single = load_hf(str(src))
    save_hf(single, str(tmp_path / "single"))
    run_dist(_load_and_save_sharded, 2, str(src), str(tmp_path), our_logits(single, input_ids()))
    with HFCheckpoint(str(tmp_path / "single")) as ref:
        for name in ("tp2", "ep2"):
            with HFCheckpoint(str(tmp_path / name)) as out:
                assert set(out.weight_map) == set(ref.weight_map)
                assert all(torch.equal(out.read(k), ref.read(k)) for k in ref.weight_map), name
