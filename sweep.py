"""Sweeps: many train.py runs from one TOML file, ranked in a results table and one plot.

    python sweep.py configs/sweeps/attention.toml               # every trial, one after another
    python sweep.py configs/sweeps/lr_warmup.toml --parallel 2  # two trials at a time
    python sweep.py configs/sweeps/lr_warmup.toml --dry-run     # list the trials and their commands
    python sweep.py configs/sweeps/lr_tpe.toml --storage postgresql://me@db/sweeps  # one worker of a study
    python sweep.py configs/sweeps/lr_tpe.toml --report         # rewrite the table and plot from the study

A sweep file holds one [sweep] table. Override keys are `section.key`, as on the train.py command
line; quote them (`"train.lr" = ...`) or write them as nested tables (`train.lr = ...`).

    [sweep]
    base = "../shakespeare_char_cpu.toml"  # config every trial starts from: relative to this file, else the repo
    name = "lr_warmup"                     # default: the file's stem; also the W&B group and the study's name
    out_dir = "out/sweeps/lr_warmup"       # default: out/sweeps/<name>
    metric = "best_val_loss"               # rank by best_val_loss (default), final_val_loss, tokens_per_s,
                                           # or best_/final_ of an [eval] score, e.g. best_text_bits_per_byte
    search = "tpe"                         # grid, random or tpe (default: grid or random, by the table given)
    count = 8                              # random and tpe: trials in all, over every worker
    seed = 0                               # random and tpe: the draws are a function of it (default 0)
    pruner = "asha"                        # none (default), median or asha: stop losing trials early
    storage = "postgresql://me@db/sweeps"  # the study's database (default: a journal file in out_dir)
    gpus_per_trial = 1                     # k > 1: each trial runs under torchrun on k GPUs

    [sweep.shared]                         # overrides every trial gets, e.g. a shorter run
    "train.max_steps" = 600

    # ...then exactly one of the three ways to name the trials:

    [sweep.grid]                           # search = "grid": every combination; the last key varies fastest
    "train.lr" = [1e-3, 3e-3]
    "train.warmup_steps" = [0, 100]

    [sweep.random]                         # search = "random": `count` draws, each key independently;
                                           # search = "tpe": the space Optuna's TPE sampler searches
    "train.lr" = { min = 1e-4, max = 1e-2, log = true }   # log-uniform; floats keep 4 significant digits
    "train.warmup_steps" = { min = 0, max = 200 }         # integer bounds draw integers
    "model.n_kv_heads" = [1, 2, 4]                        # a list: one of its values

    [[sweep.trials]]                       # an explicit list of override sets; `name` is optional
    name = "mqa"
    "model.n_kv_heads" = 1
    "model.hidden_dim" = 416

Every trial's resolved config is built and validated before the first one starts (tpe: one draw
of the space; its trials are proposed as the study runs). A trial is `train.py BASE --k v ...
--train.out_dir <out_dir>/<trial>`, run as its own process, with its folder named from its
overrides (`lr=0.001,warmup_steps=100`; identical random draws run once; tpe trials start with
their number, `007_lr=0.00231,warmup_steps=40`):

    <out_dir>/results.csv, results.md   every trial, best first by the metric; rewritten after each trial
    <out_dir>/curves.png                val loss against step, one line per trial; pruned ones dashed
    <out_dir>/study.journal             the Optuna study, unless `storage` names a database
    <out_dir>/<trial>/                  the run (checkpoints, metrics.jsonl, loss.png), train.log and
                                        sweep.json (its sweep, overrides, status, wall time)

With Optuna installed (pip install -r requirements-sweep.txt) every sweep is an Optuna study that
the same command, run on several machines or several times on one, serves as workers: each asks
the study for a trial no other worker runs, `count` holds over all of them, and the table and plot
cover the whole study. A pruner reads each running trial's metrics.jsonl as it grows, reports the
metric at every evaluation and stops a losing trial with SIGTERM (it saves; its folder stays). A
worker that dies (even by kill -9) leaves its trial running in the study; another worker fails
that trial, once the dead worker's processes are gone on the same machine or its heartbeat is
STALE_S old, and queues its overrides again. Without Optuna, grid, random and list sweeps run on
one machine as one worker, with each trial's state in its sweep.json.

Running the same command again skips trials that are done, failed or pruned (delete a trial's
folder, and the study, to run it again) and resumes interrupted ones from their latest
checkpoint (a study queues them behind the trials not yet started). Ctrl-C or SIGTERM reach every running trial, which saves at its next step boundary,
so a stopped sweep loses at most the steps in flight. With CUDA GPUs visible each trial gets its
own (CUDA_VISIBLE_DEVICES): all of them, one trial each at a time, or those --gpus picks. With
train.wandb on, the trials log as one W&B group named after the sweep.
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
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
SWEEP_KEYS = ("base", "name", "out_dir", "metric", "search", "count", "seed", "pruner", "storage", "gpus_per_trial",
              "shared", "grid", "random", "trials")
SEARCHES = {"grid": "grid", "random": "random", "tpe": "random"}  # search -> the table that names its trials
PRUNERS = ("none", "median", "asha")
STATE, LOG = "sweep.json", "train.log"
TAIL_LINES = 8  # of a failed trial's log, kept in its sweep.json and shown in results.md
FINAL = ("done", "failed", "pruned")  # a trial in one of these states is not run again
OPTUNA_EXTRA = "pip install -r requirements-sweep.txt"


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
    trials: list[Trial]  # the fixed trials of a grid, random draws or a list; none for tpe
    checked: list[Trial]  # the trials validated before any starts: the fixed ones, or one draw of tpe's space
    search: str  # grid, random, tpe, or list ([[sweep.trials]])
    ranges: dict[str, Any]  # tpe: the [sweep.random] space, as written
    count: int  # trials in all, over every worker
    seed: int
    pruner: str
    storage: str | None  # a database URL or a journal file; None: out_dir/study.journal
    gpus_per_trial: int
    first_eval: int  # the step of a trial's first evaluation: ASHA's first rung
    record: dict[str, Any]  # what the study keeps to recognise its sweep file: the space and the base config


@dataclass
class Result:
    """A trial's line in the table, its val curve and, if it failed, its log's end: from its folder,
    or (when the folder is on another machine) as its worker stored them in the study."""
    row: dict[str, Any]
    curve: list[list[float]]  # [step, val loss] at every evaluation
    log_tail: list[str]


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
    search, named, ranges, count, seed = read_trials(spec, path)
    shared = flatten(_table(spec, "shared"))
    for key, value in [*shared.items(), *(kv for _, o in named for kv in o.items())]:
        _check_scalar(key, value)
    pruner, storage, gpus_per_trial = read_running(spec)

    out_dir = Path(spec.get("out_dir", f"out/sweeps/{name}"))
    base_toml = load_toml(base)
    sweep = Sweep(name, base, out_dir, metric, shared, [], [], [], search, ranges, count, seed, pruner, storage,
                  gpus_per_trial, 0, {})
    sweep.trials = [make_trial(sweep, base_toml, n, o) for n, o in zip(trial_names(named), (o for _, o in named))]
    # tpe's trials come later, one at a time: one draw of its space checks its keys and values now.
    sweep.checked = sweep.trials or [make_trial(sweep, base_toml, "tpe", draw(ranges, 1, seed)[0])]
    sweep.keys = list(dict.fromkeys(k for t in sweep.checked for k in t.overrides))
    sweep.count = len(sweep.trials) or count
    sweep.first_eval = min(t.cfg.train.eval_interval for t in sweep.checked)
    sweep.record = json.loads(json.dumps(
        {"base": base_toml, "shared": shared, "metric": metric, "search": search, "count": sweep.count, "seed": seed,
         "pruner": pruner, "trials": [[t.name, t.overrides] for t in sweep.trials], "ranges": ranges}, default=str))
    return sweep


def read_trials(spec: dict[str, Any], path: Path) -> tuple[str, list[tuple[str | None, dict[str, Any]]],
                                                          dict[str, Any], int, int]:
    """The search, its fixed trials (name or None, overrides), tpe's ranges, count and seed."""
    modes = [mode for mode in ("grid", "random", "trials") if mode in spec]
    if len(modes) != 1:
        raise ConfigError(f"{path} must give exactly one of [sweep.grid], [sweep.random] or [[sweep.trials]] "
                          f"(it gives {len(modes)})")
    if modes == ["trials"]:
        if "search" in spec:
            raise ConfigError("sweep.search chooses how [sweep.grid] or [sweep.random] is searched; "
                              "[[sweep.trials]] runs its list as written: remove sweep.search")
        return "list", explicit(spec["trials"]), {}, 0, 0
    search = spec.get("search", modes[0])
    if search not in SEARCHES:
        raise ConfigError(f"sweep.search={search!r} is not one of {', '.join(SEARCHES)}")
    if SEARCHES[search] != modes[0]:
        raise ConfigError(f"search = \"{search}\" draws from [sweep.{SEARCHES[search]}] "
                          f"{'lists' if search == 'grid' else 'ranges'}, and {path} gives [sweep.{modes[0]}]: "
                          f"give [sweep.{SEARCHES[search]}] or set search = \"{modes[0]}\"")
    if search == "grid":
        return search, [(None, overrides) for overrides in grid(flatten(_table(spec, "grid")))], {}, 0, 0
    count, seed = spec.get("count"), spec.get("seed", 0)
    if not (isinstance(count, int) and count >= 1 and isinstance(seed, int)):
        raise ConfigError(f"a {search} search needs sweep.count (a positive integer, got {count!r}) and an "
                          f"integer sweep.seed (got {seed!r})")
    ranges = flatten(_table(spec, "random"))
    if search == "tpe":
        return search, [], ranges, count, seed
    return search, [(None, overrides) for overrides in draw(ranges, count, seed)], {}, count, seed


