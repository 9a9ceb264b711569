"""Every file a model lives in: our crash-safe training checkpoints, Hugging Face Llama folders,
and llama2.c's legacy .bin files. `load_model` opens any of them.

Training checkpoints are Hugging Face model folders plus the training state:

    out_dir/
      ckpt-000500/          config.json, model.safetensors, tokenizer files, optimizer/ (sharded,
                            see save_optimizer), training_state.pt, config.toml, COMPLETE (sha256
                            of every other file)
      latest -> ckpt-000500 a relative symlink to the newest complete checkpoint
      best -> ckpt-000500   a relative symlink to the checkpoint with the lowest val loss

A checkpoint is written into `ckpt-<step>.tmp/`, every file fsynced, the folder renamed, and only
then does `latest` move (a new symlink renamed over the old). A folder without its COMPLETE
marker, or whose files no longer match the hashes in it, is never loaded, so a crash at any
moment leaves the previous checkpoint as the one to resume from.

The legacy llama2.c file is 7 int32s (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the embedding), then every
weight as float32 grouped by kind across layers, the RoPE tables run.c no longer reads, and the
classifier when unshared. Meta's RoPE rotates adjacent pairs (x0, x1), (x2, x3)... while we, like
Hugging Face, rotate halves (x_i, x_{i+head_dim/2}), so q and k rows are permuted on the way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from config import ConfigError, ModelConfig, WriteError, failed_write, load_json, write_error
from model import Llama
from tokenizer import TOKENIZER_FILES

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"


class CheckpointError(WriteError):
    """A checkpoint could not be written; the message says what survived."""


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


POINTERS = ("latest", "best")


def write_pointer(out_dir: Path, name: str, target: str) -> None:
    """Atomically make out_dir/name a relative symlink to the checkpoint folder `target`, so that
    `<run>/latest` opens as a model folder in any tool (transformers, vLLM, peft, lm_eval). The
    link is made under a temporary name and renamed over the old one: a reader, or a crash, sees
    the old link or the new, never none."""
    tmp, pointer = out_dir / f".{name}.tmp", out_dir / name
    tmp.unlink(missing_ok=True)  # the leftover of an update that was killed
    os.symlink(target, tmp, target_is_directory=True)
    if pointer.is_dir() and not pointer.is_symlink():  # a copy of the run that resolved the link
        shutil.rmtree(pointer)
    os.replace(tmp, pointer)
    _fsync(out_dir)


def read_pointer(out_dir: Path, name: str) -> str | None:
    """The checkpoint folder name out_dir/name points at: a symlink, the text file that runs
    written before symlinks hold, or (in a copy of the run that followed the link) a copy of the
    checkpoint, named by the step its marker records."""
    pointer = out_dir / name
    if pointer.is_symlink():
        return Path(os.readlink(pointer)).name
    if (pointer / MARKER).is_file():
        return checkpoint_path(out_dir, load_json(pointer / MARKER)["step"]).name
    return pointer.read_text().strip() if pointer.is_file() else None


def follow_pointer(path: str | Path) -> Path:
    """`path`, or for an older run's text-file `latest`/`best`, the checkpoint folder it names."""
    path = Path(path)
    if path.name in POINTERS and path.is_file() and not path.is_symlink():
        return path.parent / read_pointer(path.parent, path.name)
    return path


# Files a checkpoint carries besides the weights, so that it is a complete model folder for
# transformers and vLLM: the tokenizer (chat template included) and the sampling defaults.
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def save_model_folder(model: Llama, source: Path | None, target: str | Path) -> list[str]:
    """`model` as a complete Hugging Face folder: config.json (with the trained context `source`
    records) and model.safetensors, plus the CARRIED_FILES `source` has, copied byte for byte.
    Returns the names of the files carried (none for a llama2.c source, which has no folder)."""
    target = Path(target)
    save_hf(model, target, trained_context(source) if source is not None else None)
    carried = [name for name in CARRIED_FILES if source is not None and (source / name).is_file()]
    for name in carried:
        shutil.copyfile(source / name, target / name)
    return carried


