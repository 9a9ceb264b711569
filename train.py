"""Train a Llama on a dataset written by prepare_data.py.

    python train.py configs/shakespeare_char_cpu.toml [--section.key value ...]
    python train.py configs/shakespeare_char_cpu.toml --resume            # continue from out_dir/latest
    torchrun --nproc_per_node 2 train.py configs/shakespeare_char_cpu.toml

A resumed run is the run that never stopped: batches are a function of (seed, step, rank,
micro-step), the LR a function of the step, and every RNG state travels in the checkpoint, so on
CPU in fp32 the per-step losses are bit-identical. Exit codes: 0 done, 2 bad input,
3 interrupted by SIGTERM/SIGINT (checkpoint saved; --resume continues), 4 stopped after repeated
non-finite steps (last good state saved).

The file reads top down: the run and its loop, one function per step; the LR schedules; setting
up a run (its out_dir is claimed by checkpoint.RunFolder); then the plumbing: device and
processes, RNG state, the records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import checkpoint
import data
import devices
from config import (Config, ConfigError, TrainConfig, build_config, disk_write, load_toml, parse_cli, replace_file,
                    replace_png, script, to_toml)
from eval import TrainingEval, training_eval
from model import Llama
from muon import Muon
from tokenizer import Tokenizer

EXIT_INTERRUPTED = 3
EXIT_NONFINITE = 4
# Dense bf16 tensor-core peaks, for MFU on GPUs we know; anything else is measured.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0, "4090": 165.0}


def warn(message: str) -> None:
    """One line on stderr (Python's warnings would add a second line of source)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run: its state, the loop, then one function per step of the recipe


@dataclasses.dataclass
class Run:
    """What the loop needs: what start_run sets up, then the state carried from one step to the next."""
    cfg: Config
    runtime: Runtime
    folder: checkpoint.RunFolder  # out_dir, and the previous run --overwrite replaces
    model: Llama  # the weights: what is saved, clipped and evaluated
    optimizers: dict[str, torch.optim.Optimizer]  # by name: AdamW, and Muon when configured
    scaler: torch.amp.GradScaler
    train_batches: data.BatchSampler | data.ConversationSampler
    val_batches: data.BatchSampler | data.ConversationSampler
    accum: int  # micro-batches per optimizer step on each process
    trained_context: int  # the longest window the weights have learned from (sampling stays inside)
    carried: dict[str, bytes]  # tokenizer files and generation_config.json every checkpoint carries
    adapters: Any = None  # LoRA: peft's wrapper around `model`, whose adapters are all that trains and is saved
    tasks: TrainingEval | None = None  # [eval] data and tasks, scored at each evaluation (shared out under torchrun)
    # The loop's state: restore() takes it from a checkpoint, the steps move it on.
    step: int = 0  # optimizer steps taken
    best_val: float = math.inf
    nonfinite_streak: int = 0
    wandb_id: str | None = None
    wandb_run: Any = None
    resumed_from: Path | None = None
    eval_unrecorded: bool = False  # resumed at an evaluation step whose evaluation was never recorded
    compiled: bool = False  # step_model runs torch.compile'd code
    # What trains: the model, compiled (see compile_for_training) and/or wrapped in DDP; set once
    # the weights are restored.
    step_model: torch.nn.Module = dataclasses.field(init=False)

    @property
    def out_dir(self) -> Path:
        return self.folder.path

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return self.accum * tc.micro_batch_size * tc.block_size * self.runtime.world


@dataclasses.dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    applied: bool  # False: the loss or gradient was not finite and the update was skipped
    seconds: float


def train(cfg: Config) -> int:
    """Run the configured training; returns the process exit code."""
    run = start_run(cfg)
    with run.folder.previous_run_restored_on_failure():
        return train_loop(run)


def train_loop(run: Run) -> int:
    """The recipe: step, log, checkpoint, evaluate, until max_steps or a signal."""
    tc = run.cfg.train
    flops_per_token, peak = start_logging(run)
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=not run.runtime.is_main, dynamic_ncols=True, unit="step")
    with StopRequest() as stop, bar:
        exit_code = 0
        run.step_model.train()
        if run.resumed_from is not None and on_any_rank(run, run.eval_unrecorded):  # main knows; all evaluate
            log_eval(run, evaluate(run), run.resumed_from, bar)
        while run.step < tc.max_steps:
            result = train_step(run)
            log_step(run, result, flops_per_token, peak, bar)
            if run.nonfinite_streak >= tc.max_nonfinite_skips:
                ckpt = save_checkpoint(run)
                if run.runtime.is_main:
                    print(f"error: {run.nonfinite_streak} consecutive non-finite steps; no update was applied on "
                          f"them and the weights in {ckpt} are the last good state. Likely causes: learning rate "
                          f"too high (train.lr), fp16 overflow (use bf16 or float32), or bad data.", file=sys.stderr)
                exit_code = EXIT_NONFINITE
                break
            eval_now = run.step % tc.eval_interval == 0 or run.step == tc.max_steps
            stopping = on_any_rank(run, stop.signal is not None)
            if stopping or eval_now or run.step % tc.ckpt_interval == 0:
                ckpt = save_checkpoint(run)  # before an evaluation that may crash
                if stopping:
                    run.runtime.log(f"\nstopped by signal {stop.signal} at step {run.step}; checkpoint saved, "
                                    f"continue with --resume")
                    exit_code = EXIT_INTERRUPTED
                    break
            if eval_now:
                log_eval(run, evaluate(run), ckpt, bar)
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if run.runtime.distributed:  # leave together: a rank that exits while another still talks can abort
        dist.barrier()
        dist.destroy_process_group()
    return exit_code


