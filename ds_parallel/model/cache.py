"""Decode caches: preallocated per layer, addressed by slot and position.

A cache holds `max_slots` sequences of up to `max_len` positions. A decode forward names,
for each of its b rows, the slot it writes (`slots`, (b,)) and the position of its first
token (`pos`, (b,)): token t of row i is written at cache[slots[i], pos[i] + t] and attends
to positions 0..pos[i] + t of its own slot. Rows therefore run at their own positions
(prompts of different lengths, speculative steps that accept different numbers of tokens)
with no recomputation; a slot is reused by writing a new sequence from position 0, and what
lies beyond a row's position is never read (`causal_mask`), so it need not be cleared.

    MLA (V2/V3): kv_norm(latent) and the roped shared k^R per token: kv_lora_rank +
                 qk_rope_head_dim values (V3: 512 + 64 = 576), replicated over tp.
    MHA / GQA:   k and v of this rank's KV heads: 2 x n_kv_heads/tp x head_dim values.

`ModelCache` holds one per main-model layer and one per MTP depth (its block attends over
its own past positions too).
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def _positions(pos: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(b, T): the cache position of every token of every row."""
    return pos.view(-1, 1) + torch.arange(seqlen, device=pos.device)


def as_rows(pos: Union[int, torch.Tensor], slots: Optional[torch.Tensor], bsz: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, slots) as (b,) long tensors: an int position applies to every row, and rows
    default to slots 0..b-1."""
    if not torch.is_tensor(pos):
        pos = torch.full((bsz,), int(pos), dtype=torch.long, device=device)
    if slots is None:
        slots = torch.arange(bsz, device=device)
    return pos.to(device), slots.to(device)


def rotary_rows(freqs_cis: torch.Tensor, pos: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(b, T, dim/2): each row's RoPE rotations from the full table (max_seq_len, dim/2)."""
    positions = _positions(pos, seqlen)
    assert int(positions.max()) < freqs_cis.shape[0], \
        f"position {int(positions.max())} is past model.max_seq_len={freqs_cis.shape[0]}"
    return freqs_cis[positions]


def causal_mask(pos: torch.Tensor, seqlen: int, length: int) -> torch.Tensor:
    """(b, T, S) bool, True where query t of row i may read key position s: s <= pos[i] + t."""
    keys = torch.arange(length, device=pos.device).view(1, 1, length)
    return keys <= _positions(pos, seqlen).unsqueeze(-1)


class LayerCache:
    """Named tensors of shape (max_slots, max_len, ...), written and read by rows."""

    def __init__(self, max_slots: int, max_len: int, dtype: torch.dtype, device, **widths: tuple[int, ...]):
        self.max_len = max_len
        self.tensors = {name: torch.zeros(max_slots, max_len, *shape, dtype=dtype, device=device)
                        for name, shape in widths.items()}

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position takes (all tensors), measured from the allocations."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors.values())

    def write_read(self, slots: torch.Tensor, pos: torch.Tensor, **new: torch.Tensor) -> list[torch.Tensor]:
        """Write `new` (each (b, T, ...)) at rows' positions; return each tensor's rows over
        positions 0..max(pos + T) - 1 (b, S, ...), in the order given."""
        seqlen = next(iter(new.values())).shape[1]
        positions = _positions(pos, seqlen)
        length = int(positions.max()) + 1
        assert length <= self.max_len, f"cache holds {self.max_len} positions per sequence, decoding reached {length}"
        rows = slots.view(-1, 1).expand_as(positions)
        out = []
        for name, value in new.items():
            cache = self.tensors[name]
            cache[rows, positions] = value.to(cache.dtype)
            out.append(cache[slots, :length])
        return out


class MLACache(LayerCache):
    """One MLA layer's compressed cache: `kv` (slots, len, kv_lora_rank), `pe` (slots, len, rope)."""

    def __init__(self, max_batch: int, max_seq_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(max_batch, max_seq_len, dtype, device, kv=(kv_lora_rank,), pe=(qk_rope_head_dim,))

    @classmethod
    def for_layers(cls, cfg, n_layers: int, max_batch: int, max_seq_len: int, dtype=torch.float32, device=None):
        return [cls(max_batch, max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
                for _ in range(n_layers)]

    @property
    def kv(self) -> torch.Tensor:
        return self.tensors["kv"]

    @property
    def pe(self) -> torch.Tensor:
        return self.tensors["pe"]

    @property
    def values_per_token(self) -> int:
        return self.kv.shape[-1] + self.pe.shape[-1]


class KVCache(LayerCache):
    """One MHA/GQA layer's cache of this rank's KV heads: `k`, `v` (slots, len, heads, head_dim)."""

    def __init__(self, max_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(max_slots, max_len, dtype, device, k=(n_kv_heads, head_dim), v=(n_kv_heads, head_dim))


class ModelCache:
    """A decode cache for every attention of a model: `layers[i]` for main layer i (this
    rank's, by global id), `mtp[k]` for MTP depth k + 1."""

    def __init__(self, model, max_slots: int, max_len: int, dtype: Optional[torch.dtype] = None, device=None):
        cfg, ctx = model.cfg, model.ctx
        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device

        def one():
            if cfg.attention == "mla":
                return MLACache(max_slots, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
            return KVCache(max_slots, max_len, cfg.mha_kv_heads // ctx.tp, cfg.mha_head_dim, dtype, device)

        self.max_slots, self.max_len = max_slots, max_len
        self.layers = {int(i): one() for i in model.layers}
        self.mtp = [one() for _ in range(len(model.mtp or ()))]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per cached position over the main model's layers on this rank."""
        return sum(c.bytes_per_token for c in self.layers.values())
