"""Sweeps: many train.py runs from one TOML file, ranked in a results table and one plot.

    python sweep.py configs/sweeps/attention.toml               # every trial, one after another
    python sweep.py configs/sweeps/lr_warmup.toml --parallel 2  # two trials at a time
    python sweep.py configs/sweeps/lr_warmup.toml --dry-run     # list the trials and their commands

A sweep file holds one [sweep] table. Override keys are `section.key`, as on the train.py command
line; quote them (`"train.lr" = ...`) or write them as nested tables (`train.lr = ...`).

    [sweep]
    base = "../shakespeare_char_cpu.toml"  # config every trial starts from: relative to this file, else the repo
    name = "lr_warmup"                     # default: the file's stem; also the W&B group
    out_dir = "out/sweeps/lr_warmup"       # default: out/sweeps/<name>
    metric = "best_val_loss"               # rank by best_val_loss (default), final_val_loss, tokens_per_s,
                                           # or best_/final_ of an [eval] score, e.g. best_text_bits_per_byte
    count = 8                              # random search: how many trials to draw
    seed = 0                               # random search: the draws are a function of it (default 0)

    [sweep.shared]                         # overrides every trial gets, e.g. a shorter run
    "train.max_steps" = 600

    # ...then exactly one of the three ways to name the trials:

    [sweep.grid]                           # every combination; the last key varies fastest
    "train.lr" = [1e-3, 3e-3]
    "train.warmup_steps" = [0, 100]

    [sweep.random]                         # `count` draws, each key independently
    "train.lr" = { min = 1e-4, max = 1e-2, log = true }   # log-uniform; floats keep 4 significant digits
    "train.warmup_steps" = { min = 0, max = 200 }         # integer bounds draw integers
    "model.n_kv_heads" = [1, 2, 4]                        # a list: one of its values

    [[sweep.trials]]                       # an explicit list of override sets; `name` is optional
    name = "mqa"
    "model.n_kv_heads" = 1
    "model.hidden_dim" = 416

Every trial's resolved config is built and validated before the first one starts. A trial is
`train.py BASE --k v ... --train.out_dir <out_dir>/<trial>`, run as its own process, with its
folder named from its overrides (`lr=0.001,warmup_steps=100`; identical random draws run once):

    <out_dir>/results.csv, results.md   every trial, best first by the metric; rewritten after each trial
    <out_dir>/curves.png                val loss against step, one line per trial
    <out_dir>/<trial>/                  the run (checkpoints, metrics.jsonl, loss.png), train.log and
                                        sweep.json (its sweep, overrides, status, wall time)

Running the same command again skips trials that are done or failed (delete a trial's folder to
run it again) and resumes interrupted ones from their latest checkpoint. Ctrl-C or SIGTERM reach
every running trial, which saves at its next step boundary, so a stopped sweep loses at most the
steps in flight. With train.wandb on, the trials log as one W&B group named after the sweep.
Exit codes: 0 every trial done, 1 some trial failed, 2 bad input, 3 interrupted.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import checkpoint
import data
from config import Config, ConfigError, build_config, disk_write, load_toml, replace_file, replace_png, script
from train import EXIT_INTERRUPTED, StopRequest, read_metrics

ROOT = Path(__file__).resolve().parent
EXIT_FAILED = 1
METRICS = {"best_val_loss": min, "final_val_loss": min, "tokens_per_s": max}
# Or best_<key> / final_<key> of any score the eval records carry ([eval] data and tasks, e.g.
# best_text_bits_per_byte or final_hellaswag_acc_norm): accuracies rank high first, the rest low first.
EVAL_METRIC = re.compile(r"(best|final)_(\w+)")


def metric_goal(metric: str) -> Callable[..., Any]:
    """min or max: which end of `metric` is better."""
    if metric in METRICS:
        return METRICS[metric]
    return max if re.search(r"_acc(_norm)?$", metric) else min


def eval_metric(metric: str, evals: list[dict[str, Any]]) -> float | None:
    """best_<key> or final_<key> over the eval records that carry key."""
    kind, key = EVAL_METRIC.fullmatch(metric).groups()
    values = [m[key] for m in evals if key in m]
    if not values:
        return None
    return values[-1] if kind == "final" else metric_goal(metric)(values)
SWEEP_KEYS = ("base", "name", "out_dir", "metric", "count", "seed", "shared", "grid", "random", "trials")
STATE, LOG = "sweep.json", "train.log"
TAIL_LINES = 8  # of a failed trial's log, kept in its sweep.json and shown in results.md


@dataclass
class Trial:
    name: str
    overrides: dict[str, Any]  # the keys this sweep varies, as written in the sweep file
    cfg: Config  # base + shared + overrides, validated
    dir: Path


@dataclass
class Sweep:
    name: str
    base: Path
    out_dir: Path
    metric: str
    shared: dict[str, Any]
    keys: list[str]  # every varied key: the table's columns
    trials: list[Trial]


# ---------------------------------------------------------------------------------------------
# Reading a sweep file into validated trials


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    spec = load_toml(path).get("sweep")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} has no [sweep] table; sweep.py's docstring shows the format")
    for key in spec:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            hint = f"; did you mean 'sweep.{close[0]}'?" if close else f"; expected one of {', '.join(SWEEP_KEYS)}"
            raise ConfigError(f"unknown sweep key 'sweep.{key}'{hint}")
    name = str(spec.get("name", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"sweep.name={name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    metric = spec.get("metric", "best_val_loss")
    if metric not in METRICS and not EVAL_METRIC.fullmatch(metric):
        raise ConfigError(f"sweep.metric={metric!r} is not one of {', '.join(METRICS)}, nor best_<key> or final_<key> "
                          f"of a logged eval score (e.g. best_text_bits_per_byte)")
    base = find_base(spec.get("base"), path)
    modes = [mode for mode in ("grid", "random", "trials") if mode in spec]
    if len(modes) != 1:
        raise ConfigError(f"{path} must give exactly one of [sweep.grid], [sweep.random] or [[sweep.trials]] "
                          f"(it gives {len(modes)})")
    if modes == ["grid"]:
        named = [(None, overrides) for overrides in grid(flatten(_table(spec, "grid")))]
    elif modes == ["random"]:
        count, seed = spec.get("count"), spec.get("seed", 0)
        if not (isinstance(count, int) and count >= 1 and isinstance(seed, int)):
            raise ConfigError(f"a random search needs sweep.count (a positive integer, got {count!r}) and an "
                              f"integer sweep.seed (got {seed!r})")
        named = [(None, overrides) for overrides in draw(flatten(_table(spec, "random")), count, seed)]
    else:
        named = explicit(spec["trials"])
    shared = flatten(_table(spec, "shared"))
    for key, value in [*shared.items(), *(kv for _, o in named for kv in o.items())]:
        _check_scalar(key, value)

    out_dir = Path(spec.get("out_dir", f"out/sweeps/{name}"))
    base_toml, trials = load_toml(base), []
    for trial_name, overrides in zip(trial_names(named), (o for _, o in named)):
        try:  # every trial's config exactly as train.py will build it
            cfg = build_config(base_toml, [*as_args(shared), *as_args(overrides)])
        except ConfigError as e:
            raise ConfigError(f"trial {trial_name}: {e}") from None
        trials.append(Trial(trial_name, overrides, cfg, out_dir / trial_name))
    keys = list(dict.fromkeys(k for t in trials for k in t.overrides))
    return Sweep(name, base, out_dir, metric, shared, keys, trials)


def find_base(base: Any, sweep_path: Path) -> Path:
    if not isinstance(base, str):
        raise ConfigError(f"{sweep_path} needs sweep.base, the config file every trial starts from")
    for candidate in (Path(os.path.normpath(sweep_path.parent / base)), ROOT / base):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"base config {base!r} of {sweep_path} does not exist (looked in {sweep_path.parent} "
                      f"and {ROOT})")


def _table(spec: dict[str, Any], key: str) -> dict[str, Any]:
    table = spec.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"sweep.{key} must be a table of 'section.key' = value entries")
    return table


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`"train.lr" = 1` and an unquoted `train.lr = 1` (a nested table to TOML) both give 'train.lr'."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict) and not value.keys() & {"min", "max", "log"}:  # not a random range
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_scalar(key: str, value: Any) -> None:
    if not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"{key} = {value!r}: an override is a number, a string or a boolean")


def grid(table: dict[str, Any]) -> list[dict[str, Any]]:
    if not table:
        raise ConfigError("[sweep.grid] is empty: give it at least one key with a list of values")
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values (got {values!r})")
    return [dict(zip(table, combo)) for combo in itertools.product(*table.values())]


def draw(table: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` independent draws; the same seed gives the same trials. Repeats are dropped."""
    if not table:
        raise ConfigError("[sweep.random] is empty: give it at least one key with a list or a range")
    samplers = {key: _sampler(key, spec) for key, spec in table.items()}
    rng = random.Random(seed)
    trials = [{key: sample(rng) for key, sample in samplers.items()} for _ in range(count)]
    return list({json.dumps(t, sort_keys=True): t for t in trials}.values())


