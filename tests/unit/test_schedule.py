"""Learning-rate schedules: warmup, cosine, DeepSeek LLM's multi-step."""
import math

import pytest

from ds_parallel.config.schema import TrainConfig
from ds_parallel.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    t = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, t) == pytest.approx(1.0)
    mid = 10 + (109 - 10) / 2
    assert lr_at(int(mid), t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(109, t) == pytest.approx(0.1)
    values = [lr_at(s, t) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_deepseek_multistep():
    # DeepSeek LLM: peak until 80% of training, 31.6% of peak until 90%, then 10%.
    t = TrainConfig(steps=1000, lr=4.2e-4, warmup_steps=20, lr_schedule="multistep")
    assert lr_at(19, t) == pytest.approx(4.2e-4)
    assert lr_at(799, t) == pytest.approx(4.2e-4)
    assert lr_at(800, t) == pytest.approx(0.316 * 4.2e-4)
    assert lr_at(899, t) == pytest.approx(0.316 * 4.2e-4)
    assert lr_at(900, t) == pytest.approx(0.1 * 4.2e-4)
    assert lr_at(999, t) == pytest.approx(0.1 * 4.2e-4)


def test_constant():
    t = TrainConfig(steps=10, lr=2.0, warmup_steps=0, lr_schedule="constant")
    assert {lr_at(s, t) for s in range(10)} == {2.0}


def test_v3_mtp_lambda_and_bias_speed_schedules():
    from ds_parallel.config.schema import ModelConfig
    from ds_parallel.train.schedule import bias_update_speed_at, mtp_lambda_at

    m = ModelConfig(mtp_depth=1, mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch=10 / 14.8,
                    bias_update_speed=1e-3, bias_update_stop=14.3 / 14.8)
    t = TrainConfig(steps=1480)
    assert [mtp_lambda_at(s, m, t) for s in (0, 999, 1000, 1479)] == [0.3, 0.3, 0.1, 0.1]
    assert [bias_update_speed_at(s, m, t) for s in (0, 1429, 1430, 1479)] == [1e-3, 1e-3, 0.0, 0.0]
    m.mtp_lambda_late = None
    assert mtp_lambda_at(1479, m, t) == 0.3
