"""Checkpoints are atomic, verified, pruned, and load without unpickling objects."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from config import ConfigError, ModelConfig
from model import Llama

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def small_model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))


def save(out_dir, step, model, **state):
    with checkpoint.writing(out_dir, step, needed=1_000_000) as folder:
        checkpoint.write_contents(folder, {"step": step, "opt": {"m": torch.ones(3)}, **state}, "[model]\n", None,
                                  lambda f: checkpoint.save_hf(model, f))
    return checkpoint.checkpoint_path(out_dir, step)


def test_save_writes_hf_folder_and_pointer(tmp_path):
    model = small_model()
    path = save(tmp_path, 7, model)
    assert path.name == "ckpt-000007" and checkpoint.read_pointer(tmp_path, "latest") == "ckpt-000007"
    assert checkpoint.verify(path)["step"] == 7
    assert checkpoint.resolve(tmp_path) == path
    state = checkpoint.load_training_state(path)  # weights_only=True inside
    assert state["step"] == 7 and torch.equal(state["opt"]["m"], torch.ones(3))
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() <= 1e-5


def test_incomplete_and_corrupt_checkpoints_are_refused(tmp_path):
    path = save(tmp_path, 1, small_model())
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is corrupt: model.safetensors does not match its recorded sha256"):
        checkpoint.verify(path)
    (path / checkpoint.MARKER).unlink()
    with pytest.raises(ConfigError, match=r"is incomplete \(no COMPLETE marker\)"):
        checkpoint.verify(path)


def test_interrupted_save_leaves_previous_checkpoint_latest(tmp_path):
    model = small_model()
    save(tmp_path, 1, model)
    # What a process killed mid-save leaves behind: a half-written .tmp folder.
    partial = tmp_path / "ckpt-000002.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert checkpoint.resolve(tmp_path).name == "ckpt-000001"
    checkpoint.verify(checkpoint.resolve(tmp_path))
    save(tmp_path, 2, model)  # the next save clears the leftovers
    assert not partial.exists() and checkpoint.resolve(tmp_path).name == "ckpt-000002"


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    save(tmp_path, 1, model)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(checkpoint.CheckpointError) as err:
        save(tmp_path, 2, model)
    assert "the previous checkpoint ckpt-000001 is intact" in str(err.value)
    assert "No space left on device" in str(err.value)
    assert checkpoint.read_pointer(tmp_path, "latest") == "ckpt-000001"
    assert not (tmp_path / "ckpt-000002.tmp").exists() and not (tmp_path / "ckpt-000002").exists()
    checkpoint.verify(tmp_path / "ckpt-000001")


def test_prune_keeps_last_k_and_best(tmp_path):
    model = small_model()
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, model)
        if step == 2:
            checkpoint.write_pointer(tmp_path, "best", "ckpt-000002")
        checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000004", "ckpt-000005"]


def test_marker_lists_every_file(tmp_path):
    path = save(tmp_path, 3, small_model())
    listed = set(json.loads((path / checkpoint.MARKER).read_text())["sha256"])
    assert listed == {p.name for p in path.iterdir()} - {checkpoint.MARKER}


def test_pointers_are_relative_symlinks_that_open_as_model_folders(tmp_path):
    model = small_model()
    save(tmp_path / "run", 1, model)
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)  # relative links survive moving the run
    assert (moved / "latest").is_symlink() and os.readlink(moved / "latest") == "ckpt-000001"
    hf = transformers.AutoModelForCausalLM.from_pretrained(moved / "latest").eval()
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() <= 1e-5
    assert checkpoint.load_model(moved / "latest")[1] == moved / "latest"
    assert checkpoint.resolve(moved) == moved / "ckpt-000001"


def test_text_file_pointers_of_older_runs_are_still_read(tmp_path):
    save(tmp_path, 1, small_model())
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").write_text("ckpt-000001\n")  # as runs wrote it before symlinks
    assert checkpoint.resolve(tmp_path) == tmp_path / "ckpt-000001"
    assert checkpoint.resolve(tmp_path / "latest") == tmp_path / "ckpt-000001"
    assert checkpoint.load_model(tmp_path / "latest")[1] == tmp_path / "ckpt-000001"
    save(tmp_path, 2, small_model())  # the next save turns it into a link
    assert os.readlink(tmp_path / "latest") == "ckpt-000002"


def test_a_copy_that_followed_the_links_still_resolves_and_saves(tmp_path):
    save(tmp_path / "run", 1, small_model())
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # symlinks=False: latest becomes a folder
    assert not (tmp_path / "copy" / "latest").is_symlink()
    assert checkpoint.resolve(tmp_path / "copy") == tmp_path / "copy" / "ckpt-000001"
    save(tmp_path / "copy", 2, small_model())
    assert os.readlink(tmp_path / "copy" / "latest") == "ckpt-000002"


def test_a_kill_mid_update_leaves_a_valid_pointer(tmp_path):
    for step in (1, 2):
        save(tmp_path, step, small_model())
    names = {"ckpt-000001", "ckpt-000002"}
    flipper = ("import sys, checkpoint, pathlib\nout = pathlib.Path(sys.argv[1])\nprint('ready', flush=True)\n"
               "while True:\n    for name in ('ckpt-000001', 'ckpt-000002'):\n"
               "        checkpoint.write_pointer(out, 'latest', name)\n")
    for delay in (0.0, 0.013, 0.05, 0.11):
        child = subprocess.Popen([sys.executable, "-c", flipper, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert checkpoint.read_pointer(tmp_path, "latest") in names
        assert (tmp_path / "latest" / "config.json").is_file()
        checkpoint.write_pointer(tmp_path, "latest", "ckpt-000002")  # a leftover .latest.tmp is no obstacle
        assert checkpoint.resolve(tmp_path) == tmp_path / "ckpt-000002"
