"""Typed configs for every nanollama script.

One TOML file describes one experiment; `--section.key value` (or `--section.key=value`)
overrides any field from the command line. Every field carries a one-line help string, so
`--help` can list them all, and every dataclass validates itself: bad input ends in a single
line that names the key, the value and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import functools
import io
import json
import math
import os
import re
import shutil
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class UserError(ValueError):
    """Something the user gave (a config, a file, a prompt, a request) is wrong. Its message is
    one line that says what and how to fix it; every user-facing error derives from this."""


class ConfigError(UserError):
    """A problem with a config file or override."""


def script(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """The one error path of every script's `main(argv)`: a UserError prints `error: ...` and
    returns 2, Ctrl-C returns 130, and a reader that closes the pipe (`... --help | head`) ends
    the script quietly. Anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            try:
                return main(list(sys.argv[1:] if argv is None else argv)) or 0
            finally:
                sys.stdout.flush()  # a closed pipe surfaces here, inside the try, not at interpreter exit
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # Python flushes stdout again at exit; pointing it at /dev/null keeps that quiet too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13  # what a shell reports for a process killed by SIGPIPE
    return run


# ---------------------------------------------------------------------------------------------
# Failed writes: a full or read-only disk is one line that names the folder and what the write
# needed, and whatever was complete before stays complete.


class WriteError(UserError):
    """A file could not be written (a full or read-only disk); the message names the folder, the
    bytes the write needed, and what survived."""


# torch.save and safetensors write from C++ and Rust and report a failed write in their own words,
# never as an OSError; torch.distributed.checkpoint wraps each process's failure in a
# CheckpointException, which is a BaseException.
NATIVE_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "I/O error")


def failed_write(error: BaseException) -> bool:
    """Whether `error`, raised while writing files, is the disk refusing the write."""
    if isinstance(error, OSError):
        return True
    failures = getattr(error, "failures", None)  # a CheckpointException: {rank: (exception, traceback)}
    if type(error).__name__ == "CheckpointException" and isinstance(failures, dict):
        return any(failed_write(exc) for exc, _ in failures.values())
    return (type(error).__name__ in ("RuntimeError", "SafetensorError")
            and any(words in str(error) for words in NATIVE_WRITE_FAILURES))


def write_error(error: BaseException, folder: str | Path, needed: int, what: str, after: str,
                kind: type[WriteError] = WriteError) -> WriteError:
    """The one line for a failed write into `folder` of `needed` bytes: `what` failed, why, how much
    room there is, and `after` (what survived and how to go on)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    elif free < needed:
        reason = os.strerror(errno.ENOSPC)
    else:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"
    return kind(f"{what} failed ({reason}): {folder} needs {_bytes(needed)} for it and has {_bytes(free)} free; "
                f"{after}")


@contextlib.contextmanager
def disk_write(folder: str | Path, needed: int, what: str, after: str) -> Iterator[None]:
    """Runs its block; a failed write inside becomes write_error's one line."""
    try:
        yield
    except BaseException as e:
        if not failed_write(e):
            raise
        raise write_error(e, folder, needed, what, after) from None


def replace_file(path: Path, contents: str | bytes, after: str) -> None:
    """Write `path` whole or not at all: into a .tmp beside it, then renamed over it. A failed
    write removes the .tmp and leaves the previous file as it was (WriteError)."""
    data = contents.encode() if isinstance(contents, str) else contents
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_write(path.parent, len(data), f"writing {path.name}", after):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_png(path: Path, figure: Any, dpi: int, after: str) -> None:
    """A matplotlib figure saved as `path` by replace_file (whole or not at all), then closed."""
    import matplotlib.pyplot as plt
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi)
    plt.close(figure)
    replace_file(path, image.getvalue(), after)


def _bytes(n: int) -> str:
    """1,234,567 bytes (1.2 MiB): exact, and readable at a glance."""
    scaled, unit = float(n), ""
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, bigger
    return f"{n:,} bytes ({scaled:.1f} {unit})" if unit else f"{n:,} bytes"


