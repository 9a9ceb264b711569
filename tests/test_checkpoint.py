"""Checkpoints are atomic, verified, pruned, and load without unpickling objects."""

import errno
import json

import pytest
import torch

import checkpoint
from config import ConfigError, ModelConfig
from model import Llama

transformers = pytest.importorskip("transformers")


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