def link_adapters(out_dir: Path) -> None:
    """Let peft load a LoRA run folder as it is: its adapter files are links through `latest`
    (PeftModel.from_pretrained looks for them in the folder it is given, else on the Hub)."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (out_dir / name).is_symlink():
            os.symlink(f"latest/{name}", out_dir / name)


def write_contents(folder: Path, training_state: dict[str, Any], config_toml: str,
                   extra_files: dict[str, bytes] | None, write_weights: Callable[[Path], None]) -> None:
    """Everything a checkpoint folder holds besides the sharded optimizer state: the weights
    (`write_weights(folder)`: the full model, or a LoRA run's adapters), the training state, the
    config, and `extra_files` (name: contents, e.g. CARRIED_FILES)."""
    write_weights(folder)
    torch.save(training_state, folder / STATE_FILE)
    (folder / "config.toml").write_text(config_toml)
    for file, contents in (extra_files or {}).items():
        (folder / file).write_bytes(contents)


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:06d}"


@contextlib.contextmanager
def writing(out_dir: str | Path, step: int, main: bool = True,
            barrier: Callable[[], None] = lambda: None, *, needed: int) -> Iterator[Path]:
    """The folder to write checkpoint `ckpt-<step>` into, made whole on exit: every file hashed
    into the COMPLETE marker and fsynced, the folder renamed into place, `latest` moved. Under
    torchrun every process enters (each may write its shard of the state); only the `main` one
    prepares and finishes the folder, and `barrier` keeps the others from running ahead of it.
    A failed write (a full or read-only disk: `needed` is about what the checkpoint takes) removes
    the half-written folder and ends in one CheckpointError line; the previous one stays latest."""
    out_dir, final = Path(out_dir), checkpoint_path(out_dir, step)
    name, tmp = final.name, final.with_name(final.name + ".tmp")
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that was killed
            tmp.mkdir(parents=True)
        barrier()
        yield tmp
        barrier()
        if main:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            hashes = {str(p.relative_to(tmp)): _sha256(p) for p in files}
            (tmp / MARKER).write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
            for p in [*files, tmp / MARKER, *(d for d in tmp.rglob("*") if d.is_dir())]:
                _fsync(p)
            _fsync(tmp)
            if final.exists():  # a checkpoint of this step from a run that was resumed before it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(out_dir)
            write_pointer(out_dir, "latest", name)
        barrier()
    except BaseException as e:
        if not failed_write(e):
            raise
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = read_pointer(out_dir, "latest")
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise write_error(e, out_dir, needed, f"saving {final.name}", f"{kept}: free disk space (or make the "
                          f"folder writable) and resume with --resume", CheckpointError) from None


# A run's folder holds one run. --overwrite sets the previous run aside (out_dir.replaced) before
# the new one writes anything, deletes it once the new run has saved a checkpoint, and puts it
# back if the new run fails before that: a failed start never costs the previous run.


def replaced_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".replaced")


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite; returns whether
    a previous run must make way for this one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} is a file, not a folder: pick another train.out_dir")
    holds_run = (out_dir / "metrics.jsonl").exists() or any(out_dir.glob("ckpt-*"))
    if not holds_run or resume:
        return False
    if not overwrite:
        raise ConfigError(f"out_dir {out_dir} holds another run: pass --resume to continue it or "
                          f"--overwrite to start afresh")
    if replaced_path(out_dir).exists():
        raise ConfigError(f"{replaced_path(out_dir)} holds a run an earlier --overwrite set aside and did not "
                          f"get to delete: move it back to {out_dir} or delete it, then run again")
    return True


@dataclasses.dataclass
class RunFolder:
    """A run's out_dir, and the previous run it replaces until its first checkpoint."""
    path: Path
    replaced: Path | None = None

    @classmethod
    def claim(cls, out_dir: Path, overwrite: bool) -> RunFolder:
        """Create out_dir; with `overwrite` (check_out_dir's answer), first move the previous run aside."""
        folder = cls(out_dir, replaced_path(out_dir) if overwrite else None)
        if folder.replaced is not None:
            os.replace(out_dir, folder.replaced)
        out_dir.mkdir(parents=True, exist_ok=True)
        return folder

    def checkpoint_saved(self) -> None:
        """The new run now stands on its own: the previous one goes."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced)
            self.replaced = None

    @contextlib.contextmanager
    def previous_run_restored_on_failure(self) -> Iterator[None]:
        """Around the run: on any failure before the first checkpoint, the previous run goes back."""
        try:
            yield
        except BaseException:
            if self.replaced is not None:
                shutil.rmtree(self.path)
                os.replace(self.replaced, self.path)
                print(f"warning: the new run failed before its first checkpoint: the previous run is back in "
                      f"{self.path}", file=sys.stderr, flush=True)
            raise


# The optimizer state is saved with torch.distributed.checkpoint (DCP): each process writes its own
# shard, keyed by parameter name, and any number of processes (one without torchrun too) can read
# it back, each taking the part its own parameters need. So a run resumes on another world size,
# and under fsdp or ddp whichever saved it.
OPTIMIZER_DIR = "optimizer"


@contextlib.contextmanager
def one_process_expected(alone: bool) -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process, as asked."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_optimizer(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], folder: Path,
                   distributed: bool) -> None:
    """Every process's share of the optimizer state into folder/optimizer/ (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizers)
    with one_process_expected(not distributed):
        dcp.save({"optimizer": state}, checkpoint_id=folder / OPTIMIZER_DIR, no_dist=not distributed)


def load_optimizer(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], folder: Path,
                   distributed: bool) -> None:
    """The optimizer state save_optimizer wrote, resharded for this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, optimizers)}
    with one_process_expected(not distributed):
        dcp.load(state, checkpoint_id=folder / OPTIMIZER_DIR, no_dist=not distributed)
    set_optimizer_state_dict(model, optimizers, state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole weights, gathered on the CPU of the main process (a collective call;
    the other processes get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole weights into an FSDP model: each process keeps its own shard of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def verify(path: str | Path) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint, after checking every file against its hash."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted while "
                          f"saving; use an earlier one")
    info = load_json(marker)
    if not isinstance(info.get("sha256"), dict):
        raise ConfigError(f"checkpoint {path} is corrupt: its {MARKER} marker lists no file hashes; use an "
                          f"earlier checkpoint")
    for file, expected in info["sha256"].items():
        if not (path / file).is_file() or _sha256(path / file) != expected:
            raise ConfigError(f"checkpoint {path} is corrupt: {file} does not match its recorded sha256; "
                              f"use an earlier checkpoint")
    return info


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run directory (through `latest`) or the folder itself."""
    path = follow_pointer(path)
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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               max_seq_len: int | None = None) -> tuple[Llama, Path | None]:
    """Any checkpoint we can run, and the folder it came from (None for a llama2.c .bin): a run
    folder (its latest checkpoint), a checkpoint folder or a Hugging Face Llama folder. One of
    our checkpoints is verified against its COMPLETE marker first."""
    path = follow_pointer(path)
    if path.is_file():
        return read_llama2c(path, dtype, max_seq_len), None
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist: give a checkpoint or run folder, a Hugging Face "
                          f"Llama folder or a llama2.c .bin file")
    folder = resolve(path)
    if (folder / MARKER).exists():
        verify(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return load_lora(folder, dtype, max_seq_len), folder
    return load_hf(folder, dtype, max_seq_len), folder


# ---------------------------------------------------------------------------------------------
# Hugging Face Llama folders: config.json and (sharded) model.safetensors


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
            cfg: ModelConfig | None = None) -> Llama:
    """Load a Hugging Face Llama folder (config.json + model.safetensors, sharded or not), one
    tensor at a time. `cfg` replaces its config.json (for a caller that changed its context or
    RoPE settings; the weights must fit it)."""
    cfg = cfg or read_hf_config(path)
    if max_seq_len is not None:
        cfg.max_seq_len = max_seq_len
    return Llama.from_state_dict(cfg, SafetensorsWeights(path), dtype, source=str(path))


