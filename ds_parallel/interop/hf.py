"""Hugging Face DeepSeek-V2 / V3, Llama and Qwen2 checkpoints <-> ds_parallel models (README.md,
"Hugging Face checkpoints"). config.json's model_type picks the config mapping: interop/hf_config.py
(deepseek_v2 / _v3: MLA) or interop/hf_dense.py (llama / qwen2: the dense MHA/GQA model).

Weights map 1:1 by name, with no reshuffling (established against transformers 5.24's
modeling_deepseek_v2 / _v3 and tested in tests/unit/test_hf.py):

    model.embed_tokens / model.norm / lm_head                  embed / norm / head
    model.layers.{i}.input_layernorm / post_attention_layernorm  layers.{i}.attn_norm / ffn_norm
    ...self_attn.{q_proj, q_a_proj, q_a_layernorm, q_b_proj,   ...attn.{wq, wq_a, q_norm, wq_b,
       kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}     wkv_a, kv_norm, wkv_b, wo}
    ...self_attn.{k_proj, v_proj}.weight (Llama, Qwen2)        ...attn.{wk, wv}.weight
    ...self_attn.{q_proj, k_proj, v_proj}.bias (Qwen2)         ...attn.{bq, bk, bv}
    ...mlp.{gate_proj, up_proj, down_proj}                     ...ffn.{w1, w3, w2} (dense FFN; also
                                                                 under shared_experts)
    ...mlp.gate.weight, mlp.gate.e_score_correction_bias       ...ffn.gate.weight, .e_score_correction_bias
    ...mlp.experts.{e}.{gate_proj, up_proj, down_proj}.weight  ...ffn.experts.{w1, w3, w2}[e] (stacked)
    MTP module k is HF layer num_hidden_layers + k:
    ...{enorm, hnorm, eh_proj, shared_head.norm}               mtp.{k}.{enorm, hnorm, eh_proj, norm}
    ...<decoder-layer names>                                   mtp.{k}.block.<block names>
    ...{embed_tokens, shared_head.head}                        copies of embed / head: written on
                                                                 export, checked equal on import
    With tied embeddings (Llama / Qwen2 tie_word_embeddings) the model has no head.weight: no
    lm_head.weight is written, and one found on import must equal the embedding.

Config keys, and what transformers really computes with them: interop/hf_config.py. Only
V3 with rope_interleave=False needs more than renaming: transformers rotates split halves
(i, i + r/2) there, so the rope rows of q and of kv_a_proj_with_mqa are permuted into our
interleaved pairs on import (V2, and V3 with rope_interleave=True, rotate our pairs: 1:1).

Conversion streams. The loader allocates the model (this rank's shards only), then reads one
tensor, or this rank's slice of it (safetensors slices lazily; `shard.local_index`), copies it
into place and drops it. The exporter writes safetensors files itself, tensor by tensor;
per-expert tensors are views of the stacked ones. Peak memory: the model plus about one
tensor. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import replace
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from torch import nn

from ds_parallel.atomic import write_atomic
from ds_parallel.checkpoint.stream import TensorItem, split_by_size, write_safetensors
from ds_parallel.checkpoint.weights import build_uninitialised, persistent_buffers
from ds_parallel.config.schema import ModelConfig
from ds_parallel.interop.hf_config import V2, V3, config_from_hf, hf_config_from_model
from ds_parallel.interop.hf_dense import DENSE_TYPES, dense_config_from_hf, hf_config_from_dense
from ds_parallel.model.transformer import Transformer
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.shard import ShardSpec, full_shape, gather_full, local_index, shards_of

# -------------------------------------------------------------------------- name map
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight",
}
_BLOCK_NAMES = {  # ours, inside a Block -> HF, inside a decoder layer
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.bq": "self_attn.q_proj.bias",
    "attn.bk": "self_attn.k_proj.bias",
    "attn.bv": "self_attn.v_proj.bias",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    # Stacked (E, ...) tensors: one HF tensor per expert; "{e}" is the global expert id.
    "ffn.experts.w1": "mlp.experts.{e}.gate_proj.weight",
    "ffn.experts.w3": "mlp.experts.{e}.up_proj.weight",
    "ffn.experts.w2": "mlp.experts.{e}.down_proj.weight",
}
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}
# HF-only copies of the shared embedding and head inside each MTP layer.
_MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}


def hf_name(name: str, n_layers: int) -> str:
    """Our parameter / buffer name -> its HF name ("{e}" marks a stacked expert tensor)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        prefix, rest = f"model.layers.{n_layers + int(m[1])}.", m[2]
        if rest in _MTP_NAMES:
            return prefix + _MTP_NAMES[rest]
        if rest.startswith("block.") and rest[len("block."):] in _BLOCK_NAMES:
            return prefix + _BLOCK_NAMES[rest[len("block."):]]
    raise KeyError(f"{name}: no Hugging Face name for this tensor")


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, then persistent buffers (the router bias): everything a checkpoint holds."""
    yield from model.named_parameters()
    yield from persistent_buffers(model)


def _rope_perm(rope_dim: int) -> torch.Tensor:
    """Row order taking split-half RoPE rows (i, i + r/2) to interleaved pairs (2i, 2i+1)."""
    half = torch.arange(rope_dim // 2)
    return torch.stack([half, half + rope_dim // 2], dim=1).flatten()


def _interleave_rope_rows(name: str, piece: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    leaf = name.rsplit(".", 2)[-2]
    perm = _rope_perm(cfg.qk_rope_head_dim)
    if leaf in ("wq", "wq_b"):  # rows: heads x [nope; rope]; a tp slice holds whole heads
        heads = piece.view(-1, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, piece.shape[-1])
        nope, pe = heads.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=1)
        return torch.cat([nope, pe[:, perm]], dim=1).view_as(piece)
    if leaf == "wkv_a":  # rows: [latent; rope]
        return torch.cat([piece[: cfg.kv_lora_rank], piece[cfg.kv_lora_rank:][perm]])
    return piece


# ----------------------------------------------------------------------------- reading
def _dequant_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek fp8 weights: value x scale of its (128 x 128) block (README_WEIGHTS.md)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def is_hf_directory(path: str) -> bool:
    """An HF checkpoint directory (config.json), not one of our step directories (meta.json)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "meta.json"))


