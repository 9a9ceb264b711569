"""Quality per second: which training recipe reaches which val loss at which wall-clock time.

    python bench/speedrun.py --source ../shared/data/tinyshakespeare.txt            # every recipe, 3 seeds
    python bench/speedrun.py --source ../shared/data/tinyshakespeare.txt --recipes adamw,muon --seeds 1
    python bench/speedrun.py --report_only                                 # summarize the last runs again

Every recipe trains the same model (configs/shakespeare_char_cpu.toml: a plain Llama, checkpoints
stay Hugging Face folders) on the same data, one train.py process at a time so they never share
the cores, and evaluates every `--eval_every` steps. Time is training time: the sum of the steps'
wall-clock seconds as train.py records them (evaluation and checkpoints excluded, as speedruns
count it). For each recipe it reports, as mean ± half the spread over seeds: the val loss at the
budget (the best evaluation inside it), the val loss at a fixed step count, the time to reach the
target val loss, and the final val loss; it writes results.json, results.md and curves.png (val
loss against training time) into --out (default bench/results/speedrun/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = "configs/shakespeare_char_cpu.toml"
# Overrides on top of BASE (whose model, data and warmup every recipe shares; each recipe names its
# optimizer settings in full). Each step count is chosen to end inside the default budget on these
# 2-core machines, since a schedule cut short by the budget would waste its decay. Muon's settings
# come from 600-step trials: muon_lr 0.005 / 0.01 / 0.02 / 0.04 / 0.08 gave val 1.752 / 1.720 /
# 1.744 / 1.817 / 1.949 (AdamW: 1.918), and doubling AdamW's lr for the rest then gave 1.698.
MUON = ["--train.optimizer", "muon", "--train.muon_lr", "0.01", "--train.lr", "6e-3", "--train.min_lr", "6e-4",
        "--train.max_steps", "1500"]
RECIPES: dict[str, list[str]] = {
    "adamw": ["--train.optimizer", "adamw", "--train.lr", "3e-3", "--train.min_lr", "3e-4",
              "--train.max_steps", "1800"],
    "muon": MUON,
    "muon_wsd": [*MUON, "--train.lr_schedule", "wsd", "--train.decay_fraction", "0.4"],
}


def run_recipe(name: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train one (recipe, seed) (unless --report_only) and return its metrics records."""
    out_dir = args.out / f"{name}-seed{seed}"
    if args.report_only:
        if not (out_dir / "metrics.jsonl").is_file():
            raise SystemExit(f"error: --report_only: {out_dir} holds no run; run the benchmark first")
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    cmd = [sys.executable, "train.py", BASE, *RECIPES[name], "--train.seed", str(seed),
           "--train.out_dir", str(out_dir), "--train.overwrite", "true", "--train.eval_interval", str(args.eval_every),
           "--train.ckpt_interval", "100000", "--data.data_dir", str(args.data_dir), *args.extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {name} (seed {seed}) failed: {result.stderr.strip().splitlines()[-1]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


Curve = list[tuple[int, float, float]]  # (step, training seconds so far, val loss) per evaluation


def val_curve(records: list[dict[str, Any]]) -> Curve:
    elapsed, curve = 0.0, []
    for m in records:
        if m["kind"] == "train":
            elapsed += m["step_s"]
        else:
            curve.append((m["step"], elapsed, m["val_loss"]))
    return curve


def summarize(curves: list[Curve], budget_s: float, target: float, at_step: int) -> dict[str, Any]:
    at_budget = [min((v for _, t, v in c if t <= budget_s), default=float("nan")) for c in curves]
    at_steps = [min((v for s, _, v in c if s <= at_step), default=float("nan")) for c in curves]
    to_target = [next((t for _, t, v in c if v <= target), None) for c in curves]
    reached = [t for t in to_target if t is not None]
    return {"val_at_budget": spread(at_budget), "val_at_step": spread(at_steps),
            "final_val": spread([c[-1][2] for c in curves]), "train_s": spread([c[-1][1] for c in curves]),
            "steps": curves[0][-1][0],
            "time_to_target_s": spread(reached) if len(reached) == len(curves) else None,
            "seeds_reaching_target": len(reached), "seeds": len(curves)}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2, "values": values}


def shown(stat: dict[str, float] | None, digits: int) -> str:
    return "never (all seeds)" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}"


def plot(curves: dict[str, list[Curve]], budget_s: float, target: float, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for color, (name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], curves.items()):
        for i, curve in enumerate(runs):
            ax.plot([t for _, t, _ in curve], [v for _, _, v in curve], color=color, alpha=0.8, lw=1,
                    label=name if i == 0 else None)
    ax.axvline(budget_s, color="gray", ls="--", lw=1, label=f"budget {budget_s:g} s")
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}")
    ax.set(xlabel="training time (s)", ylabel="val loss", ylim=(target - 0.15, 2.6),
           title="Tiny Shakespeare (char), 2 CPU threads: val loss against training time")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def prepare(args: argparse.Namespace) -> None:
    if (args.data_dir / "shakespeare_char" / "train.bin").is_file():
        return
    cmd = [sys.executable, "prepare_data.py", "--data.dataset", "shakespeare_char", "--data.data_dir",
           str(args.data_dir), *(["--data.source", str(args.source)] if args.source else [])]
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=138.0, help="nanoGPT's CPU run takes 138 s here")
    parser.add_argument("--target", type=float, default=1.62)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--at_step", type=int, default=1500, help="also compare every recipe at this step")
    parser.add_argument("--report_only", action="store_true", help="summarize the runs already in --out")
    parser.add_argument("--source", type=Path, help="local Tiny Shakespeare (else it is downloaded)")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speedrun")
    parser.add_argument("extra", nargs="*", help="train.py overrides for every recipe, after --")
    args = parser.parse_args()
    names = args.recipes.split(",")
    if unknown := [n for n in names if n not in RECIPES]:
        raise SystemExit(f"error: unknown recipe {unknown[0]!r}: choose from {', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        prepare(args)
    curves: dict[str, list[Curve]] = {}
    for seed in range(1, args.seeds + 1):  # seeds outermost: machine drift hits every recipe alike
        for name in names:
            curves.setdefault(name, []).append(val_curve(run_recipe(name, seed, args)))
            step, seconds, val = curves[name][-1][-1]
            print(f"{name} seed {seed}: val {val:.4f} at step {step} after {seconds:.1f} s", flush=True)
    results = {name: summarize(runs, args.budget_s, args.target, args.at_step) for name, runs in curves.items()}
    lines = [f"| recipe | val at {args.budget_s:g} s | val at step {args.at_step} | time to val {args.target:g} (s) "
             f"| final val (step) | training time (s) | seeds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {shown(r['val_at_budget'], 4)} | {shown(r['val_at_step'], 4)} | "
                     f"{shown(r['time_to_target_s'], 1)} | {shown(r['final_val'], 4)} ({r['steps']}) | "
                     f"{shown(r['train_s'], 1)} | {r['seeds']} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"budget_s": args.budget_s, "target": args.target,
                                                       "recipes": {n: RECIPES[n] for n in names},
                                                       "results": results}, indent=2))
    plot(curves, args.budget_s, args.target, args.out / "curves.png")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