def save_hf(model: Llama, path: str | Path, trained_context: int | None = None,
            weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a folder that transformers.LlamaForCausalLM.from_pretrained loads as is. With
    `trained_context`, config.json also records the longest window the model was trained on
    (sampling never goes past it; transformers keeps the key as an attribute and ignores it).
    `weights` replaces the model's own state dict (an FSDP model's, gathered whole)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_config(model, path, trained_context)
    # Tied weights are one tensor: safetensors refuses aliases, and HF re-ties on load.
    state = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous()
             for k, v in (weights if weights is not None else model.standard_state_dict()).items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    safetensors.torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_config(model: Llama, folder: Path, trained_context: int | None = None) -> None:
    """config.json for `model`, recording `trained_context` when given."""
    config = hf_config_dict(model.cfg, model.embed_tokens.weight.dtype)
    if trained_context is not None:
        config[TRAINED_CONTEXT] = trained_context
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def trained_context(folder: str | Path) -> int | None:
    """The longest window the folder's model was trained on, when config.json records it."""
    value = load_json(Path(folder) / "config.json").get(TRAINED_CONTEXT)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{Path(folder) / 'config.json'} sets {TRAINED_CONTEXT}={value!r}: it must be a "
                          f"positive integer")
    return value


TRAINED_CONTEXT = "nanollama_trained_context"
_HF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": _HF_DTYPES[dtype],
    }