class HFCheckpoint:
    """An HF checkpoint directory: its config and a name -> file index. `read` loads one
    tensor, or one slice of it, and nothing else (safetensors maps files lazily)."""

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        with open(config_path) as fh:
            self.config = json.load(fh)
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as fh:
                self.weight_map: dict[str, str] = json.load(fh)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files (pickled .bin checkpoints are never loaded)")
            self.weight_map = {}
            for fname in files:
                with safe_open(os.path.join(path, fname), framework="pt") as f:
                    self.weight_map.update({key: fname for key in f.keys()})
        block = (self.config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
        self.block = tuple(block)
        self.reads: list[tuple[str, int]] = []  # (name, elements) per read: the streaming record
        self._stack = contextlib.ExitStack()
        self._files: dict[str, Any] = {}

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._files.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = self._stack.enter_context(safe_open(os.path.join(self.path, fname), framework="pt"))
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, index: Optional[tuple[slice, ...]] = None) -> torch.Tensor:
        f = self._file(name)
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if name.endswith(".weight") and scale_name in self.weight_map:  # fp8: dequantise whole, then cut
            out = _dequant_blockwise(f.get_tensor(name), self._file(scale_name).get_tensor(scale_name), self.block)
            out = out if index is None else out[index]
        elif index is None or all(s == slice(None) for s in index):
            out = f.get_tensor(name)
        else:
            out = f.get_slice(name)[index]
        self.reads.append((name, out.numel()))
        return out


def _mtp_layers_present(hf: HFCheckpoint, cfg: ModelConfig) -> int:
    depth = 0
    while depth < cfg.mtp_depth and any(k.startswith(f"model.layers.{cfg.n_layers + depth}.") for k in hf.weight_map):
        depth += 1
    return depth


