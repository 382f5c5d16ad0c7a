"""Cross-field rules, checked before any process group starts (docs/architecture.md,
invariant 5).

Each failure is one `ConfigError` line naming the key, the value and the fix.
"""
from __future__ import annotations

import importlib.util
import os

from ds_parallel.config.errors import ConfigError
from ds_parallel.config.schema import (DUALPIPEV, Config, data_parallel_size, micro_batches_per_step,
                                      n_pipeline_stages, stage_layer_counts)

# train.recompute_modules (model/recompute.py): RMSNorms, MLA's up-projections, SwiGLU.
RECOMPUTE_MODULES = ("norm", "mla_up_proj", "swiglu")

_POSITIVE = {
    "model": ["vocab_size", "dim", "n_layers", "n_heads", "inter_dim", "max_seq_len"],
    "parallel": ["tp", "pp", "ep", "cp"],
    "train": ["steps", "global_batch_size", "micro_batch_size", "seq_len", "log_every"],
}


def validate(cfg: Config, world_size: int | None = None, purpose: str = "train") -> None:
    """Raise ConfigError on the first broken rule. `world_size=None` skips world checks;
    purpose="plan" (launchers/plan.py) admits layouts the trainer cannot run yet."""
    for section, names in _POSITIVE.items():
        sub = getattr(cfg, section)
        for name in names:
            value = getattr(sub, name)
            if value <= 0:
                raise ConfigError(f"{section}.{name}={value} must be a positive integer")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("n_kv_heads", "head_dim"):
        value = getattr(m, name)
        if value is not None and value <= 0:
            raise ConfigError(f"model.{name}={value} must be positive or null")
    for name in ("lr", "rope_theta", "norm_eps", "init_std"):
        sub = t if name == "lr" else m
        value = getattr(sub, name)
        if value <= 0:
            raise ConfigError(f"{'train' if sub is t else 'model'}.{name}={value} must be > 0")
    if t.warmup_steps < 0 or t.save_every < 0 or t.max_steps_this_run < 0:
        raise ConfigError("train.warmup_steps, train.save_every and train.max_steps_this_run must be >= 0")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]")
    if not 0 <= cfg.parallel.cpu_malloc_keep_mib < 2048:
        raise ConfigError(f"parallel.cpu_malloc_keep_mib={cfg.parallel.cpu_malloc_keep_mib} must be in [0, 2047] "
                          "(malloc's int parameter; 0 leaves glibc's defaults)")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={t.wandb_project!r} needs the wandb package: pip install wandb, or "
                          "set train.wandb_project=null")
    unknown = [name for name in t.recompute_modules if name not in RECOMPUTE_MODULES]
    if unknown:
        raise ConfigError(f"train.recompute_modules has unknown {unknown}: use any of {list(RECOMPUTE_MODULES)}")
    if t.recompute == "selective" and not t.recompute_modules:
        raise ConfigError(f"train.recompute=selective with empty train.recompute_modules recomputes nothing: "
                          f"list some of {list(RECOMPUTE_MODULES)} or set train.recompute=none")
    if t.recompute_layers < 0:
        raise ConfigError(f"train.recompute_layers={t.recompute_layers} must be >= 0 (0: every block of each stage)")
    if t.recompute_layers and t.recompute != "full":
        raise ConfigError(f"train.recompute_layers={t.recompute_layers} applies to train.recompute=full only "
                          f"(train.recompute={t.recompute}): set it to 0 or use full")
    if t.compile and p.tp > 1:
        raise ConfigError(f"train.compile=true with parallel.tp={p.tp}: the tensor-parallel all-reduces inside the "
                          f"blocks are not compiled yet; set parallel.tp=1 or train.compile=false")
    if t.compile and p.pp_schedule == DUALPIPEV:
        raise ConfigError(f"train.compile=true with parallel.pp_schedule={DUALPIPEV}: its split backward runs twice "
                          f"through a compiled graph, which torch.compile's donated buffers refuse; use pp_schedule=1f1b "
                          f"or train.compile=false")
    if t.compile and p.zero_stage == 3:
        raise ConfigError("train.compile=true with parallel.zero_stage=3: ZeRO-3 gathers parameters in module hooks "
                          "inside the compiled blocks; use zero_stage 0-2 or train.compile=false")

    # Model shape rules.
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}: set model.head_dim")
    if m.mha_head_dim % 2:
        raise ConfigError(f"model head_dim={m.mha_head_dim} must be even for RoPE: change model.dim or model.n_heads")
    n_kv = m.mha_kv_heads
    if m.n_heads % n_kv:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={n_kv}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: lower one or raise the other")

    # Parallel layout rules.
    if p.cp != 1:
        raise ConfigError(f"parallel.cp={p.cp} is not supported yet: set parallel.cp=1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if m.n_heads % p.tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}")
    if n_kv % p.tp:
        raise ConfigError(f"model.n_kv_heads={n_kv} is not divisible by parallel.tp={p.tp}: lower tp or raise n_kv_heads")
    if m.inter_dim % p.tp:
        raise ConfigError(f"model.inter_dim={m.inter_dim} is not divisible by parallel.tp={p.tp}")
    if m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}: pad the vocabulary")
    n_stages = n_pipeline_stages(p.pp, p.pp_schedule)
    if p.pp_layers is not None:
        try:
            stage_layer_counts(p.pp_layers, n_stages, m.n_layers)
        except ValueError as exc:
            raise ConfigError(f"{exc} (pp_schedule={p.pp_schedule})") from None
    elif n_stages > m.n_layers:
        raise ConfigError(f"parallel.pp={p.pp} with pp_schedule={p.pp_schedule} makes {n_stages} stages for "
                          f"model.n_layers={m.n_layers}: lower pp or list layers per stage in parallel.pp_layers")
    if p.pp_schedule == DUALPIPEV and p.pp % 2:
        raise ConfigError(f"parallel.pp_schedule=dualpipev needs an even parallel.pp, got {p.pp}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: ZeRO-2/3 reduce or gather "
                          f"inside DeepSpeed's backward, which a pipeline schedule bypasses; use zero_stage=1")
    if p.pp > 1 and p.zero_stage == 0 and cfg.precision.dtype == "bf16":
        raise ConfigError(f"parallel.pp={p.pp} with precision.dtype=bf16 needs parallel.zero_stage=1 (DeepSpeed's "
                          f"stage-0 bf16 optimizer accumulates gradients inside its own backward)")

    if world_size is not None:
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp*pp*cp={model_parallel}: "
                f"launch a multiple of {model_parallel} processes or change the degrees"
            )
        dp = data_parallel_size(world_size, p.tp, p.pp, p.cp)
        if p.dp is not None and p.dp != dp:
            raise ConfigError(
                f"parallel.dp={p.dp} but world {world_size} / (tp*pp*cp={model_parallel}) = {dp}: remove parallel.dp or fix it"
            )
        if dp % p.ep:
            raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel degree {dp} (world {world_size} / tp*pp*cp)")
        try:
            n_micro = micro_batches_per_step(t.global_batch_size, t.micro_batch_size, dp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if p.pp > 1 and n_micro < n_stages:
            raise ConfigError(
                f"{n_micro} micro-batches per step (train.global_batch_size / (micro_batch_size x dp={dp})) are "
                f"fewer than the {n_stages} pipeline stages of pp_schedule={p.pp_schedule}: lower "
                f"train.micro_batch_size or raise train.global_batch_size")

    _validate_mla_moe(cfg)

    _validate_data(cfg, purpose)

    if cfg.precision.fp8.enabled:
        _validate_fp8(cfg)


def _validate_data(cfg: Config, purpose: str) -> None:
    """Data rules, including those that read the data (data/loader.py `check_data`): the
    tokenizer's vocabulary, the corpus size, the token ids of an indexed dataset. Planning
    needs no data files."""
    from ds_parallel.data.loader import check_data

    d, t = cfg.data, cfg.train
    if t.eval_every < 0 or t.eval_samples < 1:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 0 and train.eval_samples={t.eval_samples} >= 1")
    if t.eval_every and cfg.parallel.pp > 1:
        raise ConfigError(f"train.eval_every={t.eval_every} with parallel.pp={cfg.parallel.pp}: the held-out loss runs "
                          "the whole model on each rank; set train.eval_every=0 or parallel.pp=1")
    if d.source == "indexed":
        if bool(d.path) == bool(d.blend):
            raise ConfigError("data.source=indexed needs exactly one of data.path (the prefix of a .bin/.idx pair) "
                              "and data.blend (several, with weights)")
        if d.blend_schedule and not d.blend:
            raise ConfigError("data.blend_schedule changes data.blend's weights: give data.blend")
        if t.eval_every and not d.valid_path:
            raise ConfigError(f"train.eval_every={t.eval_every} on indexed data needs data.valid_path, the prefix of "
                              "a validation .bin/.idx pair (or set train.eval_every=0)")
        if purpose != "train":
            return
        paths = [("data.path", d.path)] if d.path else [(f"data.blend[{i}].path", e.get("path"))
                                                        for i, e in enumerate(d.blend) if isinstance(e, dict)]
        for key, path in paths + ([("data.valid_path", d.valid_path)] if d.valid_path else []):
            for ext in (".bin", ".idx"):
                if not isinstance(path, str) or not os.path.isfile(path + ext):
                    raise ConfigError(f"{key}={path!r}: {path}{ext} does not exist")
    else:
        for key in ("path", "blend", "blend_schedule", "valid_path"):
            if getattr(d, key):
                raise ConfigError(f"data.{key} is set but data.source={d.source!r}: set data.source=indexed")
    try:
        check_data(d, t.seq_len, cfg.model.vocab_size, t.steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_fp8(cfg: Config) -> None:
    """FP8 rules (fp8/recipe.py: pure, no layer is imported). The torch backend pads shapes
    that are not multiples of block_size with zeros (as DeepSeek's kernels do), so it needs
    no divisibility rule."""
    from ds_parallel.fp8.recipe import (TE_EXPERTS_RULE, TORCH_RECIPES, fp8_gemm_shapes, is_kept, keep_patterns,
                                        resolve_backend)

    fp8 = cfg.precision.fp8
    if fp8.block_size <= 0:
        raise ConfigError(f"precision.fp8.block_size={fp8.block_size} must be positive (V3: 128)")
    if fp8.recipe == "mxfp8":
        import torch

        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if cap is None or cap < (10, 0):
            found = "no CUDA device" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
            raise ConfigError(f"precision.fp8.recipe=mxfp8 needs a Blackwell (sm100+) GPU, found {found}: "
                              f"use precision.fp8.recipe=blockwise")
    backend = resolve_backend(fp8)
    if fp8.gemm == "cublas":
        import torch

        from ds_parallel.fp8.recipe import scaled_mm_blockwise_available

        if backend != "torch" or fp8.block_size != 128 or not scaled_mm_blockwise_available(
                torch.device("cuda") if torch.cuda.is_available() else "cpu"):
            raise ConfigError("precision.fp8.gemm=cublas needs backend=torch, block_size=128 and a Hopper (sm90) GPU "
                              "with torch built for CUDA 12.9+: use precision.fp8.gemm=auto")
    if backend == "torch":
        if fp8.recipe not in TORCH_RECIPES:
            raise ConfigError(f"precision.fp8.recipe={fp8.recipe} needs precision.fp8.backend=te (the torch "
                              f"backend implements blockwise only): set precision.fp8.recipe=blockwise or backend=te")
        if fp8.format != "e4m3":
            raise ConfigError(f"precision.fp8.format={fp8.format} needs precision.fp8.backend=te (the torch "
                              f"backend is E4M3 throughout, as V3): set precision.fp8.format=e4m3")
        return
    why = "" if fp8.backend == "te" else f" (chosen by backend=auto for recipe={fp8.recipe}, format={fp8.format})"
    m = cfg.model  # the module names the model gives its routed experts (trunk, then MTP)
    experts = [f"layers.{i}.ffn.experts" if i < m.n_layers else f"mtp.{i - m.n_layers}.block.ffn.experts"
               for i in m.moe_layer_ids()]
    if not all(is_kept(name, keep_patterns(fp8)) for name in experts):
        raise ConfigError(TE_EXPERTS_RULE + why)
    from ds_parallel.fp8.te import te_available  # only where TE is the backend

    if not te_available():
        raise ConfigError(f"precision.fp8.backend=te{why}: transformer_engine is not importable here: install "
                          f"transformer-engine[pytorch] on a CUDA machine, or set precision.fp8.backend=torch "
                          f"with precision.fp8.recipe=blockwise and precision.fp8.format=e4m3")
    if fp8.recipe == "blockwise" and fp8.block_size != 128:
        raise ConfigError(f"precision.fp8.block_size={fp8.block_size}: TE's Float8BlockScaling uses 128; "
                          f"set block_size=128 or backend=torch")
    if fp8.power_of_two_scales:
        raise ConfigError("precision.fp8.power_of_two_scales=true is not mapped to TE recipes: set it false "
                          "with backend=te, or use backend=torch")
    for name, (n, k) in fp8_gemm_shapes(cfg.model, cfg.parallel.tp).items():
        if n % 16 or k % 16:  # TE: "FP8 execution requires ... width divisible by 16"
            raise ConfigError(f"precision.fp8.backend=te: GEMM {name} of shape (out {n}, in {k}) per tp rank is "
                              f"not a multiple of 16 in both dims: change the model dims or use backend=torch")


def _validate_mla_moe(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.attention == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(m, name)} must be positive for model.attention=mla")
        if m.q_lora_rank < 0:
            raise ConfigError(f"model.q_lora_rank={m.q_lora_rank} must be >= 0 (0 = no query compression)")
        if m.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for RoPE")
    if m.rope_factor < 1.0:
        raise ConfigError(f"model.rope_factor={m.rope_factor} must be >= 1 (1 disables RoPE scaling)")
    if m.rope_scaling == "llama3":
        if m.attention != "mha":
            raise ConfigError("model.rope_scaling=llama3 needs model.attention=mha (MLA scales its RoPE by YaRN)")
        if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} and rope_high_freq_factor="
                              f"{m.rope_high_freq_factor} must satisfy 0 < low < high (Llama 3.1: 1 and 4)")
        if m.original_max_seq_len <= 0:
            raise ConfigError(f"model.original_max_seq_len={m.original_max_seq_len} must be positive")
    elif m.attention == "mha" and m.rope_factor > 1.0:
        raise ConfigError(f"model.rope_factor={m.rope_factor} with model.attention=mha: YaRN is modelled for MLA "
                          f"only; set model.rope_scaling=llama3 or rope_factor=1")
    if m.qkv_bias and m.attention != "mha":
        raise ConfigError("model.qkv_bias=true needs model.attention=mha (MLA projections have no biases)")
    if m.tie_embeddings and p.pp > 1:
        raise ConfigError(f"model.tie_embeddings=true with parallel.pp={p.pp}: the embedding and the head sit on "
                          f"different pipeline stages; use parallel.pp=1 or untie them")
    if m.mtp_depth < 0 or m.mtp_lambda < 0 or (m.mtp_lambda_late or 0) < 0:
        raise ConfigError("model.mtp_depth, model.mtp_lambda and model.mtp_lambda_late must be >= 0")
    if m.mtp_depth and cfg.train.seq_len <= m.mtp_depth:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} must exceed model.mtp_depth={m.mtp_depth}")
    e = m.n_routed_experts
    if e == 0:
        if p.ep != 1:
            raise ConfigError(f"parallel.ep={p.ep} needs a MoE model: set model.n_routed_experts > 0 or parallel.ep=1")
        return
    if e < 0:
        raise ConfigError(f"model.n_routed_experts={e} must be >= 0 (0 = dense)")
    if e % p.ep:
        raise ConfigError(f"model.n_routed_experts={e} is not divisible by parallel.ep={p.ep}")
    if not 0 < m.n_activated_experts <= e:
        raise ConfigError(f"model.n_activated_experts={m.n_activated_experts} must lie in [1, n_routed_experts={e}]")
    if m.moe_inter_dim <= 0 or m.n_shared_experts < 0:
        raise ConfigError("model.moe_inter_dim must be > 0 and model.n_shared_experts >= 0")
    if m.n_expert_groups <= 0 or e % m.n_expert_groups:
        raise ConfigError(f"model.n_routed_experts={e} is not divisible by model.n_expert_groups={m.n_expert_groups}")
    if not 0 < m.n_limited_groups <= m.n_expert_groups:
        raise ConfigError(f"model.n_limited_groups={m.n_limited_groups} must lie in [1, n_expert_groups={m.n_expert_groups}]")
    if m.n_activated_experts > m.n_limited_groups * (e // m.n_expert_groups):
        raise ConfigError(
            f"model.n_activated_experts={m.n_activated_experts} exceeds the {m.n_limited_groups} x "
            f"{e // m.n_expert_groups} experts reachable in model.n_limited_groups: raise n_limited_groups"
        )
    if m.n_expert_groups > 1 and m.score_func == "sigmoid" and e // m.n_expert_groups < 2:
        raise ConfigError("sigmoid group scoring sums each group's top-2 scores: groups need >= 2 experts")
    if not 0 <= m.n_dense_layers <= m.n_layers:
        raise ConfigError(f"model.n_dense_layers={m.n_dense_layers} must lie in [0, n_layers={m.n_layers}]")
    if m.capacity_factor < 0:
        raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be >= 0 (0 = dropless)")
    if p.zero_stage == 3:
        raise ConfigError("parallel.zero_stage=3 does not support MoE experts (DeepSpeed refuses it): use 1 or 2")
    # (Under pp > 1 the pipeline runner clips by the exact global norm, train/engine.py.)
    if p.zero_stage == 0 and p.ep > 1 and cfg.train.grad_clip > 0 and p.pp == 1:
        raise ConfigError(
            "parallel.zero_stage=0 with parallel.ep>1 clips by DeepSpeed's average of per-rank norms, which is "
            "inexact for experts: use parallel.zero_stage=1 or 2, or train.grad_clip=0"
        )
