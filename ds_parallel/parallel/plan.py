"""Dry-run planning of a layout without processes: parameter counts, per-stage memory and
pipeline bubbles, from the config alone (torchtitan's and Megatron's "fake process group"
planning, as pure arithmetic).

Parameter counts follow the model code exactly: one table of parameters (`Param`), each
with its full size and the group that splits it (tp, ep or none: replicated), from which
totals, activated counts and each rank's local count are derived (a test checks the names
and local sizes against every rank's built shard under tp, ep and pp). Memory per rank, in
bytes, for mixed precision with an fp32 master:

    weights     2 (bf16) or 4 (fp32) per local parameter; divided over dp / edp by ZeRO-3
    grads       same width as the weights; divided over dp / edp by ZeRO-2
    optimizer   fp32 master (4, bf16 runs only) + AdamW m and v (8, or 4 with
                precision.optimizer_moments=bf16) per parameter;
                divided over dp (dense) / edp (experts) by ZeRO-1 and up
    activations saved for backward, per micro-batch and layer (bytes per token):
                34 d x width/2 (Korthikanti et al. 2022, no recompute; the per-head and
                dense-MLP parts divided by tp), + 5 h s x width/2
                where the attention probabilities are stored (fp32 CPU MLA, not flash; fewer
                keys per query where kernels.causal_blocks skips them),
                + MLA latents and expanded heads, + k (3 i_moe + d) x width for MoE layers;
                train.recompute=selective subtracts what its modules no longer keep
                (`selective_saving_per_token`), full keeps each recomputed block's input
                and, in MoE blocks, the routing and received rows (`full_bytes_per_token`);
                1F1B keeps pp - i micro-batches in flight on stage i (`in_flight`);
                DualPipeV's rank r, the largest held mix of its two chunks over its
                schedule (`dualpipev_live`: at most 2 pp - r and r + 2), about pp + 1
                micro-batches of a whole rank's layers (V3 report Table 2: pp + 1)

`check_memory` compares the busiest rank's total with the device's memory (less
GPU_HEADROOM) before training starts, and `suggest_layout` finds the closest layout that fits.

Bubble fractions (time idle / total), with F = forward, B = full backward = 2F and
W = weight-gradient part of B = F, and F&B (an overlapped forward + backward pair) = F + B:

    1F1B       (p - 1)(F + B) / ((p - 1)(F + B) + m (F + B))  =  (p - 1) / (m + p - 1)
    DualPipe   (p/2 - 1)(F&B + B - 3W) / (that + m (F + B))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ds_parallel.config.load import ConfigError
from ds_parallel.config.schema import (DUALPIPEV, Config, ModelConfig, data_parallel_size, micro_batches_per_step,
                                      n_pipeline_stages, stage_layer_counts)
from ds_parallel.parallel.topology import Topology

# Device memory left outside the estimate: CUDA context and kernels, NCCL buffers, the
# caching allocator's fragmentation and temporaries the estimate does not count.
GPU_HEADROOM = 0.10
GIB = 2**30


@dataclass(frozen=True)
class Param:
    """One parameter as the model code builds it: `name` relative to the model (as in
    `named_parameters()`), its full size, and how it is split over ranks: "tp" (the
    column/row/vocab-parallel layers of parallel/tensor_parallel.py), "ep" (the routed
    experts, moe/experts.py) or None (replicated: norms, MLA's down-projections, the router,
    the shared experts, MTP's eh_proj)."""

    name: str
    numel: int
    shard: Optional[str] = None

    def local(self, tp: int, ep: int) -> int:
        return self.numel // {"tp": tp, "ep": ep}.get(self.shard, 1)


def attention_params(m: ModelConfig, prefix: str) -> list[Param]:
    d, h = m.dim, m.n_heads
    if m.attention == "mla":
        qk = m.qk_head_dim
        if m.q_lora_rank:
            q = [Param(f"{prefix}wq_a.weight", m.q_lora_rank * d), Param(f"{prefix}q_norm.weight", m.q_lora_rank),
                 Param(f"{prefix}wq_b.weight", h * qk * m.q_lora_rank, "tp")]
        else:
            q = [Param(f"{prefix}wq.weight", h * qk * d, "tp")]
        return q + [
            Param(f"{prefix}wkv_a.weight", (m.kv_lora_rank + m.qk_rope_head_dim) * d),
            Param(f"{prefix}kv_norm.weight", m.kv_lora_rank),
            Param(f"{prefix}wkv_b.weight", h * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank, "tp"),
            Param(f"{prefix}wo.weight", d * h * m.v_head_dim, "tp"),
        ]
    hd, kv = m.mha_head_dim, m.mha_kv_heads
    out = [Param(f"{prefix}wq.weight", h * hd * d, "tp"), Param(f"{prefix}wk.weight", kv * hd * d, "tp"),
           Param(f"{prefix}wv.weight", kv * hd * d, "tp"), Param(f"{prefix}wo.weight", d * h * hd, "tp")]
    if m.qkv_bias:  # Qwen2
        out += [Param(f"{prefix}bq", h * hd, "tp"), Param(f"{prefix}bk", kv * hd, "tp"), Param(f"{prefix}bv", kv * hd, "tp")]
    return out


def ffn_params(m: ModelConfig, layer_id: int, prefix: str) -> list[Param]:
    d = m.dim
    if not m.is_moe_layer(layer_id):
        return [Param(f"{prefix}{w}.weight", d * m.inter_dim, "tp") for w in ("w1", "w2", "w3")]
    out = [Param(f"{prefix}gate.weight", m.n_routed_experts * d)]
    out += [Param(f"{prefix}experts.{w}", m.n_routed_experts * m.moe_inter_dim * d, "ep") for w in ("w1", "w2", "w3")]
    if m.n_shared_experts:
        out += [Param(f"{prefix}shared_experts.{w}.weight", m.n_shared_experts * m.moe_inter_dim * d)
                for w in ("w1", "w2", "w3")]
    return out


def block_params(m: ModelConfig, layer_id: int, prefix: str) -> list[Param]:
    return ([Param(f"{prefix}attn_norm.weight", m.dim)] + attention_params(m, f"{prefix}attn.")
            + [Param(f"{prefix}ffn_norm.weight", m.dim)] + ffn_params(m, layer_id, f"{prefix}ffn."))


def mtp_module_params(m: ModelConfig, k: int) -> list[Param]:
    p, d = f"mtp.{k}.", m.dim
    return ([Param(f"{p}enorm.weight", d), Param(f"{p}hnorm.weight", d), Param(f"{p}eh_proj.weight", 2 * d * d)]
            + block_params(m, m.n_layers + k, f"{p}block.") + [Param(f"{p}norm.weight", d)])


def stage_params(m: ModelConfig, layer_ids, has_embed: bool, has_head: bool) -> list[Param]:
    """What `Transformer(m, ctx, layer_ids, has_embed, has_head)` builds, full sizes."""
    out = [Param("embed.weight", m.vocab_size * m.dim, "tp")] if has_embed else []
    for i in layer_ids:
        out += block_params(m, i, f"layers.{i}.")
    if has_head:
        out.append(Param("norm.weight", m.dim))
        if not (m.tie_embeddings and has_embed):  # tied: the head is the embedding's Parameter
            out.append(Param("head.weight", m.vocab_size * m.dim, "tp"))
        for k in range(m.mtp_depth):
            out += mtp_module_params(m, k)
    return out


def active_numel(m: ModelConfig, params: list[Param]) -> int:
    """Parameters one token touches: the routed experts count K of E."""
    experts = sum(p.numel for p in params if p.shard == "ep")
    routed = experts // m.n_routed_experts * m.n_activated_experts if experts else 0
    return sum(p.numel for p in params) - experts + routed


def model_params(m: ModelConfig) -> dict[str, int]:
    """Parameter counts of the main model (embedding + layers + norm + head) and MTP."""
    mtp = [q for k in range(m.mtp_depth) for q in mtp_module_params(m, k)]
    main = [q for q in stage_params(m, range(m.n_layers), True, True) if not q.name.startswith("mtp.")]
    return {"total": sum(q.numel for q in main), "active": active_numel(m, main),
            "mtp_total": sum(q.numel for q in mtp), "mtp_active": active_numel(m, mtp),
            "embed_head": (1 if m.tie_embeddings else 2) * m.vocab_size * m.dim}


def layer_cost(m: ModelConfig, layer_id: int) -> float:
    """Relative compute of a layer per token: activated parameters (2 FLOPs each forward)."""
    return float(active_numel(m, block_params(m, layer_id, "")))


def split_layers(m: ModelConfig, n_stages: int, explicit: str | None = None) -> list[list[int]]:
    """Layer ids per (virtual) stage. Explicit "a,b,..." counts win (a stage may be empty);
    otherwise contiguous stages that minimise the largest stage cost, with the embedding
    charged to the first stage and the head (plus MTP) to the last."""
    if explicit:
        counts = stage_layer_counts(explicit, n_stages, m.n_layers)
    else:
        costs = [layer_cost(m, i) for i in range(m.n_layers)]
        edge = m.vocab_size * m.dim
        head = edge + model_params(m)["mtp_active"]
        counts = _balanced_counts(costs, n_stages, first_extra=edge * 0.1, last_extra=float(head))
    stages, start = [], 0
    for c in counts:
        stages.append(list(range(start, start + c)))
        start += c
    return stages


@dataclass(frozen=True)
class PipelineLayout:
    """Which layers each pipeline stage runs and which pp rank holds each stage.

    1F1B: pp stages, stage s on rank s. DualPipeV (the V-shaped DualPipe): 2 pp stages, rank
    r holds stages r and 2pp-1-r, so rank 0 holds both the embedding (stage 0) and the head
    and MTP (the last stage): the weights MTP shares with the main model sit on one rank, as
    in DeepSeek-V3. Under 1F1B with MTP the last rank keeps a copy of the embedding whose
    gradient is summed with the first rank's (Megatron's tied word embeddings)."""

    schedule: str
    pp: int
    stages: tuple[tuple[int, ...], ...]  # layer ids per stage, in execution order
    mtp: bool = False

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def rank_of(self, stage: int) -> int:
        return stage if stage < self.pp else 2 * self.pp - 1 - stage

    @property
    def is_dualpipe(self) -> bool:
        return self.schedule == DUALPIPEV

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.n_stages) if self.rank_of(s) == rank]

    def layers_of(self, rank: int) -> list[int]:
        return sorted(i for s in self.stages_of(rank) for i in self.stages[s])

    def has_head(self, rank: int) -> bool:
        """Final norm, output head and the MTP modules."""
        return self.rank_of(self.n_stages - 1) == rank

    def has_embed(self, rank: int) -> bool:
        return self.rank_of(0) == rank or (self.mtp and self.has_head(rank))

    @property
    def tied_embedding(self) -> bool:
        """Two ranks hold the embedding (1F1B with MTP): their gradients must be summed."""
        return self.mtp and self.rank_of(0) != self.rank_of(self.n_stages - 1)