def train_step(run: Run) -> StepResult:
    """One optimizer step: LR, gradients, clipping, and the update unless something is not finite."""
    tc, start = run.cfg.train, time.perf_counter()
    lr = lr_at(run.step, tc)
    for name, optimizer in run.optimizers.items():
        for group in optimizer.param_groups:
            group["lr"] = LR_SCHEDULES[name](run.step, tc)
    try:
        loss = accumulate_gradients(run)
    except Exception as e:  # compile="auto": a model dynamo cannot handle still trains, eagerly
        if tc.compile != "auto" or not run.compiled:
            raise
        warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); continuing eagerly")
        zero_grads(run)
        run.compiled = False
        run.step_model = wrap_for_training(uncompiled(run.model), run.runtime)
        loss = accumulate_gradients(run)
    for optimizer in run.optimizers.values():
        run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else
                                               float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards
        grad_norm = grad_norm.full_tensor()
    loss_value, grad_norm_value = loss.item(), grad_norm.item()
    # Under fp16 loss scaling an overflowing gradient is routine (the scaler skips and backs
    # off); anywhere else a non-finite value means the step would poison the weights.
    finite = math.isfinite(loss_value) and (run.scaler.is_enabled() or math.isfinite(grad_norm_value))
    if finite:
        for optimizer in run.optimizers.values():
            run.scaler.step(optimizer)
        run.scaler.update()
        run.nonfinite_streak = 0
    else:
        run.nonfinite_streak += 1
        warn(f"step {run.step}: non-finite loss {loss_value} or grad norm {grad_norm_value}; "
             f"skipping the update ({run.nonfinite_streak}/{tc.max_nonfinite_skips})")
    zero_grads(run)
    run.step += 1
    return StepResult(loss_value, grad_norm_value, lr, finite, time.perf_counter() - start)


def accumulate_gradients(run: Run) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; returns the mean loss over processes."""
    runtime, accum = run.runtime, run.accum
    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(accum):
        # Each global micro-batch index (micro * world + rank) draws the same window whatever
        # the world size, so 2 processes x accumulation A equal 1 process x accumulation 2A.
        x, y = run.train_batches.get(run.step, micro * runtime.world + runtime.rank)
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        sync = micro == accum - 1 or runtime.world == 1
        if runtime.sharded:  # FSDP keeps the micro-batches' gradients unsharded until the last one
            run.model.set_requires_gradient_sync(sync)
        no_sync = contextlib.nullcontext() if sync or runtime.sharded else run.step_model.no_sync()
        with no_sync, runtime.autocast():
            _, loss = run.step_model(x, y)
            loss = loss / accum
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    if runtime.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum


def zero_grads(run: Run) -> None:
    for optimizer in run.optimizers.values():
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean loss over the same eval_iters batches of each split at every evaluation, and on the
    main process the scores of [eval] data and task when set (eval.py's, with the live weights)."""
    runtime, tc = run.runtime, run.cfg.train
    run.step_model.eval()
    losses = {}
    for split, sampler in (("train", run.train_batches), ("val", run.val_batches)):
        total = torch.zeros((), device=runtime.device)
        for i in range(tc.eval_iters):
            x, y = sampler.get_eval(i * runtime.world + runtime.rank)
            with runtime.autocast():
                total += run.model(x.to(runtime.device), y.to(runtime.device))[1].float()
        if runtime.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        losses[split] = total.item() / tc.eval_iters
    if run.tasks is not None:  # every process scores its share of the windows and examples
        # ...except under FSDP, where every forward is a collective that all processes must
        # make: each scores them all.
        if runtime.sharded:
            share = (0, 1, lambda values: values)
        else:
            share = (runtime.rank, runtime.world, functools.partial(sum_over_processes, runtime))
        with runtime.autocast():
            losses |= run.tasks.scores(*share)
    run.step_model.train()
    return losses


def sum_over_processes(runtime: Runtime, values: list[float]) -> list[float]:
    """Each value summed over all processes (in float64, so counts and sums stay exact)."""
    if runtime.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(total)
    return total.tolist()


def save_checkpoint(run: Run) -> Path:
    """Every process writes its shard of the optimizer state; the main one writes the rest: the
    weights whole (gathered first under FSDP), so every checkpoint is a plain model folder."""
    runtime = run.runtime
    state = {"step": run.step, "optimizers": list(run.optimizers),
             "scaler": run.scaler.state_dict(), "rng": rng_state(), "best_val_loss": run.best_val,
             "wandb_run_id": run.wandb_id or ""}
    gathered = checkpoint.full_state_dict(run.model) if runtime.sharded else None  # all processes take part

    def write_weights(folder: Path) -> None:
        if run.adapters is not None:
            base = checkpoint.resolve(Path(run.cfg.train.init_from))
            checkpoint.save_lora(run.adapters, folder, base, run.trained_context)
        else:
            checkpoint.save_hf(run.model, folder, run.trained_context, gathered)

    with checkpoint.writing(run.out_dir, run.step, runtime.is_main, runtime.barrier,
                            needed=checkpoint_bytes(run)) as folder:
        checkpoint.save_optimizer(run.model, list(run.optimizers.values()), folder, runtime.distributed)
        if runtime.is_main:
            checkpoint.write_contents(folder, state, to_toml(run.cfg), run.carried, write_weights)
    if runtime.is_main:
        checkpoint.prune(run.out_dir, run.cfg.train.keep_last)
        if run.adapters is not None:
            checkpoint.link_adapters(run.out_dir)
        run.folder.checkpoint_saved()
    return checkpoint.checkpoint_path(run.out_dir, run.step)