def read_hf_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config.json; what we cannot run is refused by name."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json: point at a Hugging Face model folder")
    hf = load_json(file)
    if hf.get("model_type") != "llama":
        raise ConfigError(f"{file} describes model_type={hf.get('model_type')!r}; only 'llama' is supported")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"{file} sets {key}={hf[key]!r}; this Llama implementation needs {key}={ok!r}")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters; accept both spellings.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{file} uses rope_type={rope_type!r}; supported: default, llama3")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or isinstance(hf[key], bool):
            raise ConfigError(f"{file} needs an integer {key}, found {hf.get(key)!r}")
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if rope_type == "llama3":
        cfg.rope_scaling = "llama3"
        cfg.rope_scaling_factor = float(rope["factor"])
        cfg.rope_low_freq_factor = float(rope["low_freq_factor"])
        cfg.rope_high_freq_factor = float(rope["high_freq_factor"])
        cfg.rope_original_max_seq_len = int(rope["original_max_position_embeddings"])
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{file} describes a model we cannot build: {e}") from None
    return cfg


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The tensors of a (possibly sharded) safetensors checkpoint, keyed by our parameter names and
    read from disk one at a time when asked for: a model loads with its own memory plus one tensor,
    however large the shards (and in bf16 files, each tensor becomes fp32 as it arrives)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index} has no weight_map: restore the file or re-save the model")
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif any(path.glob("pytorch_model*.bin")):
            raise ConfigError(f"{path} holds only pickled pytorch_model.bin weights; re-save it with "
                              f"safe_serialization=True (transformers) to get model.safetensors")
        else:
            raise ConfigError(f"{path} has no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, tuple[Any, str]] = {}  # our name -> (open file, its key there)
        for name in files:
            try:
                handle = safetensors.safe_open(str(path / name), framework="pt")
            except (safetensors.SafetensorError, OSError) as e:
                raise ConfigError(f"{path / name} cannot be read ({e}): the file is truncated or corrupt; "
                                  f"download or copy it again") from None
            for key in handle.keys():
                if not key.endswith("rotary_emb.inv_freq"):  # a buffer older exports saved; we recompute it
                    self.where[key.removeprefix("model.")] = (handle, key)
        self.path = path

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, key = self.where[name]
        try:
            return handle.get_tensor(key)
        except (safetensors.SafetensorError, OSError) as e:
            raise ConfigError(f"{self.path}: {key} cannot be read ({e}): the file is truncated or corrupt; "
                              f"download or copy it again") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


# ---------------------------------------------------------------------------------------------
# LoRA adapters, in peft's format: a checkpoint folder of a LoRA run holds adapter_config.json and
# adapter_model.safetensors (named as for LlamaForCausalLM, so peft loads them onto the
# transformers model too) and, for our own readers, config.json with the base model's shape.

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install -r requirements-lora.txt") from None
    return peft


def add_lora(model: Llama, rank: int, alpha: float, dropout: float, targets: list[str]) -> Any:
    """Freeze `model` and give the named projections trainable adapters: peft injects them in
    place, so `model` itself now computes W x + (alpha / rank) B A x. Returns peft's wrapper,
    which saves and merges them."""
    peft = _peft()
    if unknown := [t for t in targets if t not in LORA_TARGETS]:
        raise ConfigError(f"LoRA target {unknown[0]!r} is not a projection of this Llama: choose among "
                          f"{', '.join(LORA_TARGETS)}")
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=targets))


