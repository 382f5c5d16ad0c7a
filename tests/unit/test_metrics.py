"""The metric schema: which keys a step record holds, in the order metrics.jsonl has always had."""
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
