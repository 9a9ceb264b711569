"""Batch-1 decoding speed: generate.py against transformers' generate on the same weights.

    python bench/generate_speed.py [--rounds 3] [--no-compile] [--json out.json]

Models: the reference config (vocab 8192, 6 layers, dim 384, 6 heads, 2 KV heads, FFN 1024, random
weights) and stories260K when ../shared/data/stories260K.bin exists. Each run decodes 256 greedy
tokens after a 16-token prompt; tokens/s counts all 256 over the whole call (prefill included).
Rounds alternate between variants so machine noise hits all of them; medians are reported.

nanollama runs twice: with the weights as training leaves them and with Llama.use_decoding_layout()
(what generate.py does on CPU), so the layout's gain is measured in the same run.

Decoding one token reads every weight once and does ~2 FLOPs per weight, so its limits are the
weight bytes over the memory bandwidth (measured here by summing a 256 MB tensor) and the FLOPs
over the fp32 matmul rate. Also measured: time to first token, and one token's cost at a 1024-token
context with the KV cache and without it (a full forward over the context).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import SampleConfig  # noqa: E402
from checkpoint import read_llama2c  # noqa: E402
from generate import compile_decode_step, generate  # noqa: E402
from model import Llama  # noqa: E402
from train_speed import REFERENCE as TRAINING_REFERENCE  # noqa: E402
from train_speed import benchmark_args, hf_model, matmul_flops_per_s  # noqa: E402

# The training benchmark's model, with room for the 1024-token cached-vs-uncached measurement.
REFERENCE = dataclasses.replace(TRAINING_REFERENCE, max_seq_len=1040)

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "stories260K.bin"
PROMPT_LEN, NEW_TOKENS, LONG_CONTEXT = 16, 256, 1024


def read_bandwidth(reps: int = 5) -> float:
    """Bytes per second for a reduction over a 256 MB tensor: far more than any cache holds."""
    big = torch.ones(64 * 1024 * 1024)
    big.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times)


def decode_limits(model: Llama) -> dict[str, float]:
    """Bytes and FLOPs one decoding step needs at batch 1 (context PROMPT_LEN + NEW_TOKENS / 2)."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    context = PROMPT_LEN + NEW_TOKENS // 2
    kv_bytes = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * context * 4
    return {"weight_bytes": 4 * (matmul_weights + norms + model.cfg.dim), "kv_bytes": kv_bytes,
            "flops": 2 * matmul_weights + 4 * model.cfg.n_layers * model.cfg.dim * context}


def ours_runner(model: Llama, prompt: list[int], compiled: bool):
    cfg = SampleConfig(temperature=0.0, max_new_tokens=NEW_TOKENS, eos="none")
    step = compile_decode_step(model) if compiled else None

    def run() -> tuple[list[int], float]:
        start = time.perf_counter()
        for rows in generate(model, [prompt], cfg, decode_step=step):
            pass
        return rows[0].token_ids, time.perf_counter() - start
    return run


def hf_runner(hf, prompt: list[int], cache: str | None):
    x = torch.tensor([prompt])

    def run() -> tuple[list[int], float]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              pad_token_id=0, cache_implementation=cache)
        return out[0, len(prompt):].tolist(), time.perf_counter() - start
    return run


