"""Compute a search saves: grid, random and TPE + ASHA tune LR and warmup on the same trial budget.

    python bench/sweep_efficiency.py --source ../shared/data/tinyshakespeare.txt   # 3 methods x 3 seeds
    python bench/sweep_efficiency.py --methods tpe_asha      # run TPE + ASHA again, the others as they are
    python bench/sweep_efficiency.py --report_only           # summarize the last runs

Each method runs as a real sweep.py study (two trials at a time) of 16 trials on a shortened CPU
preset (configs/shakespeare_char_cpu.toml at dim 64, 2 layers, 400 AdamW steps, evaluated every
25): grid is 4 LRs x 4 warmups; random and TPE + ASHA draw from the ranges the grid spans (LR
log-uniform). A seed sets both the search's draws and train.seed (data order and initialization),
so the grid too varies over seeds. For each method it reports, as mean +- half the spread over
seeds, the best val loss of the study and the training steps all its trials ran (a pruned trial
counts the steps it ran), and writes results.md, results.json and the TPE + ASHA study's plot
into --out (default bench/results/sweep_efficiency/). It measures steps and losses, not time, so
other jobs on the cores do not change its numbers. Goal: TPE + ASHA reaches the grid's best val
loss (within the grid's seed spread) with at most 40% of the grid's training steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "shakespeare_char_cpu.toml"
SHARED = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
          "train.batch_tokens": 512, "train.micro_batch_size": 8, "train.max_steps": 400, "train.eval_interval": 25,
          "train.eval_iters": 4, "train.optimizer": "adamw", "train.min_lr": 1e-4, "train.peak_tflops": 1}
LRS, WARMUPS = [1e-3, 3e-3, 1e-2, 3e-2], [0, 50, 100, 200]
RANGES = (f'"train.lr" = {{ min = {LRS[0]}, max = {LRS[-1]}, log = true }}\n'
          f'"train.warmup_steps" = {{ min = {WARMUPS[0]}, max = {WARMUPS[-1]} }}\n')
METHODS = {  # name -> the sweep file's search settings and trial table
    "grid": f'search = "grid"\n[sweep.grid]\n"train.lr" = {LRS}\n"train.warmup_steps" = {WARMUPS}\n',
    "random": f'search = "random"\ncount = {len(LRS) * len(WARMUPS)}\n[sweep.random]\n{RANGES}',
    "tpe_asha": f'search = "tpe"\npruner = "asha"\ncount = {len(LRS) * len(WARMUPS)}\n[sweep.random]\n{RANGES}',
}


def sweep_file(method: str, seed: int, data_dir: Path, folder: Path) -> Path:
    head, _, table = METHODS[method].partition("[sweep.")
    shared = {**SHARED, "train.seed": seed, "data.data_dir": str(data_dir)}
    lines = ["[sweep]", f'base = "{BASE}"', f'name = "{method}-seed{seed}"', f'out_dir = "{folder}"',
             f"seed = {seed}", head.strip(), "[sweep.shared]", *(f'"{k}" = {json.dumps(v)}' for k, v in shared.items()),
             f"[sweep.{table}"]
    path = folder.with_suffix(".toml")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_study(method: str, seed: int, args: argparse.Namespace) -> list[dict[str, str]]:
    """Run one (method, seed) study unless --report_only or --methods leaves it out; its results.csv rows."""
    folder = args.out / f"{method}-seed{seed}"
    if not args.report_only and method in args.methods.split(","):
        shutil.rmtree(folder, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "sweep.py", str(sweep_file(method, seed, args.data_dir, folder)), "--parallel",
               str(args.parallel)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {method} (seed {seed}) failed: {(result.stderr or result.stdout).strip()[-300:]}")
    if not (folder / "results.csv").is_file():
        raise SystemExit(f"error: --report_only: {folder} holds no study; run the benchmark first")
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "half_spread": (max(values) - min(values)) / 2}


def summarize(rows_by_seed: list[list[dict[str, str]]]) -> dict[str, Any]:
    best = [min(float(r["best_val_loss"]) for r in rows if r["best_val_loss"]) for rows in rows_by_seed]
    steps = [sum(int(r["steps"]) for r in rows) for rows in rows_by_seed]
    pruned = [sum(r["status"] == "pruned" for r in rows) for rows in rows_by_seed]
    return {"best_val_loss": spread(best), "steps": spread(steps), "trials": len(rows_by_seed[0]),
            "pruned": spread(pruned), "per_seed": {"best_val_loss": best, "steps": steps}}


def table(results: dict[str, dict[str, Any]]) -> str:
    grid = results["grid"]
    lines = ["| method | best val loss | training steps | of grid's steps | trials (pruned) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        b, s = r["best_val_loss"], r["steps"]
        lines.append(f"| {name} | {b['mean']:.4f} ± {b['half_spread']:.4f} "
                     f"| {s['mean']:,.0f} ± {s['half_spread']:,.0f} | {s['mean'] / grid['steps']['mean']:.0%} "
                     f"| {r['trials']} ({r['pruned']['mean']:.1f}) |")
    return "\n".join(lines)


def verdict(results: dict[str, dict[str, Any]]) -> str:
    grid, tpe = results["grid"], results["tpe_asha"]
    reached = tpe["best_val_loss"]["mean"] <= grid["best_val_loss"]["mean"] + grid["best_val_loss"]["half_spread"]
    share = tpe["steps"]["mean"] / grid["steps"]["mean"]
    met = reached and share <= 0.4
    return (f"Goal {'met' if met else 'not met'}: TPE + ASHA's best val {tpe['best_val_loss']['mean']:.4f} "
            f"{'is within' if reached else 'misses'} the grid's {grid['best_val_loss']['mean']:.4f} "
            f"± {grid['best_val_loss']['half_spread']:.4f}, with {share:.0%} of its training steps "
            f"(goal: at most 40%).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"the methods to run, of {', '.join(METHODS)}; the others are summarized from --out")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time in each study")
    parser.add_argument("--report_only", action="store_true", help="summarize the studies already in --out")
    parser.add_argument("--source", type=Path, help="local Tiny Shakespeare (else it is downloaded)")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_efficiency")
    parser.add_argument("--figure", type=Path, help="also copy the TPE + ASHA study's curves (seed 0) here")
    args = parser.parse_args()
    if not args.report_only and not (args.data_dir / "shakespeare_char" / "train.bin").is_file():
        subprocess.run([sys.executable, "prepare_data.py", "--data.dataset", "shakespeare_char", "--data.data_dir",
                        str(args.data_dir), *(["--data.source", str(args.source)] if args.source else [])],
                       cwd=ROOT, check=True)
    results = {}
    for method in METHODS:
        results[method] = summarize([run_study(method, seed, args) for seed in range(args.seeds)])
        print(f"{method}: best val {results[method]['best_val_loss']}, steps {results[method]['steps']}", flush=True)
    report = f"{table(results)}\n\n{verdict(results)}"
    print(report)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps({"shared": SHARED, "lrs": LRS, "warmups": WARMUPS,
                                                       "seeds": args.seeds, "methods": results}, indent=1) + "\n")
    if args.figure:
        shutil.copyfile(args.out / "tpe_asha-seed0" / "curves.png", args.figure)


if __name__ == "__main__":
    main()
