"""Post-training configs: every shipped one plans and validates, and bad post_train input is
refused with one line naming the field, before any process group exists (rl/run.py)."""
import pytest

from ds_parallel.config import ConfigError
from ds_parallel.rl.run import plan_phases

CONFIGS = {"r1_zero_cpu": (2, ["base:pretrain", "rl:grpo"]), "sft_cpu": (2, ["sft:sft"]),
           "r1_cpu": (2, ["base:pretrain", "cold_start:sft", "reasoning:grpo", "sampled:rejection_sample",
                          "sft_again:sft", "all:grpo"]),
           "grpo_r1_zero": (16, ["grpo:grpo"]), "grpo_deepseekmath": (16, ["grpo:grpo"]),
           "grpo_dapo": (16, ["grpo:grpo"])}
R1 = "configs/r1_zero_cpu.yaml"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_plan(name):
    world, phases = CONFIGS[name]
    planned = plan_phases(f"configs/{name}.yaml", [], world)
    assert [f"{p.name}:{p.kind}" for p in planned] == phases
    if name == "r1_zero_cpu":  # the RL phase starts from the base phase's run directory
        base, rl = planned
        assert rl.init == base.cfg.train.out_dir and rl.cfg.train.out_dir.endswith("/rl")
        assert rl.cfg.train.lr == 1e-5 and base.cfg.train.lr == 1e-3


def test_r1_preset_has_the_papers_numbers():
    cfg = plan_phases("configs/grpo_r1_zero.yaml", [], 16)[0].cfg
    g = cfg.post_train.grpo
    assert (cfg.train.lr, g.kl_coef, g.group_size, g.temperature) == (3e-6, 0.001, 16, 1.0)
    # 32 unique questions per optimizer step, reference reset every 400 optimizer steps
    assert g.prompts_per_step // g.minibatches == 32 and g.ref_reset_every * g.minibatches == 400