def _sampler(key: str, spec: Any) -> Any:
    where = f"sweep.random.{key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where} is an empty list: give at least one value")
        return lambda rng: rng.choice(spec)
    if not isinstance(spec, dict) or spec.keys() - {"min", "max", "log"}:
        raise ConfigError(f"{where} must be a list of values or a range {{ min = ..., max = ..., log = true }}")
    lo, hi, log = spec.get("min"), spec.get("max"), spec.get("log", False)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"{where} needs numeric min and max (got min={lo!r}, max={hi!r})")
    if lo > hi:
        raise ConfigError(f"{where}: min={lo} exceeds max={hi}")
    if log and lo <= 0:
        raise ConfigError(f"{where}: a log range needs min > 0 (got min={lo})")
    integer = isinstance(lo, int) and isinstance(hi, int)

    def sample(rng: random.Random) -> int | float:
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi)
        # Rounded so the folder name, the table and the value train.py gets all agree.
        return round(x) if integer else float(f"{x:.4g}")
    return sample


def explicit(trials: Any) -> list[tuple[str | None, dict[str, Any]]]:
    if not isinstance(trials, list) or not trials or not all(isinstance(t, dict) for t in trials):
        raise ConfigError("[[sweep.trials]] must list at least one table of overrides")
    named = []
    for t in trials:
        overrides = flatten({k: v for k, v in t.items() if k != "name"})
        named.append((str(t["name"]) if "name" in t else None, overrides))
    return named