def read_running(spec: dict[str, Any]) -> tuple[str, str | None, int]:
    """pruner, storage and gpus_per_trial: how the trials run, not what they are."""
    pruner, storage, gpus = spec.get("pruner", "none"), spec.get("storage"), spec.get("gpus_per_trial", 1)
    if pruner not in PRUNERS:
        raise ConfigError(f"sweep.pruner={pruner!r} is not one of {', '.join(PRUNERS)}")
    if storage is not None and not (isinstance(storage, str) and storage):
        raise ConfigError(f"sweep.storage={storage!r} must be a database URL (postgresql://user@host/db) or a "
                          f"journal file's path")
    if not (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1):
        raise ConfigError(f"sweep.gpus_per_trial={gpus!r} must be a positive integer")
    return pruner, storage, gpus


def make_trial(sweep: Sweep, base_toml: dict[str, Any], name: str, overrides: dict[str, Any]) -> Trial:
    try:  # the trial's config exactly as train.py will build it
        cfg = build_config(base_toml, [*as_args(sweep.shared), *as_args(overrides)])
    except ConfigError as e:
        raise ConfigError(f"trial {name}: {e}") from None
    return Trial(name, overrides, cfg, sweep.out_dir / name)
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
    for trial in sweep.checked:
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




def launch(sweep: Sweep, trial: Trial, env: dict[str, str], label: str, gpus: list[str] | None) -> subprocess.Popen:
    """Start the trial afresh, or resume it from its latest checkpoint; on `gpus` if given."""
    resume = checkpoint.read_pointer(trial.dir, "latest") is not None
    if not resume and trial.dir.is_dir():  # killed before its first checkpoint: start clean
        for path in trial.dir.iterdir():
            if path.name not in (STATE, LOG):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    trial.dir.mkdir(parents=True, exist_ok=True)
    state = read_state(trial)
    write_state(trial, {"sweep": sweep.name, "trial": trial.name, "overrides": trial.overrides,
                        "args": train_args(sweep, trial), "status": "running", "wall_s": state.get("wall_s", 0.0)})
    launcher = [sys.executable]
    if gpus:
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        if len(gpus) > 1:  # one process per GPU; --standalone picks a free port, so trials do not collide
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(gpus))]
    cmd = [*launcher, str(ROOT / "train.py"), str(sweep.base), *train_args(sweep, trial),
           "--train.out_dir", str(trial.dir), *(["--resume"] if resume else [])]
    command_line = f"$ {shlex.join(cmd)}\n"
    with disk_write(trial.dir, len(command_line.encode()), f"appending to {LOG}", RUN_AGAIN), \
            (trial.dir / LOG).open("a") as log:
        log.write(command_line)
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if _LIBC else None)
    where = f" on GPU {','.join(gpus)}" if gpus else ""
    print(f"{label} {'resumed' if resume else 'started'}{where} (log {trial.dir / LOG})", flush=True)
    return proc


