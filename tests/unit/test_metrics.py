"""The metric schema: which keys a step record holds, in the order metrics.jsonl has always had."""
import pytest

from ds_parallel.train.metrics import step_record

LOSSES = {"loss": 2.0, "lm_loss": 1.5, "aux_loss": 0.1, "mtp_loss": 0.4}


def test_step_record_keys_and_order():
    dense = step_record(3, LOSSES, 1e-3, 0.5, 100.0, moe=False, mtp=False)
    assert list(dense) == ["step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s"]
    assert dense == {"step": 3, "loss": 2.0, "lm_loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0}
    v3 = step_record(3, LOSSES, 1e-3, 0.5, 100.0, moe=True, mtp=True, expert_load_imbalance=1.25)
    assert list(v3) == ["step", "loss", "lm_loss", "aux_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s",
                        "expert_load_imbalance"]
    assert (v3["aux_loss"], v3["mtp_loss"], v3["expert_load_imbalance"]) == (0.1, 0.4, 1.25)
    # MTP without MoE (a dense model with multi-token prediction), and a MoE step between log steps.
    assert list(step_record(3, LOSSES, 1e-3, 0.5, 100.0, moe=False, mtp=True))[3] == "mtp_loss"
    assert "expert_load_imbalance" not in step_record(3, LOSSES, 1e-3, 0.5, 100.0, moe=True, mtp=False)


def test_tensorboard_scalars_equal_the_jsonl_and_a_resume_purges_later_steps(tmp_path):
    """Every numeric field logged is a TensorBoard scalar of the same value (evaluations under
    eval/); a run resumed from step 2 rewrites steps 3.. without keeping the first run's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ds_parallel.train.metrics import MetricsLog, read_metrics

    def run(start, steps, loss_of):
        log = MetricsLog(str(tmp_path), True, 4, start, tensorboard=True)
        for step in steps:
            log.log({"step": step, "loss": loss_of(step), "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0})
        log.log_eval({"step": steps[-1], "heldout_accuracy": 0.25})
        log.writer.close()

    run(0, [1, 2, 3, 4], lambda s: 10.0 - s)
    run(2, [3, 4], lambda s: 20.0 - s)  # resumed from the step-2 checkpoint: 3 and 4 again, other values
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    jsonl = read_metrics(str(tmp_path))
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in jsonl] == [(1, 9), (2, 8), (3, 17), (4, 16)]
    assert scalars["eval/heldout_accuracy"] == [(4, 0.25)]
    assert set(scalars) == {"loss", "lr", "grad_norm", "tokens_per_s", "eval/heldout_accuracy"}


def test_wandb_offline_run_gets_the_scalars_and_a_resume_continues_it(tmp_path, monkeypatch):
    """train.wandb_project (W&B offline): the run logs every numeric field at its step, and a
    resumed training run reopens the same W&B run (wandb_id in the run directory)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from ds_parallel.config import load_config
    from ds_parallel.train.metrics import MetricsLog

    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.wandb_project=dsp-test", "train.steps=4"])
    seen = []
    log = MetricsLog.for_run(cfg, True, 0)
    monkeypatch.setattr(log.wandb, "log", lambda data, step: seen.append((step, data)))
    log.log({"step": 1, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0})
    log.log_eval({"step": 1, "valid_loss": 2.5})
    first_id = log.wandb.id
    log.wandb.finish()
    assert seen == [(1, {"loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0}),
                    (1, {"eval/valid_loss": 2.5})]
    assert (tmp_path / "wandb_id").read_text() == first_id
    again = MetricsLog.for_run(cfg, True, 1)
    assert again.wandb.id == first_id and again.wandb.config["train"]["steps"] == 4
    again.wandb.finish()
    assert wandb.run is None


def test_wandb_project_without_the_package_is_refused_in_one_line(monkeypatch):
    import importlib.util

    from ds_parallel.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="train.wandb_project='p' needs the wandb package: pip install wandb"):
        load_config(None, ["train.wandb_project=p"])
