"""MLA decode cache per token per layer vs a naive per-head K/V cache (V2 §2.1.4, Table 1;
V3 §2.1).

  MLA (ours)  `MLACache`: kv_norm(latent) and the roped shared k^R per token,
              kv_lora_rank + qk_rope_head_dim values (V3: 512 + 64 = 576).
  naive       the cache of the expanded (non-absorbed) MLA forward: per head k of
              qk_nope + qk_rope and v of v_head_dim values, H * (nope + rope + v)
              (V3: 128 * (192 + 128) = 40,960). THIS is the ratio reported: same model,
              same attention, cached the obvious way.
  MHA d_h     V2 Table 1's yardstick: an MHA with the same H and head dim d_h = v_head_dim,
              2 * H * d_h (V3: 32,768, so 56.9x). It ignores the 64 RoPE dims of each key,
              which is why it is smaller than the naive cache above.

The paper shapes come from the presets (config numbers only, nothing allocated). For
debug_v3 the bytes are also measured from real tensors: an `MLACache` and a naive k/v
pair, and the cache is checked to be sufficient: token-by-token `forward_decode` through
it reproduces the full causal `forward` of the same MLA layer.

    .venv/bin/python benchmarks/mla_cache.py
"""
from __future__ import annotations

import torch
from common import table  # first: puts the repo on sys.path

from ds_parallel.config.presets import MODEL_PRESETS
from ds_parallel.config.schema import ModelConfig
from ds_parallel.model.mla import MLA, MLACache, precompute_mla_freqs_cis
from ds_parallel.parallel.groups import ParallelContext

SHAPES = ["debug_v3", "deepseek_v2_lite", "deepseek_v3"]


def model_cfg(preset: str) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[preset], "preset": preset})


def values_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Cached values per token per layer of each scheme."""
    return {
        "mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "naive": cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim),
        "mha": 2 * cfg.n_heads * cfg.v_head_dim,
    }


@torch.no_grad()
def measure_debug(cfg: ModelConfig, bsz: int = 2, seqlen: int = 64) -> tuple[dict[str, float], float]:
    """Bytes per token per layer of real fp32 tensors, and the max |decode - forward| check."""
    cache = MLACache(bsz, seqlen, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)
    assert cache.values_per_token == values_per_token(cfg)["mla"]
    naive_k = torch.zeros(bsz, seqlen, cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # (B, S, H, 192)
    naive_v = torch.zeros(bsz, seqlen, cfg.n_heads, cfg.v_head_dim)  # (B, S, H, 128)
    per_tok = {
        "mla": (cache.kv.nbytes + cache.pe.nbytes) / (bsz * seqlen),
        "naive": (naive_k.nbytes + naive_v.nbytes) / (bsz * seqlen),
    }
    torch.manual_seed(0)
    mla = MLA(0, cfg, ParallelContext.single()).eval()
    for p in mla.parameters():
        p.normal_(std=0.1) if p.dim() > 1 else p.fill_(1.0)
    freqs_cis = precompute_mla_freqs_cis(cfg, seqlen)
    x = torch.randn(bsz, seqlen, cfg.dim)
    full = mla(x, freqs_cis)
    prompt = 8
    outs = [mla.forward_decode(x[:, :prompt], freqs_cis, cache, 0)]
    outs += [mla.forward_decode(x[:, p : p + 1], freqs_cis, cache, p) for p in range(prompt, seqlen)]
    return per_tok, (torch.cat(outs, dim=1) - full).abs().max().item()


def main() -> None:
    rows = []
    for preset in SHAPES:
        cfg = model_cfg(preset)
        v = values_per_token(cfg)
        rows.append([
            preset, cfg.n_heads, f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}",
            f"{cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} / {cfg.v_head_dim}", v["mla"], v["naive"],
            f"{v['naive'] / v['mla']:.2f}x", v["mha"], f"{v['mha'] / v['mla']:.2f}x",
            f"{v['mla'] * 2 * cfg.n_layers:,}", f"{v['naive'] * 2 * cfg.n_layers:,}",
        ])
    print("Decode cache per token per layer, in values (elements); from the config numbers")
    print(table(["shape", "heads", "MLA d_c+d_R", "naive k / v head dims", "MLA values", "naive values",
                 "naive / MLA", "MHA(d_h=v) values", "MHA / MLA", "MLA bf16 B/token all layers",
                 "naive bf16 B/token all layers"], rows))

    cfg = model_cfg("debug_v3")
    per_tok, err = measure_debug(cfg)
    print()
    print("debug_v3, measured from allocated fp32 tensors "
          "(MLACache(2, 64, ...) vs naive k (B,S,H,nope+rope) + v (B,S,H,v)):")
    print(table(["scheme", "bytes / token / layer", "values (bytes / 4)"], [
        ["MLA (MLACache.kv + .pe)", f"{per_tok['mla']:.0f}", f"{per_tok['mla'] / 4:.0f}"],
        ["naive per-head k + v", f"{per_tok['naive']:.0f}", f"{per_tok['naive'] / 4:.0f}"],
        ["ratio naive / MLA", f"{per_tok['naive'] / per_tok['mla']:.2f}x", ""],
    ]))
    print(f"cache sufficiency: max |forward_decode through MLACache - forward| = {err:.2e} (8-token prefill, "
          "then 56 single-token steps)")
    assert err < 1e-4, "decoding through the compressed cache does not reproduce the full forward"
    assert per_tok["mla"] / 4 == values_per_token(cfg)["mla"] and per_tok["naive"] / 4 == values_per_token(cfg)["naive"]


if __name__ == "__main__":
    main()
