"""Post-training configs: every shipped one plans and validates, and bad post_train input is
refused with one line naming the field, before any process group exists (rl/run.py)."""
import pytest

from ds_parallel.config import ConfigError
from ds_parallel.rl.run import plan_phases

CONFIGS = {"r1_zero_cpu": (2, ["base:pretrain", "rl:grpo"]), "sft_cpu": (2, ["sft:sft"]),
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
