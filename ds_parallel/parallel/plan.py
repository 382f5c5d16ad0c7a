"""Dry-run planning of a layout without processes: parameter counts, per-stage memory and
pipeline bubbles, from the config alone (torchtitan's and Megatron's "fake process group"
planning, as pure arithmetic).

Parameter counts follow the model code exactly (a test checks them against a built
model). Memory per rank, in bytes, for mixed precision with an fp32 master:

    weights     2 (bf16) or 4 (fp32) per local parameter
    grads       same width as the weights; divided over dp by ZeRO-2
    optimizer   fp32 master (4, bf16 runs only) + AdamW m and v (8) per parameter;
                divided over dp (dense) / edp (experts) by ZeRO-1 and up
    activations saved for backward, per micro-batch and layer (bytes per token):
                34 d x width/2 (Korthikanti et al. 2022, no recompute), + 5 h s x width/2
                where the attention probabilities are stored (fp32 math kernel, not flash),
                + MLA latents and expanded heads, + k (3 i_moe + d) x width for MoE layers;
                1F1B keeps pp - i micro-batches in flight on stage i; DualPipeV's two
                chunks on rank r keep 2 pp - r and about r + 2 (`in_flight`), about pp + 1
                micro-batches of a whole rank's layers (V3 report Table 2: pp + 1)

Bubble fractions (time idle / total), with F = forward, B = full backward = 2F and
W = weight-gradient part of B = F, and F&B (an overlapped forward + backward pair) = F + B:

    1F1B       (p - 1)(F + B) / ((p - 1)(F + B) + m (F + B))  =  (p - 1) / (m + p - 1)
    DualPipe   (p/2 - 1)(F&B + B - 3W) / (that + m (F + B))
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ds_parallel.config.schema import Config, ModelConfig


@dataclass
class LayerParams:
    attention: int
    ffn_total: int  # dense MLP, or router + all routed experts + shared experts
    ffn_active: int  # what one token touches
    experts: int  # routed-expert parameters (sharded over ep)
    norms: int

    @property
    def total(self) -> int:
        return self.attention + self.ffn_total + self.norms

    @property
    def active(self) -> int:
        return self.attention + self.ffn_active + self.norms


def attention_params(m: ModelConfig) -> int:
    d, h = m.dim, m.n_heads
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk if m.q_lora_rank else d * h * qk
        kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * h * (
            m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + h * m.v_head_dim * d
    hd = m.head_dim or d // h
    kv = m.n_kv_heads or h
    return d * h * hd + 2 * d * kv * hd + h * hd * d


def layer_params(m: ModelConfig, layer_id: int) -> LayerParams:
    d = m.dim
    attn = attention_params(m)
    if m.n_routed_experts and layer_id >= m.n_dense_layers:
        expert = 3 * d * m.moe_inter_dim
        shared = 3 * d * m.moe_inter_dim * m.n_shared_experts
        router = m.n_routed_experts * d
        experts = m.n_routed_experts * expert
        return LayerParams(attn, router + experts + shared, router + m.n_activated_experts * expert + shared,
                           experts, 2 * d)
    mlp = 3 * d * m.inter_dim
    return LayerParams(attn, mlp, mlp, 0, 2 * d)


def mtp_params(m: ModelConfig) -> tuple[int, int]:
    """(total, active) of the MTP modules, excluding the shared embedding and head."""
    total = active = 0
    for k in range(m.mtp_depth):
        block = layer_params(m, m.n_layers + k)
        extra = 2 * m.dim + 2 * m.dim * m.dim + m.dim  # enorm, hnorm, eh_proj, norm
        total += block.total + extra
        active += block.active + extra
    return total, active


def model_params(m: ModelConfig) -> dict[str, int]:
    """Parameter counts of the main model (embedding + layers + norm + head) and MTP."""
    layers = [layer_params(m, i) for i in range(m.n_layers)]
    embed_head = 2 * m.vocab_size * m.dim
    total = embed_head + m.dim + sum(lp.total for lp in layers)
    active = embed_head + m.dim + sum(lp.active for lp in layers)
    mtp_total, mtp_active = mtp_params(m)
    return {"total": total, "active": active, "mtp_total": mtp_total, "mtp_active": mtp_active,
            "embed_head": embed_head}


def layer_cost(m: ModelConfig, layer_id: int) -> float:
    """Relative compute of a layer per token: activated parameters (2 FLOPs each forward)."""
    return float(layer_params(m, layer_id).active)


def split_layers(m: ModelConfig, n_stages: int, explicit: str | None = None) -> list[list[int]]:
    """Layer ids per (virtual) stage. Explicit "a,b,..." counts win (a stage may be empty);
    otherwise contiguous stages that minimise the largest stage cost, with the embedding
    charged to the first stage and the head (plus MTP) to the last."""
    if explicit:
        counts = [int(c) for c in explicit.split(",")]
        if len(counts) != n_stages or sum(counts) != m.n_layers or min(counts) < 0:
            raise ValueError(f"parallel.pp_layers={explicit!r} must list {n_stages} counts summing to {m.n_layers}")
    else:
        costs = [layer_cost(m, i) for i in range(m.n_layers)]
        edge = m.vocab_size * m.dim
        head = edge + mtp_params(m)[1]
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
    n_stages = 2 * pp if schedule == "dualpipev" and pp > 1 else pp
    stages = split_layers(m, n_stages, explicit)
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
    """Bytes saved for backward per token by one layer (no recompute). fp32 runs (CPU) use
    the math attention kernel, which saves the (h, s, s) probabilities; bf16 runs assume
    flash attention, which does not."""
    out = 34 * m.dim * width / 2  # Korthikanti et al. 2022: norms, projections, MLP, residuals
    if width == 4:
        out += 5 * (m.n_heads / tp) * seqlen * width / 2
    if m.attention == "mla":  # latents, expanded per-head q/k (nope + rope) and v
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        out += (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim
                + m.n_heads / tp * (2 * qk + m.v_head_dim)) * width
    if m.n_routed_experts and layer_id >= m.n_dense_layers:
        out += m.n_activated_experts * (3 * m.moe_inter_dim + m.dim) * width
    return out


def bubble_fraction(schedule: str, pp: int, n_micro: int) -> float:
    if pp == 1:
        return 0.0
    f, b, w = 1.0, 2.0, 1.0
    if schedule == "dualpipev":
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
    """Micro-batches whose activations `stage` holds at its rank's peak.

    1F1B: stage s warms up with pp - s forwards before its first backward. DualPipeV (DeepSeek's
    dualpipev.py, which torch's ScheduleDualPipeV follows): rank r runs 2(pp - r - 1) forwards of
    its first chunk, then r + 1 forward pairs of both chunks, then pp - r - 1 zero-bubble
    triples on the second chunk (input backward, weight backward, forward), then steady
    F/B pairs. The first chunk peaks at 2 pp - r micro-batches; the second at r + 1, plus one
    on ranks that run the triples (the input backward retains its graph, and torch 2.13 frees
    it only after the next forward: measured in tests/dist/test_pipeline_memory.py)."""
    pp, rank = layout.pp, layout.rank_of(stage)
    if pp == 1:
        count = 1
    elif layout.schedule == "dualpipev":
        count = 2 * pp - rank if stage < pp else rank + 1 + (rank < pp - 1)
    else:
        count = pp - stage
    return min(count, n_micro)


def plan(cfg: Config, world_size: int) -> dict:
    """The whole report for `cfg` on `world_size` ranks (validated first): one StagePlan per
    pipeline rank (under DualPipeV a rank runs two stages of the V)."""
    from ds_parallel.config.validate import validate

    validate(cfg, world_size, purpose="plan")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, ep = p.tp, p.pp, p.ep
    dp = world_size // (tp * pp * p.cp)
    edp = dp // ep
    width = 2 if cfg.precision.dtype == "bf16" else 4
    master = 4 if cfg.precision.dtype == "bf16" else 0
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    layout = pipeline_layout(m, pp, p.pp_schedule, p.pp_layers)
    tokens = t.micro_batch_size * t.seq_len
    mtp_ids = [m.n_layers + k for k in range(m.mtp_depth)]
    out = []
    for rank in range(pp):
        layer_ids = layout.layers_of(rank)
        lps = [layer_params(m, i) for i in layer_ids]
        dense = sum(lp.total - lp.experts for lp in lps)
        experts = sum(lp.experts for lp in lps)
        if layout.has_embed(rank):
            dense += m.vocab_size * m.dim
        if layout.has_head(rank):
            mtp_total = mtp_params(m)[0]
            mtp_experts = sum(layer_params(m, i).experts for i in mtp_ids)
            dense += m.vocab_size * m.dim + m.dim + mtp_total - mtp_experts  # head, norm, MTP
            experts += mtp_experts
        local_dense, local_experts = dense / tp, experts / ep
        local = local_dense + local_experts
        opt_div_dense = dp if p.zero_stage >= 1 else 1
        opt_div_exp = edp if p.zero_stage >= 1 else 1
        optimizer = (master + 8) * (local_dense / opt_div_dense + local_experts / opt_div_exp)
        grads = width * (local_dense / (dp if p.zero_stage >= 2 else 1) + local_experts / (edp if p.zero_stage >= 2 else 1))
        weights = width * local
        if p.zero_stage == 3:
            weights = width * (local_dense / dp + local_experts / edp)
        acts = 0.0
        for stage in layout.stages_of(rank):
            ids = list(layout.stages[stage]) + (mtp_ids if stage == layout.n_stages - 1 else [])
            per_token = sum(activation_bytes_per_token(m, i, t.seq_len, tp, width) for i in ids)
            stage_acts = per_token * tokens / (tp if tp > 1 else 1)
            if stage == layout.n_stages - 1:
                stage_acts += tokens * (m.vocab_size / tp) * 4 * (1 + m.mtp_depth)  # fp32 logits for the loss
            acts += stage_acts * in_flight(layout, stage, n_micro)
        n_layers_here = len(layer_ids) + (m.mtp_depth if layout.has_head(rank) else 0)
        notes = [f"{n_layers_here} layers"] + (["embedding copy (tied)"] if layout.tied_embedding and rank == pp - 1 else [])
        out.append(StagePlan(rank, layer_ids, int(local), int(local_experts), weights, grads, optimizer, acts, notes))
    counts = model_params(m)
    return {
        "world_size": world_size, "tp": tp, "pp": pp, "ep": ep, "dp": dp, "edp": edp,
        "zero_stage": p.zero_stage, "schedule": p.pp_schedule, "micro_batches": n_micro,
        "bubble_fraction": bubble_fraction(p.pp_schedule, pp, n_micro),
        "params": counts, "stages": out, "layout": layout,
    }