@dataclass(frozen=True)
class Bounds:
    """The range a numeric field must lie in: ge/le are inclusive ends, gt/lt exclusive (pydantic's
    names, so the HTTP schema takes them as they are). Floats must also be finite."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The rule in words: "must be positive", "must lie in (0, 1]", ..."""
        low, opening = (self.ge, "[") if self.gt is None else (self.gt, "(")
        high, closing = (self.le, "]") if self.lt is None else (self.lt, ")")
        if low is not None and high is not None:
            return f"must lie in {opening}{_number(low)}, {_number(high)}{closing}"
        if high is not None:
            return f"must be at most {_number(high)}" if closing == "]" else f"must be below {_number(high)}"
        if low == 0:
            return "must be positive" if opening == "(" else "must not be negative"
        return f"must be at least {_number(low)}" if opening == "[" else f"must be greater than {_number(low)}"

    def as_kwargs(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Seeds go to torch.manual_seed and numpy's generators, which take 64-bit values.
MAX_SEED = 2**63 - 1


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _field(default: Any, help: str, **bounds: float) -> Any:
    return field(default=default, metadata={"help": help, "bounds": Bounds(**bounds)})


def bounds_of(section: type, key: str) -> Bounds:
    """The declared range of a config field (unbounded when it declares none)."""
    return next(f.metadata["bounds"] for f in dataclasses.fields(section) if f.name == key)


def check_fields(obj: Any, section: str) -> None:
    """Every numeric field of a config section finite and inside its declared bounds."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name}={value} must be a finite number")
        if not f.metadata["bounds"].admits(value):
            raise ConfigError(f"{section}.{f.name}={value} {f.metadata['bounds'].describe()}")


DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (Apple GPUs); auto takes cuda, then mps, then cpu"


def check_device(key: str, value: str) -> None:
    """A device name devices.resolve understands (whether this machine has it is checked there)."""
    if not (value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value)):
        raise ConfigError(f"{key}={value!r} is not one of auto, cpu, cuda, cuda:N, mps")


@dataclass
class ModelConfig:
    vocab_size: int = _field(32000, "number of token ids the embedding and LM head cover", gt=0)
    dim: int = _field(288, "width of the residual stream", gt=0)
    n_layers: int = _field(6, "number of transformer blocks", gt=0)
    n_heads: int = _field(6, "number of query heads", gt=0)
    n_kv_heads: int | None = _field(None, "number of key/value heads (none = n_heads; 1 = MQA)", gt=0)
    head_dim: int | None = _field(None, "width of one attention head (none = dim / n_heads)", gt=0)
    hidden_dim: int | None = _field(None, "SwiGLU hidden width (none = 2/3 * 4 * dim rounded up to multiple_of)", gt=0)
    multiple_of: int = _field(32, "round the derived SwiGLU hidden width up to a multiple of this", gt=0)
    norm_eps: float = _field(1e-5, "epsilon inside RMSNorm", gt=0)
    max_seq_len: int = _field(256, "longest sequence the model (and its KV cache) handles", gt=0)
    rope_theta: float = _field(10000.0, "RoPE base frequency", gt=0)
    rope_scaling: Literal["none", "llama3"] = _field("none", "RoPE frequency scaling scheme")
    rope_scaling_factor: float = _field(8.0, "llama3 scaling: how much longer the context becomes", gt=0)
    rope_low_freq_factor: float = _field(1.0, "llama3 scaling: wavelengths above original/low are fully scaled", gt=0)
    rope_high_freq_factor: float = _field(4.0, "llama3 scaling: wavelengths below original/high are kept", gt=0)
    rope_original_max_seq_len: int = _field(8192, "llama3 scaling: context length the model was trained on", gt=0)
    tie_embeddings: bool = _field(False, "share the token embedding with the LM head")
    attention: Literal["sdpa", "reference"] = _field("sdpa", "attention kernel: sdpa (FlashAttention on CUDA) or the readable reference")
    init_std: float = _field(0.02, "std of the normal init (residual projections are scaled by 1/sqrt(2*n_layers))", gt=0)

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> None:
        """Check every field; an unset n_kv_heads becomes n_heads (MHA) and an unset head_dim
        dim / n_heads, so after validation both always hold the model's numbers."""
        check_fields(self, "model")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        named = "model.head_dim" if self.head_dim is not None else "model.dim/model.n_heads"
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: "
                                  f"choose dim as a multiple of n_heads (or set model.head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"{named}={self.head_dim} is odd: RoPE rotates pairs, so the head dim must be even")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}: "
                              f"use a divisor of n_heads (1 = MQA, n_heads = MHA)")
        if self.rope_scaling == "llama3":
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ConfigError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be greater than "
                                  f"model.rope_low_freq_factor={self.rope_low_freq_factor}")


