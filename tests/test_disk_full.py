"""A full or read-only disk never costs work: every write that fails (a checkpoint, a dataset shard,
the metrics, a sweep's results, a GGUF file) is one line naming the folder and the bytes it needed,
whatever was complete before stays complete, and the run resumes. The disks are real: small tmpfs
mounts (skipped where mounting is not allowed); the metrics append also meets a fake ENOSPC at
os.write, halfway through its line."""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import checkpoint
import data
import prepare_data
import train
from config import ModelConfig, WriteError, failed_write, replace_file
from model import Llama
from tokenizer import Tokenizer

TINY = ["--model.vocab_size", "64", "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.max_seq_len", "32", "--train.block_size", "16", "--train.micro_batch_size", "4",
        "--train.batch_tokens", "64", "--train.warmup_steps", "0", "--train.compile", "false",
        "--train.eval_iters", "1", "--train.peak_tflops", "1", "--train.eval_interval", "2",
        "--train.ckpt_interval", "2", "--train.lr_schedule", "constant"]  # so a run may be extended


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs folder of that many bytes; unmounted after the test."""
    mounted = []

    def mount(size: int, name: str = "disk") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): needs root")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes free on `disk` (delete it to make room again)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def one_line_error(capsys) -> str:
    """The error line a script ended with (after any progress bar and warnings), and no traceback."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("error: ") == 1 and last.startswith("error: "), err
    return last