def log_tail(trial: Trial) -> list[str]:
    text = (trial.dir / LOG).read_text(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]  # tqdm redraws with \r
    return lines[-TAIL_LINES:]


def record(trial: Trial, returncode: int, wall_s: float, pruned: bool) -> str:
    """Store how the trial ended; a trial killed by a signal counts as interrupted (resumable),
    unless the sweep stopped it to prune it."""
    if returncode == 0:
        status = "done"
    elif returncode == EXIT_INTERRUPTED or returncode < 0:
        status = "pruned" if pruned else "interrupted"
    else:
        status = "failed"
    state = read_state(trial)
    state.update(status=status, returncode=returncode, wall_s=state["wall_s"] + wall_s)
    if status == "failed":
        state["log_tail"] = log_tail(trial)
    write_state(trial, state)
    return status


@dataclass
class Running:
    """A trial this sweep process runs, and how far it has read the trial's metrics.jsonl."""
    proc: subprocess.Popen
    label: str
    trial: Trial
    slot: int  # which of the sweep's places to run (a GPU group, or one of --parallel) it holds
    start: float = field(default_factory=time.monotonic)
    records: list[dict[str, Any]] = field(default_factory=list)
    inode: int = 0
    offset: int = 0
    reported: int = -1  # the last step reported to the study (a resumed trial's rewritten file repeats steps)
    pruned: bool = False


