"""Speculative decoding: how often a small draft's tokens are kept, and what that saves.

    python bench/speculative_speed.py [--rounds 3] [--steps 400] [--json out.json]
    python bench/speculative_speed.py --target CKPT --draft CKPT      # a pair of your own

Without --target/--draft it first trains a pair on Tiny Shakespeare (../shared/data/tinyshakespeare.txt,
char level, the CPU preset's recipe for --steps steps, a few minutes on 2 cores): the target has
6 layers of dim 256, the draft 1 layer of dim 64. Then each variant decodes 200 tokens after each
of 4 prompts from the validation text, one row at a time, greedy and sampled (temperature 0.8):
the target alone, and speculative decoding with k = 2, 4 and 6 drafted tokens per round. Rounds
alternate between variants and medians are reported; with compilation (the default) the target
alone and k = 4 also run compiled, each compared with the compiled target alone. Greedy speculative output must equal the
target's own (the table says whether it did); sampled output follows the target's distribution,
so only its speed and acceptance are compared.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
from config import SampleConfig  # noqa: E402
from decoding import prepare_for_decoding  # noqa: E402
from engine import Speculation, compile_decode_step  # noqa: E402
from generate import generate, speculative_generate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_speed import benchmark_args  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {"target": ["--model.dim", "256", "--model.n_layers", "6", "--model.n_heads", "4", "--model.n_kv_heads", "2"],
          "draft": ["--model.dim", "64", "--model.n_layers", "1", "--model.n_heads", "4", "--model.n_kv_heads", "2"]}
NEW_TOKENS, DRAFT_TOKENS = 200, (2, 4, 6)
PROMPTS = ["ROMEO:\nBut soft", "KING RICHARD II:\nNow", "First Citizen:\nWe are", "JULIET:\nO "]


def train_pair(folder: Path, steps: int) -> tuple[Path, Path]:
    """Prepare Tiny Shakespeare and train the target and the draft on it; returns their run folders."""
    def run(*argv: str) -> None:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(argv[:1])} failed:\n{done.stderr[-2000:]}")
    run("prepare_data.py", "--data.input", str(SHAKESPEARE), "--data.data_dir", str(folder), "--data.dataset",
        "shakespeare_char", "--data.tokenizer", "char")
    for name, shape in SHAPES.items():
        start = time.perf_counter()
        run("train.py", "configs/shakespeare_char_cpu.toml", *shape, "--model.max_seq_len", "256",
            "--train.block_size", "256", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
            "--train.eval_interval", str(steps), "--train.ckpt_interval", str(steps),
            "--data.data_dir", str(folder), "--train.out_dir", str(folder / name))
        print(f"trained the {name} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return folder / "target", folder / "draft"


def decoder(pair: dict, prompts: list[list[int]], cfg: SampleConfig, k: int | None, compiled: bool):
    """A function decoding every prompt at batch 1: (token ids per prompt, seconds, Speculation)."""
    target, draft = pair[compiled]
    target_step = compile_decode_step(target) if compiled else None
    draft_step = compile_decode_step(draft) if compiled and k else None

    def run() -> tuple[list[list[int]], float, Speculation]:
        stats, out = Speculation(), []
        start = time.perf_counter()
        for prompt in prompts:
            steps = (generate(target, [prompt], cfg, decode_step=target_step) if k is None else
                     speculative_generate(target, draft, [prompt], cfg, k=k, stats=stats,
                                          steps=(target_step, draft_step) if compiled else None))
            for rows in steps:
                pass
            out.append(rows[0].token_ids)
        return out, time.perf_counter() - start, stats
    return run


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, device=True, extra=[
        ("--target", dict(type=Path, help="a checkpoint to decode from (default: train one)")),
        ("--draft", dict(type=Path, help="a smaller checkpoint with the target's tokenizer (default: train one)")),
        ("--steps", dict(type=int, default=400, help="training steps of each model of the default pair"))])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as tmp:
        paths = (args.target, args.draft) if args.target and args.draft else train_pair(Path(tmp), args.steps)
        (target, folder), (draft, _) = (checkpoint.load_model(p) for p in paths)
        tokenizer = Tokenizer.load(folder) if folder is not None and (folder / "tokenizer.json").is_file() else None
    pair = {}  # eager and compiled decoding prepare the weights differently on CPU (prepare_for_decoding)
    for compiled in (False, True):
        pair[compiled] = [copy.deepcopy(m).to(device).eval() for m in (target, draft)]
        for model in pair[compiled]:
            prepare_for_decoding(model, compiled=compiled)
    prompts = [tokenizer.encode(p) if tokenizer else [1] for p in PROMPTS]
    results = []
    for mode, cfg in {"greedy": SampleConfig(temperature=0.0, max_new_tokens=NEW_TOKENS, eos="none"),
                      "sampled": SampleConfig(temperature=0.8, max_new_tokens=NEW_TOKENS, eos="none")}.items():
        variants = {"target alone": decoder(pair, prompts, cfg, None, False)}
        variants |= {f"speculative, k={k}": decoder(pair, prompts, cfg, k, False) for k in DRAFT_TOKENS}
        if not args.no_compile:
            variants["target alone, compiled"] = decoder(pair, prompts, cfg, None, True)
            variants["speculative, k=4, compiled"] = decoder(pair, prompts, cfg, 4, True)
        outputs = {name: run()[0] for name, run in variants.items()}  # warm-up and compilation
        times, stats = {name: [] for name in variants}, {}
        for _ in range(args.rounds):
            for name, run in variants.items():
                _, seconds, stats[name] = run()
                times[name].append(seconds)
        for name, t in times.items():
            alone = statistics.median(times["target alone, compiled" if "compiled" in name else "target alone"])
            s = stats[name]
            results.append({"mode": mode, "variant": name, "tokens_per_s": round(len(prompts) * NEW_TOKENS / statistics.median(t), 1),
                            "speedup": round(alone / statistics.median(t), 2),
                            "acceptance_rate": round(s.acceptance_rate, 3) if s.rounds else None,
                            "tokens_per_target_forward": round(len(prompts) * NEW_TOKENS / s.rounds, 2) if s.rounds else 1.0,
                            "same_tokens_as_target": outputs[name] == outputs["target alone"]})
    print(f"\ntarget {target.num_params() / 1e6:.2f}M params, draft {draft.num_params() / 1e6:.2f}M params, "
          f"{device}, {len(prompts)} prompts x {NEW_TOKENS} tokens at batch 1")
    print(f"| {'mode':<7} | {'variant':<26} | {'tokens/s':>9} | {'speed-up':>8} | {'kept':>5} | "
          f"{'tokens/target pass':>18} | same as target |")
    print(f"|{'-' * 9}|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 7}|{'-' * 20}|----------------|")
    for r in results:
        kept = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
        same = ("yes" if r["same_tokens_as_target"] else "no") if r["mode"] == "greedy" else "-"
        print(f"| {r['mode']:<7} | {r['variant']:<26} | {r['tokens_per_s']:>9,.1f} | {r['speedup']:>7.2f}x | "
              f"{kept:>5} | {r['tokens_per_target_forward']:>18.2f} | {same:>14} |")
    summary = {"device": device, "target_params": target.num_params(), "draft_params": draft.num_params(),
               "rows": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