@dataclass
class DataConfig:
    dataset: str = _field("shakespeare_char", "dataset name; its files live in data_dir/<dataset>/")
    data_dir: str = _field("data", "folder that holds prepared datasets")
    source: str | None = _field(None, "local path or URL of a named dataset's raw file (none = its official download)")
    input: str | None = _field(None, "your own corpus: a .txt, .jsonl(.gz/.zst) or .parquet file, a folder of them, a "
                                     "glob, or hf:NAME[:CONFIG] for a Hugging Face dataset (streamed)")
    sha256: str | None = _field(None, "expected sha256 of the downloaded or --data.source file (none = the dataset's own)")
    tokenizer: str = _field("char", "char or bpe (trained on the corpus; named datasets fix which), or a Hugging Face "
                                    "tokenizer folder (tokenizer.json [+ tokenizer_config.json]) to use as it is")
    vocab_size: int = _field(4096, "BPE vocabulary size (ignored for char)", gt=0)
    chat: bool = _field(False, "BPE: also learn chat turn markers and carry a Llama 3-style chat template, for "
                               "conversation data (from-scratch chat models)")
    bpe_train_bytes: int = _field(100_000_000, "BPE merges are learned from at most this many bytes of the corpus", gt=0)
    val_fraction: float = _field(0.1, "share of the corpus held out for validation", gt=0, lt=1)
    workers: int = _field(2, "tokenizer processes", gt=0)
    text_field: str = _field("text", "the field of .jsonl, .parquet and Hugging Face rows that holds a document's text")
    shard_documents: int = _field(0, "0: one train.bin and val.bin; N: shards of N documents each (train_000000.bin, "
                                     "val_000000.bin, ...), for corpora larger than memory, resumable", ge=0)
    shard_range: str | None = _field(None, "START:END: prepare only shards START to END-1 (several machines, one "
                                           "shared folder; none = all)")

    def validate(self) -> None:
        check_fields(self, "data")
        if self.shard_range is not None:
            self.shard_span()

    def shard_span(self) -> tuple[int, int | None]:
        """The shards this run prepares, as (first, end): end is None for all the rest of the corpus."""
        if self.shard_range is None:
            return 0, None
        start, colon, end = self.shard_range.partition(":")
        if not (colon and start.isdigit() and end.isdigit() and int(start) <= int(end)):
            raise ConfigError(f"data.shard_range={self.shard_range!r} is not START:END with 0 <= START <= END "
                              f"(shards START to END-1): write e.g. 0:50")
        if not self.shard_documents:
            raise ConfigError(f"data.shard_range={self.shard_range} needs shards: set --data.shard_documents N "
                              f"(documents per shard) too")
        return int(start), int(end)