def new_evals(run: Running) -> list[int]:
    """Where in run.records the eval records are that the trial's metrics.jsonl gained since the
    last look. A resumed trial rewrites the file (a new inode, records past its checkpoint
    dropped): then it is read anew."""
    try:
        with (run.trial.dir / "metrics.jsonl").open("rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_ino != run.inode or stat.st_size < run.offset:
                run.inode, run.offset, run.records = stat.st_ino, 0, []
            f.seek(run.offset)
            chunk = f.read()
    except FileNotFoundError:
        return []
    whole = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next look
    run.offset += len(whole)
    first = len(run.records)
    run.records += [json.loads(line) for line in whole.splitlines() if line]
    return [i for i in range(first, len(run.records)) if run.records[i]["kind"] == "eval"]


def report_evals(sweep: Sweep, trials: Trials, run: Running, stopping: bool) -> None:
    """The sweep's metric at each new evaluation goes to the study; a trial its pruner calls losing
    gets SIGTERM, saves and exits, and is recorded as pruned."""
    for i in new_evals(run):
        step, value = run.records[i]["step"], summary(sweep, run.records[:i + 1])[sweep.metric]
        if run.pruned or stopping or step <= run.reported or value is None or not math.isfinite(value):
            continue
        run.reported = step
        if trials.report(run.trial, step, value):
            print(f"{run.label} pruned at step {step} ({sweep.metric} {value:.4f})", flush=True)
            run.proc.send_signal(signal.SIGTERM)
            run.pruned = True


def run(sweep: Sweep, trials: Trials, slots: list[list[str] | None], env: dict[str, str]) -> int:
    """Run what `trials` (LocalTrials or StudyTrials) hands out, len(slots) at a time, until it has
    nothing more or a signal stops the sweep."""
    running: list[Running] = []
    write_results(sweep, trials.results())
    with StopRequest() as stop:
        forwarded = False
        while True:
            busy = {r.slot for r in running}
            for slot in [s for s in range(len(slots)) if s not in busy]:
                claim = trials.next() if stop.signal is None else None
                if claim is None:
                    break
                label, trial = claim
                proc = launch(sweep, trial, env, label, slots[slot])
                trials.started(trial, proc.pid)
                running.append(Running(proc, label, trial, slot))
            if not running and (stop.signal is not None or trials.done()):
                break
            time.sleep(0.2)
            if stop.signal is not None and not forwarded:
                print(f"signal {stop.signal}: stopping the running trials at their next step", flush=True)
                for r in running:
                    r.proc.send_signal(stop.signal)
                forwarded = True
            for r in running:
                report_evals(sweep, trials, r, stop.signal is not None)
            trials.beat()
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                finish(sweep, trials, r)
                write_results(sweep, trials.results())
        interrupted = stop.signal is not None
    print(f"results: {sweep.out_dir / 'results.md'}")
    if interrupted:
        print("interrupted: run the same command again to resume")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if trials.failed() else 0


def finish(sweep: Sweep, trials: Trials, run: Running) -> None:
    wall_s = time.monotonic() - run.start
    status = record(run.trial, run.proc.returncode, wall_s, run.pruned)
    result = trial_result(sweep, run.trial)
    trials.finish(run.trial, status, result)
    best = result.row["best_val_loss"]
    print(f"{run.label} {status} (exit {run.proc.returncode}) after {wall_s:.0f} s"
          + (f", best val {best:.4f}" if best is not None else ""), flush=True)
    if status == "failed":
        print("\n".join(f"    {line}" for line in result.log_tail), flush=True)


class LocalTrials:
    """The sweep's own list of trials, without Optuna: one machine, one sweep process, and each
    trial's state in its folder's sweep.json."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep, self.todo = sweep, []
        for i, trial in enumerate(sweep.trials, 1):
            label, status = f"[{i}/{len(sweep.trials)}] {trial.name}:", read_state(trial).get("status")
            if status in FINAL:
                print(f"{label} {status} before, skipped")
            else:
                self.todo.append((label, trial))

    def next(self) -> tuple[str, Trial] | None:
        return self.todo.pop(0) if self.todo else None

    def done(self) -> bool:
        return not self.todo

    def report(self, trial: Trial, step: int, value: float) -> bool:
        return False  # no study, no pruner

    def started(self, trial: Trial, pid: int) -> None:
        pass

    def beat(self) -> None:
        pass

    def finish(self, trial: Trial, status: str, result: Result) -> None:
        pass  # record() has written its sweep.json

    def results(self) -> list[Result]:
        return [trial_result(self.sweep, trial) for trial in self.sweep.trials]

    def failed(self) -> bool:
        return any(read_state(t).get("status") == "failed" for t in self.sweep.trials)


# ---------------------------------------------------------------------------------------------
# The study: Optuna's record of the trials, which every worker of the sweep shares


def optuna_or_none(needed_by: str | None) -> Any:
    """Optuna, imported only here: without it a grid, random or list sweep runs as one worker, and
    what needs a study (`needed_by`) is refused in one line."""
    try:
        import optuna
    except ImportError:
        if needed_by is None:
            return None
        raise ConfigError(f"{needed_by} needs Optuna, an optional extra: {OPTUNA_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own one line per event
    return optuna


def open_storage(optuna: Any, url: str | None, out_dir: Path) -> Any:
    """A journal file (the default: no server; workers on one machine or a shared file system) or,
    for a URL, a database through SQLAlchemy (PostgreSQL for machines that share no file system)."""
    if url is None or "://" not in url:
        path = Path(url) if url else out_dir / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    import sqlalchemy
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"storage {url!r} is neither a database URL (postgresql://user@host/db) nor a journal "
                          f"file's path") from None
    where = parsed.host or parsed.query.get("host") or parsed.database or "localhost"
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 reads a plain URL as psycopg 3; we ship psycopg2
        parsed = parsed.set(drivername="postgresql+psycopg2")
    # A server that does not answer fails in seconds, not after the driver's default of minutes.
    engine = {"connect_args": {"connect_timeout": 10}} if parsed.get_backend_name() == "postgresql" else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False), engine_kwargs=engine)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
            reason = str(e.__cause__ or e).splitlines()[0]  # Optuna wraps the driver's ImportError in its own
            raise ConfigError(f"storage {parsed.render_as_string()}: its database driver is missing ({reason}): "
                              f"{OPTUNA_EXTRA} (psycopg2 serves postgresql://)") from None
        except sqlalchemy.exc.DBAPIError as e:
            # Workers that start together on a new database race to create Optuna's tables; the
            # loser finds them made on its next try. Not reaching the server is final.
            if isinstance(e, sqlalchemy.exc.OperationalError) or attempt == 4:
                reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
                raise ConfigError(f"cannot reach the study's database at {where} ({reason}): check the storage "
                                  f"URL and that the server is up") from None
            time.sleep(1 + random.random())


def open_study(optuna: Any, sweep: Sweep, storage: Any) -> Any:
    """The sweep's study: created by the first worker, which queues the fixed trials and then records
    the sweep file; joined by the others, which must bring the same file."""
    direction = "minimize" if metric_goal(sweep.metric) is min else "maximize"
    pruner = {"none": optuna.pruners.NopPruner(),
              "median": optuna.pruners.MedianPruner(n_startup_trials=max(1, sweep.count // 4)),
              # Rungs at the first evaluation and every 3x after it; the best third goes on.
              "asha": optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.first_eval, reduction_factor=3)}
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, direction=direction,
                                    pruner=pruner[sweep.pruner])
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweep.name, storage=storage, pruner=pruner[sweep.pruner])
        check_record(sweep, study)
        return study
    for i, trial in enumerate(sweep.trials, 1):
        study.enqueue_trial({}, user_attrs={"folder": trial.name, "overrides": trial.overrides, "index": i})
    study.set_user_attr("sweep", sweep.record)
    return study


def check_record(sweep: Sweep, study: Any) -> None:
    """A worker joins only a study of the same sweep file and base config."""
    deadline = time.monotonic() + 60
    while "sweep" not in study.user_attrs:  # its creator is still queueing the trials
        if time.monotonic() > deadline:
            raise ConfigError(f"study '{sweep.name}' exists but its creator never finished setting it up: delete "
                              f"it (optuna delete-study --study-name {sweep.name} --storage ...) and run again")
        time.sleep(0.5)
    recorded = study.user_attrs["sweep"]
    keys = sorted(recorded.keys() | sweep.record.keys())
    changed = [key for key in keys if recorded.get(key) != sweep.record.get(key)]
    if changed:
        raise ConfigError(f"the sweep file differs from the one study '{sweep.name}' was started with (changed: "
                          f"{', '.join('base config' if k == 'base' else k for k in changed)}): put it back, or give "
                          f"the new sweep another sweep.name or out_dir")


def suggest(handle: Any, ranges: dict[str, Any]) -> dict[str, Any]:
    """A TPE proposal over the [sweep.random] space, rounded as random draws are."""
    overrides = {}
    for key, spec in ranges.items():
        if isinstance(spec, list):
            overrides[key] = handle.suggest_categorical(key, spec)
        elif isinstance(spec["min"], int) and isinstance(spec["max"], int):
            overrides[key] = handle.suggest_int(key, spec["min"], spec["max"], log=spec.get("log", False))
        else:
            x = handle.suggest_float(key, spec["min"], spec["max"], log=spec.get("log", False))
            overrides[key] = float(f"{x:.4g}")
    return overrides


def machine() -> str:
    """This machine, as the study names a worker's: its host name and (Linux) boot, so that two
    containers named alike or a reboot do not pass for the same machine."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + (f":{boot.read_text()[:8]}" if boot.is_file() else "")


HOST = machine()
HEARTBEAT_S = 20.0  # how often a worker marks its running trials alive in the study
STALE_S = 120.0  # a running trial of another machine whose heartbeat is this old has lost its worker
LOOK_S = 1.0  # how often a worker asks the study for work and looks for lost trials


def process_start(pid: int) -> str | None:
    """When `pid` started (Linux), so that a reused pid is not taken for a live worker."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def alive(process: dict[str, Any] | None) -> bool:
    """Whether {pid, started} on this machine still runs."""
    if process is None:
        return False
    try:
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return process_start(process["pid"]) == process["started"]


class StudyTrials:
    """The trials of an Optuna study that several sweep processes (workers) share: each asks it for
    a trial no other runs, stores the trial's result in it, and takes over the trials of workers
    that died. `count` counts the trials running or finished (a failed trial is a result, as
    without Optuna), not those lost with a worker and queued again."""

    def __init__(self, optuna: Any, sweep: Sweep, study: Any) -> None:
        self.optuna, self.sweep, self.study = optuna, sweep, study
        self.state = optuna.trial.TrialState
        self.me = {"host": HOST, "pid": os.getpid(), "started": process_start(os.getpid())}
        self.base_toml = load_toml(sweep.base)
        self.asked: dict[str, Any] = {}  # trial folder -> the optuna trial this worker runs there
        self.last_look = self.last_done_look = self.last_beat = 0.0
        for t in sorted(self.latest().values(), key=lambda t: t.user_attrs["index"]):
            if t.state.is_finished() and self.status(t) in FINAL:
                print(f"[{t.user_attrs['index']}/{sweep.count}] {t.user_attrs['folder']}: {self.status(t)} before, "
                      f"skipped")

    def counted(self, trials: list[Any]) -> list[Any]:
        S = self.state
        return [t for t in trials if t.state in (S.RUNNING, S.COMPLETE, S.PRUNED)
                or (t.state == S.FAIL and t.user_attrs.get("status") in ("failed", "done"))]

    def latest(self) -> dict[str, Any]:
        """Each trial folder's latest attempt (a lost trial's retry comes after it)."""
        return {t.user_attrs["folder"]: t for t in self.study.get_trials(deepcopy=False) if "folder" in t.user_attrs}

    def status(self, t: Any) -> str:
        S = self.state
        named = {S.RUNNING: "running", S.WAITING: "pending", S.COMPLETE: "done", S.PRUNED: "pruned"}
        return named.get(t.state) or t.user_attrs.get("status", "lost")

    def next(self) -> tuple[str, Trial] | None:
        """A trial for this worker: a queued one (grid, random, list, or a lost trial's retry) or a
        new TPE proposal while fewer than `count` trials count."""
        if time.monotonic() < self.last_look + LOOK_S:
            return None
        self.last_look = time.monotonic()
        self.fail_lost()
        trials = self.study.get_trials(deepcopy=False)
        if not any(t.state == self.state.WAITING for t in trials) and (
                self.sweep.search != "tpe" or len(self.counted(trials)) >= self.sweep.count):
            return None
        if self.sweep.search == "tpe":
            # Seeded by (seed, trials so far): repeatable for one worker, and two workers asking at
            # different moments do not draw the same startup trial. seed + 1 shares no stream with seed.
            self.study.sampler = self.optuna.samplers.TPESampler(
                seed=(self.sweep.seed << 20) + len(trials), n_startup_trials=max(2, min(10, self.sweep.count // 3)))
        handle = self.study.ask()
        return self.claim(handle)

    def claim(self, handle: Any) -> tuple[str, Trial] | None:
        attrs = dict(handle.user_attrs)
        overrides = suggest(handle, self.sweep.ranges) if self.sweep.search == "tpe" else attrs.get("overrides")
        if self.sweep.search == "tpe" and "folder" not in attrs:
            counted = self.counted(self.study.get_trials(deepcopy=False))
            attrs["index"] = sum(t.number <= handle.number for t in counted)
            attrs["folder"] = f"{handle.number:03d}_{trial_names([(None, overrides)])[0]}"
        # Two workers that asked at once may both have passed the count check (or found the queue
        # empty): the later trial is surplus, failed unrun and not counted.
        if "folder" not in attrs or attrs["index"] > self.sweep.count:
            self.give_up(handle, "surplus")
            return None
        try:
            trial = make_trial(self.sweep, self.base_toml, attrs["folder"], overrides)
        except ConfigError as e:  # a TPE proposal train.py would refuse: it does not count
            print(f"error: {e}; proposal skipped", file=sys.stderr, flush=True)
            self.give_up(handle, "invalid")
            return None
        for key, value in (("folder", trial.name), ("overrides", overrides), ("index", attrs["index"]),
                           ("owner", self.me), ("heartbeat", time.time())):
            handle.set_user_attr(key, value)
        self.asked[trial.name] = handle
        return f"[{attrs['index']}/{self.sweep.count}] {trial.name}:", trial

    def give_up(self, handle: Any, status: str) -> None:
        handle.set_user_attr("status", status)
        self.study.tell(handle, state=self.state.FAIL)

    def started(self, trial: Trial, pid: int) -> None:
        """The trial's process, which must be gone too before another worker may take the trial over."""
        self.asked[trial.name].set_user_attr("process", {"pid": pid, "started": process_start(pid)})

    def report(self, trial: Trial, step: int, value: float) -> bool:
        handle = self.asked[trial.name]
        handle.report(value, step)
        return handle.should_prune()

    def beat(self) -> None:
        if time.monotonic() > self.last_beat + HEARTBEAT_S:
            self.last_beat = time.monotonic()
            for handle in self.asked.values():
                handle.set_user_attr("heartbeat", time.time())

    def finish(self, trial: Trial, status: str, result: Result) -> None:
        """Store the trial's result in the study and tell it how the trial ended; an interrupted
        trial goes back in the queue, to resume from its folder."""
        handle = self.asked.pop(trial.name)
        handle.set_user_attr("result", {"row": result.row, "curve": result.curve, "log_tail": result.log_tail})
        value = result.row[self.sweep.metric]
        if status == "interrupted":
            handle.set_user_attr("status", status)
            self.requeue(handle.number, handle.user_attrs, handle.params)
        elif status == "pruned":
            self.study.tell(handle, state=self.state.PRUNED)  # with its last reported value
        elif status == "done" and value is not None and math.isfinite(value):
            self.study.tell(handle, value)
        else:
            self.give_up(handle, status)

    def requeue(self, number: int, attrs: dict[str, Any], params: dict[str, Any]) -> None:
        """Fail a trial that did not finish and queue it again, same folder and overrides. Of workers
        that try at once, the first fail wins and only it queues the retry."""
        try:
            self.study.tell(number, state=self.state.FAIL)
        except (ValueError, self.optuna.exceptions.UpdateFinishedTrialError):
            return
        if "folder" in attrs:  # a TPE trial lost before it had a folder: TPE proposes another
            self.study.enqueue_trial(params, user_attrs={k: attrs[k] for k in ("folder", "overrides", "index")},
                                     skip_if_exists=False)

    def fail_lost(self) -> None:
        """Running trials whose worker is gone: on this machine, the worker and the trial's process
        are dead; elsewhere, no heartbeat for STALE_S."""
        for t in self.study.get_trials(deepcopy=False, states=(self.state.RUNNING,)):
            owner = t.user_attrs.get("owner")
            if owner == self.me:
                continue
            if owner is not None and owner["host"] == HOST:
                lost = not alive(owner) and not alive(t.user_attrs.get("process"))
            else:
                lost = time.time() - t.user_attrs.get("heartbeat", t.datetime_start.timestamp()) > STALE_S
            if lost:
                print(f"trial {t.user_attrs.get('folder', t.number)} lost its worker: queued again", flush=True)
                self.requeue(t.number, t.user_attrs, t.params)

    def done(self) -> bool:
        """Nothing left for any worker: no trial queued or running (a running one may yet be lost)."""
        if time.monotonic() < self.last_done_look + LOOK_S:
            return False
        self.last_done_look = time.monotonic()
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (self.state.RUNNING, self.state.WAITING) for t in trials):
            return False
        return self.sweep.search != "tpe" or len(self.counted(trials)) >= self.sweep.count

    def results(self) -> list[Result]:
        results = []
        for name, t in self.latest().items():
            stored = t.user_attrs.get("result")
            if stored is not None:
                result = Result(dict(stored["row"]), stored["curve"], stored["log_tail"])
            else:  # running or queued: what its folder holds, if it is on this machine
                trial = make_trial(self.sweep, self.base_toml, name, t.user_attrs["overrides"])
                result = trial_result(self.sweep, trial)
            result.row["status"] = self.status(t)
            results.append(result)
        return results

    def failed(self) -> bool:
        return any(self.status(t) == "failed" for t in self.latest().values())


