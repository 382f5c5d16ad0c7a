"""Recording and replaying MoE routes: which experts each token went to.

In RL the rollout and the training forward route the same tokens independently; tiny
numerical differences flip top-k choices, and a policy trained on experts the rollout did not
use is off-policy in a way the importance ratio cannot see (routing replay, as in the MoE RL
literature). A tape, installed for the duration of a `with` block, is read by every MoE layer
(moe/layer.py):

    with recording() as tape:            # rollout or any forward: tape.routes[layer_id] gets
        model.decode(...)                # one (B, T, K) expert-id tensor per forward
    with replaying(routes, layer_ids):   # routes (B, T, L, K), -1 where not recorded
        engine(ids, objective=...)       # the gate selects the recorded experts

Replay fixes only the selection. The gate values are recomputed from the live scores at the
replayed experts (normalised and scaled as usual), so the router still receives gradients;
rows whose route is -1 (padding, tokens never fed in the rollout) route live. Nothing is
stored in the modules: the tape lives in a context variable for the block's duration.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class RouteTape:
    record: bool  # append each forward's routes to `routes`
    routes: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer id -> per-forward (B, T, K)
    replay: dict[int, torch.Tensor] = field(default_factory=dict)  # layer id -> (B, T, K), -1 = live

    def seen(self, layer_id: int, indices: torch.Tensor) -> None:
        if self.record:
            self.routes.setdefault(layer_id, []).append(indices.detach())

    def forced(self, layer_id: int) -> Optional[torch.Tensor]:
        return self.replay.get(layer_id)


_TAPE: ContextVar[Optional[RouteTape]] = ContextVar("ds_parallel_route_tape", default=None)


def current_tape() -> Optional[RouteTape]:
    return _TAPE.get()


@contextmanager
def _installed(tape: RouteTape) -> Iterator[RouteTape]:
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


def recording() -> "contextmanager[RouteTape]":
    """Every MoE forward inside the block appends its (B, T, K) expert ids to tape.routes."""
    return _installed(RouteTape(record=True))


@contextmanager
def replaying(routes: Optional[torch.Tensor], layer_ids: Sequence[int], record: bool = False
              ) -> Iterator[Optional[RouteTape]]:
    """MoE layers `layer_ids[l]` select routes[:, :, l] (B, T, K) inside the block (and
    record what they used when `record`); routes None: no-op."""
    if routes is None:
        yield None
        return
    if routes.dim() != 4 or routes.shape[2] != len(layer_ids):
        raise ValueError(f"routes of shape {tuple(routes.shape)}: expected (B, T, {len(layer_ids)}, K), "
                         f"one K-route per MoE layer {list(layer_ids)}")
    with _installed(RouteTape(record=record, replay={i: routes[:, :, l] for l, i in enumerate(layer_ids)})) as tape:
        yield tape


def select(live: torch.Tensor, forced: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, K) expert ids: the forced route of every token that has one (no -1), else live."""
    if forced is None:
        return live
    forced = forced.reshape(live.shape).to(live.device)
    return torch.where((forced >= 0).all(-1, keepdim=True), forced, live)


def routing_mismatch(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(differing, compared) token-layer routes between two (..., K) expert-id tensors, as
    sets (the order of the K choices does not matter); entries with any -1 are skipped."""
    valid = (a >= 0).all(-1) & (b >= 0).all(-1)
    differ = (a.sort(-1).values != b.sort(-1).values).any(-1) & valid
    return int(differ.sum()), int(valid.sum())
