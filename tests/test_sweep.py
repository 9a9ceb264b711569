"""sweep.py on tiny trials: table and plot, interrupt and resume, parallel, random draws, bad input;
Optuna studies: TPE and ASHA, workers sharing a journal file or PostgreSQL, a worker killed with -9."""

import csv
import json
import os
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

    # The study queues a stopped trial again behind the trials not yet started: the second run
    # started the third trial, and this one takes the fourth, then resumes the second and third.
    assert sweep.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"[1/4] {GRID_NAMES[0]}: done before, skipped" in out
    assert f"trial {GRID_NAMES[2]} lost its worker: queued again" in out
    assert [line.split(" (log")[0] for line in out.splitlines() if " (log " in line] == [
        f"[4/4] {GRID_NAMES[3]}: started", f"[2/4] {GRID_NAMES[1]}: resumed", f"[3/4] {GRID_NAMES[2]}: resumed"]
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
    "invalid-trial-config", "unknown-search", "unknown-pruner", "tpe-without-ranges", "search-of-a-list",
    "gpus-per-trial"], argvalues=[
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
    (GRID, None, {"search": "bayes"}, "error: sweep.search='bayes' is not one of grid, random, tpe"),
    (GRID, None, {"pruner": "hyperband"}, "error: sweep.pruner='hyperband' is not one of none, median, asha"),
    (GRID, None, {"search": "tpe", "count": 4},
     'error: search = "tpe" draws from [sweep.random] ranges, and {path} gives [sweep.grid]: give [sweep.random] or '
     'set search = "grid"'),
    ('[[sweep.trials]]\nname = "a"\n', None, {"search": "grid"},
     "error: sweep.search chooses how [sweep.grid] or [sweep.random] is searched; [[sweep.trials]] runs its list as "
     "written: remove sweep.search"),
    (GRID, None, {"gpus_per_trial": 0}, "error: sweep.gpus_per_trial=0 must be a positive integer"),
])
def test_bad_sweep_files(tmp_path, data_dir, capsys, body, shared, keys, message):
    path = write_sweep(tmp_path, data_dir, body, shared, **keys)
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [message.format(path=path)]
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


# --- studies: TPE, pruning, several workers, storage ------------------------------------------

TPE = ('[sweep.random]\n"train.lr" = { min = 1e-4, max = 3e-2, log = true }\n'
       '"train.warmup_steps" = { min = 0, max = 4 }\n')


def study_trials(path: Path, storage: str | None = None) -> list:
    """The study's trials, as a worker sees them."""
    import optuna
    sw = sweep.load_sweep(path)
    return optuna.load_study(study_name=sw.name, storage=sweep.open_storage(optuna, storage, sw.out_dir)).trials


def counted(trials: list) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "RUNNING")
            or t.state.name == "FAIL" and t.user_attrs.get("status") in ("failed", "done")]


def test_report_rewrites_the_table_from_the_study_alone(serial, data_dir, tmp_path):
    """Another machine, without the trial folders: the same table from the study's journal."""
    path = write_sweep(tmp_path, data_dir)
    assert sweep.main([str(path), "--storage", str(serial / "study.journal"), "--report"]) == 0
    assert results(tmp_path / "out") == results(serial)
    assert not (tmp_path / "out" / GRID_NAMES[0]).exists()


def test_a_changed_sweep_file_is_refused_by_its_study(tmp_path, data_dir, capsys):
    assert sweep.main([str(write_sweep(tmp_path, data_dir)), "--report"]) == 0  # creates the study, runs nothing
    assert sweep.main([str(write_sweep(tmp_path, data_dir, shared={"train.max_steps": 14}))]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the sweep file differs from the one study 'grid' was started with (changed: shared): put it back, "
        "or give the new sweep another sweep.name or out_dir"]