def _transformers_key(key: str) -> str:
    """peft's key for one of our modules -> its key for LlamaForCausalLM, which nests the decoder
    (everything but lm_head) one level down, in `.model`."""
    rest = key.removeprefix("base_model.model.")
    return "base_model.model." + (rest if rest.startswith("lm_head.") else "model." + rest)


def save_lora(adapters: Any, folder: Path, base: Path, trained_context: int | None = None) -> None:
    """The adapters as peft saves them (loadable with PeftModel.from_pretrained onto the base in
    transformers), recording the base model's folder, plus our config.json."""
    peft = _peft()
    state = {_transformers_key(k): v.detach().contiguous()
             for k, v in peft.get_peft_model_state_dict(adapters).items()}
    safetensors.torch.save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapters.peft_config["default"]
    config.base_model_name_or_path = str(base.resolve())
    config.save_pretrained(str(folder))
    write_config(adapters.get_base_model(), folder, trained_context)


def read_lora(adapters: Any, folder: Path) -> None:
    """Load a checkpoint's adapter weights into `adapters` (made by add_lora with its settings)."""
    peft = _peft()
    saved = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS))
    ours = {"base_model.model." + k.removeprefix("base_model.model.").removeprefix("model."): v
            for k, v in saved.items()}
    expected = set(peft.get_peft_model_state_dict(adapters))
    if set(ours) != expected:
        raise ConfigError(f"{folder / ADAPTER_WEIGHTS} holds other adapters than train.lora_rank and "
                          f"train.lora_targets describe: resume with the LoRA settings of the run")
    peft.set_peft_model_state_dict(adapters, ours)


