"""sweep.py on tiny trials: table and plot, interrupt and resume, parallel, random draws, bad input."""

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sweep
from config import build_config, load_toml, parse_overrides
from test_train import TINY, args, data_dir, run_cli, wait_for  # noqa: F401 (data_dir is a fixture)
from train import EXIT_INTERRUPTED, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SHARED = {**dict(parse_overrides(TINY)), "train.max_steps": 12, "train.eval_interval": 6,
          "train.peak_tflops": 1}  # a fixed peak: no matmul timing at every start
GRID = '[sweep.grid]\n"train.lr" = [3e-3, 1e-3]\n"train.warmup_steps" = [0, 2]\n'
GRID_NAMES = ["lr=0.003,warmup_steps=0", "lr=0.003,warmup_steps=2", "lr=0.001,warmup_steps=0",
              "lr=0.001,warmup_steps=2"]
VARYING = ("wall_s", "tokens_per_s")  # the only columns that may differ between equal sweeps


def write_sweep(folder: Path, data_dir: Path, body: str = GRID, shared: dict | None = None, **keys) -> Path:
    """folder/grid.toml on a tiny base config, with its trials under folder/out/."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(f'[data]\ndata_dir = "{data_dir}"\ndataset = "tiny"\n')
    head = {"base": "base.toml", "out_dir": str(folder / "out"), **keys}
    lines = ["[sweep]", *(f"{k} = {json.dumps(v)}" for k, v in head.items()), "[sweep.shared]",
             *(f'"{k}" = {json.dumps(v)}' for k, v in {**SHARED, **(shared or {})}.items()), body]
    path = folder / "grid.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # trials get the same threads in serial and parallel


def start_sweep(path: Path) -> subprocess.Popen:
    """The sweep as its own process, to be signalled or killed."""
    return subprocess.Popen([sys.executable, "sweep.py", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in VARYING} for row in csv.DictReader(f)]


def train_steps(trial_dir: Path) -> int:
    return sum(m["kind"] == "train" for m in read_metrics(trial_dir / "metrics.jsonl"))


@pytest.fixture(scope="module")
def serial(tmp_path_factory, data_dir) -> Path:
    """The 2 x 2 grid run once, uninterrupted, one trial at a time: the reference."""
    folder = tmp_path_factory.mktemp("serial")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert sweep.main([str(write_sweep(folder, data_dir))]) == 0
    return folder / "out"


def test_grid_writes_table_plot_and_trial_records(serial):
    rows = results(serial)
    assert sorted(row["trial"] for row in rows) == sorted(GRID_NAMES)
    assert all(row["status"] == "done" and row["steps"] == "12" for row in rows)
    best = [float(row["best_val_loss"]) for row in rows]
    assert best == sorted(best)  # ranked by the metric
    table = (serial / "results.md").read_text().splitlines()
    assert table[2].startswith("| trial | lr | warmup_steps | params | best val loss |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[4:8]] == [row["trial"] for row in rows]
    assert (serial / "curves.png").stat().st_size > 10_000
    for name in GRID_NAMES:
        state = json.loads((serial / name / "sweep.json").read_text())
        assert state["sweep"] == "grid" and state["status"] == "done" and state["trial"] == name
        assert "step 12: train" in (serial / name / "train.log").read_text()
    assert json.loads((serial / GRID_NAMES[1] / "sweep.json").read_text())["overrides"] == {
        "train.lr": 3e-3, "train.warmup_steps": 2}


def test_parallel_gives_the_serial_results(serial, data_dir, tmp_path):
    assert sweep.main([str(write_sweep(tmp_path, data_dir)), "--parallel", "2"]) == 0
    assert results(tmp_path / "out") == results(serial)


@pytest.mark.slow  # the default suite's longest test (~25 s): CI runs it with the slow ones
def test_interrupted_and_killed_sweep_resumes_to_the_same_results(serial, data_dir, tmp_path, capsys):
    path = write_sweep(tmp_path, data_dir)
    first, second, third, _ = (tmp_path / "out" / name for name in GRID_NAMES)

    # Ctrl-C: the sweep forwards it, the running trial saves at its next step and the sweep exits 3.
    proc = start_sweep(path)
    wait_for(lambda: train_steps(second) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED, proc.stderr.read()
    assert json.loads((second / "sweep.json").read_text())["status"] == "interrupted"
    assert "stopped by signal" in (second / "train.log").read_text()
    assert not third.exists()  # no new trial starts once stopping
    first_metrics = (first / "metrics.jsonl").stat().st_mtime_ns

    # SIGKILL of the sweep alone: its running trial gets SIGTERM from the kernel and saves.
    proc = start_sweep(path)
    wait_for(lambda: train_steps(third) >= 2 or proc.poll() is not None)
    proc.kill()
    proc.wait()
    wait_for(lambda: "stopped by signal" in (third / "train.log").read_text())

    assert sweep.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"[1/4] {GRID_NAMES[0]}: done before, skipped" in out
    assert f"[2/4] {GRID_NAMES[1]}: done before, skipped" in out
    assert f"[3/4] {GRID_NAMES[2]}: resumed" in out
    assert (first / "metrics.jsonl").stat().st_mtime_ns == first_metrics  # finished trials are not re-run
    assert results(tmp_path / "out") == results(serial)  # exact resume: the same losses to the last bit


def test_failed_trial_is_recorded_and_the_sweep_goes_on(data_dir, tmp_path, capsys):
    body = '[[sweep.trials]]\nname = "bad"\n"train.batch_tokens" = 100\n[[sweep.trials]]\nname = "good"\n'
    path = write_sweep(tmp_path, data_dir, body, shared={"train.max_steps": 2, "train.eval_interval": 2})
    assert sweep.main([str(path)]) == sweep.EXIT_FAILED
    assert [(row["trial"], row["status"]) for row in results(tmp_path / "out")] == [("good", "done"),
                                                                                    ("bad", "failed")]
    message = "error: train.batch_tokens=100 is not a multiple of micro_batch_size * block_size"
    assert message in capsys.readouterr().out
    assert message in (tmp_path / "out" / "results.md").read_text()
    assert sweep.main([str(path)]) == sweep.EXIT_FAILED  # re-run: nothing to do, the failure stays
    assert "[1/2] bad: failed before, skipped" in capsys.readouterr().out


def test_random_search_is_a_function_of_the_seed(tmp_path, data_dir):
    body = ('[sweep.random]\n"train.lr" = { min = 1e-4, max = 1e-2, log = true }\n'
            '"train.warmup_steps" = { min = 0, max = 10 }\n"model.n_kv_heads" = [1, 2, 4]\n')
    draws = {}
    for seed in (7, 7, 8):
        trials = sweep.load_sweep(write_sweep(tmp_path, data_dir, body, count=6, seed=seed)).trials
        draws.setdefault(seed, []).append([(t.name, t.overrides) for t in trials])
    assert draws[7][0] == draws[7][1] and draws[7][0] != draws[8][0]
    for _, overrides in draws[7][0]:
        assert 1e-4 <= overrides["train.lr"] <= 1e-2 and overrides["model.n_kv_heads"] in (1, 2, 4)
        assert isinstance(overrides["train.warmup_steps"], int) and 0 <= overrides["train.warmup_steps"] <= 10
    name, overrides = draws[7][0][0]
    assert name == f"lr={overrides['train.lr']},warmup_steps={overrides['train.warmup_steps']}," \
                   f"n_kv_heads={overrides['model.n_kv_heads']}"


def test_explicit_trials_and_wandb_group(tmp_path, data_dir, capsys):
    body = ('[[sweep.trials]]\nname = "mqa"\n"model.n_kv_heads" = 1\n'
            '[[sweep.trials]]\nmodel.n_kv_heads = 4\nmodel.hidden_dim = 96\n')
    path = write_sweep(tmp_path, data_dir, body, shared={"train.wandb": "offline"}, name="attn")
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--train.wandb_group attn --train.wandb_run_name mqa" in out
    assert "--train.wandb_run_name n_kv_heads=4,hidden_dim=96 --train.out_dir" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_wandb_agent_command_line_trains(data_dir, tmp_path):
    """`wandb agent` calls the program with --key=value pairs and Python literals."""
    result = run_cli(*args(data_dir, tmp_path, "--train.max_steps=2", "--train.eval_interval=2",
                           "--train.lr=0.001", "--model.tie_embeddings=True", "--model.n_kv_heads=None"))
    assert result.returncode == 0, result.stderr
    cfg = build_config(load_toml(tmp_path / "config.toml"))
    assert cfg.train.lr == 0.001 and cfg.model.tie_embeddings is True and cfg.model.n_kv_heads == cfg.model.n_heads


# --- bad input: one line each, before any trial starts ------------------------------------------


@pytest.mark.parametrize("body,shared,keys,message", ids=[
    "unknown-grid-key", "unknown-shared-key", "empty-grid", "empty-values", "min-over-max", "unknown-sweep-key",
    "invalid-trial-config"], argvalues=[
    ('[sweep.grid]\n"train.lrr" = [1e-3]\n', None, {},
     "error: trial lrr=0.001: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (GRID, {"model.dimm": 64}, {},
     "error: trial lr=0.003,warmup_steps=0: unknown config key 'model.dimm'; did you mean 'model.dim'?"),
    ("[sweep.grid]\n", None, {}, "error: [sweep.grid] is empty: give it at least one key with a list of values"),
    ('[sweep.grid]\n"train.lr" = []\n', None, {},
     "error: sweep.grid.train.lr must be a non-empty list of values (got [])"),
    ('[sweep.random]\n"train.lr" = { min = 1e-2, max = 1e-4 }\n', None, {"count": 2},
     "error: sweep.random.train.lr: min=0.01 exceeds max=0.0001"),
    (GRID, None, {"metrc": "best_val_loss"}, "error: unknown sweep key 'sweep.metrc'; did you mean 'sweep.metric'?"),
    (GRID, {"model.n_kv_heads": 3}, {}, "error: trial lr=0.003,warmup_steps=0: model.n_heads=4 is not divisible "
                                        "by model.n_kv_heads=3: use a divisor of n_heads (1 = MQA, n_heads = MHA)"),
])
def test_bad_sweep_files(tmp_path, data_dir, capsys, body, shared, keys, message):
    assert sweep.main([str(write_sweep(tmp_path, data_dir, body, shared, **keys))]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_missing_base_config(tmp_path, data_dir, capsys):
    path = write_sweep(tmp_path, data_dir, base="nope.toml")
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: base config 'nope.toml' of {path} does not exist (looked in {tmp_path} and {ROOT})"]


def test_trial_directory_of_another_sweep(tmp_path, data_dir, capsys):
    path = write_sweep(tmp_path, data_dir, name="mine")
    trial = tmp_path / "out" / GRID_NAMES[0]
    trial.mkdir(parents=True)
    (trial / "sweep.json").write_text(json.dumps({"sweep": "theirs", "args": []}))
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: trial directory {trial} belongs to sweep 'theirs', not 'mine': give this sweep another name "
        f"or out_dir"]
    assert not (trial / "train.log").exists()
    (trial / "sweep.json").write_text(json.dumps({"sweep": "mine", "args": ["--train.lr", "1"]}))
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: trial directory {trial} was run with other overrides than sweep 'mine' now gives it: delete "
        f"the folder to run it again"]


def test_trials_rank_by_any_logged_eval_score():
    evals = [{"kind": "eval", "step": 2, "val_loss": 2.0, "text_bits_per_byte": 3.0, "mine_acc": 0.25},
             {"kind": "eval", "step": 4, "val_loss": 1.9, "text_bits_per_byte": 2.5, "mine_acc": 0.5},
             {"kind": "eval", "step": 6, "val_loss": 1.8, "text_bits_per_byte": 2.75, "mine_acc": 0.375}]
    assert sweep.eval_metric("best_text_bits_per_byte", evals) == 2.5
    assert sweep.eval_metric("final_text_bits_per_byte", evals) == 2.75
    assert sweep.eval_metric("best_mine_acc", evals) == 0.5  # accuracies: higher is better
    assert sweep.eval_metric("best_hellaswag_acc_norm", evals) is None  # not logged: ranked last
    assert sweep.metric_goal("final_mine_acc_norm") is max and sweep.metric_goal("best_text_loss") is min