def pipeline_layout(m: ModelConfig, pp: int, schedule: str = "1f1b", explicit: str | None = None) -> PipelineLayout:
    stages = split_layers(m, n_pipeline_stages(pp, schedule), explicit)
    return PipelineLayout(schedule, pp, tuple(tuple(s) for s in stages), mtp=m.mtp_depth > 0)


def _balanced_counts(costs: list[float], pp: int, first_extra: float, last_extra: float) -> list[int]:
    """Contiguous partition minimising the max part cost (binary search on the bound)."""
    n = len(costs)
    if pp > n:
        raise ValueError(f"parallel.pp={pp} exceeds model.n_layers={n}")

    def parts_for(bound: float) -> list[int] | None:
        counts, acc, cnt = [], first_extra, 0
        for i, c in enumerate(costs):
            extra = last_extra if len(counts) == pp - 1 and i == n - 1 else 0.0
            if cnt and acc + c + extra > bound:
                counts.append(cnt)
                acc, cnt = 0.0, 0
            acc += c + (last_extra if i == n - 1 else 0.0)
            cnt += 1
        counts.append(cnt)
        if len(counts) > pp or acc > bound:
            return None
        while len(counts) < pp:  # split the largest part to use every stage
            j = max(range(len(counts)), key=lambda k: counts[k])
            if counts[j] < 2:
                return None
            counts[j:j + 1] = [counts[j] - counts[j] // 2, counts[j] // 2]
        return counts

    lo, hi = max(costs), sum(costs) + first_extra + last_extra
    best = parts_for(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        got = parts_for(mid)
        if got is not None:
            best, hi = got, mid
        else:
            lo = mid
    return best


def activation_bytes_per_token(m: ModelConfig, layer_id: int, seqlen: int, tp: int, width: int) -> float:
    """Bytes saved for backward per token by one layer on one tp rank (no recompute, no
    sequence parallel). Attention is a fused kernel that keeps no (h, s, s) probabilities
    (flash or memory-efficient SDPA), except in fp32 runs (CPU) of MLA: torch's CPU flash
    kernel takes only equal q/k and v widths, so attention keeps the fp32 softmax output of
    the keys each query's block reads, h/tp x s per token from SDPA's math path below 128
    tokens, 5/8 of that from kernels.causal_blocks at 256 (which imports torch: fp32 plans
    only; the bf16 plans of GPU configs stay torch-free). Korthikanti et al.'s attention
    half: of its 18 d per token, 10 (block input, norms, residuals) stay replicated under tp and 8
    (per-head q, k, v, attention output) split; MLA's latents are replicated too. A SwiGLU
    keeps its input and four hidden-wide tensors (w1 x, w3 x, silu(w1 x), their product),
    split under tp in a dense layer only: MoE layers run their experts (routed and shared,
    whose weights are not tp-split) on every tp rank's full token set."""
    out = (10 + 8 / tp) * m.dim * width / 2  # Korthikanti et al. 2022 (no recompute)
    if m.attention == "mla":  # latents, expanded per-head q/k (nope + rope) and v
        out += (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim
                + m.n_heads / tp * (2 * m.qk_head_dim + m.v_head_dim)) * width
        if width == 4:  # the probabilities of the blocks (docstring)
            from ds_parallel.kernels import causal_block_keys
            out += m.n_heads / tp * causal_block_keys(seqlen) * 4
    if not m.is_moe_layer(layer_id):
        return out + (m.dim + 4 * m.inter_dim / tp) * width
    out += (m.dim + 4 * m.n_shared_experts * m.moe_inter_dim) * width  # the shared experts' SwiGLU
    # Per routed pair: its input row, five hidden-wide tensors (the four of a SwiGLU and the
    # gate-weighted product w2 reads, moe/experts.py), its int64 row / order / expert ids and
    # fp32 gate; the router's scores. The sums over pairs and over a token's returned rows keep
    # only their indices (moe/permute.py).
    k = m.n_activated_experts
    return out + k * ((5 * m.moe_inter_dim + m.dim) * width + 3 * 8 + 4) + m.n_routed_experts * 4


def head_bytes_per_token(m: ModelConfig, tp: int, width: int) -> float:
    """Bytes per token the output head keeps (once for the main model, once per MTP depth):
    its final norm's input, fp32 intermediates and output (the head's input), and the fp32
    logits and log-probabilities of the cross-entropy, vocab / tp wide."""
    return (2 * width + _norm_bytes(width)) * m.dim + 4 + 2 * (m.vocab_size / tp) * 4


def _norm_bytes(width: int) -> float:
    """Bytes per channel an RMSNorm keeps beyond its input (model/norm.py computes in fp32):
    the normalised fp32 x, and in a bf16 run also the fp32 copy of its input, less the bf16
    input a checkpoint keeps instead."""
    return 4 + (0 if width == 4 else 4 - width)


def selective_saving_per_token(m: ModelConfig, layer_id: int, tp: int, width: int, modules) -> float:
    """Bytes per token one layer no longer keeps under selective recompute of `modules`
    (model/recompute.py), exact for the code as written (tests/unit/test_recompute.py):
    norm: each RMSNorm's fp32 intermediates (per channel `_norm_bytes`, plus its 4-byte rsqrt);
    mla_up_proj: the normed latents wq_b and wkv_b read (and their norms' intermediates when
    "norm" is not also set); swiglu: silu(w1 x), one hidden of every SwiGLU (dense split over
    tp; shared experts), two of a routed pair's (also silu(w1 x) * w3 x, which its gate
    multiplies, moe/experts.py)."""
    modules, out = set(modules), 0.0
    latents = []
    if m.attention == "mla":
        latents = ([m.q_lora_rank] if m.q_lora_rank else []) + [m.kv_lora_rank]
    if "norm" in modules:
        out += sum(c * _norm_bytes(width) + 4 for c in [m.dim, m.dim] + latents)
    if "mla_up_proj" in modules:
        out += sum(c * width for c in latents)
        if "norm" not in modules:
            out += sum(c * _norm_bytes(width) + 4 for c in latents)
    if "swiglu" in modules:
        if m.is_moe_layer(layer_id):
            out += (2 * m.n_activated_experts + m.n_shared_experts) * m.moe_inter_dim * width
        else:
            out += m.inter_dim / tp * width
    return out


def full_bytes_per_token(m: ModelConfig, layer_id: int, ep: int, width: int) -> float:
    """Bytes per token a fully recomputed block keeps (model/block.py, moe/layer.py): its
    input; a MoE block also the FFN input (which the router and shared experts read; the
    router's fp32 copy in bf16 runs), the received rows of the dispatch (one per destination
    rank, at most min(K, ep)) and their combined outputs, and the routing in fp32 (scores
    and balance-loss terms, about 2 E, plus gate values and expert ids, about 10 K + 4).
    At ep = 1 without capacity dropping neither is kept (`dispatch_rows_per_token`)."""
    out = m.dim * width
    if m.is_moe_layer(layer_id):
        k = m.n_activated_experts
        out += (1 + dispatch_rows_per_token(m, ep)) * m.dim * width + (0 if width == 4 else 4 * m.dim)
        out += (2 * m.n_routed_experts + 10 * k + 4) * 4
    return out


def dispatch_rows_per_token(m: ModelConfig, ep: int) -> int:
    """Hidden-wide rows per token the dispatch path of a MoE layer keeps (moe/layer.py
    `MoE._dispatched`): the rows received for the experts (one per destination rank, at most
    min(K, ep)) and the combined outputs. None at ep = 1 without capacity dropping, where
    the experts read the FFN input itself (`MoE._local`)."""
    if ep == 1 and not m.capacity_factor:
        return 0
    return 1 + min(m.n_activated_experts, ep)


def layer_activation_bytes(m: ModelConfig, layer_id: int, seqlen: int, tp: int, ep: int, width: int,
                           recompute: str = "none", modules=(), full: bool = False) -> float:
    """Saved bytes per token of one layer under train.recompute `recompute`; `full`: this
    block is one of the fully recomputed ones (`full_recompute_blocks`)."""
    if recompute == "full" and full:
        return full_bytes_per_token(m, layer_id, ep, width)
    out = activation_bytes_per_token(m, layer_id, seqlen, tp, width)
    if recompute == "selective":
        out -= selective_saving_per_token(m, layer_id, tp, width, modules)
    return out


def stage_blocks(stage_layers, n_layers: int, mtp_depth: int) -> list[list[int]]:
    """Each stage's block ids in order; MTP depth k (block id n_layers + k) after the last
    stage's layers."""
    out = [list(ids) for ids in stage_layers]
    out[-1] += [n_layers + k for k in range(mtp_depth)]
    return out


def full_recompute_blocks(stage_blocks_: list[list[int]], recompute_layers: int) -> list[int]:
    """Block ids fully recomputed under train.recompute=full (Megatron's "block" method): of
    each stage's blocks in order, the first `recompute_layers`, or all with 0."""
    return [i for ids in stage_blocks_ for i in (ids if recompute_layers == 0 else ids[:recompute_layers])]


def bubble_fraction(schedule: str, pp: int, n_micro: int) -> float:
    if pp == 1:
        return 0.0
    f, b, w = 1.0, 2.0, 1.0
    if schedule == DUALPIPEV:
        bubble = (pp / 2 - 1) * ((f + b) + b - 3 * w)
    else:
        bubble = (pp - 1) * (f + b)
    return bubble / (bubble + n_micro * (f + b))


@dataclass
class StagePlan:
    stage: int
    layers: list[int]
    params: int  # local parameters on one rank of this stage
    expert_params: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def in_flight(layout: PipelineLayout, stage: int, n_micro: int) -> int:
    """1F1B: micro-batches whose activations `stage` holds at its peak; stage s warms up with
    pp - s forwards before its first backward. (DualPipeV: `dualpipev_live`.)"""
    return min(layout.pp - stage, n_micro)


def dualpipev_live(pp: int, rank: int, n_micro: int) -> list[tuple[int, int]]:
    """(first chunk, second chunk) micro-batches whose activations DualPipeV's rank `rank`
    holds right after each of its forwards, the only moments the held bytes grow. Walks the
    schedule as torch's ScheduleDualPipeV orders it (DeepSeek's dualpipev.py): 2(pp - r - 1)
    forwards of the first chunk; r + 1 forward pairs of both chunks; pp - r - 1 zero-bubble
    triples on the second chunk (input backward, weight backward, forward); then the
    overlapped F/B pairs, whose forward runs first. An input backward frees its micro-batch
    only after the chunk's next forward (torch 2.13 keeps the graph for the weight pass until
    then: measured in tests/dist/test_pipeline_memory.py). The rank's peak is the largest
    n0 a0 + n1 a1 over these states, a0, a1 the chunks' bytes per micro-batch: rank 0 never
    holds its first chunk's 2 pp micro-batches and its second chunk's 2 at once."""
    live, pending, states = [0, 0], [0, 0], []

    def forward(chunk):
        live[chunk] += 1
        states.append((live[0], live[1]))
        live[chunk] -= pending[chunk]
        pending[chunk] = 0

    def backward(chunk):
        live[chunk] -= 1

    for _ in range(2 * (pp - rank - 1)):
        forward(0)
    for _ in range(rank + 1):
        forward(0)
        forward(1)
    for _ in range(pp - rank - 1):
        pending[1] += 1  # input backward of the second chunk, then its weight backward
        forward(1)
    for _ in range(n_micro - 2 * pp + rank + 1):
        forward(0)
        backward(1)
        forward(1)
        backward(0)
    for _ in range(pp - rank - 1):
        backward(1)
        forward(1)
        backward(0)
    return states  # the rest of the schedule only runs backwards


def rank_params(m: ModelConfig, layout: PipelineLayout, rank: int) -> list[Param]:
    """The parameters pipeline rank `rank` builds (model/__init__.py `build_model`)."""
    return stage_params(m, layout.layers_of(rank), layout.has_embed(rank), layout.has_head(rank))


def plan(cfg: Config, world_size: int) -> dict:
    """The whole report for `cfg` on `world_size` ranks (validated first): one StagePlan per
    pipeline rank (under DualPipeV a rank runs two stages of the V)."""
    from ds_parallel.config.validate import validate

    validate(cfg, world_size, purpose="plan")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, ep = p.tp, p.pp, p.ep
    topo = Topology(world_size, tp, pp, p.cp, ep)
    dp, edp = topo.dp, topo.edp
    width = 2 if cfg.precision.dtype == "bf16" else 4
    master = 4 if cfg.precision.dtype == "bf16" else 0
    moments = 2 * (2 if cfg.precision.optimizer_moments == "bf16" else 4)  # AdamW m and v
    n_micro = micro_batches_per_step(t.global_batch_size, t.micro_batch_size, dp)
    layout = pipeline_layout(m, pp, p.pp_schedule, p.pp_layers)
    tokens = t.micro_batch_size * t.seq_len
    mtp_ids = [m.n_layers + k for k in range(m.mtp_depth)]
    # ZeRO-1 and up split the optimizer over dp (dense) / edp (experts), ZeRO-2 also the
    # gradients, ZeRO-3 also the weights.
    div = {z: (dp if p.zero_stage >= z else 1, edp if p.zero_stage >= z else 1) for z in (1, 2, 3)}
    out = []
    for rank in range(pp):
        params = rank_params(m, layout, rank)
        local_experts = sum(q.local(tp, ep) for q in params if q.shard == "ep")
        local_dense = sum(q.local(tp, ep) for q in params) - local_experts

        def per_rank(bytes_per_param, z):
            return bytes_per_param * (local_dense / div[z][0] + local_experts / div[z][1])

        per_micro = {}  # {stage of this rank: activation bytes of one micro-batch}
        for stage in layout.stages_of(rank):
            last = stage == layout.n_stages - 1
            ids = list(layout.stages[stage]) + (mtp_ids if last else [])
            full = set(full_recompute_blocks([ids], t.recompute_layers)) if t.recompute == "full" else set()
            stage_acts = tokens * sum(layer_activation_bytes(m, i, t.seq_len, tp, ep, width, t.recompute,
                                                             t.recompute_modules, i in full) for i in ids)
            if last:
                stage_acts += tokens * head_bytes_per_token(m, tp, width) * (1 + m.mtp_depth)
                if t.recompute == "selective" and "norm" in t.recompute_modules:  # final norm, MTP's three
                    stage_acts -= tokens * (1 + 3 * m.mtp_depth) * (m.dim * _norm_bytes(width) + 4)
            per_micro[stage] = stage_acts
        if layout.is_dualpipe:  # the V's first chunk, then its second
            first, second = per_micro.values()
            acts = max(n0 * first + n1 * second for n0, n1 in dualpipev_live(pp, rank, n_micro))
        else:
            acts = sum(a * in_flight(layout, stage, n_micro) for stage, a in per_micro.items())
        n_layers_here = len(layout.layers_of(rank)) + (m.mtp_depth if layout.has_head(rank) else 0)
        notes = [f"{n_layers_here} layers"] + (["embedding copy (tied)"] if layout.tied_embedding and rank == pp - 1 else [])
        out.append(StagePlan(rank, layout.layers_of(rank), local_dense + local_experts, local_experts,
                             per_rank(width, 3), per_rank(width, 2), per_rank(master + moments, 1), acts, notes))
    counts = model_params(m)
    return {
        "world_size": world_size, "tp": tp, "pp": pp, "ep": ep, "dp": dp, "edp": edp,
        "zero_stage": p.zero_stage, "schedule": p.pp_schedule, "micro_batches": n_micro,
        "bubble_fraction": bubble_fraction(p.pp_schedule, pp, n_micro),
        "params": counts, "stages": out, "layout": layout,
    }


def recompute_modes(cfg: Config, world_size: int) -> dict[str, tuple[float, float]]:
    """{mode: (activation bytes, total bytes) of the busiest rank} for train.recompute = none,
    selective (cfg's recompute_modules, or all when it lists none) and full (cfg's
    recompute_layers), the rest of cfg as it is (launchers/plan.py prints them)."""
    import dataclasses

    from ds_parallel.config.validate import RECOMPUTE_MODULES

    out = {}
    for mode in ("none", "selective", "full"):
        train = dataclasses.replace(cfg.train, recompute=mode,
                                    recompute_modules=list(cfg.train.recompute_modules or RECOMPUTE_MODULES),
                                    recompute_layers=cfg.train.recompute_layers if mode == "full" else 0)
        busiest = max(plan(dataclasses.replace(cfg, train=train), world_size)["stages"], key=lambda s: s.total_bytes)
        out[mode] = (busiest.activation_bytes, busiest.total_bytes)
    return out


def peak_bytes(report: dict) -> float:
    return max(s.total_bytes for s in report["stages"])


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _layout_str(p) -> str:
    return f"tp={p.tp} pp={p.pp} ep={p.ep} zero_stage={p.zero_stage}"


def suggest_layout(cfg: Config, world_size: int, budget_bytes: float, max_tp: int = 8) -> Optional[tuple[dict, float]]:
    """The valid layout of `world_size` ranks closest to cfg's whose peak estimate fits
    `budget_bytes`: ({key: value} of the changed parallel.* keys, peak bytes), or None.
    Searches tp (up to a node's max_tp GPUs), pp, ep and zero_stage; closest = fewest keys
    changed, then tp kept (it costs the most communication), then the smallest peak."""
    import dataclasses

    p, m = cfg.parallel, cfg.model
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    best = None
    for tp in (d for d in divisors if d <= max(max_tp, p.tp)):
        for pp in (d for d in divisors if (world_size // tp) % d == 0 and d <= m.n_layers):
            dp = data_parallel_size(world_size, tp, pp, p.cp)
            for ep in (d for d in divisors if dp % d == 0 and (m.n_routed_experts or 1) % d == 0):
                for zero in (0, 1, 2, 3):
                    changed = {k: v for k, v in (("tp", tp), ("pp", pp), ("ep", ep), ("zero_stage", zero))
                               if getattr(p, k) != v}
                    if not changed:
                        continue
                    schedule = p.pp_schedule if pp > 1 and (pp % 2 == 0 or p.pp_schedule == "1f1b") else "1f1b"
                    trial = dataclasses.replace(cfg, parallel=dataclasses.replace(
                        p, tp=tp, pp=pp, ep=ep, zero_stage=zero, dp=None, pp_schedule=schedule,
                        pp_layers=p.pp_layers if pp == p.pp else None))
                    try:
                        peak = peak_bytes(plan(trial, world_size))
                    except (ConfigError, ValueError):
                        continue
                    key = (len(changed), tp != p.tp, peak)
                    if peak <= budget_bytes and (best is None or key < best[0]):
                        best = (key, changed, peak)
    return None if best is None else (best[1], best[2])


def memory_verdict(cfg: Config, world_size: int, budget_bytes: float, budget_source: str) -> tuple[bool, str]:
    """(fits, one line): the peak per-rank estimate of `cfg` against `budget_bytes` and, when
    it does not fit, the closest layout that does (`suggest_layout`)."""
    report = plan(cfg, world_size)
    worst = max(report["stages"], key=lambda s: s.total_bytes)
    where = (f"pipeline rank {worst.stage}: weights {_size(worst.weights_bytes)}, grads {_size(worst.grads_bytes)}, "
             f"optimizer {_size(worst.optimizer_bytes)}, activations {_size(worst.activation_bytes)}")
    head = (f"parallel layout {_layout_str(cfg.parallel)} on {world_size} ranks needs an estimated "
            f"{_size(worst.total_bytes)} per rank ({where}); budget {_size(budget_bytes)} ({budget_source})")
    if worst.total_bytes <= budget_bytes:
        return True, f"fits: {head}"
    found = suggest_layout(cfg, world_size, budget_bytes)
    if found is None:
        fix = (f"no tp/pp/ep/zero_stage layout of {world_size} ranks fits: launch more ranks, or lower "
               f"train.micro_batch_size or train.seq_len")
    else:
        changed, peak = found
        fix = "set " + " ".join(f"parallel.{k}={v}" for k, v in changed.items()) + f" ({_size(peak)} per rank)"
    return False, f"does not fit: {head}: {fix}"


def memory_budget(cfg: Config, local_rank: int = 0) -> Optional[tuple[float, str]]:
    """(bytes, where from) the per-rank estimate must fit in: parallel.memory_budget_gib, else
    the CUDA device's memory less GPU_HEADROOM; None on CPU without a configured budget."""
    if cfg.parallel.memory_budget_gib is not None:
        if cfg.parallel.memory_budget_gib <= 0:
            raise ConfigError(f"parallel.memory_budget_gib={cfg.parallel.memory_budget_gib} must be > 0 "
                              f"(or null: the device's memory)")
        return cfg.parallel.memory_budget_gib * GIB, "parallel.memory_budget_gib"
    import torch

    from ds_parallel.parallel.init import use_cuda

    if not use_cuda():
        return None
    props = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count())
    return device_budget(props.total_memory), (f"{props.name} {props.total_memory / GIB:.1f} GiB less "
                                                f"{GPU_HEADROOM:.0%} headroom; parallel.memory_budget_gib overrides")


def device_budget(total_bytes: float) -> float:
    return total_bytes * (1 - GPU_HEADROOM)


def check_memory(cfg: Config, world_size: int, local_rank: int = 0) -> None:
    """Pre-flight, before any process group: raise ConfigError (one line naming the estimate
    and a layout that fits) when the planner's peak per-rank memory exceeds the budget."""
    budget = memory_budget(cfg, local_rank)
    if budget is None:
        return
    fits, line = memory_verdict(cfg, world_size, *budget)
    if not fits:
        raise ConfigError(line)