Trials = LocalTrials | StudyTrials  # what run() takes its trials from and reports them to


# ---------------------------------------------------------------------------------------------
# GPUs: a trial per GPU (or per gpus_per_trial GPUs), through CUDA_VISIBLE_DEVICES


def visible_gpus() -> list[str]:
    """The CUDA GPUs this process sees, as a trial's CUDA_VISIBLE_DEVICES names them."""
    import torch
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in listed.split(",")][:count] if listed else [str(i) for i in range(count)]


def gpu_groups(visible: list[str], chosen: list[int] | None, per_trial: int) -> list[list[str]]:
    """The GPUs of each trial that runs at once: every visible GPU, or those `chosen` (indices into
    the visible ones, as --gpus gives them), `per_trial` to a trial. No GPU: none."""
    picked = visible
    if chosen is not None:
        missing = [i for i in chosen if not 0 <= i < len(visible)]
        if missing:
            shown = f"{len(visible)} (0-{len(visible) - 1})" if visible else "none"
            raise ConfigError(f"--gpus names GPU {missing[0]}, which is not there: the CUDA GPUs this machine shows "
                              f"are {shown}; leave --gpus out to use them all")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"--gpus names a GPU twice ({','.join(map(str, chosen))}): name each once")
        picked = [visible[i] for i in chosen]
    if per_trial > 1 and len(picked) < per_trial:
        raise ConfigError(f"sweep.gpus_per_trial = {per_trial} needs that many CUDA GPUs; "
                          f"{'--gpus picks' if chosen is not None else 'this machine shows'} {len(picked)}")
    return [picked[i:i + per_trial] for i in range(0, len(picked) - per_trial + 1, per_trial)]