def checkpoint_bytes(run: Run) -> int:
    """About what one checkpoint takes on disk: the weights (a LoRA run's adapters alone) and the
    optimizer state; the rest (config, tokenizer, RNG) is small beside them."""
    weights = ([p for p in run.model.parameters() if p.requires_grad] if run.adapters is not None
               else list(run.model.state_dict().values()))
    moments = [t for o in run.optimizers.values() for s in o.state.values() for t in s.values()
               if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in weights + moments)


def on_any_rank(run: Run, flag: bool) -> bool:
    """True on every process when `flag` is true on any: under torchrun all ranks must take the
    same branch (stop at the same step, run the same evaluation)."""
    return not on_all_processes(run.runtime, not flag)


def on_all_processes(runtime: Runtime, flag: bool) -> bool:
    """True on every process when `flag` is true on all of them."""
    if runtime.world > 1:
        value = torch.tensor(float(flag), device=runtime.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        flag = bool(value.item())
    return flag


def log_step(run: Run, result: StepResult, flops_per_token: int, peak: float, bar: tqdm) -> None:
    if run.runtime.is_main:
        tokens_per_s = run.tokens_per_step / result.seconds
        mfu = flops_per_token * tokens_per_s / peak
        record = {"kind": "train", "step": run.step, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "step_s": result.seconds, "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "skipped": not result.applied}
        if run.runtime.device.type == "cuda":  # what one process has held on its GPU at most so far
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.runtime.device) / 2**30
        append_metric(run.metrics_path, record)
        if run.wandb_run is not None:
            run.wandb_run.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=run.step)
        if run.step % run.cfg.train.log_interval == 0 or run.step == run.cfg.train.max_steps:
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{100 * mfu:.1f}%")
    bar.update(1)


def log_eval(run: Run, losses: dict[str, float], ckpt: Path, bar: tqdm) -> None:
    """Record an evaluation, move the `best` pointer when val improved, redraw loss.png."""
    if not run.runtime.is_main:
        return
    tasks = {k: v for k, v in losses.items() if k not in ("train", "val")}
    append_metric(run.metrics_path, {"kind": "eval", "step": run.step, "train_loss": losses["train"],
                                     "val_loss": losses["val"], **tasks})
    if losses["val"] < run.best_val:
        run.best_val = losses["val"]
        checkpoint.write_pointer(run.out_dir, "best", ckpt.name)
    if run.wandb_run is not None:
        run.wandb_run.log({"val_loss": losses["val"], "train_loss_eval": losses["train"], **tasks}, step=run.step)
    plot_curves(read_metrics(run.metrics_path), run.out_dir / "loss.png")
    bar.write(f"step {run.step}: train {losses['train']:.4f} | val {losses['val']:.4f} | best val {run.best_val:.4f}"
              + "".join(f" | {k} {v:.4f}" for k, v in tasks.items()))


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the (0-based) step about to be taken.


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:  # (step + 1): the first step already learns
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    # Warmup-stable-decay: hold the peak, then decay linearly to min_lr over the last fraction.
    decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)


def muon_schedule(cfg: TrainConfig) -> TrainConfig:
    """The schedule Muon follows: peak muon_lr, floor scaled like min_lr, its own shape."""
    shape = cfg.lr_schedule if cfg.muon_lr_schedule == "same" else cfg.muon_lr_schedule
    return dataclasses.replace(cfg, lr=cfg.muon_lr, min_lr=cfg.muon_lr * cfg.min_lr / cfg.lr, lr_schedule=shape)


def muon_lr_at(step: int, cfg: TrainConfig) -> float:
    return lr_at(step, muon_schedule(cfg))


# Each optimizer's schedule, by its name in configure_optimizers.
LR_SCHEDULES = {"AdamW": lr_at, "Muon": muon_lr_at}


# ---------------------------------------------------------------------------------------------
# Setting up a run: checks, data, model, optimizers, a resumed run's state, compilation, the log