@pytest.mark.parametrize("url,message", [
    ("postgresql://nobody@127.0.0.1:1/sweeps", "error: cannot reach the study's database at 127.0.0.1 ("),
    ("postgresql+pg8000://nobody@db.example/sweeps", "error: storage postgresql+pg8000://nobody@db.example/sweeps: "
                                                     "its database driver is missing (No module named 'pg8000')"),
])
def test_storage_that_cannot_be_used_is_one_line(tmp_path, data_dir, capsys, url, message):
    assert sweep.main([str(write_sweep(tmp_path, data_dir)), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_without_optuna_a_grid_runs_alone_and_a_study_is_refused(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    path = write_sweep(tmp_path, data_dir, TPE, search="tpe", count=2)
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        'error: search = "tpe" needs Optuna, an optional extra: pip install -r requirements-sweep.txt']
    path = write_sweep(tmp_path, data_dir, '[[sweep.trials]]\nname = "only"\n',
                       shared={"train.max_steps": 2, "train.eval_interval": 2})
    assert sweep.main([str(path)]) == 0
    assert [row["status"] for row in results(tmp_path / "out")] == ["done"]
    assert not (tmp_path / "out" / "study.journal").exists()


def test_gpus_each_trial_gets():
    eight = [str(i) for i in range(8)]
    assert sweep.gpu_groups(eight, None, 1) == [[g] for g in eight]
    assert sweep.gpu_groups(eight, [0, 2, 5], 1) == [["0"], ["2"], ["5"]]
    assert sweep.gpu_groups(eight, None, 3) == [["0", "1", "2"], ["3", "4", "5"]]  # GPUs 6 and 7 are too few
    assert sweep.gpu_groups(["4", "6"], [1], 1) == [["6"]]  # indices into CUDA_VISIBLE_DEVICES
    assert sweep.gpu_groups([], None, 1) == [] and sweep.trial_slots([], None) == [None]
    assert sweep.trial_slots([], 3) == [None, None, None] and sweep.trial_slots([["0"], ["1"]], 1) == [["0"]]
    with pytest.raises(sweep.ConfigError, match=r"^--gpus names GPU 8, which is not there: the CUDA GPUs this "
                                                r"machine shows are 8 \(0-7\); leave --gpus out to use them all$"):
        sweep.gpu_groups(eight, [0, 8], 1)
    with pytest.raises(sweep.ConfigError, match=r"^sweep.gpus_per_trial = 4 needs that many CUDA GPUs; --gpus "
                                                r"picks 2$"):
        sweep.gpu_groups(eight, [0, 1], 4)
    with pytest.raises(sweep.ConfigError, match=r"^--parallel 3 exceeds the 2 GPU group\(s\) here"):
        sweep.trial_slots([["0"], ["1"]], 3)


def test_gpus_that_are_not_there(tmp_path, data_dir, capsys):
    assert sweep.main([str(write_sweep(tmp_path, data_dir)), "--gpus", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --gpus names GPU 0, which is not there: the CUDA GPUs this machine shows are none; leave --gpus out "
        "to use them all"]


@pytest.mark.slow  # ~15 s of real trials
def test_tpe_with_asha_prunes_losing_trials(tmp_path, data_dir):
    path = write_sweep(tmp_path, data_dir, TPE, search="tpe", count=6, pruner="asha",
                       shared={"train.max_steps": 18, "train.eval_interval": 2})
    assert sweep.main([str(path)]) == 0
    trials = study_trials(path)
    assert len(counted(trials)) == len(trials) == 6
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and all(t.value == t.intermediate_values[max(t.intermediate_values)] for t in pruned)
    rows = {row["trial"]: row for row in results(tmp_path / "out")}
    for t in pruned:  # recorded as pruned with its last value; the folder stays
        name = t.user_attrs["folder"]
        assert rows[name]["status"] == "pruned" and float(rows[name]["best_val_loss"]) == t.value
        assert int(rows[name]["steps"]) < 18 and (tmp_path / "out" / name / "metrics.jsonl").is_file()
        assert json.loads((tmp_path / "out" / name / "sweep.json").read_text())["status"] == "pruned"


def start_worker(path: Path, log: Path, *extra: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "sweep.py", str(path), *extra], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def two_workers_one_killed(path: Path, tmp_path: Path, *extra: str) -> None:
    """Two workers on one study; the first is killed with -9 in the middle of a trial. The second
    takes the trial over, resumes it from its checkpoint, and completes the study."""
    first = start_worker(path, tmp_path / "first.log", *extra)
    second = start_worker(path, tmp_path / "second.log", *extra)
    try:
        kill_one_and_finish(first, second, tmp_path)
    finally:
        for worker in (first, second):
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def kill_one_and_finish(first: subprocess.Popen, second: subprocess.Popen, tmp_path: Path) -> None:

    def first_trial() -> Path | None:
        started = [line for line in (tmp_path / "first.log").read_text().splitlines() if "started (log " in line]
        return Path(started[0].split("(log ")[1].rstrip(")")).parent if started else None

    wait_for(lambda: first_trial() is not None and train_steps(first_trial()) >= 2)
    first.kill()
    first.wait()
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    lost = first_trial()
    assert f"trial {lost.name} lost its worker: queued again" in (tmp_path / "second.log").read_text()
    assert "resumed from" in (lost / "train.log").read_text()
    assert json.loads((lost / "sweep.json").read_text())["status"] == "done"


@pytest.mark.slow  # two workers, real trials: ~40 s
def test_two_workers_share_a_journal_and_survive_a_kill(tmp_path, data_dir):
    path = write_sweep(tmp_path, data_dir, TPE, search="tpe", count=5, shared={"train.max_steps": 40})
    two_workers_one_killed(path, tmp_path)
    trials = study_trials(path)
    assert len(counted(trials)) == 5 and all(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    assert [row["status"] for row in results(tmp_path / "out")] == ["done"] * 5


def postgres_binaries() -> Path | None:
    for folder in [*sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True), Path("/usr/local/bin")]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a Unix socket in a temp folder; its URL."""
    import shutil
    import tempfile
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="nanollama-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the server runs as the postgres user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres user to run the server as")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    ctl = [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log")]
    subprocess.run([*ctl, "-o", f"-k {folder} -c listen_addresses=''", "-w", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={folder}"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # a PostgreSQL server and two workers: ~45 s
def test_two_workers_share_a_postgresql_study_and_survive_a_kill(tmp_path, data_dir, postgres_url):
    path = write_sweep(tmp_path, data_dir, TPE, search="tpe", count=5, shared={"train.max_steps": 40})
    two_workers_one_killed(path, tmp_path, "--storage", postgres_url)
    trials = study_trials(path, postgres_url)
    assert len(counted(trials)) == 5 and all(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    assert sweep.main([str(path), "--storage", postgres_url, "--report"]) == 0
    assert [row["status"] for row in results(tmp_path / "out")] == ["done"] * 5