def load_lora(folder: Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> Llama:
    """A LoRA checkpoint as one plain model: its base model with the adapters merged into the weights."""
    info = load_json(folder / ADAPTER_CONFIG)
    base = Path(info.get("base_model_name_or_path") or "")
    if not base.is_dir():
        raise ConfigError(f"{folder} holds LoRA adapters for the base model {base}, which is not here: put the "
                          f"base model there, or write its path into {folder / ADAPTER_CONFIG}")
    model = load_hf(resolve(base), max_seq_len=max_seq_len)  # merged in fp32, then cast
    targets = info.get("target_modules")
    adapters = add_lora(model, info["r"], info["lora_alpha"], 0.0,
                        sorted(targets) if isinstance(targets, (list, set)) else [targets])
    read_lora(adapters, folder)
    return adapters.merge_and_unload().to(dtype)


# ---------------------------------------------------------------------------------------------
# llama2.c legacy .bin files

LLAMA2C_HEADER = struct.Struct("<7i")
# run.c hard-codes these; a model trained with others would run there silently wrong.
LLAMA2C_ROPE_THETA, LLAMA2C_NORM_EPS = 10000.0, 1e-5


def rope_permute(w: torch.Tensor, n_heads: int, to_pairs: bool = False) -> torch.Tensor:
    """Reorder the rows of a q or k projection between Meta's adjacent-pair RoPE layout and our
    rotate-half layout (to_pairs=False: pairs -> halves, the permute of HF's Llama converter)."""
    rows, cols = w.shape
    split = (n_heads, 2, rows // n_heads // 2) if to_pairs else (n_heads, rows // n_heads // 2, 2)
    return w.reshape(*split, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_layout(cfg: ModelConfig, shared_classifier: bool) -> list[tuple[str | None, tuple[int, ...]]]:
    """(our parameter name, shape) of every array in a legacy file, in file order; None = RoPE table."""
    d, hd, kv = cfg.dim, cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = [("input_layernorm", (d,)), ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)),
                 ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, d)), ("post_attention_layernorm", (d,)),
                 ("mlp.gate_proj", (cfg.ffn_dim, d)), ("mlp.down_proj", (d, cfg.ffn_dim)),
                 ("mlp.up_proj", (cfg.ffn_dim, d))]
    layout = [("embed_tokens.weight", (cfg.vocab_size, d))]
    layout += [(f"layers.{i}.{name}.weight", shape) for name, shape in per_layer for i in range(cfg.n_layers)]
    layout += [("norm.weight", (d,)), (None, (cfg.max_seq_len, hd // 2)), (None, (cfg.max_seq_len, hd // 2))]
    if not shared_classifier:
        layout.append(("lm_head.weight", (cfg.vocab_size, d)))
    return layout


def read_llama2c(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> Llama:
    """Load a legacy llama2.c checkpoint (as written by llama2.c's export.py --version 0)."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < LLAMA2C_HEADER.size:
        raise ConfigError(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = LLAMA2C_HEADER.unpack_from(raw)
    try:
        cfg = ModelConfig(vocab_size=abs(vocab_size), dim=dim, n_layers=n_layers, n_heads=n_heads,
                          n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, max_seq_len=seq_len,
                          norm_eps=LLAMA2C_NORM_EPS, rope_theta=LLAMA2C_ROPE_THETA, tie_embeddings=vocab_size > 0)
        cfg.validate()
    except (ConfigError, ZeroDivisionError):
        raise ConfigError(f"{path} has no valid llama2.c header (read {dim=} {n_heads=} {n_kv_heads=} "
                          f"{vocab_size=}): is it a legacy llama2.c .bin?") from None
    layout = llama2c_layout(cfg, shared_classifier=cfg.tie_embeddings)
    expected = LLAMA2C_HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if len(raw) != expected:
        raise ConfigError(f"{path} holds {len(raw)} bytes but its header (dim {dim}, {n_layers} layers, vocab "
                          f"{vocab_size}) needs {expected}: the file is truncated or not a legacy llama2.c file")
    floats = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=LLAMA2C_HEADER.size).copy())
    state, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        if name is not None:
            state[name] = floats[offset:offset + size].view(shape)
        offset += size
    for i in range(n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            state[key] = rope_permute(state[key], heads)
    if max_seq_len is not None:
        cfg.max_seq_len = max_seq_len
    return Llama.from_state_dict(cfg, state, dtype, source=str(path))


def write_llama2c(model: Llama, path: str | Path) -> None:
    """Write `model` as a legacy llama2.c checkpoint (float32), the classifier shared when tied."""
    cfg = model.cfg
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ConfigError(f"llama2.c derives the head width from dim / n_heads, but this model's head_dim="
                          f"{cfg.head_dim} is not {cfg.dim} / {cfg.n_heads}: it cannot run there")
    if cfg.rope_theta != LLAMA2C_ROPE_THETA or cfg.norm_eps != LLAMA2C_NORM_EPS or cfg.rope_scaling != "none":
        raise ConfigError(f"llama2.c fixes rope_theta={LLAMA2C_ROPE_THETA:g}, norm_eps={LLAMA2C_NORM_EPS:g} and no "
                          f"RoPE scaling, but this model has rope_theta={cfg.rope_theta:g}, norm_eps={cfg.norm_eps:g}, "
                          f"rope_scaling={cfg.rope_scaling}: it cannot run there")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    shared = cfg.tie_embeddings or torch.equal(state["embed_tokens.weight"], state["lm_head.weight"])
    for i in range(cfg.n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            state[key] = rope_permute(state[key], heads, to_pairs=True)
    half = cfg.head_dim // 2
    rope_tables = iter((model.rope_cos[:, :half].float().cpu(), model.rope_sin[:, :half].float().cpu()))
    with Path(path).open("wb") as f:
        f.write(LLAMA2C_HEADER.pack(cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                            cfg.vocab_size if shared else -cfg.vocab_size, cfg.max_seq_len))
        for name, _ in llama2c_layout(cfg, shared):
            tensor = next(rope_tables) if name is None else state[name]
            f.write(tensor.contiguous().numpy().astype("<f4").tobytes())
