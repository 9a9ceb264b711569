"""train.py end to end on a tiny char-level dataset: exact resume, signals, DDP, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from config import ConfigError, ModelConfig, TrainConfig
from model import Llama
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model.vocab_size", "64", "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.max_seq_len", "32", "--train.block_size", "32",
        "--train.micro_batch_size", "4", "--train.batch_tokens", "128", "--train.warmup_steps", "2",
        "--train.lr", "3e-3", "--train.eval_iters", "2", "--train.compile", "false", "--train.log_interval", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A char-level dataset written by prepare_data.py from a small synthetic corpus."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.txt"
    lines = [f"{w} the quick brown fox {i} jumps over the lazy dog; " * 3 for i, w in enumerate("abcdefghij" * 40)]
    corpus.write_text("\n".join(lines))
    result = subprocess.run([sys.executable, "prepare_data.py", "--data.dataset", "tiny", "--data.data_dir",
                             str(root), "--data.input", str(corpus), "--data.tokenizer", "char"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return root


def args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data.data_dir", str(data_dir), "--data.dataset", "tiny", "--train.out_dir", str(out_dir),
            *extra]


def run_cli(*argv: str, wait: bool = True, launcher: tuple[str, ...] = (sys.executable,)):
    cmd = [*launcher, "train.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def train_losses(out_dir: Path) -> list[float]:
    return [m["loss"] for m in train.read_metrics(out_dir / "metrics.jsonl") if m["kind"] == "train"]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# Accumulation with AdamW runs with the slow tests: (2, "muon") covers accumulation by default.
@pytest.mark.parametrize("accum,optimizer", [(1, "adamw"), pytest.param(2, "adamw", marks=pytest.mark.slow),
                                             (2, "muon")])
def test_kill_and_resume_is_bit_identical(data_dir, tmp_path, accum, optimizer):
    common = ["--train.max_steps", "30", "--train.ckpt_interval", "5", "--train.eval_interval", "10",
              "--train.batch_tokens", str(128 * accum), "--model.dim", "64", "--train.optimizer", optimizer]
    straight = run_cli(*args(data_dir, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = run_cli(*args(data_dir, out, *common), wait=False)
    wait_for(lambda: (out / "ckpt-000015").is_dir() or proc.poll() is not None)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_cli(*args(data_dir, out, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert train_losses(out) == train_losses(tmp_path / "straight")  # bit-identical, not approximately
    assert len(train_losses(out)) == 30
    assert checkpoint.trained_context(checkpoint.resolve(out)) == 32  # block_size, kept through the resume


def test_a_run_killed_while_evaluating_redoes_that_evaluation(data_dir, tmp_path, monkeypatch):
    """The checkpoint of step 4 is saved, then the process dies evaluating it: the resumed run
    must record that evaluation (metrics, `best`, loss.png) as the run that never died did."""
    common = ["--train.max_steps", "8", "--train.eval_interval", "4", "--train.ckpt_interval", "4"]
    assert train.main(args(data_dir, tmp_path / "straight", *common)) == 0
    real_evaluate = train.evaluate

    def dies(run):
        raise SystemExit(-9)  # as SIGKILL would: nothing after this point is recorded

    monkeypatch.setattr(train, "evaluate", dies)
    with pytest.raises(SystemExit):
        train.main(args(data_dir, tmp_path / "killed", *common))
    assert checkpoint.read_pointer(tmp_path / "killed", "latest") == "ckpt-000004"
    assert not [m for m in train.read_metrics(tmp_path / "killed" / "metrics.jsonl") if m["kind"] == "eval"]
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert train.main(args(data_dir, tmp_path / "killed", *common, "--resume")) == 0

    def records(out: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "mfu", "step_s")}
                for m in train.read_metrics(out / "metrics.jsonl")]

    assert records(tmp_path / "killed") == records(tmp_path / "straight")
    assert [m["step"] for m in records(tmp_path / "killed") if m["kind"] == "eval"] == [4, 8]
    assert checkpoint.read_pointer(tmp_path / "killed", "best") == checkpoint.read_pointer(tmp_path / "straight", "best")


def test_sigterm_saves_a_complete_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*args(data_dir, out, "--train.max_steps", "100000", "--train.eval_interval", "100000",
                         "--train.ckpt_interval", "100000"), wait=False)
    wait_for(lambda: len(train_losses(out)) >= 3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == train.EXIT_INTERRUPTED
    ckpt = checkpoint.resolve(out)
    info = checkpoint.verify(ckpt)
    assert info["step"] >= 3
    assert checkpoint.load_training_state(ckpt)["step"] == info["step"]


def test_checkpoint_loads_in_transformers(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "4", "--train.eval_interval", "2"))
    assert result.returncode == 0, result.stderr
    ckpt = checkpoint.resolve(tmp_path)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (ckpt / "tokenizer.json").is_file()
    ours = checkpoint.load_hf(ckpt)
    theirs = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max() <= 1e-5
    evals = [m for m in train.read_metrics(tmp_path / "metrics.jsonl") if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4]
    assert checkpoint.read_pointer(tmp_path, "best") in {"ckpt-000002", "ckpt-000004"}


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_torchrun_two_processes_equal_one_with_accumulation(data_dir, tmp_path, optimizer):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    # On CPU with gloo, also where CUDA is visible: this test is about the arithmetic, not devices.
    common = ["--train.max_steps", "10", "--train.eval_interval", "10", "--train.batch_tokens", "256",
              "--train.optimizer", optimizer, "--train.device", "cpu"]
    single = run_cli(*args(data_dir, tmp_path / "one", *common))
    assert single.returncode == 0, single.stderr
    ddp = run_cli(*args(data_dir, tmp_path / "two", *common),
                  launcher=(torchrun, "--standalone", "--nproc_per_node", "2"))
    assert ddp.returncode == 0, ddp.stderr
    assert "accumulation 1" in ddp.stdout and "accumulation 2" in single.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 10
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5


def test_nonfinite_steps_are_skipped_then_stop(data_dir, tmp_path, monkeypatch, capsys):
    original = Llama.forward
    calls = {"n": 0}
    poisoned = {2, 3}  # forward calls (= steps here, accumulation 1) that return NaN

    def forward(self, tokens, targets=None, **kw):
        logits, loss = original(self, tokens, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in poisoned or calls["n"] > 6:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Llama, "forward", forward)
    code = train.main(args(data_dir, tmp_path, "--train.max_steps", "50", "--train.eval_interval", "50",
                           "--train.max_nonfinite_skips", "3"))
    assert code == train.EXIT_NONFINITE
    records = [m for m in train.read_metrics(tmp_path / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["skipped"] for m in records] == [False, True, True, False, False, False, True, True, True]
    assert "3 consecutive non-finite steps" in capsys.readouterr().err
    saved = checkpoint.load_hf(checkpoint.resolve(tmp_path))
    assert all(torch.isfinite(p).all() for p in saved.parameters())


# --- bad input: one line each ------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_data_folder(tmp_path):
    err = one_line_error(run_cli(*args(tmp_path, tmp_path / "out")))
    assert "prepare_data.py" in err


def test_out_dir_holding_another_run(data_dir, tmp_path):
    first = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", "--train.eval_interval", "2"))
    assert first.returncode == 0, first.stderr
    err = one_line_error(run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", "--train.eval_interval", "2")))
    assert err == (f"error: out_dir {tmp_path} holds another run: pass --resume to continue it or --overwrite "
                   f"to start afresh")
    again = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", "--train.eval_interval", "2", "--overwrite"))
    assert again.returncode == 0, again.stderr
    err = one_line_error(run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", "--model.dim", "64",
                                       "--resume")))
    assert "cannot resume" in err and "model.dim was 32, the config now says 64" in err


def test_model_vocab_smaller_than_data(data_dir, tmp_path):
    err = one_line_error(run_cli(*args(data_dir, tmp_path, "--model.vocab_size", "8")))
    assert "vocab" in err


def test_batch_not_divisible(data_dir, tmp_path):
    err = one_line_error(run_cli(*args(data_dir, tmp_path, "--train.batch_tokens", "100")))
    assert err == ("error: train.batch_tokens=100 is not a multiple of micro_batch_size * block_size * "
                   "world_size = 128: pick a multiple of it")


def test_corrupt_checkpoint_refused_on_resume(data_dir, tmp_path):
    first = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", "--train.eval_interval", "2"))
    assert first.returncode == 0, first.stderr
    (checkpoint.resolve(tmp_path) / "training_state.pt").write_bytes(b"x")
    err = one_line_error(run_cli(*args(data_dir, tmp_path, "--train.max_steps", "4", "--resume")))
    assert "is corrupt: training_state.pt does not match its recorded sha256" in err


def test_resume_alias_parsing():
    assert train.expand_aliases(["--resume"]) == ["--train.resume", "latest"]
    assert train.expand_aliases(["--resume", "out/ckpt-000010", "--train.lr", "1"]) == [
        "--train.resume", "out/ckpt-000010", "--train.lr", "1"]
    assert train.expand_aliases(["--overwrite", "--init_from=hf/dir"]) == [
        "--train.overwrite", "true", "--train.init_from", "hf/dir"]


def test_resume_on_data_from_another_tokenizer_is_refused(data_dir, tmp_path):
    first = run_cli(*args(data_dir, tmp_path / "run", "--train.max_steps", "2", "--train.eval_interval", "2"))
    assert first.returncode == 0, first.stderr
    other = tmp_path / "other"
    (other / "tiny").mkdir(parents=True)
    corpus = tmp_path / "other.txt"
    corpus.write_text("an entirely different alphabet: XYZ 0123456789 " * 200)
    prepared = subprocess.run([sys.executable, "prepare_data.py", "--data.dataset", "tiny", "--data.data_dir",
                               str(other), "--data.input", str(corpus)], cwd=ROOT, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    err = one_line_error(run_cli(*args(other, tmp_path / "run", "--train.max_steps", "2", "--train.eval_interval",
                                       "2", "--resume")))
    assert "was tokenized with another tokenizer than " in err and "use the dataset the checkpoint was trained on" in err


def test_wandb_offline_keeps_its_run_id_across_resume(data_dir, tmp_path):
    pytest.importorskip("wandb")
    common = ["--train.eval_interval", "2", "--train.wandb", "offline"]
    first = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "2", *common))
    assert first.returncode == 0, first.stderr
    run_id = checkpoint.load_training_state(checkpoint.resolve(tmp_path))["wandb_run_id"]
    assert run_id
    resumed = run_cli(*args(data_dir, tmp_path, "--train.max_steps", "4", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_training_state(checkpoint.resolve(tmp_path))["wandb_run_id"] == run_id


def test_init_from_a_hugging_face_folder(data_dir, tmp_path):
    import data

    torch.manual_seed(3)
    pretrained = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=64))
    checkpoint.save_hf(pretrained, tmp_path / "hf")
    result = run_cli(*args(data_dir, tmp_path / "run", "--train.max_steps", "2", "--train.eval_interval", "2",
                           "--init_from", str(tmp_path / "hf")))
    assert result.returncode == 0, result.stderr
    assert "initialized from" in result.stdout
    # The first step's loss is the pretrained model's loss on the first batch: its weights were used.
    sampler = data.BatchSampler(data.open_split(data_dir / "tiny", "train"), block_size=32, batch_size=4, seed=1337)
    x, y = sampler.get(0, 0)
    with torch.no_grad():
        expected = checkpoint.load_hf(tmp_path / "hf", max_seq_len=32)(x, y)[1].item()
    assert train_losses(tmp_path / "run")[0] == pytest.approx(expected, abs=1e-5)
    assert checkpoint.load_hf(checkpoint.resolve(tmp_path / "run")).cfg.n_kv_heads == 1


def test_fsdp_on_a_gpu_without_bf16_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    with pytest.raises(ConfigError, match="train.parallel=fsdp needs bf16 or fp32, and this GPU does bf16 only by "
                                          "emulation: use parallel=ddp"):
        train.setup_runtime(TrainConfig(parallel="fsdp"))


def test_compile_auto_goes_on_eagerly_without_the_compiled_blocks(data_dir, tmp_path, monkeypatch, capsys):
    """compile="auto": compiled code that fails at the first step leaves the run training eagerly,
    with the losses of a run never compiled. The failure here sits in the blocks' own forwards (how
    FSDP compiles), so training goes on only if the fallback removes them."""
    def cannot_trace(block, *inputs):
        raise RuntimeError("dynamo could not trace this")

    def compile_blocks(model, runtime):
        for block in model.layers:
            block.forward = types.MethodType(cannot_trace, block)
        return model
    common = ("--train.max_steps", "3", "--train.eval_interval", "3")
    assert train.main(args(data_dir, tmp_path / "eager", *common)) == 0
    monkeypatch.setattr(train, "compile_for_training", compile_blocks)
    assert train.main(args(data_dir, tmp_path / "auto", *common, "--train.compile", "auto")) == 0
    assert ("warning: torch.compile failed (RuntimeError: dynamo could not trace this); continuing eagerly"
            in capsys.readouterr().err)
    assert train_losses(tmp_path / "auto") == train_losses(tmp_path / "eager")


@pytest.mark.parametrize("local_rank, order", [("0", ["load", "barrier"]), ("1", ["barrier", "load"])])
def test_each_machines_first_process_loads_before_the_others(monkeypatch, local_rank, order):
    """A download is written by the first process of a machine alone: the others meet it at the
    barrier only after it has loaded, and then find the files there."""
    events = []
    runtime = types.SimpleNamespace(barrier=lambda: events.append("barrier"))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with train.machine_main_first(runtime):
        events.append("load")
    assert events == order


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"process 1 \(LOCAL_RANK 1\) has no GPU of its own: this machine shows 1; "
                                          r"start at most 1 per machine \(torchrun --nproc_per_node 1\)"):
        train.setup_runtime(TrainConfig())


def test_the_default_vocab_size_takes_the_datas_padded_and_a_wider_one_set_on_purpose_is_warned(data_dir, tmp_path):
    default_vocab = [a for a in TINY if a not in ("--model.vocab_size", "64")]
    ids = Tokenizer.load(data_dir / "tiny").vocab_size
    common = ["--data.data_dir", str(data_dir), "--data.dataset", "tiny", "--train.eval_interval", "1"]
    fresh = run_cli(*default_vocab, *common, "--train.out_dir", str(tmp_path / "fresh"), "--train.max_steps", "2")
    assert fresh.returncode == 0, fresh.stderr
    assert (f"model.vocab_size=64: the data's {ids} ids rounded up to a multiple of 64 (the default 32000 would "
            f"leave {32000 - ids} rows untrained)") in fresh.stdout
    assert checkpoint.read_hf_config(checkpoint.resolve(tmp_path / "fresh")).vocab_size == 64
    resumed = run_cli(*default_vocab, *common, "--train.out_dir", str(tmp_path / "fresh"), "--train.max_steps", "3",
                      "--resume")
    assert resumed.returncode == 0, resumed.stderr  # the run keeps the size it began with
    assert checkpoint.read_hf_config(checkpoint.resolve(tmp_path / "fresh")).vocab_size == 64

    wide = run_cli(*default_vocab, *common, "--model.vocab_size", "4096", "--train.out_dir", str(tmp_path / "wide"),
                   "--train.max_steps", "2")
    assert wide.returncode == 0, wide.stderr
    assert (f"warning: model.vocab_size=4096 but the data's tokenizer has {ids} ids: {4096 - ids} rows of the head "
            f"will never be trained (set --model.vocab_size 64)\n") in wide.stderr
    assert checkpoint.read_hf_config(checkpoint.resolve(tmp_path / "wide")).vocab_size == 4096