def trial_names(named: list[tuple[str | None, dict[str, Any]]]) -> list[str]:
    """Folder-safe names from the overrides, by the key's last part where that is unambiguous."""
    keys = {k for _, overrides in named for k in overrides}
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k for k in keys}
    names, seen = [], collections.Counter()
    for given, overrides in named:
        name = given or ",".join(f"{short[k]}={_short_value(v)}" for k, v in overrides.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
        if len(name) > 96:
            name = f"{name[:87]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def _short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else as_arg(value)


def as_arg(value: Any) -> str:
    """A TOML value as train.py's command line spells it."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def as_args(overrides: dict[str, Any]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", as_arg(value))]


def train_args(sweep: Sweep, trial: Trial) -> list[str]:
    """The overrides train.py gets (after the base config; the out_dir comes on top)."""
    args = [*as_args(sweep.shared), *as_args(trial.overrides)]
    if trial.cfg.train.wandb != "off":
        args += ["--train.wandb_group", sweep.name, "--train.wandb_run_name", trial.name]
    return args


def resolved(trial: Trial, key: str) -> Any:
    section, field = key.split(".")
    return getattr(getattr(trial.cfg, section), field)


# ---------------------------------------------------------------------------------------------
# Checks that need the file system: data and trial folders


def check_data(sweep: Sweep) -> None:
    """Every trial's dataset exists and fits its model, so a typo fails now and not N times."""
    for trial in sweep.trials:
        cfg = trial.cfg
        if cfg.train.init_from:  # the model shape comes from the checkpoint; train.py checks it
            continue
        dataset = Path(cfg.data.data_dir) / cfg.data.dataset
        try:
            splits = data.open_split(dataset, "train"), data.open_split(dataset, "val")
            data.check_compatible(*splits, model_vocab_size=cfg.model.vocab_size, block_size=cfg.train.block_size)
        except data.DataError as e:
            raise ConfigError(f"trial {trial.name}: {e}") from None


def read_state(trial: Trial) -> dict[str, Any]:
    path = trial.dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


# What a failed write of a sweep's records says: finished work is kept.
RUN_AGAIN = ("the trials and results written so far are intact: free disk space (or make the folder writable) and "
             "run the same command again (it skips finished trials and resumes the others)")


def write_state(trial: Trial, state: dict[str, Any]) -> None:
    replace_file(trial.dir / STATE, json.dumps(state, indent=1) + "\n", RUN_AGAIN)


def check_owner(sweep: Sweep, trial: Trial) -> None:
    """A trial folder is this sweep's, with these overrides, or absent; anything else is refused."""
    state = read_state(trial)
    if not state and trial.dir.is_dir() and any(trial.dir.iterdir()):
        raise ConfigError(f"{trial.dir} exists but is no trial of sweep '{sweep.name}' (no {STATE}): move it "
                          f"away or set sweep.out_dir")
    if state and state["sweep"] != sweep.name:
        raise ConfigError(f"trial directory {trial.dir} belongs to sweep '{state['sweep']}', not "
                          f"'{sweep.name}': give this sweep another name or out_dir")
    if state and state["args"] != train_args(sweep, trial):
        raise ConfigError(f"trial directory {trial.dir} was run with other overrides than sweep "
                          f"'{sweep.name}' now gives it: delete the folder to run it again")


# ---------------------------------------------------------------------------------------------
# Running the trials


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if the sweep dies, even by SIGKILL, so an
    orphaned trial saves and stops instead of racing the next run of the sweep."""
    _LIBC.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def launch(sweep: Sweep, trial: Trial, env: dict[str, str], label: str) -> subprocess.Popen:
    """Start the trial afresh, or resume it from its latest checkpoint."""
    resume = checkpoint.read_pointer(trial.dir, "latest") is not None
    if not resume and trial.dir.is_dir():  # killed before its first checkpoint: start clean
        for path in trial.dir.iterdir():
            if path.name not in (STATE, LOG):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    trial.dir.mkdir(parents=True, exist_ok=True)
    state = read_state(trial)
    write_state(trial, {"sweep": sweep.name, "trial": trial.name, "overrides": trial.overrides,
                        "args": train_args(sweep, trial), "status": "running", "wall_s": state.get("wall_s", 0.0)})
    cmd = [sys.executable, str(ROOT / "train.py"), str(sweep.base), *train_args(sweep, trial),
           "--train.out_dir", str(trial.dir), *(["--resume"] if resume else [])]
    command_line = f"$ {shlex.join(cmd)}\n"
    with disk_write(trial.dir, len(command_line.encode()), f"appending to {LOG}", RUN_AGAIN), \
            (trial.dir / LOG).open("a") as log:
        log.write(command_line)
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if _LIBC else None)
    print(f"{label} {'resumed' if resume else 'started'} (log {trial.dir / LOG})", flush=True)
    return proc


def log_tail(trial: Trial) -> list[str]:
    text = (trial.dir / LOG).read_text(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]  # tqdm redraws with \r
    return lines[-TAIL_LINES:]


def record(trial: Trial, returncode: int, wall_s: float) -> str:
    """Store how the trial ended; a trial killed by a signal counts as interrupted (resumable)."""
    if returncode == 0:
        status = "done"
    elif returncode == EXIT_INTERRUPTED or returncode < 0:
        status = "interrupted"
    else:
        status = "failed"
    state = read_state(trial)
    state.update(status=status, returncode=returncode, wall_s=state["wall_s"] + wall_s)
    if status == "failed":
        state["log_tail"] = log_tail(trial)
    write_state(trial, state)
    return status


def run(sweep: Sweep, parallel: int) -> int:
    todo = []
    for i, trial in enumerate(sweep.trials, 1):
        label, status = f"[{i}/{len(sweep.trials)}] {trial.name}:", read_state(trial).get("status")
        if status in ("done", "failed"):
            print(f"{label} {status} before, skipped")
        else:
            todo.append((label, trial))
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # N trials share the cores instead of fighting
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    write_results(sweep)
    running: dict[subprocess.Popen, tuple[str, Trial, float]] = {}
    with StopRequest() as stop:
        forwarded = False
        while (todo and stop.signal is None) or running:
            while todo and len(running) < parallel and stop.signal is None:
                label, trial = todo.pop(0)
                running[launch(sweep, trial, env, label)] = (label, trial, time.monotonic())
            time.sleep(0.05)
            if stop.signal is not None and not forwarded:
                print(f"signal {stop.signal}: stopping the running trials at their next step", flush=True)
                for proc in running:
                    proc.send_signal(stop.signal)
                forwarded = True
            for proc in [p for p in running if p.poll() is not None]:
                label, trial, start = running.pop(proc)
                status = record(trial, proc.returncode, time.monotonic() - start)
                best = trial_row(sweep, trial)["best_val_loss"]
                print(f"{label} {status} (exit {proc.returncode}) after {time.monotonic() - start:.0f} s"
                      + (f", best val {best:.4f}" if best is not None else ""), flush=True)
                if status == "failed":
                    print("\n".join(f"    {line}" for line in read_state(trial)["log_tail"]), flush=True)
                write_results(sweep)
        interrupted = stop.signal is not None
    print(f"results: {sweep.out_dir / 'results.md'}")
    if interrupted:
        print("interrupted: run the same command again to resume")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(read_state(t).get("status") == "failed" for t in sweep.trials) else 0


# ---------------------------------------------------------------------------------------------
# Results: results.csv, results.md, curves.png


def trial_row(sweep: Sweep, trial: Trial) -> dict[str, Any]:
    state = read_state(trial)
    metrics = read_metrics(trial.dir / "metrics.jsonl")
    steps = [m for m in metrics if m["kind"] == "train"]
    val = [m["val_loss"] for m in metrics if m["kind"] == "eval"]
    info = trial.dir / "run_info.json"
    logged = {} if sweep.metric in METRICS else {sweep.metric: eval_metric(sweep.metric, [m for m in metrics if m["kind"] == "eval"])}
    return {"trial": trial.name, **{key: resolved(trial, key) for key in sweep.keys},
            "params": json.loads(info.read_text())["params"] if info.is_file() else None,
            "best_val_loss": min(val, default=None), "final_val_loss": val[-1] if val else None, **logged,
            "steps": steps[-1]["step"] if steps else 0,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None,
            "wall_s": state.get("wall_s"), "status": state.get("status", "pending")}


def ranked(sweep: Sweep) -> list[tuple[Trial, dict[str, Any]]]:
    """Trials best first by the metric; those without a value (pending, failed early) last."""
    sign = 1 if metric_goal(sweep.metric) is min else -1
    rows = [(trial, trial_row(sweep, trial)) for trial in sweep.trials]
    return sorted(rows, key=lambda r: (r[1][sweep.metric] is None, sign * (r[1][sweep.metric] or 0), r[0].name))


def write_results(sweep: Sweep) -> None:
    rows = ranked(sweep)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, list(rows[0][1]))
    writer.writeheader()
    writer.writerows(row for _, row in rows)
    replace_file(sweep.out_dir / "results.csv", table.getvalue(), RUN_AGAIN)
    replace_file(sweep.out_dir / "results.md", results_markdown(sweep, rows), RUN_AGAIN)
    plot_val_curves(sweep, [trial for trial, _ in rows], sweep.out_dir / "curves.png")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.endswith("loss") or key.startswith(("best_", "final_")):
        return f"{value:.4f}"
    if key in ("params", "tokens_per_s"):
        return f"{value:,.0f}"
    if key == "wall_s":
        return f"{value:.0f} s"
    return _short_value(value)


def results_markdown(sweep: Sweep, rows: list[tuple[Trial, dict[str, Any]]]) -> str:
    try:
        base = sweep.base.resolve().relative_to(ROOT)
    except ValueError:
        base = sweep.base
    shared = ", ".join(f"`{k}={as_arg(v)}`" for k, v in sweep.shared.items())
    lines = [f"Sweep `{sweep.name}`: base `{base}`" + (f", shared {shared}" if shared else "") +
             f"; ranked by {sweep.metric}.", ""]
    header = {"trial": "trial", **{k: k.rsplit(".", 1)[-1] for k in sweep.keys}, "params": "params",
              "best_val_loss": "best val loss", "final_val_loss": "final val loss",
              **({} if sweep.metric in METRICS else {sweep.metric: sweep.metric}), "steps": "steps",
              "tokens_per_s": "tokens/s", "wall_s": "wall time", "status": "status"}
    lines.append("| " + " | ".join(header.values()) + " |")
    lines.append("| " + " | ".join("---" if k in ("trial", "status") else "---:" for k in header) + " |")
    for _, row in rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for k in header) + " |")
    for trial, row in rows:
        if row["status"] == "failed":
            tail = "\n".join(read_state(trial)["log_tail"])
            lines += ["", f"`{trial.name}` failed; the end of {trial.name}/{LOG}:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def plot_val_curves(sweep: Sweep, trials: list[Trial], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for trial in trials:  # best first, so the legend reads like the table
        evals = [m for m in read_metrics(trial.dir / "metrics.jsonl") if m["kind"] == "eval"]
        if evals:
            ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", ms=3, lw=1.2,
                    label=trial.name)
    ax.set_title(f"sweep {sweep.name}: validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    replace_png(png, fig, 90, RUN_AGAIN)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # through script()'s one error path
        raise ConfigError(message)


@script
def main(argv: list[str]) -> int:
    parser = _Parser(prog="sweep.py", description="Run a sweep of train.py trials (format: see sweep.py).")
    parser.add_argument("sweep", help="sweep TOML file, e.g. configs/sweeps/attention.toml")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="trials to run at once (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their commands, run nothing")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel} must be at least 1")
    sweep = load_sweep(args.sweep)
    for trial in sweep.trials:
        check_owner(sweep, trial)
    check_data(sweep)
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(sweep.trials)} trials in {sweep.out_dir}")
        for trial in sweep.trials:
            status = read_state(trial).get("status", "pending")
            cmd = ["python", "train.py", str(sweep.base), *train_args(sweep, trial), "--train.out_dir", str(trial.dir)]
            print(f"{trial.name}  [{status}]\n    {shlex.join(cmd)}")
        return 0
    return run(sweep, args.parallel)


if __name__ == "__main__":
    sys.exit(main())