def start_run(cfg: Config) -> Run:
    """Device and processes, data, model, optimizer, and the state of a resumed run."""
    tc = cfg.train
    runtime = setup_runtime(tc)
    out_dir = Path(tc.out_dir)
    overwrite = checkpoint.check_out_dir(out_dir, resume=tc.resume is not None, overwrite=tc.overwrite)
    dataset_dir = Path(cfg.data.data_dir) / cfg.data.dataset
    train_tokens, val_tokens = data.open_split(dataset_dir, "train"), data.open_split(dataset_dir, "val")
    resume_from = find_resume_checkpoint(cfg, out_dir)
    pretrained = adopt_pretrained_config(cfg, runtime)
    if resume_from is None and pretrained is None:
        fit_vocab_to_data(cfg, train_tokens.vocab_size, runtime)
    # A model comes with its tokenizer: training it on data from another one would train garbage.
    data.check_compatible(train_tokens, val_tokens, model_vocab_size=cfg.model.vocab_size, block_size=tc.block_size,
                          model_tokenizer=model_tokenizer(resume_from, pretrained),
                          padded=data.is_conversations(dataset_dir))
    model, adapters = build_model(cfg, pretrained)
    model.to(runtime.device)
    model.activation_checkpointing = tc.activation_checkpointing
    with machine_main_first(runtime):  # [eval] task hellaswag is downloaded on first use
        tasks = training_eval(cfg.eval, model, Tokenizer.load(dataset_dir), tc.block_size)
    accum = accumulation_steps(tc, runtime.world)
    # Everything is checked: only now may a previous run make way.
    folder = checkpoint.RunFolder.claim(out_dir, overwrite) if runtime.is_main else checkpoint.RunFolder(out_dir)
    runtime.barrier()
    if runtime.distributed:
        check_shared_out_dir(out_dir, runtime)
    if runtime.sharded:
        shard_model(model, runtime)
    optimizers = configure_optimizers(model, tc, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    train_batches, val_batches = batch_samplers(dataset_dir, train_tokens, val_tokens, tc, runtime)
    run = Run(cfg=cfg, runtime=runtime, folder=folder, model=model, optimizers=optimizers, scaler=scaler,
              train_batches=train_batches, val_batches=val_batches, accum=accum,
              trained_context=trained_context(cfg, model, resume_from, pretrained),
              carried=carried_files(dataset_dir, resume_from, pretrained), adapters=adapters, tasks=tasks)
    if resume_from is not None:
        restore(run, resume_from)
    run.compiled = compiles(tc, runtime.device)
    run.step_model = wrap_for_training(compile_for_training(model, runtime) if run.compiled else model, runtime)
    return run


def check_resume_compatible(cfg: Config, ckpt: Path) -> None:
    saved = checkpoint.read_hf_config(ckpt)
    ours = cfg.model
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
    for key in shape:
        if getattr(saved, key) != getattr(ours, key):
            raise ConfigError(f"cannot resume {ckpt}: model.{key} was {getattr(saved, key)}, the config now says "
                              f"{getattr(ours, key)}; a resumed run keeps its model shape")
    saved_train = build_config(load_toml(ckpt / "config.toml")).train
    for key in ("max_steps", "lr", "min_lr", "lr_schedule", "warmup_steps", "decay_fraction"):
        if getattr(saved_train, key) != getattr(cfg.train, key):
            warn(f"resuming with train.{key}={getattr(cfg.train, key)} (was {getattr(saved_train, key)}): "
                 f"the run will no longer equal an uninterrupted one")


def find_resume_checkpoint(cfg: Config, out_dir: Path) -> Path | None:
    """The verified checkpoint --resume names, or None for a fresh run."""
    if cfg.train.resume is None:
        return None
    ckpt = checkpoint.resolve(out_dir if cfg.train.resume == "latest" else cfg.train.resume)
    checkpoint.verify(ckpt)
    if cfg.train.init_from:  # a fine-tune resumes with the model its checkpoint holds, not the folder's again
        cfg.model = checkpoint.read_hf_config(ckpt)
    elif "model.vocab_size" not in cfg.explicit:  # what fit_vocab_to_data chose when the run began
        cfg.model.vocab_size = checkpoint.read_hf_config(ckpt).vocab_size
    check_resume_compatible(cfg, ckpt)
    return ckpt


# Vocabularies are padded to a multiple of 64, as nanoGPT pads GPT-2's 50,257 to 50,304: the head's
# matmuls run faster on such shapes, and the few extra rows cost nothing.
VOCAB_MULTIPLE = 64


def fit_vocab_to_data(cfg: Config, data_vocab: int, runtime: Runtime) -> None:
    """A fresh model far wider than the data's vocabulary (the default 32,000 on a 4,096-id
    tokenizer) starts at loss ln(32,000) and never trains most of its head. Unless the config sets
    model.vocab_size, the model takes the data's size padded to VOCAB_MULTIPLE; a config that sets
    a wider one keeps it, with a warning."""
    padded = -(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if cfg.model.vocab_size <= padded:
        return
    if "model.vocab_size" in cfg.explicit:
        warn(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has {data_vocab} ids: "
             f"{cfg.model.vocab_size - data_vocab} rows of the head will never be trained (set --model.vocab_size "
             f"{padded})")
        return
    runtime.log(f"model.vocab_size={padded}: the data's {data_vocab} ids rounded up to a multiple of {VOCAB_MULTIPLE} "
                f"(the default {cfg.model.vocab_size} would leave {cfg.model.vocab_size - data_vocab} rows untrained)")
    cfg.model.vocab_size = padded


# What --init_from keeps from the pretrained model's config.json unless the config sets it.
PRETRAINED_CONTEXT = ("max_seq_len", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                      "rope_high_freq_factor", "rope_original_max_seq_len")


def adopt_pretrained_config(cfg: Config, runtime: Runtime) -> Path | None:
    """With --init_from DIR (and no checkpoint to resume), the [model] section becomes DIR's
    config.json: its shape always, its context length and RoPE settings unless the config sets
    them. Returns DIR."""
    if not cfg.train.init_from or cfg.train.resume is not None:
        return None
    folder = checkpoint.follow_pointer(cfg.train.init_from)
    if not folder.is_dir():
        raise ConfigError(f"train.init_from={folder} is not a folder: give a Hugging Face Llama folder "
                          f"(config.json + model.safetensors) or one of our checkpoints")
    folder = checkpoint.resolve(folder)
    pretrained = checkpoint.read_hf_config(folder)
    chosen = [key for key in PRETRAINED_CONTEXT if f"model.{key}" in cfg.explicit]
    for key in chosen:
        setattr(pretrained, key, getattr(cfg.model, key))
    pretrained.validate()
    if ignored := sorted(k for k in cfg.explicit if k.startswith("model.") and k[6:] not in PRETRAINED_CONTEXT):
        warn(f"{', '.join(ignored)} ignored: with --init_from the model's shape is {folder}'s")
    cfg.model = pretrained
    kept = [key for key in ("max_seq_len", "rope_theta", "rope_scaling") if key not in chosen]
    runtime.log(f"initialized from {folder}: its config.json replaces [model]"
                + (f"; kept its {', '.join(f'{k}={getattr(pretrained, k)}' for k in kept)}" if kept else "")
                + (f"; the config sets {', '.join(f'{k}={getattr(pretrained, k)}' for k in chosen)}" if chosen else ""))
    if cfg.train.block_size > pretrained.max_seq_len:
        raise ConfigError(f"train.block_size={cfg.train.block_size} exceeds {folder}'s context of "
                          f"{pretrained.max_seq_len} tokens: shorten the block (or set model.max_seq_len)")
    return folder


def build_model(cfg: Config, pretrained: Path | None) -> tuple[Llama, Any]:
    """A freshly initialized model from the seed, or the weights of --init_from in fp32 (the
    master weights; autocast computes in bf16 on GPUs); with LoRA, that model frozen under new
    adapters (and peft's wrapper of them). A resumed run's trained weights are loaded later, in
    restore(); a resumed LoRA run needs its frozen base, --init_from, again."""
    torch.manual_seed(cfg.train.seed)
    tc = cfg.train
    base = pretrained or (checkpoint.resolve(Path(tc.init_from)) if tc.lora_rank else None)
    model = checkpoint.load_hf(base, cfg=cfg.model) if base is not None else Llama(cfg.model)
    if not tc.lora_rank:
        return model, None
    adapters = checkpoint.add_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_dropout, tc.lora_target_list())
    return model, adapters


def model_tokenizer(resume_from: Path | None, pretrained: Path | None) -> tuple[str, str, str] | None:
    """(sha256, folder, fix) of the tokenizer a resumed checkpoint or --init_from model comes
    with, which the data must have been prepared with."""
    folder = resume_from or pretrained
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    fix = ("use the dataset the checkpoint was trained on" if resume_from is not None else
           f"prepare the data with the model's tokenizer: python prepare_data.py --data.tokenizer {folder} ...")
    return Tokenizer.load(folder).hash, str(folder), fix


def carried_files(dataset_dir: Path, resume_from: Path | None, pretrained: Path | None) -> dict[str, bytes]:
    """The files every checkpoint carries besides the weights, read once (the folders they come
    from may be pruned or moved while the run goes on): the resumed checkpoint's; else the
    dataset's tokenizer, replaced by --init_from's own files (tokenizer, chat template,
    generation_config.json), so a fine-tuned checkpoint is a drop-in replacement for the model."""
    sources = [resume_from] if resume_from is not None else [dataset_dir, pretrained]
    return {name: (folder / name).read_bytes() for folder in sources if folder is not None
            for name in checkpoint.CARRIED_FILES if (folder / name).is_file()}


def trained_context(cfg: Config, model: Llama, resume_from: Path | None, pretrained: Path | None) -> int:
    """Windows of block_size, on top of what the weights already knew: a resumed checkpoint's
    record, or an --init_from model's record or (for a foreign folder) its whole context."""
    earlier = cfg.train.block_size
    if resume_from is not None:
        earlier = checkpoint.trained_context(resume_from) or earlier
    elif pretrained is not None:
        earlier = checkpoint.trained_context(pretrained) or model.cfg.max_seq_len
    return min(max(earlier, cfg.train.block_size), model.cfg.max_seq_len)


def batch_samplers(dataset_dir: Path, train_tokens: data.TokenFile, val_tokens: data.TokenFile,
                   tc: TrainConfig, runtime: Runtime) -> tuple[data.BatchSampler, data.BatchSampler] | tuple[
                       data.ConversationSampler, data.ConversationSampler]:
    """Random windows of the token stream; for a conversation dataset, whole conversations packed
    into rows, the loss on the assistant's tokens only."""
    if not data.is_conversations(dataset_dir):
        return (data.BatchSampler(train_tokens, tc.block_size, tc.micro_batch_size, tc.seed),
                data.BatchSampler(val_tokens, tc.block_size, tc.micro_batch_size, tc.seed))
    pad = Tokenizer.load(dataset_dir).eos_id
    samplers = tuple(data.ConversationSampler(data.open_conversations(dataset_dir, split), tc.block_size,
                                              tc.micro_batch_size, tc.seed, pad, tc.long_conversations == "skip")
                     for split in ("train", "val"))
    for split, sampler in zip(("train", "val"), samplers):
        if sampler.too_long:
            action = "never drawn" if tc.long_conversations == "skip" else "cut to their start"
            runtime.log(f"{split}: {sampler.too_long} of {len(sampler.lengths)} conversations are longer than "
                        f"block_size + 1 = {tc.block_size + 1} tokens: {action} (train.long_conversations)")
    return samplers


def accumulation_steps(tc: TrainConfig, world: int) -> int:
    per_micro = tc.micro_batch_size * tc.block_size * world
    if tc.batch_tokens % per_micro:
        raise ConfigError(f"train.batch_tokens={tc.batch_tokens} is not a multiple of micro_batch_size * block_size "
                          f"* world_size = {per_micro}: pick a multiple of it")
    return tc.batch_tokens // per_micro


def configure_optimizers(model: Llama, cfg: TrainConfig, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """The optimizers by name (the names checkpoints record, and LR_SCHEDULES keys): AdamW with
    weight decay on the 2-D weights only (not on norm gains); with Muon, the 2-D weights inside the
    blocks go to Muon instead (it orthogonalizes matrix updates, which suits hidden projections;
    the embedding, LM head and gains stay with AdamW)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    to_muon = {n for n, p in named if cfg.optimizer == "muon" and n.startswith("layers.") and p.dim() == 2}
    rest = [p for n, p in named if n not in to_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"
    optimizers: dict[str, torch.optim.Optimizer] = {"AdamW": torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=not fused)}
    if to_muon:
        ns_dtype = torch.bfloat16 if devices.bf16_matmul_is_native(device) else torch.float32
        optimizers["Muon"] = Muon([p for n, p in named if n in to_muon], ns_dtype=ns_dtype, lr=cfg.muon_lr,
                                  momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    return optimizers


def restore_optimizers(run: Run, ckpt: Path, state: dict[str, Any]) -> None:
    """The optimizer state: sharded by parameter name in ckpt/optimizer/, whatever the world size
    and parallel mode that saved it; or, from checkpoints written before it was, whole in the
    training state."""
    whole = state.get("optimizer")  # checkpoints from before: one state dict, or a list of them
    whole = [whole] if isinstance(whole, dict) else whole
    # Checkpoints from before the names were recorded held AdamW, then Muon when there was one.
    saved = state.get("optimizers") or ["AdamW", "Muon"][:len(whole)]
    ours = list(run.optimizers)
    if saved != ours:
        raise ConfigError(f"cannot resume {ckpt}: it was trained with {' + '.join(saved)} and train.optimizer="
                          f"{run.cfg.train.optimizer} needs {' + '.join(ours)}; keep the optimizer of the run")
    if (ckpt / checkpoint.OPTIMIZER_DIR).is_dir():
        checkpoint.load_optimizer(run.model, list(run.optimizers.values()), ckpt, run.runtime.distributed)
    elif run.runtime.sharded:
        raise ConfigError(f"cannot resume {ckpt} under train.parallel=fsdp: it holds its optimizer state whole, as "
                          f"checkpoints did before sharding; resume it once with parallel=ddp, whose next "
                          f"checkpoint fsdp can resume")
    else:
        for optimizer, optimizer_state in zip(run.optimizers.values(), whole):
            optimizer.load_state_dict(optimizer_state)


def restore(run: Run, ckpt: Path) -> None:
    """Weights, optimizer, loss scaler, every RNG and the loop's counters from a checkpoint."""
    state = checkpoint.load_training_state(ckpt)
    if run.adapters is not None:
        checkpoint.read_lora(run.adapters, ckpt)
    elif run.runtime.sharded:
        checkpoint.load_full_state_dict(run.model, checkpoint.load_hf(ckpt).state_dict())
    else:
        run.model.load_state_dict(checkpoint.load_hf(ckpt).state_dict())
    restore_optimizers(run, ckpt, state)
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.step, run.best_val, run.wandb_id = state["step"], state["best_val_loss"], state["wandb_run_id"] or None
    run.resumed_from = ckpt
    if run.runtime.is_main:  # forget what was logged after the checkpoint: those steps run again
        kept = [m for m in read_metrics(run.metrics_path) if m["step"] <= run.step]
        replace_file(run.metrics_path, "".join(json.dumps(m) + "\n" for m in kept), RESUME_ADVICE)
        # A run killed while evaluating (or stopped by a signal) saved its checkpoint but not the
        # evaluation of that step: the resumed run does it first, as the uninterrupted run did.
        tc = run.cfg.train
        due = run.step % tc.eval_interval == 0 or run.step == tc.max_steps
        run.eval_unrecorded = due and not any(m["kind"] == "eval" and m["step"] == run.step for m in kept)
    run.runtime.log(f"resumed from {ckpt} at step {run.step}")


def compiles(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to torch.compile: when asked, and under auto where Inductor is at home (CUDA, CPU);
    on MPS the model trains eagerly unless compile is asked for."""
    return cfg.compile is True or (cfg.compile == "auto" and device.type != "mps")


def compile_for_training(model: Llama, runtime: Runtime) -> torch.nn.Module:
    """torch.compile: the whole model, or under FSDP each block's forward on its own, with the
    gathers and frees around each block left outside (torchtitan's way). A whole FSDP model breaks
    its graph at every gather and ran no faster than eager; compiled blocks fuse their arithmetic,
    and one graph serves them all."""
    if not runtime.sharded:
        return torch.compile(model)
    for block in model.layers:
        block.forward = torch.compile(block.forward)
    return model


def uncompiled(model: Llama) -> Llama:
    """The model without the compiled block forwards that compile_for_training gave it."""
    for block in model.layers:
        vars(block).pop("forward", None)
    return model


def wrap_for_training(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """DDP around the module under torchrun; an FSDP model is already sharded in place."""
    if runtime.world == 1 or runtime.sharded:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)


def shard_model(model: Llama, runtime: Runtime) -> None:
    """FSDP2: each block, then the rest (embedding, final norm, LM head), sharded over the
    processes in place. A block's parameters are gathered just before it runs and freed after, so
    one process holds 1/world of the weights, gradients and optimizer state plus one block whole.
    On GPUs the gathered weights are bf16 while gradients are averaged in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    precision = MixedPrecisionPolicy(param_dtype=runtime.amp_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


@contextlib.contextmanager
def machine_main_first(runtime: Runtime) -> Iterator[None]:
    """The first process of each machine does the work first (a download into data/downloads/), the
    others after it, when the files are there: two processes writing one download would corrupt it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        runtime.barrier()
    yield
    if first:
        runtime.barrier()


def check_shared_out_dir(out_dir: Path, runtime: Runtime) -> None:
    """Every process writes its shard of each checkpoint into out_dir, so on several machines it
    must be one folder they all see: the main process leaves a token there for the others to read."""
    token = [f"{platform.node()}-{os.getpid()}-{time.time_ns()}" if runtime.is_main else None]
    dist.broadcast_object_list(token, src=0)
    probe = out_dir / ".shared-check"
    if runtime.is_main:
        probe.write_text(token[0])
    runtime.barrier()
    seen = probe.read_text() if probe.is_file() else None
    ok = on_all_processes(runtime, seen == token[0])
    if runtime.is_main:
        probe.unlink()
    if not ok:
        raise ConfigError(f"train.out_dir={out_dir} is not the same folder for every process: on several machines "
                          f"put it on a filesystem they all mount (NFS, a shared disk)")


def trainable_params(model: Llama) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def start_logging(run: Run) -> tuple[int, float]:
    """Record the config and environment, print the setup, open W&B; returns (training FLOPs per
    token, the peak FLOP/s that MFU divides by)."""
    cfg, tc, runtime, model = run.cfg, run.cfg.train, run.runtime, run.model
    flops_per_token = model.flops_per_token(tc.block_size)
    peak = peak_flops(tc, runtime)
    if runtime.is_main:
        replace_file(run.out_dir / "config.toml", to_toml(cfg), RESUME_ADVICE)
        replace_file(run.out_dir / "run_info.json", json.dumps({
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": str(runtime.device), "amp_dtype": str(runtime.amp_dtype), "world_size": runtime.world,
            "params": model.num_params(), "trainable_params": trainable_params(model),
            "flops_per_token": flops_per_token, "peak_flops": peak}, indent=2), RESUME_ADVICE)
    parallel = f" ({tc.parallel})" if runtime.distributed else ""
    recompute = " | activation checkpointing" if tc.activation_checkpointing else ""
    runtime.log(f"device {runtime.device} | amp {str(runtime.amp_dtype).removeprefix('torch.')} | "
                f"compile {tc.compile if run.compiled or tc.compile is False else 'auto: off on mps'} | "
                f"world {runtime.world}{parallel}{recompute}")
    adamw = f"adamw lr {tc.lr:g} betas ({tc.beta1:g}, {tc.beta2:g}) decay {tc.weight_decay:g}"
    runtime.log(f"optimizer {adamw}" if tc.optimizer == "adamw" else
                f"optimizer muon lr {tc.muon_lr:g} ({muon_schedule(tc).lr_schedule}) momentum {tc.muon_momentum:g} "
                f"decay {tc.muon_weight_decay:g} on "
                f"{sum(p.numel() for p in run.optimizers['Muon'].param_groups[0]['params']):,} block-matrix weights | "
                f"{adamw} on the rest | newton-schulz in {str(run.optimizers['Muon'].ns_dtype).removeprefix('torch.')}"
                f"{'' if devices.bf16_matmul_is_native(runtime.device) else ' (bf16 matmuls are not native here)'}")
    lora = (f" (LoRA rank {tc.lora_rank} on {tc.lora_targets}: {trainable_params(model):,} trainable)"
            if run.adapters is not None else "")
    runtime.log(f"params {model.num_params():,}{lora} | micro batch {tc.micro_batch_size} x {tc.block_size} tokens | "
                f"accumulation {run.accum} | {run.tokens_per_step:,} tokens/step | peak {peak / 1e12:.2f} TFLOP/s")
    if tc.wandb != "off" and runtime.is_main:
        import wandb
        # Under `wandb agent` (WANDB_SWEEP_ID set) W&B names the runs; otherwise the folder does.
        default_name = None if os.environ.get("WANDB_SWEEP_ID") else run.out_dir.name
        run.wandb_run = wandb.init(project=tc.wandb_project, name=tc.wandb_run_name or default_name,
                                   group=tc.wandb_group, id=run.wandb_id, resume="allow", mode=tc.wandb,
                                   config=cfg.to_dict(), dir=str(run.out_dir))
        run.wandb_id = run.wandb_run.id
    return flops_per_token, peak


# ---------------------------------------------------------------------------------------------
# Device, precision and processes


@dataclasses.dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype
    rank: int = 0
    world: int = 1
    distributed: bool = False  # in a torchrun process group (a one-process group too, under fsdp)
    sharded: bool = False  # the model is sharded with FSDP2 (train.parallel = "fsdp" under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def log(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick device and precision (printed at start) and join the torchrun process group if any."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # FSDP under `torchrun --nproc_per_node 1` still shards (over one process): the same code path,
    # and its mixed-precision policy, as on many GPUs.
    distributed = world > 1 or (cfg.parallel == "fsdp" and "RANK" in os.environ)
    device = devices.resolve(cfg.device, "train.device")
    if device.type == "mps" and "RANK" in os.environ:
        raise ConfigError("train.device=mps runs one process: torchrun (DDP, FSDP) needs CUDA GPUs, or CPUs with "
                          "--train.device cpu; on a Mac run python train.py without torchrun")
    if device.type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if (world > 1 or cfg.device in ("auto", "cuda")) and local_rank >= visible:
            raise ConfigError(f"process {rank} (LOCAL_RANK {local_rank}) has no GPU of its own: this machine shows "
                              f"{visible}; start at most {visible} per machine (torchrun --nproc_per_node "
                              f"{visible}) or train on CPU with --train.device cpu")
        if world > 1 or cfg.device in ("auto", "cuda"):
            device = torch.device(f"cuda:{local_rank}")
    amp_dtype = training_dtype(cfg, device)
    if cfg.parallel == "fsdp" and amp_dtype == torch.float16:
        raise ConfigError("train.parallel=fsdp needs bf16 or fp32, and this GPU does bf16 only by emulation: "
                          "use parallel=ddp (fp16 with loss scaling) or --train.dtype float32")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:  # naming the GPU binds NCCL to it at once, instead of guessing from the rank
        on_gpu = device.type == "cuda"
        dist.init_process_group(backend="nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)
    return Runtime(device=device, amp_dtype=amp_dtype, rank=rank, world=world, distributed=distributed,
                   sharded=distributed and cfg.parallel == "fsdp")


def training_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype: the configured one where the device can train in it, else bf16 on GPUs
    whose tensor cores do it natively, fp16 (with loss scaling) on other GPUs, fp32 on CPU and MPS."""
    if cfg.dtype == "float16" and device.type == "mps":
        raise ConfigError("train.dtype=float16 on mps: fp16 training needs loss scaling, untested on Apple GPUs "
                          "here; use --train.dtype bfloat16 (macOS 14+) or float32")
    if cfg.dtype != "auto":
        return devices.checked_dtype(device, cfg.dtype, "train.dtype")
    if device.type == "cuda":
        return torch.bfloat16 if devices.bf16_matmul_is_native(device) else torch.float16
    return torch.float32  # CPU bf16 matmuls are emulated and ~30x slower; MPS: fp32 unless asked


def peak_flops(cfg: TrainConfig, runtime: Runtime) -> float:
    """The FLOP/s that MFU divides by: configured, a known GPU's peak, or a matmul measured now."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    n, reps = 1024, 4
    dtype = runtime.amp_dtype if runtime.device.type != "cpu" else torch.float32
    # Constant operands: drawing random ones would move the RNG a resumed run has just restored
    # (and with dropout, e.g. LoRA's, change what it trains on).
    a = torch.full((n, n), 0.5, device=runtime.device, dtype=dtype)
    b = torch.full((n, n), 0.5, device=runtime.device, dtype=dtype)
    a @ b  # warm up
    rates = []
    for _ in range(3):  # the fastest round: other work on the machine only ever slows a round down
        devices.synchronize(runtime.device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        devices.synchronize(runtime.device)
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - start))
    return max(rates)


# ---------------------------------------------------------------------------------------------
# RNG state as plain tensors and numbers, so a checkpoint loads with weights_only=True


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **({"mps": torch.mps.get_rng_state()} if torch.backends.mps.is_available() else {}),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class StopRequest:
    """While active, SIGTERM/SIGINT only set a flag; the loop saves and exits at the next step
    boundary. The previous handlers come back on exit."""

    def __enter__(self) -> "StopRequest":
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


# ---------------------------------------------------------------------------------------------
# Records: metrics.jsonl and loss.png


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def plot_curves(metrics: list[dict[str, Any]], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if m["kind"] == "train" and not m["skipped"]]
    evals = [m for m in metrics if m["kind"] == "eval"]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.8, alpha=0.6, label="train (batch)")
    if evals:
        ax_loss.plot([m["step"] for m in evals], [m["train_loss"] for m in evals], "o-", label="train (eval)")
        ax_loss.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="val")
        if "text_loss" in evals[-1]:
            ax_loss.plot([m["step"] for m in evals if "text_loss" in m],
                         [m["text_loss"] for m in evals if "text_loss" in m], "o-", label="eval.data")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([m["step"] for m in steps], [m["lr"] for m in steps], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    replace_png(png, fig, 110, RESUME_ADVICE)


# What a failed write of the run's records says: the records and checkpoints are whole as they were.
RESUME_ADVICE = "the checkpoints and records so far are intact: free disk space (or make the folder writable) " \
                "and resume with --resume"


def append_metric(path: Path, record: dict[str, Any]) -> None:
    """One line at the end of metrics.jsonl. A failed write cuts the file back to its last whole
    line: a cut one would stop the resumed run from reading its records."""
    line = (json.dumps(record) + "\n").encode()
    with disk_write(path.parent, len(line), f"appending to {path.name}", RESUME_ADVICE):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


ALIASES = {"--resume": "--train.resume", "--init_from": "--train.init_from", "--overwrite": "--train.overwrite"}


def expand_aliases(argv: list[str]) -> list[str]:
    """`--resume [PATH]`, `--init_from DIR`, `--overwrite` as shorthands for their train.* keys."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ALIASES:
            has_value = eq or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
            if not eq and has_value:
                value, i = argv[i + 1], i + 1
            default = "latest" if key == "--resume" else "true"
            out += [ALIASES[key], value if (eq or has_value) else default]
        else:
            out.append(arg)
        i += 1
    return out


@script
def main(argv: list[str]) -> int:
    return train(parse_cli(expand_aliases(argv), prog="train.py"))


if __name__ == "__main__":
    sys.exit(main())