def trial_slots(groups: list[list[str]], parallel: int | None) -> list[list[str] | None]:
    """Where the trials that run at once run: a GPU group each, or the CPU, --parallel of them."""
    if not groups:
        return [None] * (parallel or 1)
    if parallel is not None and parallel > len(groups):
        raise ConfigError(f"--parallel {parallel} exceeds the {len(groups)} GPU group(s) here (a trial each): "
                          f"leave it out to use them all")
    return list(groups[:parallel])


def parse_gpus(text: str) -> list[int]:
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise ConfigError(f"--gpus {text!r} must list GPU indices, e.g. --gpus 0,2,5")
    return [int(i) for i in text.split(",")]


# ---------------------------------------------------------------------------------------------
# Results: results.csv, results.md, curves.png


def summary(sweep: Sweep, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics a trial is ranked by, from its records so far."""
    steps = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    val = [m["val_loss"] for m in evals]
    logged = {} if sweep.metric in METRICS else {sweep.metric: eval_metric(sweep.metric, evals)}
    return {"best_val_loss": min(val, default=None), "final_val_loss": val[-1] if val else None, **logged,
            "steps": steps[-1]["step"] if steps else 0,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None}


def trial_result(sweep: Sweep, trial: Trial) -> Result:
    state = read_state(trial)
    metrics = read_metrics(trial.dir / "metrics.jsonl")
    info = trial.dir / "run_info.json"
    row = {"trial": trial.name, **{key: resolved(trial, key) for key in sweep.keys},
           "params": json.loads(info.read_text())["params"] if info.is_file() else None,
           **summary(sweep, metrics), "wall_s": state.get("wall_s"), "status": state.get("status", "pending")}
    curve = [[m["step"], m["val_loss"]] for m in metrics if m["kind"] == "eval"]
    return Result(row, curve, state.get("log_tail", []))


def ranked(sweep: Sweep, results: list[Result]) -> list[Result]:
    """Trials best first by the metric; those without a value (pending, failed early) last."""
    sign = 1 if metric_goal(sweep.metric) is min else -1
    metric = sweep.metric
    return sorted(results, key=lambda r: (r.row[metric] is None, sign * (r.row[metric] or 0), r.row["trial"]))


def write_results(sweep: Sweep, results: list[Result]) -> None:
    results = ranked(sweep, results)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    if results:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, list(results[0].row))
        writer.writeheader()
        writer.writerows(r.row for r in results)
        replace_file(sweep.out_dir / "results.csv", table.getvalue(), RUN_AGAIN)
    replace_file(sweep.out_dir / "results.md", results_markdown(sweep, results), RUN_AGAIN)
    plot_val_curves(sweep, results, sweep.out_dir / "curves.png")


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


def results_markdown(sweep: Sweep, results: list[Result]) -> str:
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
    for result in results:
        lines.append("| " + " | ".join(_cell(k, result.row[k]) for k in header) + " |")
    for result in results:
        if result.row["status"] == "failed":
            name = result.row["trial"]
            lines += ["", f"`{name}` failed; the end of {name}/{LOG}:", "", "```", *result.log_tail, "```"]
    return "\n".join(lines) + "\n"


LEGEND_TRIALS = 10  # the best ones are named in the plot; more names would cover the curves


def plot_val_curves(sweep: Sweep, results: list[Result], png: Path) -> None:
    """Every trial's val loss against step, best first; a pruned trial's line is dashed and ends in x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, result in enumerate(r for r in results if r.curve):
        steps, losses = zip(*result.curve)
        pruned = result.row["status"] == "pruned"
        line, = ax.plot(steps, losses, "--" if pruned else "o-", ms=3, lw=1.2,
                        label=result.row["trial"] if i < LEGEND_TRIALS else None)
        if pruned:
            ax.plot(steps[-1], losses[-1], "x", ms=7, color=line.get_color())
    ax.set_title(f"sweep {sweep.name}: validation loss" + (" (dashed, x: pruned)" if sweep.pruner != "none" else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    replace_png(png, fig, 90, RUN_AGAIN)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # through script()'s one error path
        raise ConfigError(message)


def needs_study(sweep: Sweep, storage: str | None) -> str | None:
    """What in this sweep needs an Optuna study, in the words of the one-line error without it."""
    if sweep.search == "tpe":
        return 'search = "tpe"'
    if sweep.pruner != "none":
        return f'pruner = "{sweep.pruner}"'
    return "a storage (--storage or sweep.storage)" if storage else None


@script
def main(argv: list[str]) -> int:
    parser = _Parser(prog="sweep.py", description="Run a sweep of train.py trials (format: see sweep.py).")
    parser.add_argument("sweep", help="sweep TOML file, e.g. configs/sweeps/attention.toml")
    parser.add_argument("--parallel", type=int, metavar="N",
                        help="trials to run at once (default 1; with CUDA GPUs, one per GPU group)")
    parser.add_argument("--gpus", type=parse_gpus, metavar="I,J,...",
                        help="the CUDA GPUs to run trials on, e.g. 0,2,5 (default: every visible one)")
    parser.add_argument("--storage", metavar="URL", help="the study's database, e.g. postgresql://me@host/db, "
                        "or journal file (default: sweep.storage, else <out_dir>/study.journal)")
    parser.add_argument("--report", action="store_true", help="rewrite results.md/csv and curves.png, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their commands, run nothing")
    args = parser.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel} must be at least 1")
    sweep = load_sweep(args.sweep)
    sweep.storage = args.storage or sweep.storage
    for trial in sweep.trials:
        check_owner(sweep, trial)
    check_data(sweep)
    slots = trial_slots(gpu_groups(visible_gpus(), args.gpus, sweep.gpus_per_trial), args.parallel)
    if args.dry_run:
        dry_run(sweep)
        return 0
    optuna = optuna_or_none(needs_study(sweep, sweep.storage))
    if optuna is None:
        trials: Trials = LocalTrials(sweep)
    else:
        study = open_study(optuna, sweep, open_storage(optuna, sweep.storage, sweep.out_dir))
        trials = StudyTrials(optuna, sweep, study)
    if args.report:
        write_results(sweep, trials.results())
        print(f"results: {sweep.out_dir / 'results.md'}")
        return 0
    env = dict(os.environ)
    if len(slots) > 1 and slots[0] is None and "OMP_NUM_THREADS" not in env:  # N CPU trials share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
    return run(sweep, trials, slots, env)


def dry_run(sweep: Sweep) -> None:
    if sweep.search == "tpe":
        print(f"sweep {sweep.name}: {sweep.count} trials proposed by TPE over {', '.join(sweep.keys)} in "
              f"{sweep.out_dir}, pruner {sweep.pruner}; one draw of the space:")
    else:
        print(f"sweep {sweep.name}: {len(sweep.trials)} trials in {sweep.out_dir}")
    for trial in sweep.checked:
        status = read_state(trial).get("status", "pending")
        cmd = ["python", "train.py", str(sweep.base), *train_args(sweep, trial), "--train.out_dir", str(trial.dir)]
        print(f"{trial.name}  [{status}]\n    {shlex.join(cmd)}")


if __name__ == "__main__":
    sys.exit(main())
