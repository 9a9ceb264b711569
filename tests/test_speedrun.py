"""bench/speedrun.py's arithmetic: training time from the steps' records, and the summary numbers
that bench/README.md quotes."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("speedrun", Path(__file__).parent.parent / "bench" / "speedrun.py")
speedrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speedrun)


def records(step_s: float, vals: list[float], every: int = 2) -> list[dict]:
    """A run's metrics.jsonl: steps of step_s seconds, an evaluation every `every` steps."""
    out = []
    for i, val in enumerate(vals, 1):
        out += [{"kind": "train", "step": (i - 1) * every + k, "step_s": step_s} for k in range(1, every + 1)]
        out.append({"kind": "eval", "step": i * every, "val_loss": val})
    return out


def test_training_time_counts_steps_only():
    assert speedrun.val_curve(records(0.5, [2.0, 1.8, 1.7])) == [(2, 1.0, 2.0), (4, 2.0, 1.8), (6, 3.0, 1.7)]


def test_summary_at_the_budget_the_step_and_the_target():
    fast = speedrun.val_curve(records(0.5, [2.0, 1.6, 1.5]))  # evaluations at 1, 2, 3 s
    slow = speedrun.val_curve(records(1.0, [2.1, 1.7, 1.6]))  # at 2, 4, 6 s
    r = speedrun.summarize([fast, slow], budget_s=4.0, target=1.6, at_step=4)
    assert r["val_at_budget"]["values"] == [1.5, 1.7]  # the best evaluation inside 4 s
    assert r["val_at_step"]["values"] == [1.6, 1.7]
    assert r["time_to_target_s"]["values"] == [2.0, 6.0] and r["seeds_reaching_target"] == 2
    assert r["val_at_budget"]["mean"] == pytest.approx(1.6) and r["val_at_budget"]["half_range"] == pytest.approx(0.1)
    assert r["final_val"]["values"] == [1.5, 1.6] and r["steps"] == 6
    never = speedrun.summarize([fast, slow], budget_s=4.0, target=1.0, at_step=4)
    assert never["time_to_target_s"] is None and speedrun.shown(None, 1) == "never (all seeds)"
