"""LR schedules at their boundary steps."""

import math

import pytest

from config import TrainConfig
from train import lr_at, muon_lr_at


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_never_zero(schedule):
    c = cfg(lr_schedule=schedule)
    assert lr_at(0, c) == pytest.approx(1e-4)  # 1/10 of the peak, not 0
    assert lr_at(4, c) == pytest.approx(5e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)  # the last warmup step reaches the peak
    assert lr_at(10, c) == pytest.approx(1e-3)


def test_cosine_boundaries():
    c = cfg(lr_schedule="cosine")
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(55, c) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the decay
    assert lr_at(100, c) == pytest.approx(1e-4)
    assert lr_at(500, c) == pytest.approx(1e-4)  # past the end: stays at min_lr
    values = [lr_at(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_boundaries():
    c = cfg(lr_schedule="wsd")
    assert lr_at(79, c) == pytest.approx(1e-3)  # stable until the last 20% of the steps
    assert lr_at(80, c) == pytest.approx(1e-3)  # decay starts from the peak
    assert lr_at(90, c) == pytest.approx(5.5e-4)
    assert lr_at(100, c) == pytest.approx(1e-4)


def test_constant_after_warmup():
    c = cfg(lr_schedule="constant")
    assert {lr_at(s, c) for s in range(10, 100)} == {1e-3}


def test_no_warmup_starts_at_peak():
    assert lr_at(0, cfg(warmup_steps=0, lr_schedule="cosine")) == pytest.approx(1e-3)
    assert math.isfinite(lr_at(0, cfg(warmup_steps=100, max_steps=100, lr_schedule="cosine")))


def test_muon_has_its_own_peak_floor_and_shape():
    same = cfg(lr_schedule="cosine", muon_lr=0.02)
    for step in (0, 9, 55, 100):  # the same shape, scaled from lr to muon_lr
        assert muon_lr_at(step, same) == pytest.approx(lr_at(step, same) * 20)
    own = cfg(lr_schedule="cosine", muon_lr=0.02, muon_lr_schedule="constant")
    assert muon_lr_at(4, own) == pytest.approx(0.01)  # the warmup is shared
    assert muon_lr_at(100, own) == pytest.approx(0.02) and lr_at(100, own) == pytest.approx(1e-4)
