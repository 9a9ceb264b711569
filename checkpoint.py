"""Crash-safe checkpoints: each one is a Hugging Face model folder plus the training state.

    out_dir/
      ckpt-000500/          config.json, model.safetensors, tokenizer files, training_state.pt,
                            config.toml, COMPLETE (sha256 of every other file)
      latest                the name of the newest complete checkpoint
      best                  the name of the checkpoint with the lowest val loss

A checkpoint is written into `ckpt-<step>.tmp/`, every file fsynced, the folder renamed, and only
then does `latest` move (by an atomic replace). A folder without its COMPLETE marker, or whose
files no longer match the hashes in it, is never loaded, so a crash at any moment leaves the
previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from config import ConfigError

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message is one line and says what survived."""


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(out_dir: Path, name: str, target: str) -> None:
    """Atomically make out_dir/name hold `target` (a checkpoint folder name)."""
    tmp = out_dir / f".{name}.tmp"
    tmp.write_text(target + "\n")
    _fsync(tmp)
    os.replace(tmp, out_dir / name)
    _fsync(out_dir)


def read_pointer(out_dir: Path, name: str) -> str | None:
    pointer = out_dir / name
    return pointer.read_text().strip() if pointer.is_file() else None


def save(out_dir: str | Path, step: int, model: torch.nn.Module, training_state: dict[str, Any],
         config_toml: str, extra_files: list[Path] = ()) -> Path:
    """Write checkpoint `ckpt-<step>` atomically, point `latest` at it, and return its path."""
    out_dir = Path(out_dir)
    name = f"ckpt-{step:06d}"
    final, tmp = out_dir / name, out_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that was killed
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / "config.toml").write_text(config_toml)
        for file in extra_files:
            shutil.copy2(file, tmp / file.name)
        hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if final.exists():  # a checkpoint of this step from a run that was resumed before it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out_dir)
        write_pointer(out_dir, "latest", name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = read_pointer(out_dir, "latest")
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving {final} failed ({e.strerror or e}); {kept}: free disk space and "
                              f"resume with --resume") from None
    return final


def verify(path: str | Path) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint, after checking every file against its hash."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted while "
                          f"saving; resume from an earlier one")
    info = json.loads(marker.read_text())
    for file, expected in info["sha256"].items():
        if not (path / file).is_file() or _sha256(path / file) != expected:
            raise ConfigError(f"checkpoint {path} is corrupt: {file} does not match its recorded sha256; "
                              f"resume from an earlier checkpoint")
    return info


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run directory (through `latest`) or the folder itself."""
    path = Path(path)
    if (path / MARKER).is_file() or (path / "config.json").is_file():
        return path
    name = read_pointer(path, "latest")
    if name is None:
        raise ConfigError(f"{path} holds no checkpoint (no 'latest' pointer and no {MARKER} marker)")
    return path / name


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The optimizer, RNG and loop state, loaded without unpickling arbitrary objects."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir() and (p / MARKER).is_file())


def prune(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and the best one."""
    out_dir = Path(out_dir)
    keep = {read_pointer(out_dir, "best"), read_pointer(out_dir, "latest")}
    for ckpt in list_checkpoints(out_dir)[:-keep_last]:
        if ckpt.name not in keep:
            shutil.rmtree(ckpt)