@torch.no_grad()
def load_hf_weights(model: Transformer, hf: HFCheckpoint) -> None:
    """Copy every tensor of `model` (this rank's slices) from `hf`, one at a time. Raises on a
    missing, misshapen or unused checkpoint tensor."""
    cfg, n_layers = model.cfg, model.cfg.n_layers
    split_half = hf.config.get("model_type") == V3 and not hf.config.get("rope_interleave", True)
    tied = "lm_head.weight" not in hf and hf.config.get("tie_word_embeddings", False)
    used: set[str] = set()
    local: dict[str, torch.Tensor] = {}

    def fetch(key: str, want: tuple[int, ...], specs: tuple[ShardSpec, ...], name: str) -> torch.Tensor:
        if key not in hf:
            raise KeyError(f"{hf.path}: no tensor {key} (for {name})")
        if hf.shape(key) != tuple(want):
            raise ValueError(f"{hf.path}: {key} has shape {hf.shape(key)}, model {name} needs {tuple(want)}")
        used.add(key)
        return hf.read(key, local_index(specs, want))

    for name, tensor in named_tensors(model):
        local[name] = tensor
        key = "model.embed_tokens.weight" if name == "head.weight" and tied else hf_name(name, n_layers)
        specs, shape = shards_of(tensor), full_shape(tensor)
        if "{e}" in key:
            ep = next((s for s in specs if s.dim == 0), None)
            inner = tuple(ShardSpec(s.dim - 1, s.index, s.count, s.group) for s in specs if s.dim != 0)
            n_local = tensor.shape[0]
            for i in range(n_local):
                e = (ep.index * n_local if ep else 0) + i  # global expert id
                tensor[i].copy_(fetch(key.format(e=e), shape[1:], inner, name))
            used.update(key.format(e=e) for e in range(shape[0]))  # other ep ranks read the rest
        elif key not in hf and name.endswith("e_score_correction_bias") and hf.config.get("model_type") == V2:
            tensor.zero_()  # V2 has no bias: selection by the plain scores
        else:
            piece = fetch(key, shape, specs, name)
            tensor.copy_(_interleave_rope_rows(name, piece, cfg) if split_half else piece)

    for key in sorted(set(hf.weight_map) - used):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)", key)
        copy_of = _MTP_COPIES[m[2]] if m and n_layers <= int(m[1]) < n_layers + cfg.mtp_depth else None
        if key == "lm_head.weight" and cfg.tie_embeddings:
            copy_of = "embed.weight"  # a tied checkpoint that still stores the head
        if copy_of is not None:
            ours = local[copy_of]
            if not torch.equal(fetch(key, full_shape(ours), shards_of(ours), key).to(ours.dtype), ours):
                raise ValueError(f"{hf.path}: {key} differs from {copy_of}, which the model shares with it")
        elif key.endswith(("weight_scale_inv", "rotary_emb.inv_freq")) or 0 in hf.shape(key):
            used.add(key)  # fp8 scales go with their weights; RoPE tables are derived; empty
            # tensors are transformers' zero-width shared experts when n_shared_experts=0
    unused = sorted(set(hf.weight_map) - used)
    if unused:
        raise ValueError(f"{hf.path}: {len(unused)} checkpoint tensors have no place in the model, e.g. {unused[:3]}")


def _model_config(hf: HFCheckpoint) -> ModelConfig:
    """The model an HF directory holds: its config.json, with MTP depths only where their
    weights are present."""
    if hf.config.get("model_type") in DENSE_TYPES:
        return dense_config_from_hf(hf.config)
    cfg = config_from_hf(hf.config)
    return replace(cfg, mtp_depth=_mtp_layers_present(hf, cfg))


def hf_model_config(path: str) -> ModelConfig:
    """`_model_config` of the HF directory `path`, reading headers only (no weights)."""
    with HFCheckpoint(path) as hf:
        return _model_config(hf)


def load_hf(path: str, dtype: torch.dtype = torch.float32, ctx: Optional[ParallelContext] = None) -> Transformer:
    """Build a model from an HF DeepSeek-V2/V3, Llama or Qwen2 checkpoint directory (eval mode). With a
    parallel `ctx`, each rank allocates and reads only its own TP/EP slices."""
    ctx = ctx or ParallelContext.single()
    with HFCheckpoint(path) as hf:
        model = build_uninitialised(_model_config(hf), ctx, dtype)
        load_hf_weights(model, hf)
    return model.eval()


