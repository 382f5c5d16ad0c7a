"""ds_parallel/checkpoint's file layer (format.py) in one process: what verification refuses, and the
crash-safe re-save. Checkpoints here are written through the same begin/publish calls
save_checkpoint uses, with two "rank" shard files holding the two halves of a tensor."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ds_parallel.checkpoint import CheckpointError, CheckpointReader, latest_checkpoint
from ds_parallel.checkpoint import format as ckpt

FULL = torch.arange(24, dtype=torch.float32).reshape(4, 6)


def _write(run_dir, step, value=FULL, ranks=(0, 1)):
    """Rows 0:2 in shard 0, rows 2:4 in shard 1 (a tp=2 split on dim 0); `ranks` picks
    which shard files exist when meta.json is written."""
    root = os.path.join(run_dir, "checkpoints")
    tmp = ckpt.begin_checkpoint(root, step)
    for r in ranks:
        spec = {"w::master": {"full_shape": [4, 6], "shards": [[0, r, 2, "tp"]]}}
        save_file({"w::master": value.chunk(2)[r].contiguous()}, os.path.join(tmp, f"shard-{r:05d}.safetensors"),
                  metadata={"specs": json.dumps(spec)})
    meta = {"format_version": ckpt.FORMAT_VERSION, "step": step, "optimizer_step": step, "layout": {}, "config": {}}
    return ckpt.publish_checkpoint(root, step, meta)


def test_verified_checkpoint_loads_exactly(tmp_path):
    final = _write(tmp_path, 3)
    assert latest_checkpoint(str(tmp_path)) == final
    meta = json.load(open(os.path.join(final, "meta.json")))
    assert sorted(meta["files"]) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert meta["files"]["shard-00001.safetensors"]["bytes"] == os.path.getsize(
        os.path.join(final, "shard-00001.safetensors"))
    reader = CheckpointReader(final)
    assert torch.equal(reader.full("w::master"), FULL)
    like = torch.empty(4, 3)
    like.shards = (ckpt.ShardSpec(1, 1, 2, "tp"),)  # loads under another split (columns 3:6)
    assert torch.equal(reader.local("w::master", like), FULL[:, 3:])
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if f.startswith(".")]


def test_missing_truncated_and_corrupt_files_are_refused(tmp_path):
    final = _write(tmp_path, 1)
    shard1 = os.path.join(final, "shard-00001.safetensors")
    data = open(shard1, "rb").read()
    open(shard1, "wb").write(data[:-1])
    with pytest.raises(CheckpointError, match=r"shard-00001.safetensors has \d+ bytes, meta.json lists"):
        latest_checkpoint(str(tmp_path))
    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size, one bit of the last float
    open(shard1, "wb").write(bytes(flipped))
    with pytest.raises(CheckpointError, match="shard-00001.safetensors: sha256 differs"):
        CheckpointReader(final)
    os.remove(shard1)
    with pytest.raises(CheckpointError, match="shard-00001.safetensors is missing"):
        CheckpointReader(final)


def test_a_tensor_with_a_gap_is_refused(tmp_path):
    """meta.json consistent with its files, but rows 2:4 were never written."""
    final = _write(tmp_path, 1, ranks=(0,))
    with pytest.raises(CheckpointError, match=r"'w::master' of shape \(4, 6\) has no piece for \[2:4, 0:6\]"):
        CheckpointReader(final)


@pytest.mark.parametrize("name", ["../../outside/checkpoints/step_1", "step_1/../../../outside/checkpoints/step_1",
                                  "best", ""])
def test_latest_must_name_a_step_directory_inside_checkpoints(tmp_path, name):
    _write(tmp_path / "outside", 1)  # a complete checkpoint, but not this run's
    run = tmp_path / "run"
    _write(run, 1)
    (run / "checkpoints" / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="not a step_<N> directory"):
        latest_checkpoint(str(run))


def test_latest_step_directory_may_not_be_a_symlink(tmp_path):
    _write(tmp_path / "outside", 1)
    run = tmp_path / "run"
    _write(run, 1)
    os.rename(run / "checkpoints" / "step_1", run / "checkpoints" / "step_1.moved")
    os.symlink(tmp_path / "outside" / "checkpoints" / "step_1", run / "checkpoints" / "step_1")
    with pytest.raises(CheckpointError, match="step_1, which is not a directory in"):
        latest_checkpoint(str(run))


def test_a_crash_while_resaving_a_step_keeps_the_old_copy(tmp_path, monkeypatch):
    """Re-saving step 2 (latest) dies just before the new copy is renamed into place: the
    reader falls back to the old copy; the next save restores it and drops the temp dir."""
    _write(tmp_path, 2)
    real_replace = os.replace

    def dies_moving_the_new_copy_in(src, dst):
        if os.path.basename(src) == ".tmp_step_2":
            raise SystemExit("killed")  # stands for SIGKILL: nothing after it runs
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dies_moving_the_new_copy_in)
    with pytest.raises(SystemExit):
        _write(tmp_path, 2, value=-FULL)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == [".old_step_2", ".tmp_step_2", "latest"]
    assert torch.equal(CheckpointReader(latest_checkpoint(str(tmp_path))).full("w::master"), FULL)

    ckpt.begin_checkpoint(str(root), 3)
    assert sorted(os.listdir(root)) == [".tmp_step_3", "latest", "step_2"]
    assert torch.equal(CheckpointReader(latest_checkpoint(str(tmp_path))).full("w::master"), FULL)


def test_stale_temp_dirs_are_removed_without_following_links(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    os.symlink(keep, root / ".tmp_step_5")
    (root / ".tmp_step_6").mkdir()
    (root / ".tmp_step_6" / "shard-00000.safetensors").write_bytes(b"partial")
    (root / ".tmp_notes").mkdir()  # not ours: left alone
    ckpt.begin_checkpoint(str(root), 7)
    assert sorted(os.listdir(root)) == [".tmp_notes", ".tmp_step_7"]
    assert (keep / "precious").read_text() == "x"


def test_load_model_builds_one_pipeline_stage_from_a_full_checkpoint(tmp_path):
    """A one-process checkpoint loaded as stage 0 of a pp=2 layout: only that stage's layers
    and the embedding are built, and each holds the saved weights."""
    from ds_parallel.checkpoint import load_model, save_model
    from ds_parallel.config.presets import MODEL_PRESETS
    from ds_parallel.config.schema import ModelConfig
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.parallel.plan import pipeline_layout

    cfg = ModelConfig(**MODEL_PRESETS["debug_v3"])
    full = build_model(cfg, ParallelContext.single(), seed=3)
    save_model(full, str(tmp_path))
    layout = pipeline_layout(cfg, 2)
    stage = load_model(str(tmp_path), ctx=ParallelContext.single(), layout=layout)
    assert sorted(map(int, stage.layers)) == layout.layers_of(0) != list(range(cfg.n_layers))
    assert stage.head is None and stage.embed is not None
    saved = dict(full.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, saved[name]), name