@dataclass
class TrainConfig:
    out_dir: str = _field("out", "folder for checkpoints, logs and plots")
    seed: int = _field(1337, "seed for init, batches and dropout-free sampling", ge=0, le=MAX_SEED)
    device: str = _field("auto", DEVICE_HELP)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", "autocast dtype (auto: bf16 on CUDA GPUs that support it, else fp16; fp32 on CPU and MPS)")
    compile: Literal["auto"] | bool = _field("auto", "torch.compile the model (auto: try, fall back to eager; off on MPS)")
    batch_tokens: int = _field(16384, "global batch in tokens (micro_batch_size * block_size * accumulation * world)", gt=0)
    micro_batch_size: int = _field(32, "sequences per forward/backward pass on one process", gt=0)
    block_size: int = _field(256, "training sequence length (at most model.max_seq_len)", gt=0)
    max_steps: int = _field(5000, "optimizer steps to train for", gt=0)
    optimizer: Literal["adamw", "muon"] = _field(
        "adamw", "adamw (decay on 2-D weights only), or muon for the 2-D weights inside the blocks and adamw for "
        "the embedding, LM head and norm gains")
    lr: float = _field(1e-3, "peak learning rate", gt=0)
    min_lr: float = _field(1e-4, "learning rate at the end of the decay", ge=0)
    lr_schedule: Literal["cosine", "wsd", "constant"] = _field("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = _field(100, "linear warmup steps", ge=0)
    decay_fraction: float = _field(0.2, "WSD: share of max_steps spent in the final decay", ge=0, le=1)
    weight_decay: float = _field(0.1, "AdamW weight decay (2-D weights only)", ge=0)
    beta1: float = _field(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _field(0.95, "AdamW beta2", ge=0, lt=1)
    muon_lr: float = _field(0.02, "Muon: peak learning rate of the block matrices (its floor is muon_lr * min_lr / lr)",
                            gt=0)
    muon_lr_schedule: Literal["same", "cosine", "wsd", "constant"] = _field(
        "same", "Muon: schedule after the shared warmup (same = lr_schedule's)")
    muon_momentum: float = _field(0.95, "Muon: Nesterov momentum", ge=0, lt=1)
    muon_weight_decay: float = _field(0.0, "Muon: decoupled weight decay of the block matrices", ge=0)
    grad_clip: float = _field(1.0, "clip the global grad norm to this (0 = off)", ge=0)
    eval_interval: int = _field(250, "evaluate every this many steps", gt=0)
    eval_iters: int = _field(20, "batches per split in each evaluation", gt=0)
    log_interval: int = _field(10, "log every this many steps", gt=0)
    ckpt_interval: int = _field(1000, "checkpoint every this many steps (also at the end)", gt=0)
    keep_last: int = _field(2, "how many recent checkpoints to keep (the best one too; at least 2, so a failed write "
                         "never leaves zero good ones)", ge=2)
    max_nonfinite_skips: int = _field(5, "stop after this many consecutive non-finite steps", gt=0)
    peak_tflops: float | None = _field(None, "peak TFLOP/s for MFU (none = a table for known GPUs, a measured matmul on CPU)", gt=0)
    init_from: str | None = _field(None, "Hugging Face Llama folder (or one of our checkpoints) to fine-tune from")
    parallel: Literal["ddp", "fsdp"] = _field(
        "ddp", "under torchrun: ddp (each process holds the whole model and optimizer) or fsdp (FSDP2: parameters, "
               "gradients and optimizer state sharded over the processes, for models too large for one device)")
    activation_checkpointing: bool = _field(
        False, "keep only each block's input and recompute the rest in the backward pass: much less activation "
               "memory for about a quarter more compute")
    long_conversations: Literal["truncate", "skip"] = _field(
        "truncate", "conversation data: a conversation longer than block_size + 1 tokens is cut to its start, or "
                    "never drawn (the count is printed at start)")
    lora_rank: int = _field(0, "LoRA: rank of the adapters trained on the frozen --init_from model (0 = full "
                               "fine-tuning; needs requirements-lora.txt)", ge=0)
    lora_alpha: float = _field(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank", gt=0)
    lora_dropout: float = _field(0.0, "LoRA: dropout on the adapters' input", ge=0, lt=1)
    lora_targets: str = _field("q_proj,k_proj,v_proj,o_proj", "LoRA: comma-separated projections to adapt (of "
                               "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head)")
    resume: str | None = _field(None, "resume from 'latest' in out_dir or from a checkpoint folder (--resume [PATH])")
    overwrite: bool = _field(False, "start afresh in an out_dir that holds another run (--overwrite)")
    wandb: Literal["off", "offline", "online"] = _field("off", "Weights & Biases logging mode")
    wandb_project: str = _field("nanollama", "W&B project")
    wandb_run_name: str | None = _field(None, "W&B run name (none = derived from out_dir)")
    wandb_group: str | None = _field(None, "W&B group (sweeps set this)")

    def validate(self) -> None:
        check_fields(self, "train")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}: "
                              f"shorten the warmup or train longer")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}")
        check_device("train.device", self.device)
        if self.lora_rank and not self.init_from:
            raise ConfigError("train.lora_rank is set but train.init_from is not: LoRA adapts a pretrained model, "
                              "so give --init_from DIR (or set lora_rank 0 for full training)")
        if self.lora_rank and self.optimizer == "muon":
            raise ConfigError("train.lora_rank with train.optimizer=muon: LoRA's rank-r matrices are no hidden "
                              "projections for Muon to orthogonalize; use adamw")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise ConfigError("train.parallel=fsdp with train.optimizer=muon: Muon orthogonalizes whole matrices, "
                              "which FSDP splits across processes; use adamw, or parallel=ddp")
        if self.parallel == "fsdp" and self.lora_rank:
            raise ConfigError("train.parallel=fsdp with train.lora_rank: LoRA trains too few weights to need "
                              "sharding; use parallel=ddp")
        if self.parallel == "fsdp" and self.dtype == "float16":
            raise ConfigError("train.parallel=fsdp with train.dtype=float16: fp16 needs loss scaling, which the "
                              "sharded gradients do not get here; use bfloat16 or float32")
        if self.lora_rank and not self.lora_target_list():
            raise ConfigError("train.lora_targets is empty: name the projections to adapt, e.g. q_proj,v_proj")

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


