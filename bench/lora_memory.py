"""LoRA against full fine-tuning of the same model: trainable parameters, peak memory and speed.

    pip install -r requirements-lora.txt
    python bench/lora_memory.py [--rounds 1] [--steps 6] [--json out.json]

The model is a 50M-parameter Llama (dim 768, 8 layers, 12/4 heads, FFN 2048; random weights saved as a
Hugging Face folder), fine-tuned with train.py --init_from on Tiny Shakespeare at character level
(micro batch 4 x 128 tokens, AdamW, fp32 on CPU). Each variant is its own train.py process; its peak
resident memory comes from the kernel (wait4's ru_maxrss) and includes Python and torch themselves,
about the same for both, so the table also gives the baseline-free estimate: fp32 weights, plus
gradients and AdamW's two moments for what trains (16 bytes per trainable parameter).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
from config import DataConfig, ModelConfig  # noqa: E402
from model import Llama  # noqa: E402
from prepare_data import prepare  # noqa: E402
from train_speed import benchmark_args  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = dict(dim=768, n_layers=8, n_heads=12, n_kv_heads=4, hidden_dim=2048, max_seq_len=512)
VARIANTS = {"full fine-tuning": [],
            "LoRA r=8 (q,k,v,o)": ["--train.lora_rank", "8"],
            "LoRA r=8 (all projections)": ["--train.lora_rank", "8", "--train.lora_targets",
                                           "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]}


def train(folder: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """One train.py run: its peak RSS (MiB), trainable parameters and median step time."""
    process = subprocess.Popen(
        [sys.executable, "train.py", "--init_from", str(folder / "base"), "--data.data_dir", str(folder / "data"),
         "--data.dataset", "chars", "--train.out_dir", str(out), "--train.device", "cpu", "--train.compile", "false",
         "--train.micro_batch_size", "4", "--train.block_size", "128", "--train.batch_tokens", "512",
         "--train.max_steps", str(steps), "--train.warmup_steps", "1", "--train.eval_interval", str(steps),
         "--train.eval_iters", "1", "--train.log_interval", "1", "--train.ckpt_interval", str(steps), *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"train.py failed:\n{errors}")
    info = json.loads((out / "run_info.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["step_s"] for m in metrics if m.get("kind") == "train"][1:]  # the first step warms up
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "params": info["params"], "trainable": info["trainable_params"],
            "step_s": statistics.median(step_s)}


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=1, compiled=False, extra=[
        ("--steps", dict(type=int, default=6, help="optimizer steps per run"))])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(DataConfig(dataset="chars", data_dir=str(folder / "data"), input=str(SHAKESPEARE), tokenizer="char",
                           workers=1))
        vocab = json.loads((folder / "data" / "chars" / "meta.json").read_text())["vocab_size"]
        torch.manual_seed(0)
        checkpoint.save_hf(Llama(ModelConfig(vocab_size=vocab, **MODEL)), folder / "base")
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):  # alternating, so drift on the machine hits every variant alike
            for name, extra in VARIANTS.items():
                runs[name].append(train(folder, folder / f"run-{len(runs[name])}-{r}-{hash(name)}", args.steps, extra))
    full = statistics.median(x["peak_rss_mib"] for x in runs["full fine-tuning"])
    rows = []
    for name, results in runs.items():
        first = results[0]
        frozen = first["params"] - first["trainable"]
        estimate = (4 * frozen + 16 * first["trainable"]) / 2**20
        peak = statistics.median(x["peak_rss_mib"] for x in results)
        rows.append({"variant": name, "params": first["params"], "trainable": first["trainable"],
                     "trainable_share": first["trainable"] / first["params"], "peak_rss_mib": round(peak),
                     "vs_full": round(peak / full, 3), "weights_grads_adam_mib": round(estimate),
                     "step_s": round(statistics.median(x["step_s"] for x in results), 3)})
    print(f"\n{rows[0]['params']:,}-parameter Llama, char-level Tiny Shakespeare, micro batch 4 x 128, fp32, CPU "
          f"({torch.get_num_threads()} threads), {args.steps} steps")
    print("| variant | trainable | share | peak RSS (MiB) | vs full | weights+grads+AdamW (MiB) | s/step |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['trainable_share']:.2%} | {r['peak_rss_mib']:,} | "
              f"{r['vs_full']:.2f}x | {r['weights_grads_adam_mib']:,} | {r['step_s']:.2f} |")
    summary = {"steps": args.steps, "rows": rows}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