BAD = [
    (["post_train.kind=grpo", "parallel.pp=2"], "parallel.pp=2: GRPO rolls out with the training model"),
    (["post_train.kind=grpo", "parallel.zero_stage=3"], "parallel.zero_stage=3: rollouts read the live weights"),
    (["post_train.kind=grpo", "post_train.grpo.max_new_tokens=96"], "post_train.grpo.max_new_tokens=96 leaves no room"),
    (["post_train.kind=grpo", "post_train.grpo.rewards={nope: 1.0}"], "nope"),
    (["post_train.kind=grpo", "post_train.grpo.group_size=1"], "post_train.grpo.group_size=1"),
    (["post_train.kind=grpo", "post_train.grpo.loss_overrides={clip_low: 2.0}"], "clip_low=2.0"),
    (["post_train.kind=sft", "post_train.sft.data=/no/such.jsonl"], "post_train.sft.data='/no/such.jsonl'"),
    (["post_train.kind=sft", "post_train.sft.data=builtin:arithmetic"], "model.vocab_size=128 is below the"),
    (["post_train.phases=[{kind: distill}]"], "post_train.phases[0].kind='distill' is not one of"),
    (["post_train.phases=[{kind: grpo, overrides: {parallel.ep: 1}}]"], "without parallel.*"),
    (["post_train.phases=[{kind: pretrain}, {kind: pretrain}]"], "names must be unique"),
    (["post_train.phases=[]"], "post_train.phases must be a non-empty list"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_post_train_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        plan_phases(R1, overrides, 2)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_initial_weights_from_our_checkpoint_and_an_hf_directory(tmp_path):
    """post_train.init: a run directory of ours or an HF directory gives the same weights."""
    import torch

    from ds_parallel.checkpoint import save_model
    from ds_parallel.config import load_config
    from ds_parallel.interop.hf import save_hf
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.train.setup import load_initial_weights

    cfg = load_config(None, ["model.preset=debug_v3"])
    single = ParallelContext.single()
    source = build_model(cfg.model, single, seed=7)
    save_model(source, str(tmp_path / "ours"), cfg)
    save_hf(source, str(tmp_path / "hf"))
    for path in ("ours", "hf"):
        model = build_model(cfg.model, single, seed=8)
        load_initial_weights(model, str(tmp_path / path))
        for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (path, name)


def _deepseek_style_tokenizer(directory) -> None:
    """A tiny tokenizer.json with the DeepSeek-V3 chat template's special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from ds_parallel.data.sft import ASSISTANT, BOS, EOS, USER

    directory.mkdir(parents=True)
    tok = Tokenizer(WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    tok.add_special_tokens([BOS, EOS, USER, ASSISTANT])
    tok.save(str(directory / "tokenizer.json"))


def test_r1_cluster_config_has_the_four_phases_and_the_papers_numbers(tmp_path):
    """configs/r1.yaml with its PATHs given as overrides plans on 32 ranks: R1's four phases,
    sft_again from the pipeline's base (init: start) on the sampled phase's file."""
    import json

    base = tmp_path / "base"
    _deepseek_style_tokenizer(base)
    (tmp_path / "math.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) + "\n"
                                                 for i in range(200)))
    (tmp_path / "cold.jsonl").write_text(json.dumps({"prompt": "1+1", "response": "<think>.</think>2"}) + "\n")
    out = tmp_path / "r1"
    phases = plan_phases("configs/r1.yaml", [f"post_train.init={base}", f"post_train.sft.tokenizer={base}",
                                             f"post_train.sft.data={tmp_path / 'cold.jsonl'}",
                                             f"post_train.prompts.path={tmp_path / 'math.jsonl'}",
                                             f"train.out_dir={out}"], 32)
    assert [f"{p.name}:{p.kind}" for p in phases] == ["cold_start:sft", "reasoning:grpo", "sampled:rejection_sample",
                                                      "sft_again:sft", "all:grpo"]
    cold, reasoning, sampled, again, last = phases
    assert cold.init == str(base) and reasoning.init == str(out / "cold_start")
    assert sampled.init == str(out / "reasoning") and again.init == str(base) and last.init == str(out / "sft_again")
    assert again.cfg.post_train.sft.data == str(out / "sampled" / "samples.jsonl")
    g = reasoning.cfg.post_train.grpo
    assert (reasoning.cfg.train.lr, g.kl_coef, g.group_size, g.temperature) == (3e-6, 0.001, 16, 1.0)
    assert g.prompts_per_step // g.minibatches == 32 and g.ref_reset_every * g.minibatches == 400
    assert g.loss_overrides["clip_high"] == 10.0 and set(g.rewards) == {"accuracy", "format", "language"}
    assert last.cfg.post_train.grpo.temperature == 0.7 and cold.cfg.train.lr == 5e-6
    e = last.cfg.post_train.eval
    assert (e.k, e.temperature, e.top_p) == (64, 0.6, 0.95)


def test_distill_config_plans_both_students(tmp_path, monkeypatch):
    """configs/distill_cpu.yaml: the teacher sampled once, then our student from the seed and
    the HF Llama student from its directory in its own tokenizer and chat template, each on
    traces and on answers alone; an HF student whose shape the config does not describe is
    refused before any process starts."""
    import os

    from benchmarks.distill_cpu import task_texts, write_llama_student

    config = os.path.abspath("configs/distill_cpu.yaml")
    texts = task_texts()
    monkeypatch.chdir(tmp_path)  # the config's relative paths (runs/...) resolve here
    student = "runs/distill_cpu/llama_student"
    write_llama_student(student, texts[:200])
    phases = plan_phases(config, [], 2)
    assert [p.name for p in phases] == ["teacher_samples", "ours_traces", "ours_answers", "llama_traces",
                                        "llama_answers"]
    assert [p.init for p in phases] == ["runs/r1_cpu/all", None, None, student, student]
    samples = "runs/distill_cpu/teacher_samples/samples.jsonl"
    assert all(p.cfg.post_train.sft.data == samples for p in phases[1:])
    assert [p.cfg.post_train.sft.responses for p in phases[1:]] == ["completion", "answer"] * 2
    assert [p.cfg.post_train.prompts.template for p in phases[1:]] == ["plain", "plain", "chat", "chat"]
    assert phases[3].cfg.model.n_kv_heads == 2 and phases[1].cfg.model.n_kv_heads is None
    assert phases[0].cfg.model.attention == "mla"  # the teacher's shape
    with pytest.raises(ConfigError, match=r"post_train.phases\[0\] \(llama_traces\): model.vocab_size=512, but the HF "
                                          r"checkpoint at post_train.init=runs/distill_cpu/llama_student has 384: "
                                          r"set model.vocab_size=384"):
        plan_phases(config, ["model.vocab_size=512", "post_train.sft.data=builtin:arithmetic",
                             "post_train.phases=[{name: llama_traces, kind: sft, overrides: {post_train.init: "
                             "runs/distill_cpu/llama_student, post_train.sft.tokenizer: runs/distill_cpu/llama_student, "
                             "model.preset: debug_dense_gqa}}]"], 2)
