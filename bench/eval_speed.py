"""Multiple-choice scoring speed: eval.py against lm-evaluation-harness's hf backend, same checkpoint and task.

    pip install -r requirements-eval.txt
    python bench/eval_speed.py [--rounds 3] [--examples 200] [--json out.json]

The checkpoint is the reference config (vocab 8192, 6 layers, dim 384, 6/2 heads, FFN 1024, random
weights) with a byte-level BPE tokenizer learned from Tiny Shakespeare; the task is built from Tiny
Shakespeare too: each example is the first half of a line and four second halves, one its own (so
random weights score near chance; only the speed is measured). Both scorers read the same jsonl (the
harness through a task YAML), at batch size 16 on CPU, fp32; tokens/s counts the context and
continuation tokens of every choice. The table also says whether they gave the same acc and acc_norm.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
from config import EvalConfig  # noqa: E402
from eval import choice_requests, harness_task_yaml, load_scorer, read_examples, score_choices  # noqa: E402
from model import Llama  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_speed import REFERENCE, benchmark_args  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BATCH = 16


def build(folder: Path, n_examples: int) -> tuple[Path, Path]:
    """The checkpoint folder and the task file."""
    text = SHAKESPEARE.read_text()
    tokenizer = Tokenizer.train_bpe([text], REFERENCE.vocab_size)
    torch.manual_seed(0)
    checkpoint.save_hf(Llama(REFERENCE), folder / "ckpt")
    tokenizer.save(folder / "ckpt")
    lines = [line for line in text.splitlines() if len(line.split()) >= 6]
    rng = random.Random(0)
    rows = []
    for line in rng.sample(lines, n_examples):
        words = line.split()
        cut = len(words) // 2
        others = [" ".join(other.split()[len(other.split()) // 2:]) for other in rng.sample(lines, 3)]
        label = rng.randrange(4)
        choices = others[:label] + [" ".join(words[cut:])] + others[label:]
        rows.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    task = folder / "shakespeare_halves.jsonl"
    task.write_text("\n".join(map(json.dumps, rows)))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "task.yaml").write_text(harness_task_yaml("shakespeare_halves", task))
    return folder / "ckpt", task


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, compiled=False, extra=[
        ("--examples", dict(type=int, default=200, help="examples in the task (4 choices each)"))])
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder, task = build(Path(tmp), args.examples)
        cfg = EvalConfig(checkpoint=str(folder), task=str(task), batch_size=BATCH, device="cpu")
        scorer = load_scorer(cfg)
        examples = read_examples(cfg)[1]
        tokens = sum(len(ctx) + len(cont) for e in examples for ctx, cont in choice_requests(scorer, e))
        harness_model = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=BATCH)
        manager = TaskManager(include_path=str(Path(tmp) / "tasks"))

        def ours() -> tuple[float, float, float]:
            start = time.perf_counter()
            result = score_choices(scorer, examples, BATCH)
            return time.perf_counter() - start, result["acc"], result["acc_norm"]

        def harness() -> tuple[float, float, float]:
            start = time.perf_counter()
            result = lm_eval.simple_evaluate(model=harness_model, tasks=["shakespeare_halves"], task_manager=manager,
                                             verbosity="ERROR")["results"]["shakespeare_halves"]
            return time.perf_counter() - start, result["acc,none"], result["acc_norm,none"]

        variants = {"nanollama eval.py": ours, "lm-evaluation-harness (hf)": harness}
        outcomes = {name: run() for name, run in variants.items()}  # warm-up
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(run()[0])
    theirs = statistics.median(times["lm-evaluation-harness (hf)"])
    rows = [{"scorer": name, "seconds": round(statistics.median(t), 3),
             "tokens_per_s": round(tokens / statistics.median(t)), "speedup": round(theirs / statistics.median(t), 2),
             "acc": outcomes[name][1], "acc_norm": outcomes[name][2]} for name, t in times.items()]
    print(f"\n{len(examples)} examples x 4 choices, {tokens:,} tokens; reference config, fp32, CPU "
          f"({torch.get_num_threads()} threads), batch {BATCH}")
    print("| scorer | seconds | tokens/s | vs harness | acc | acc_norm |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scorer']} | {r['seconds']:.2f} | {r['tokens_per_s']:,} | {r['speedup']:.2f}x | "
              f"{r['acc']:.4f} | {r['acc_norm']:.4f} |")
    summary = {"examples": len(examples), "tokens": tokens, "rows": rows}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