def first_token_seconds(run_one) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def long_context_step_seconds(model: Llama, use_cache: bool) -> float:
    """Seconds per generated token for 8 tokens after a LONG_CONTEXT-token prompt (prefill excluded)."""
    prompt = torch.randint(0, model.cfg.vocab_size, (LONG_CONTEXT,), generator=torch.Generator().manual_seed(1))
    cfg = SampleConfig(temperature=0.0, max_new_tokens=9, eos="none")
    stamps = [time.perf_counter() for _ in generate(model, [prompt.tolist()], cfg, use_cache=use_cache)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def bench_model(name: str, ours: Llama, rounds: int, compile_: bool) -> dict:
    ours.eval()
    prompt = torch.randint(0, ours.cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = hf_model(ours, "sdpa").eval()
    standard = copy.deepcopy(ours)  # the weights in their training layout, for the layout's own ratio
    ours.use_decoding_layout()  # as generate.py does on CPU
    variants = {"nanollama (eager, training layout)": ours_runner(standard, prompt, False),
                "nanollama (eager)": ours_runner(ours, prompt, False)}
    if compile_:
        variants["nanollama (compiled, training layout)"] = ours_runner(standard, prompt, True)
        variants["nanollama (compiled)"] = ours_runner(ours, prompt, True)
    variants["transformers generate (dynamic cache)"] = hf_runner(hf, prompt, None)
    variants["transformers generate (static cache)"] = hf_runner(hf, prompt, "static")
    tokens, failed = {}, {}
    for variant, run in list(variants.items()):  # warm-up and compilation, outside the timed rounds
        start = time.perf_counter()
        try:
            tokens[variant] = run()[0]
        except Exception as e:  # static cache is not supported everywhere; report, do not abort
            failed[variant] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            del variants[variant]
        print(f"[{name}] warm-up {variant}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant, run in variants.items():
            times[variant].append(run()[1])
    hf_default = statistics.median(times["transformers generate (dynamic cache)"])
    rows = [{"variant": v, "tokens_per_s": round(NEW_TOKENS / statistics.median(t), 1),
             "vs_transformers_dynamic": round(hf_default / statistics.median(t), 2),
             "same_tokens_as_transformers": tokens[v] == tokens["transformers generate (dynamic cache)"]}
            for v, t in times.items()]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=1)
    ttft = {"nanollama": first_token_seconds(lambda: list(generate(ours, [prompt], cfg))),
            "transformers": first_token_seconds(lambda: hf.generate(torch.tensor([prompt]), max_new_tokens=1,
                                                                    do_sample=False, pad_token_id=0))}
    result = {"model": name, "params": ours.num_params(), **decode_limits(ours), "rows": rows, "failed": failed,
              "time_to_first_token_s": {k: round(v, 4) for k, v in ttft.items()}}
    if ours.cfg.max_seq_len >= LONG_CONTEXT + 9:
        cached, uncached = long_context_step_seconds(ours, True), long_context_step_seconds(ours, False)
        result["at_1024_tokens"] = {"cached_s_per_token": round(cached, 5), "uncached_s_per_token": round(uncached, 4),
                                    "speedup": round(uncached / cached, 1)}
    return result


def print_report(result: dict, bandwidth: float, flops: float) -> None:
    byte_limit = bandwidth / (result["weight_bytes"] + result["kv_bytes"])
    flop_limit = flops / result["flops"]
    print(f"\n{result['model']}: {result['params'] / 1e6:.2f}M params, {result['weight_bytes'] / 1e6:.1f} MB of weights "
          f"and {result['flops'] / 1e6:.1f} MFLOP per token -> limits {byte_limit:,.0f} tokens/s (memory, "
          f"{bandwidth / 1e9:.1f} GB/s) and {flop_limit:,.0f} tokens/s (matmul, {flops / 1e9:.0f} GFLOP/s)")
    print(f"| {'variant':<38} | {'tokens/s':>9} | {'vs HF dynamic':>13} | {'of memory limit':>15} | same tokens |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 15}|{'-' * 17}|-------------|")
    for r in result["rows"]:
        print(f"| {r['variant']:<38} | {r['tokens_per_s']:>9,.1f} | {r['vs_transformers_dynamic']:>12.2f}x | "
              f"{r['tokens_per_s'] / byte_limit:>15.0%} | {'yes' if r['same_tokens_as_transformers'] else 'no':>11} |")
    for variant, why in result["failed"].items():
        print(f"| {variant:<38} | failed: {why}")
    ttft = result["time_to_first_token_s"]
    print(f"time to first token: nanollama {1000 * ttft['nanollama']:.1f} ms, transformers "
          f"{1000 * ttft['transformers']:.1f} ms")
    if long := result.get("at_1024_tokens"):
        print(f"one token at a {LONG_CONTEXT}-token context: {1000 * long['cached_s_per_token']:.1f} ms with the KV "
              f"cache, {1000 * long['uncached_s_per_token']:.0f} ms without -> {long['speedup']}x")


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3)
    torch.manual_seed(0)
    models = {"reference config": Llama(REFERENCE)}
    if STORIES.is_file():
        models["stories260K"] = read_llama2c(STORIES)
    results = [bench_model(name, model, args.rounds, not args.no_compile) for name, model in models.items()]
    bandwidth, flops = read_bandwidth(), matmul_flops_per_s()
    for result in results:
        print_report(result, bandwidth, flops)
    summary = {"threads": torch.get_num_threads(), "read_bandwidth_bytes_per_s": bandwidth,
               "matmul_flops_per_s": flops, "models": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