@dataclass
class SampleConfig:
    checkpoint: str | None = _field(None, "checkpoint or run folder, Hugging Face Llama folder, or llama2.c .bin")
    prompt: str = _field("", "text to continue (empty = start from BOS)")
    prompt_file: str | None = _field(None, "read the prompt from this file ('-' = stdin)")
    prompt_ids: str | None = _field(None, "prompt as token ids, e.g. '1 403 9' ('1 5; 1 7 8' = two prompts in one batch)")
    batch_lines: bool = _field(False, "each non-empty line of the prompt is its own prompt; all decode as one batch")
    truncate: Literal["none", "left"] = _field("none", "none = refuse a prompt longer than the context; left = cut its start so max_new_tokens fit")
    max_new_tokens: int = _field(256, "tokens to generate per sample", gt=0)
    temperature: float = _field(0.8, "softmax temperature (0 = greedy)", ge=0, le=2)
    top_k: int = _field(0, "keep only the k most likely tokens (0 = off)", ge=0)
    top_p: float = _field(1.0, "nucleus sampling: keep the smallest set reaching this mass (1 = off)", gt=0, le=1)
    min_p: float = _field(0.0, "drop tokens below min_p times the top probability (0 = off)", ge=0, lt=1)
    repetition_penalty: float = _field(1.0, "Hugging Face-style repetition penalty over prompt and output (1 = off)", gt=0, le=2)
    num_samples: int = _field(1, "samples per prompt", gt=0)
    seed: int = _field(1337, "sampling seed: each (prompt, sample) pair draws from its own stream derived from it",
                       ge=0, le=MAX_SEED)
    eos: str = _field("auto", "end-of-sequence token ids, e.g. '2' or '2,32000' (auto = the checkpoint's; none = off)")
    stop: str | None = _field(None, "stop string, or a JSON list of them, e.g. '[\"\\n\\n\", \"The end\"]'")
    stream: Literal["auto"] | bool = _field("auto", "print tokens as they come (auto: when stdout is a terminal)")
    json: bool = _field(False, "print one JSON object per sample: prompt, text, token ids, finish reason, tokens/s")
    compile: bool = _field(False, "torch.compile the one-token decoding step: compiling takes seconds, so it pays "
                                  "off for long generations and servers (app.py), not for one short sample")
    device: str = _field("auto", DEVICE_HELP)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", "weights and KV cache dtype (auto: bf16 on CUDA GPUs that support it, else fp32)")
    draft: str | None = _field(None, "a smaller checkpoint with the same tokenizer that drafts tokens for the model "
                                     "to verify (speculative decoding: the output still follows the model)")
    draft_tokens: int = _field(4, "tokens the draft proposes per round (speculative decoding)", ge=1, le=64)
    chat: bool = _field(False, "chat interactively (needs a tokenizer with a chat template): /reset starts over, "
                               "/exit (or Ctrl-D) leaves; the conversation stays in the KV cache between turns")
    system: str | None = _field(None, "--chat: the system prompt")
    quantize: Literal["none", "int8"] = _field(
        "none", "int8 = weight-only int8 with one scale per output channel (a quarter of fp32's weight bytes); "
                "pays off compiled (--compile), where the conversion fuses into the matmuls; without it, "
                "decoding keeps the float weights and says so")

    def validate(self) -> None:
        check_fields(self, "sample")
        given = [key for key in ("prompt", "prompt_file", "prompt_ids") if getattr(self, key)]
        if len(given) > 1:
            raise ConfigError(f"sample.{given[0]} and sample.{given[1]} are both set: give the prompt one way")
        check_device("sample.device", self.device)
        self.eos_ids(), self.stop_strings(), self.prompt_id_lists()  # each raises on a malformed value

    def eos_ids(self) -> list[int] | None:
        """The configured end-of-sequence ids; None = take them from the checkpoint."""
        if self.eos == "auto":
            return None
        if self.eos == "none":
            return []
        try:
            return [int(i) for i in self.eos.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"sample.eos={self.eos!r} must be auto, none or token ids like '2' or '2,32000'") from None

    def stop_strings(self) -> list[str]:
        if not self.stop:
            return []
        if not self.stop.startswith("["):
            return [self.stop]
        try:
            stops = json.loads(self.stop)
        except json.JSONDecodeError:
            stops = None
        if not (isinstance(stops, list) and stops and all(isinstance(s, str) and s for s in stops)):
            raise ConfigError(f"sample.stop={self.stop!r} starts with '[' but is no JSON list of non-empty strings, "
                              f"e.g. '[\"\\n\\n\", \"The end\"]'")
        return stops

    def prompt_id_lists(self) -> list[list[int]]:
        """sample.prompt_ids as one list of ids per prompt ([] when unset)."""
        if self.prompt_ids is None:
            return []
        try:
            return [[int(i) for i in part.replace(",", " ").split()] for part in self.prompt_ids.split(";")]
        except ValueError:
            raise ConfigError(f"sample.prompt_ids={self.prompt_ids!r} must be integers, e.g. '1 403 9' "
                              f"(';' separates prompts)") from None


