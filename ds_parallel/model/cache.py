"""Decode caches: preallocated per layer, addressed by slot and position.

A cache holds `max_slots` sequences of up to `max_len` positions. A decode forward names,
for each of its b rows, the slot it writes (`slots`, (b,)) and the position of its first
token (`pos`, (b,)), worked out once per forward into `Rows`: token t of row i is written at cache[slots[i], pos[i] + t] and attends
to positions 0..pos[i] + t of its own slot. Rows therefore run at their own positions
(prompts of different lengths, speculative steps that accept different numbers of tokens)
with no recomputation; a slot is reused by writing a new sequence from position 0, and what
lies beyond a row's position is never read (`Rows.visible`), so it need not be cleared.

    MLA (V2/V3): kv_norm(latent) and the roped shared k^R per token: kv_lora_rank +
                 qk_rope_head_dim values (V3: 512 + 64 = 576), replicated over tp.
    MHA / GQA:   k and v of this rank's KV heads: 2 x n_kv_heads/tp x head_dim values.

`ModelCache` holds one per main-model layer and one per MTP depth (its block attends over
its own past positions too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class Rows:
    """Where one decode forward's b rows of T tokens sit, worked out once for every layer:
    row i writes slot slots[i] at positions positions[i] = pos[i] .. pos[i] + T - 1 and
    reads positions 0..length-1 of that slot under `visible`."""
    slots: torch.Tensor  # (b,)
    positions: torch.Tensor  # (b, T)
    length: int  # max position + 1: how far the rows read
    visible: torch.Tensor  # (b, T, length) bool: s <= positions[i, t]
    rotations: torch.Tensor  # (b, T, rope/2) each token's RoPE rotation

    @classmethod
    def of(cls, freqs_cis: torch.Tensor, seqlen: int, pos: Union[int, torch.Tensor],
           slots: Optional[torch.Tensor] = None, bsz: Optional[int] = None) -> "Rows":
        """From the full RoPE table (max_seq_len, rope/2), each row's first position (an int:
        every row's) and its slot (default 0..b-1)."""
        device = freqs_cis.device
        if not torch.is_tensor(pos):
            pos = torch.full((bsz,), int(pos), dtype=torch.long, device=device)
        pos = pos.to(device)
        slots = torch.arange(pos.shape[0], device=device) if slots is None else slots.to(device)
        positions = pos.view(-1, 1) + torch.arange(seqlen, device=device)
        length = int(positions.max()) + 1
        assert length <= freqs_cis.shape[0], f"position {length - 1} is past model.max_seq_len={freqs_cis.shape[0]}"
        visible = torch.arange(length, device=device).view(1, 1, length) <= positions.unsqueeze(-1)
        return cls(slots, positions, length, visible, freqs_cis[positions])


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

    def write_read(self, rows: Rows, **new: torch.Tensor) -> list[torch.Tensor]:
        """Write `new` (each (b, T, ...)) at the rows' positions; return each tensor's rows
        over positions 0..rows.length - 1 (b, S, ...), in the order given."""
        assert rows.length <= self.max_len, \
            f"cache holds {self.max_len} positions per sequence, decoding reached {rows.length}"
        # Each (slot, position) as a row of the cache flattened to (slots * max_len, ...): one
        # index_copy_ per tensor, and one index_select of the rows' slots to read them back.
        flat = (rows.slots.view(-1, 1) * self.max_len + rows.positions).view(-1)  # (b * T,)
        out = []
        for name, value in new.items():
            cache = self.tensors[name]
            width = cache.shape[2:]
            cache.view(-1, *width).index_copy_(0, flat, value.reshape(-1, *width).to(cache.dtype))
            out.append(cache[:, :rows.length].index_select(0, rows.slots))
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
