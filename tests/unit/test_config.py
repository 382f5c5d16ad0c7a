"""Config loading and validation: typed tree, overrides, one-line errors before any start."""
import os
import subprocess
import sys

import pytest
import yaml

from ds_parallel.config import ConfigError, dump_yaml, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke_dense_cpu.yaml")


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(["train.steps=5", "parallel.tp=2", "train.lr=1e-3", "model.n_kv_heads=null"])
    assert tree == {"train": {"steps": 5, "lr": 1e-3}, "parallel": {"tp": 2}, "model": {"n_kv_heads": None}}
    cfg = load_config(SMOKE, ["train.steps=7", "parallel.tp=2"], world_size=2)
    assert (cfg.train.steps, cfg.parallel.tp, cfg.model.dim) == (7, 2, 128)
    assert load_config(None, world_size=2).model.preset == "debug_dense"  # schema default


def test_preset_fills_and_fields_override():
    cfg = load_config(None, ["model.preset=debug_dense_gqa", "model.dim=256"])
    assert (cfg.model.n_kv_heads, cfg.model.dim) == (2, 256)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(SMOKE, ["train.steps=3"], world_size=2)
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path), world_size=2) == cfg


BAD = [
    (["train.stepz=3"], "unknown key 'train.stepz'"),
    (["bogus.x=1"], "unknown key 'bogus'"),
    (["train.steps=abc"], "train.steps='abc' has the wrong type"),
    (["train.lr=fast"], "train.lr='fast' has the wrong type"),
    (["parallel.zero_stage=true"], "parallel.zero_stage=True has the wrong type"),
    (["parallel.tp=3"], "model.n_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.tp=4"], "world size 2 is not divisible by parallel.tp*pp*cp=4"),
    (["parallel.dp=4"], "parallel.dp=4 but world 2"),
    (["model.n_layers=0"], "model.n_layers=0 must be a positive integer"),
    (["train.micro_batch_size=-1"], "train.micro_batch_size=-1 must be a positive integer"),
    (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["train.global_batch_size=12"], "train.global_batch_size=12 is not divisible"),
    (["train.seq_len=1000"], "train.seq_len=1000 exceeds model.max_seq_len=256"),
    (["data.source=indexed", "data.path=/nonexistent/tokens"], "/nonexistent/tokens.bin does not exist"),
    (["model.preset=gpt5"], "model.preset='gpt5' is unknown"),
    (["precision.dtype=fp16"], "precision.dtype='fp16' is not one of"),
    (["parallel.ep=4"], "parallel.ep=4 must divide the data-parallel degree 2"),
    (["train.steps"], "is not of the form dotted.key=value"),
    (["parallel.ep=2"], "parallel.ep=2 needs a MoE model"),
    (["model.preset=debug_v3", "parallel.ep=2", "parallel.zero_stage=0"], "parallel.zero_stage=0 with parallel.ep>1"),
    (["model.preset=debug_v3", "model.n_activated_experts=7"], "exceeds the 2 x 2 experts reachable"),
    (["model.preset=debug_v3", "parallel.zero_stage=3"], "parallel.zero_stage=3 does not support MoE"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.zero_stage=2"], "parallel.zero_stage=2 with parallel.pp=2"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.pp_schedule=dualpipev"], "makes 4 stages for model.n_layers=2"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.pp_schedule=dualpipev", "parallel.pp_layers=1,0,0,1"],
     "2 micro-batches per step"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.pp_layers=1,1,0"], "must list 2 layer counts"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.zero_stage=0", "precision.dtype=bf16"],
     "needs parallel.zero_stage=1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, overrides, message):
    # As rank 0 of a 2-process job: validation needs no process group, only the env.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import train as launcher

    out_dir = tmp_path / "run"
    code = launcher.main(["--config", SMOKE, f"train.out_dir={out_dir}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert not out_dir.exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))


@pytest.mark.dist
def test_bad_config_fails_on_every_rank_fast(tmp_path):
    """Under the deepspeed launcher with 2 ranks: non-zero exit, both ranks say why."""
    out_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", os.path.join(ROOT, "launchers", "train.py"),
         f"train.out_dir={out_dir}", "parallel.tp=3"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("model.n_heads=4 is not divisible by parallel.tp=3") >= 2
    assert not out_dir.exists()