@dataclass
class ServeConfig:
    host: str = _field("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to every network it can reach)")
    port: int = _field(7860, "TCP port", ge=1, le=65535)
    model_name: str | None = _field(None, "model id the API answers to (default: the checkpoint's folder or file name)")
    max_prompt_tokens: int = _field(0, "longest prompt a request may send, in tokens (0 = the model's context)", ge=0)
    max_tokens: int = _field(512, "most new tokens a request may ask for", gt=0)
    max_choices: int = _field(32, "most completions in one request (prompts x n)", gt=0)
    max_batch: int = _field(8, "slots: completions decoded at once, all requests together (docs/serving.md)",
                            ge=1, le=256)
    max_queue: int = _field(64, "completions that may wait for a slot; past that a request gets a 429", ge=0)
    prefill_chunk: int = _field(256, "most prompt tokens read per step while other slots decode", ge=1)

    def validate(self) -> None:
        check_fields(self, "serve")


@dataclass
class EvalConfig:
    checkpoint: str | None = _field(None, "checkpoint to score: anything generate.py's --checkpoint takes (also the first argument)")
    data: str | None = _field(None, "a UTF-8 text file (or a prepare_data.py folder: its val split) to score: loss, "
                                    "perplexity and bits per byte over all of it (in train.py: at every evaluation)")
    task: str | None = _field(None, "a multiple-choice task: hellaswag, or a .jsonl file of {\"context\", \"choices\", \"label\"} rows")
    source: str | None = _field(None, "hellaswag's validation file (hellaswag_val.jsonl) on disk (none = download "
                                      "it once into data/downloads/, checked against its published git blob id)")
    window: int = _field(0, "tokens a scoring window holds (0 = the context the model was trained on)", ge=0)
    stride: int = _field(0, "new tokens scored per window after the first; each has at least window - stride tokens "
                            "before it (0 = window // 2)", ge=0)
    batch_size: int = _field(4, "windows or choices per forward", gt=0)
    limit: int = _field(0, "score only the first N multiple-choice examples (0 = all)", ge=0)
    device: str = _field("auto", DEVICE_HELP)
    dtype: Literal["float32", "bfloat16"] = _field("float32", "weights' dtype while scoring")
    json: str | None = _field(None, "also write the results to this JSON file")

    def validate(self) -> None:
        check_fields(self, "eval")
        check_device("eval.device", self.device)
        if self.window and self.stride > self.window:
            raise ConfigError(f"eval.stride={self.stride} exceeds eval.window={self.window}: a window cannot move "
                              f"further than it reaches")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # The dotted keys a TOML file or the command line set, as opposed to defaults: --init_from keeps
    # the model's own context and RoPE unless these name them, and generate.py the model's own
    # sampling defaults unless they name those.
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    def validate(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()
        context_from_model = self.train.init_from and "model.max_seq_len" not in self.explicit
        if self.train.block_size > self.model.max_seq_len and not context_from_model:
            raise ConfigError(f"train.block_size={self.train.block_size} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}: raise max_seq_len or shorten the block")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}


SECTIONS = ("model", "data", "train", "sample", "serve", "eval")


# ---------------------------------------------------------------------------------------------
# Typing values from the field annotations