# ----------------------------------------------------------------------------- writing
class _FullTensors:
    """Full (gathered) tensors of a model, one cached at a time: consecutive per-expert
    items share one gather of their stacked tensor. Collective under a parallel ctx."""

    def __init__(self, model: Transformer):
        self.tensors, self.ctx = dict(named_tensors(model)), model.ctx
        self._name, self._value = None, None

    def get(self, name: str) -> torch.Tensor:
        if name != self._name:
            t = self.tensors[name]
            self._value = None  # drop the previous one first
            self._value = gather_full(t, shards_of(t), self.ctx) if shards_of(t) else t.detach()
            self._name = name
        return self._value


def _hf_items(model: Transformer, dtype: Optional[torch.dtype], model_type: str) -> list[TensorItem]:
    cfg, full = model.cfg, _FullTensors(model)

    def out_dtype(name: str, t: torch.Tensor) -> torch.dtype:
        if dtype is None or not t.is_floating_point() or name.endswith(("ffn.gate.weight", "e_score_correction_bias")):
            return t.dtype  # the router stays fp32, as transformers keeps it
        return dtype

    def item(key: str, name: str, expert: Optional[int] = None) -> TensorItem:
        t = full.tensors[name]
        shape = full_shape(t)[1:] if expert is not None else full_shape(t)
        fetch = (lambda: full.get(name)[expert]) if expert is not None else (lambda: full.get(name))
        return TensorItem(key, tuple(shape), out_dtype(name, t), fetch)

    items = []
    for name, t in full.tensors.items():
        key = hf_name(name, cfg.n_layers)
        if name.endswith("e_score_correction_bias") and model_type == V2:
            continue  # checked zero by save_hf
        if "{e}" in key:
            items += [item(key.format(e=e), name, e) for e in range(full_shape(t)[0])]
        else:
            items.append(item(key, name))
        if name.endswith("ffn.gate.weight") and not cfg.n_shared_experts:
            # transformers builds zero-width shared experts for n_shared_experts=0: write them empty.
            layer, float_dtype = key.removesuffix("gate.weight"), out_dtype("", model.embed.weight)
            for proj, shape in (("gate_proj", (0, cfg.dim)), ("up_proj", (0, cfg.dim)), ("down_proj", (cfg.dim, 0))):
                items.append(TensorItem(f"{layer}shared_experts.{proj}.weight", shape, float_dtype,
                                        lambda shape=shape, dt=float_dtype: torch.empty(shape, dtype=dt)))
    for k in range(cfg.mtp_depth):
        for hf_leaf, ours in _MTP_COPIES.items():
            items.append(item(f"model.layers.{cfg.n_layers + k}.{hf_leaf}", ours))
    return items


def save_hf(
    model: Transformer, path: str, dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write `model` as an HF checkpoint directory (config.json + model.safetensors, or
    numbered shards + model.safetensors.index.json above `max_shard_bytes`) that
    transformers' DeepseekV2/V3ForCausalLM (MLA), or Llama/Qwen2ForCausalLM (MHA/GQA), loads.
    `dtype` casts floating weights (the router stays fp32). Under a parallel ctx every rank
    must call it; rank 0 writes."""
    cfg = model.cfg
    hf_config = hf_config_from_model(cfg) if cfg.attention == "mla" else hf_config_from_dense(cfg)
    model_type = hf_config["model_type"]
    for name, t in named_tensors(model):
        if model_type == V2 and name.endswith("e_score_correction_bias") and bool(t.any()):
            raise ValueError(f"{name} is non-zero but DeepSeek-V2 (softmax routing) has no router bias")
    items = _hf_items(model, dtype, model_type)
    writer = model.ctx.rank == 0
    if not writer:  # join the collectives of the gathers, write nothing
        for it in items:
            it.fetch()
        return
    os.makedirs(path, exist_ok=True)
    for fname in os.listdir(path):  # stale shards of an earlier export would confuse loaders
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", fname):
            os.remove(os.path.join(path, fname))
    shards = split_by_size(items, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for fname, shard in zip(names, shards):
        write_safetensors(os.path.join(path, fname), shard, {"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(it.nbytes for it in items)},
                 "weight_map": {it.name: fname for fname, shard in zip(names, shards) for it in shard}}
        _write_json(os.path.join(path, "model.safetensors.index.json"), index)
    hf_config["dtype"] = str(dtype or model.embed.weight.dtype).removeprefix("torch.")
    _write_json(os.path.join(path, "config.json"), hf_config)


def _write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2))
