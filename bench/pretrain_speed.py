"""A pretraining recipe's throughput, MFU and peak GPU memory, measured through train.py itself.

    python bench/pretrain_speed.py configs/llama_124m_fineweb.toml [--steps 30] [--nproc 1]
                                   [--source ../shared/data/tinyshakespeare.txt] [--json out.json]
                                   [-- --train.batch_tokens 131072 ...]

The recipe runs as configured (model, precision, compile, parallel mode, micro-batch and block) on
a stand-in dataset: Tiny Shakespeare at character level, whose few ids fit any vocabulary. Only the
steps, evaluation and checkpoints are cut short; anything after `--` overrides more. With --nproc N
it runs under `torchrun --standalone --nproc_per_node N` (FSDP recipes shard even over one
process). tokens/s and MFU are train.py's own per-step records (the model's FLOPs per token over
the GPU's dense bf16 peak), medians over the steps after the first few (compilation, allocator
warm-up); peak memory is the most any step had allocated on the main process's GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WARMUP_STEPS = 5  # steps left out of the medians


def prepare(source: Path, data_dir: Path) -> None:
    subprocess.run([sys.executable, "prepare_data.py", "--data.dataset", "shakespeare_char", "--data.source",
                    str(source), "--data.data_dir", str(data_dir)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def train(recipe: str, steps: int, nproc: int, data_dir: Path, out_dir: Path, extra: list[str]) -> list[dict]:
    launcher = [sys.executable] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "train.py", recipe, "--data.dataset", "shakespeare_char", "--data.data_dir", str(data_dir),
           "--train.out_dir", str(out_dir), "--train.max_steps", str(steps), "--train.warmup_steps", "1",
           "--train.eval_interval", str(steps), "--train.eval_iters", "1", "--train.ckpt_interval", str(steps),
           "--eval.task", "none", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(recipe: str, nproc: int, metrics: list[dict], run_info: dict) -> dict:
    steps = [m for m in metrics if m["kind"] == "train"]
    timed = steps[WARMUP_STEPS:] or steps
    return {"recipe": recipe, "processes": max(nproc, 1), "device": run_info["device"],
            "amp_dtype": run_info["amp_dtype"], "params": run_info["params"], "steps_timed": len(timed),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "mfu": statistics.median(m["mfu"] for m in timed),
            "step_s": statistics.median(m["step_s"] for m in timed),
            "peak_memory_gib": max((m.get("peak_memory_gib", 0.0) for m in steps), default=0.0),
            "final_loss": steps[-1]["loss"]}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a TOML config, e.g. configs/llama_124m_fineweb.toml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=0, help="processes under torchrun (0 = plain python)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="Tiny Shakespeare on disk")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.source.is_file():
        sys.exit(f"error: {args.source} does not exist: pass --source PATH to Tiny Shakespeare")
    work = Path(tempfile.mkdtemp(prefix="pretrain_speed_"))
    try:
        prepare(args.source, work / "data")
        metrics = train(args.recipe, args.steps, args.nproc, work / "data", work / "out", extra)
        result = summarize(args.recipe, args.nproc, metrics, json.loads((work / "out" / "run_info.json").read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| recipe | processes | device | params | tokens/s | MFU | step | peak memory |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {result['recipe']} | {result['processes']} | {result['device']} | {result['params'] / 1e6:,.1f}M | "
          f"{result['tokens_per_s']:,.0f} | {100 * result['mfu']:.1f}% | {result['step_s']:.3f} s | "
          f"{result['peak_memory_gib']:.1f} GiB |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