def test_every_writer_reports_a_full_disk_as_a_failed_write(small_disk):
    """torch.save, safetensors and torch.distributed.checkpoint report ENOSPC in their own words
    (no OSError); each is recognized, and a bug in the same words' absence is not."""
    import torch.distributed.checkpoint as dcp
    disk = small_disk(128 * 1024)
    big = torch.zeros(100_000)
    writers = {"torch.save": lambda: torch.save({"a": big}, disk / "a.pt"),
               "safetensors": lambda: safetensors.torch.save_file({"a": big}, str(disk / "a.safetensors")),
               "dcp": lambda: dcp.save({"a": big}, checkpoint_id=disk / "dcp", no_dist=True),
               "numpy": lambda: big.numpy().tofile(disk / "a.bin"),
               "open": lambda: (disk / "a.raw").write_bytes(big.numpy().tobytes())}
    for name, write in writers.items():
        with pytest.raises(BaseException) as caught, checkpoint.one_process_expected(True):
            write()
        assert failed_write(caught.value), (name, caught.value)
        subprocess.run(f"rm -rf {disk}/*", shell=True, check=True)
    assert not failed_write(RuntimeError("shape mismatch")) and not failed_write(KeyError("a"))


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_finishes_the_run(small_disk, tmp_path, capsys):
    root = tmp_path / "world"
    root.mkdir()
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    assert prepare_data.main(["--data.dataset", "tiny", "--data.data_dir", str(root / "data"),
                              "--data.input", str(root / "corpus.txt"), "--data.workers", "1"]) == 0
    data_args = ["--data.data_dir", str(root / "data"), "--data.dataset", "tiny"]
    disk = small_disk(8 * 2**20)
    run = disk / "run"
    assert train.main([*TINY, *data_args, "--train.out_dir", str(run), "--train.max_steps", "4"]) == 0
    capsys.readouterr()
    filler = fill(disk, leave=64 * 1024)  # room for metrics lines, not for a checkpoint

    assert train.main([*TINY, *data_args, "--train.out_dir", str(run), "--train.max_steps", "8", "--resume"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: saving ckpt-000006 failed (No space left on device): {run} needs ")
    assert "the previous checkpoint ckpt-000004 is intact: free disk space" in err
    assert "and resume with --resume" in err
    page = (Path(__file__).parent.parent / "docs" / "resume.md").read_text()
    numbers = re.compile(r"\d[\d,.]*")  # the free bytes vary with the metrics lines' lengths
    assert numbers.sub("N", err.replace(str(run), "out/run")) in numbers.sub("N", page)
    needed = int(err.split(" needs ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > 64 * 1024  # the weights and the Adam moments, not a guess of zero
    assert checkpoint.read_pointer(run, "latest") == "ckpt-000004"
    checkpoint.verify(run / "ckpt-000004")
    assert not list(run.glob("ckpt-000006*"))
    train.read_metrics(run / "metrics.jsonl")  # whole lines only

    filler.unlink()
    assert train.main([*TINY, *data_args, "--train.out_dir", str(run), "--train.max_steps", "8", "--resume"]) == 0
    steps = [m["step"] for m in train.read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == list(range(1, 9))
    assert train.main([*TINY, *data_args, "--train.out_dir", str(tmp_path / "straight"),
                       "--train.max_steps", "8"]) == 0
    losses = [[m["loss"] for m in train.read_metrics(folder / "metrics.jsonl") if m["kind"] == "train"]
              for folder in (run, tmp_path / "straight")]
    assert losses[0] == losses[1]  # the run that hit the full disk is the run that never did


def test_a_read_only_disk_at_a_checkpoint_is_one_line(small_disk):
    disk = small_disk(4 * 2**20)
    model = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=32))

    def save(step: int) -> None:
        with checkpoint.writing(disk, step, needed=123_456) as folder:
            checkpoint.write_contents(folder, {"step": step}, "[model]\n", None, lambda f: checkpoint.save_hf(model, f))
    save(1)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(checkpoint.CheckpointError) as err:
        save(2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"saving ckpt-000002 failed (Read-only file system): {disk} needs 123,456 bytes "
                              f"(120.6 KiB) for it and has ")
    assert "the previous checkpoint ckpt-000001 is intact" in message
    checkpoint.verify(disk / "ckpt-000001")


def test_a_metrics_line_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    train.append_metric(metrics, {"kind": "train", "step": 1})
    before = metrics.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # what a disk that fills mid-line does: a short write, then ENOSPC
        if len(data) > 4:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", half_then_full)
    record = {"kind": "train", "step": 2, "loss": 1.5}
    with pytest.raises(WriteError) as err:
        train.append_metric(metrics, record)
    monkeypatch.undo()
    line = len(json.dumps(record)) + 1
    assert str(err.value).startswith(f"appending to metrics.jsonl failed (No space left on device): {tmp_path} "
                                     f"needs {line} bytes for it and has ")
    assert metrics.read_bytes() == before


def test_replace_file_leaves_the_previous_file_whole(small_disk):
    """What sweep results, loss.png, meta.json and the other records are written with."""
    disk = small_disk(64 * 1024)
    results = disk / "results.csv"
    replace_file(results, "trial,val_loss\na,1.5\n", "kept")
    fill(disk, leave=0)
    with pytest.raises(WriteError, match=rf"^writing results.csv failed \(No space left on device\): {disk} needs "
                                         rf"200,000 bytes \(195.3 KiB\) for it and has \d[\d,]* bytes.* free; kept$"):
        replace_file(results, "x" * 200_000, "kept")
    assert results.read_text() == "trial,val_loss\na,1.5\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "results.csv"]


def test_a_full_disk_while_sharding_keeps_the_finished_shards(small_disk, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(["ab", "cd", "ef", "gh"], 400))}) + "\n"
                              for _ in range(200)))
    disk = small_disk(2 * 2**20)
    args = ["--data.dataset", "sharded", "--data.data_dir", str(disk), "--data.input", str(corpus),
            "--data.tokenizer", "char", "--data.shard_documents", "20", "--data.workers", "1"]
    filler = fill(disk, leave=200 * 1024)  # the tokenizer and a few shards (~50 KB each) fit, not all ten
    assert prepare_data.main(args) == 2
    err = one_line_error(capsys)
    assert " failed (No space left on device): " in err and f"{disk / 'sharded'} needs " in err
    assert err.endswith("run it again (a sharded run skips the shards it finished)")
    folder = disk / "sharded"
    assert not list(folder.glob("*.tmp"))
    finished = {p.name[6:] for p in folder.glob("train_*.bin")} & {p.name[4:] for p in folder.glob("val_*.bin")}
    assert 0 < len(finished) < 10, "some shards fit before the disk filled, not all"
    filler.unlink()
    assert prepare_data.main(args) == 0
    assert f"{10 - len(finished)} written, {len(finished)} already there" in capsys.readouterr().out
    assert data.read_meta(folder / "meta.json")["shards"]["count"] == 10


def test_a_full_disk_while_writing_gguf_leaves_no_file_and_the_earlier_one_whole(small_disk, tmp_path):
    llamacpp = pytest.importorskip("llamacpp")
    tokenizer = Tokenizer.train_char("the quick brown fox jumps over the lazy dog")
    model = Llama(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=4, n_heads=4, max_seq_len=32))
    checkpoint.save_hf(model, tmp_path)
    tokenizer.save(tmp_path)
    disk = small_disk(128 * 1024)
    (disk / "model.gguf").write_bytes(b"an earlier file")
    with pytest.raises(WriteError) as err:
        llamacpp.write_gguf(model, tmp_path, disk / "model.gguf")
    assert str(err.value).startswith(f"writing model.gguf failed (No space left on device): {disk} needs ")
    assert str(err.value).endswith("any earlier file of that name is untouched: free disk space (or make the "
                                   "folder writable) and convert again")
    assert (disk / "model.gguf").read_bytes() == b"an earlier file" and not (disk / "model.gguf.tmp").exists()