def _describe(tp: Any) -> str:
    """Human words for a field type, used in error messages and --help."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return {int: "int", float: "float", bool: "true | false", str: "string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a TOML value or CLI string to `tp`; raise ValueError when it does not fit."""
    from_cli = isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_cli and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        for option in typing.get_args(tp):
            try:
                if _coerce(value, type(option)) == option:
                    return option
            except ValueError:
                continue
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            return int(value.replace("_", ""))
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and value.lower() not in ("nan", "inf", "-inf", "+inf"):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported config type {tp}")


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(typing.get_type_hints(Config)[section])


ALL_KEYS = [f"{s}.{k}" for s in SECTIONS for k in typing.get_type_hints(typing.get_type_hints(Config)[s])]


def _set(cfg: Config, dotted: str, value: Any) -> None:
    if dotted not in ALL_KEYS:
        close = difflib.get_close_matches(dotted, ALL_KEYS, n=1, cutoff=0.5)
        if not close:  # a right key in the wrong section, or without one, still deserves a hint
            by_name = {k.split(".")[1]: k for k in reversed(ALL_KEYS)}
            close = [by_name[k] for k in difflib.get_close_matches(dotted.split(".")[-1], by_name, n=1, cutoff=0.7)]
        hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list every key"
        raise ConfigError(f"unknown config key '{dotted}'{hint}")
    section, key = dotted.split(".")
    tp = _field_types(section)[key]
    try:
        coerced = _coerce(value, tp)
    except ValueError:
        raise ConfigError(f"bad value for {dotted}: {value!r} (expected {_describe(tp)})") from None
    setattr(getattr(cfg, section), key, coerced)
    cfg.explicit.add(dotted)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pick one from configs/")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file, or a ConfigError that names the file and what is wrong."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): restore the file or re-create it") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not the object it should")
    return value


def build_config(toml_data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML tables, then `--section.key value` overrides; validated."""
    cfg = Config()
    for section, table in (toml_data or {}).items():
        if not isinstance(table, dict):
            _set(cfg, section, table)  # a key outside any [section]: reported as unknown, with a hint
        for key, value in table.items():
            _set(cfg, f"{section}.{key}", value)
    for dotted, value in parse_overrides(overrides or []):
        _set(cfg, dotted, value)
    cfg.validate()
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--a.b value`, `--a.b=value` (also W&B agent style) into (key, raw string) pairs."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value: write {arg} VALUE or {arg}=VALUE")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML; loading it back gives the same config."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def help_text(prog: str, sections: tuple[str, ...] = SECTIONS) -> str:
    cfg = Config()
    lines = [f"usage: python {prog} [CONFIG.toml] [--section.key value ...] [--print-config] [--help]", ""]
    for section in sections:
        lines.append(f"[{section}]")
        types_ = _field_types(section)
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            default = "none" if value is None else _toml_value(value)
            lines.append(f"  --{section}.{f.name:<26} {default:<14} ({_describe(types_[f.name])}) "
                         f"{f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


def expand_short_flags(argv: list[str], sections: tuple[str, ...]) -> list[str]:
    """Let a script's own sections drop their prefix: `--top_k 5` -> `--sample.top_k 5` (the first
    of `sections` holding the key), and a bare boolean flag (`--json`) -> `--sample.json true`."""
    types_ = {f"{s}.{k}": tp for s in sections for k, tp in _field_types(s).items()}
    short: dict[str, str] = {}
    for dotted in types_:
        short.setdefault(dotted.split(".")[1], dotted)
    out = []
    for i, arg in enumerate(argv):
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        dotted = name if name in types_ else short.get(name)
        if dotted is None:
            out.append(arg)
            continue
        out.append("--" + dotted + arg[2 + len(name):])
        is_bool = types_[dotted] is bool or bool in typing.get_args(types_[dotted])
        if is_bool and "=" not in arg and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def parse_cli(argv: list[str] | None = None, prog: str = "script.py",
              sections: tuple[str, ...] = SECTIONS) -> Config:
    """The command line of every script: an optional TOML path, then overrides.

    Config errors raise ConfigError; --help and --print-config print and exit with status 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(prog, sections))
        raise SystemExit(0)
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    toml_data = load_toml(argv.pop(0)) if argv and not argv[0].startswith("--") else {}
    cfg = build_config(toml_data, argv)
    if print_config:
        print(to_toml(cfg))
        raise SystemExit(0)
    return cfg
