"""Config loading and validation: typed tree, overrides, one-line errors before any start."""
import os
import sys

import numpy as np

import pytest
import yaml

from ds_parallel.config import ConfigError, dump_yaml, load_config, parse_overrides
from ds_parallel.data.indexed import IndexedDatasetWriter

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
    # Rules that read the data or its tokenizer (more cases in DATA_BAD below).
    (["data.ops=/"], "data.ops='/' must be"),
    (["data.n_eval=10000"], "data.n_eval=10000 must lie in"),
    (["model.vocab_size=16"], "model.vocab_size=16 is below"),
    (["data.n_train=0"], "data.n_train=0 must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, overrides, message):
    # As rank 0 of a 2-process job: validation needs no process group, only the env.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import train as launcher

    monkeypatch.setattr(launcher, "PEER_GRACE_S", 0.0)  # no peers here to wait for
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


# Rules that read the data or its tokenizer (data/loader.py `check_data`), raised by
# load_config before any process starts. smoke_dense_cpu: 2-digit "+", seq_len 64.
DATA_BAD = [
    (["parallel.cpu_malloc_keep_mib=4096"], "parallel.cpu_malloc_keep_mib=4096 must be in [0, 2047]"),
    (["data.ops=/"], "data.ops='/' must be a non-empty string of operators"),
    (["data.ops="], "data.ops='' must be a non-empty string"),
    (["data.n_eval=10000"], "data.n_eval=10000 must lie in [0, 9999]"),
    (["data.n_digits=1", "data.ops=+-", "data.n_eval=155"], "data.n_eval=155 must lie in [0, 154]"),
    (["data.n_eval=-1"], "data.n_eval=-1 must lie in"),
    (["model.vocab_size=16"], "model.vocab_size=16 is below the 48 ids of the arithmetic tokenizer"),
    (["data.n_train=0"], "data.n_train=0 must be >= 1"),
    # 2-digit "+": 9 characters and an EOS per problem; 6 of them are 60 tokens < 65.
    (["data.n_train=6"], "data.n_train=6 problems make as few as 60 tokens, too few for one training sample"),
    (["data.n_digits=0"], "data.n_digits=0 must be >= 1"),
    (["train.eval_batches=1"], "unknown key 'train.eval_batches'"),
    (["model.preset=debug_v3", "precision.fp8.enabled=true", "precision.fp8.backend=te"],
     "precision.fp8.backend=te keeps routed experts in high precision"),
    # layers.* covers the trunk's experts but not the MTP module's (mtp.0.block.ffn.experts).
    (["model.preset=debug_v3", "precision.fp8.enabled=true", "precision.fp8.backend=te",
      "precision.fp8.keep_high_precision=layers.*"], "keeps routed experts in high precision"),
]


@pytest.mark.parametrize("overrides,message", DATA_BAD, ids=["-".join(b[0]) for b in DATA_BAD])
def test_data_rules_fail_in_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides, world_size=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_data_rules_admit_the_edges():
    load_config(SMOKE, ["data.n_train=7", "data.n_eval=0"], world_size=2)  # 70 tokens: one sample
    load_config(SMOKE, ["data.n_digits=1", "data.n_eval=99", "model.vocab_size=48"], world_size=2)
    load_config(SMOKE, ["data.ops=+-*+"], world_size=2)  # duplicates are dropped, not an error


def test_fp8_te_experts_need_the_opt_in():
    from ds_parallel.fp8.te import te_available

    fp8 = ["precision.fp8.enabled=true", "precision.fp8.backend=te"]
    # A dense model has no routed experts: the rule does not apply.
    dense = ["model.preset=debug_dense", *fp8]
    opted = ["model.preset=debug_v3", *fp8, "precision.fp8.keep_high_precision=mtp.*,experts"]
    for overrides in (dense, opted):
        if te_available():
            load_config(SMOKE, overrides, world_size=2)
        else:  # the rule passed; the next one (TE importable) is what stops it here
            with pytest.raises(ConfigError, match="transformer_engine is not importable"):
                load_config(SMOKE, overrides, world_size=2)


def _indexed(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return prefix


def test_indexed_data_is_checked_before_any_process(tmp_path):
    ok = _indexed(str(tmp_path / "ok"), [np.arange(3, 103)] * 2)
    base = ["data.source=indexed", "train.seq_len=64"]
    load_config(SMOKE, [*base, f"data.path={ok}"], world_size=2)
    cases = [
        (_indexed(str(tmp_path / "high"), [np.arange(3, 103), [7, 200, 9]]), [],
         "holds token ids in [3, 200], outside model.vocab_size=128: raise model.vocab_size to at least 201"),
        (_indexed(str(tmp_path / "edge"), [np.arange(0, 129)]), [], "[0, 128], outside model.vocab_size=128"),
        (_indexed(str(tmp_path / "neg"), [np.arange(3, 103), [-1]], np.int32), [],
         "holds token ids in [-1, 102], outside model.vocab_size=128: retokenize"),
        (_indexed(str(tmp_path / "short"), [np.arange(3, 60)]), [],
         "holds 57 tokens, too few for one training sample of train.seq_len + 1 = 65"),
        (_indexed(str(tmp_path / "float"), [np.ones(100)], np.float32), [], "holds float32 values, not token ids"),
        (ok, ["model.vocab_size=64"], "outside model.vocab_size=64"),
    ]
    for prefix, extra, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(SMOKE, [*base, f"data.path={prefix}", *extra], world_size=2)
        assert f"data.path={prefix!r}" in str(err.value) and message in str(err.value), str(err.value)
    bad = _indexed(str(tmp_path / "bad"), [np.arange(100)])
    with open(bad + ".idx", "r+b") as fh:
        fh.write(b"NOTMEGA")
    with pytest.raises(ConfigError, match=f"data.path='{bad}' is not a readable indexed dataset"):
        load_config(SMOKE, [*base, f"data.path={bad}"], world_size=2)
    # Planning reads no data: a missing or out-of-range file is not its business.
    for prefix in (str(tmp_path / "missing"), str(tmp_path / "high")):
        load_config(SMOKE, [*base, f"data.path={prefix}"], world_size=2, purpose="plan")
