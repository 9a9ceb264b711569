"""Batch-1 decoding speed: generate.py against transformers' generate on the same weights.

    python bench/generate_speed.py [--rounds 3] [--no-compile] [--device auto] [--profile] [--json out.json]

On CPU (fp32): the reference config (vocab 8192, 6 layers, dim 384, 6 heads, 2 KV heads, FFN 1024,
random weights) and stories260K when ../shared/data/stories260K.bin exists. On a GPU (bf16): a
TinyLlama-1.1B-shaped model (random weights). Each run decodes 256 greedy tokens after a 16-token
prompt; tokens/s counts all 256 over the whole call (prefill included). Rounds alternate between
variants so machine noise hits all of them; medians are reported.

nanollama runs with the weights as training leaves them ("training layout") and as generate.py
prepares them (fused q/k/v and gate/up projections; on CPU, eager: the transposed layout of
widening weights, compiled: one-row matmuls as multiply-and-sum passes), eager and compiled, and
compiled with int8 weights, so each transformation's gain is measured in the same run. Int8 changes the numbers: its row reports how often its greedy next token
agrees with the unquantized model's given the same previous tokens (teacher forcing).

Decoding one token reads every weight once and does ~2 FLOPs per weight, so its limits are the
bytes a step reads (each variant's own: int8 reads a quarter of fp32's) over the memory bandwidth
(measured here by summing a tensor far larger than any cache) and the FLOPs over the matmul rate.
Also measured: each compiled step alone (called back to back at one position, so the tokens/s it
allows without the decoding loop's own work and the prefill), time to first token, and one token's
cost at a 1024-token context with the KV cache and without it (a full forward over the context).
--profile adds torch.profiler's account of one call of the compiled variants: device time and
kernel launches per token, and the kernels (on CPU, operators) that take most of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import ModelConfig, SampleConfig  # noqa: E402
from checkpoint import read_llama2c  # noqa: E402
from decoding import Int8Linear, prepare_for_decoding  # noqa: E402
from engine import DecodeStep, compile_decode_step  # noqa: E402
from generate import cache_slots, generate  # noqa: E402
from model import Llama, RMSNorm  # noqa: E402
from train_speed import REFERENCE as TRAINING_REFERENCE  # noqa: E402
from train_speed import benchmark_args, describe_machine, hf_model, machine, matmul_flops_per_s, synchronize  # noqa: E402

# The training benchmark's model, with room for the 1024-token cached-vs-uncached measurement.
REFERENCE = dataclasses.replace(TRAINING_REFERENCE, max_seq_len=1040)
# TinyLlama-1.1B's shape: what the GPU figures are quoted for.
TINYLLAMA = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                        max_seq_len=2048)

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "stories260K.bin"
PROMPT_LEN, NEW_TOKENS, LONG_CONTEXT = 16, 256, 1024


def read_bandwidth(device: str, reps: int = 5) -> float:
    """Bytes per second for a reduction over a tensor far larger than any cache (256 MB; 2 GB on a GPU)."""
    big = torch.ones((512 if device == "cuda" else 64) * 1024 * 1024, device=device)
    big.sum()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        big.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times)


def step_bytes(model: Llama) -> int:
    """Bytes one batch-1 decoding step reads, KV cache aside: every matmul weight (int8 ones with
    their scales), the norms, and one row of the embedding table."""
    tensors = [t for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear, RMSNorm))
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    row = model.cfg.dim * model.embed_tokens.weight.element_size()
    return sum(t.numel() * t.element_size() for t in tensors) + row


def decode_limits(model: Llama) -> dict[str, float]:
    """KV bytes and FLOPs one decoding step needs at batch 1 (context PROMPT_LEN + NEW_TOKENS / 2)."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    context = PROMPT_LEN + NEW_TOKENS // 2
    kv_bytes = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * context
    return {"kv_bytes": kv_bytes * model.embed_tokens.weight.element_size(),
            "flops": 2 * matmul_weights + 4 * model.cfg.n_layers * model.cfg.dim * context}


def ours_runner(model: Llama, prompt: list[int], step: DecodeStep | None):
    cfg = SampleConfig(temperature=0.0, max_new_tokens=NEW_TOKENS, eos="none")

    def run() -> tuple[list[int], float]:
        start = time.perf_counter()
        for rows in generate(model, [prompt], cfg, decode_step=step):
            pass
        return rows[0].token_ids, time.perf_counter() - start
    return run


def seconds_per_call(call: Callable[[], object], calls: int, device: str | torch.device) -> float:
    """Seconds per call of `call` made `calls` times back to back, after one untimed call."""
    call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def bench_cache_slots(max_seq_len: int) -> int:
    """The cache length generate() sets up for this bench's call (PROMPT_LEN + NEW_TOKENS tokens),
    which a step timed alone attends over too."""
    return cache_slots(PROMPT_LEN + NEW_TOKENS - 1, max_seq_len)


def step_alone_seconds(model: Llama, step: DecodeStep, calls: int) -> float:
    """Seconds per call of a compiled step called back to back at one position, over the cache that
    generate() used (the same buffers): the decoding loop's own work left out."""
    device = model.embed_tokens.weight.device
    with torch.inference_mode():
        model.setup_cache(1, max_seq_len=bench_cache_slots(model.cfg.max_seq_len))
        tokens, positions = torch.ones(1, 1, dtype=torch.long, device=device), torch.tensor([PROMPT_LEN], device=device)
        seconds = seconds_per_call(lambda: step(tokens, positions), calls, device)
        model.clear_cache(keep=True)
    return seconds


def kernel_profile(run_one, device: str, tokens: int, top: int = 12) -> dict:
    """Where a decoding call's time goes, from torch.profiler: device time and kernels per token
    (on CPU, operators and their own time), and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        run_one()
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    own = {e.key: (e.self_device_time_total if on_gpu else e.self_cpu_time_total, e.count) for e in events}
    ranked = sorted(own.items(), key=lambda item: -item[1][0])
    return {"us_per_token": round(sum(us for us, _ in own.values()) / tokens, 1),
            "kernels_per_token": round(sum(n for _, n in own.values()) / tokens, 1),
            "top": [{"name": name, "us_per_token": round(us / tokens, 1), "calls_per_token": round(n / tokens, 2)}
                    for name, (us, n) in ranked[:top]]}


def hf_runner(hf, prompt: list[int], cache: str | None):
    x = torch.tensor([prompt], device=hf.device)

    def run() -> tuple[list[int], float]:
        synchronize(hf.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              pad_token_id=0, cache_implementation=cache)
        return out[0, len(prompt):].tolist(), time.perf_counter() - start
    return run


def teacher_forced_agreement(model: Llama, reference: Llama, tokens: list[int]) -> float:
    """How often model's greedy next token equals reference's, both reading the same tokens."""
    x = torch.tensor([tokens], device=model.embed_tokens.weight.device)
    with torch.inference_mode():
        ours, theirs = model(x)[0].argmax(-1), reference(x)[0].argmax(-1)
    return (ours == theirs).float().mean().item()


def first_token_seconds(run_one, device: str) -> float:
    times = []
    for _ in range(5):
        synchronize(device)
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


def bench_model(name: str, ours: Llama, rounds: int, compile_: bool, device: str, profile: bool = False) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompt = torch.randint(0, ours.cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = ours.to(dtype)
    hf = hf_model(ours, "sdpa").to(device=device, dtype=dtype).eval()
    standard = ours.to(device).eval()  # the weights as training leaves them
    prepared = copy.deepcopy(standard)
    prepare_for_decoding(prepared)  # as generate.py does
    models = {"nanollama (eager, training layout)": (standard, False), "nanollama (eager)": (prepared, False)}
    if compile_:
        # A model of its own per compiled variant: each keeps its KV cache between calls, as in use.
        standard_compiled, for_compiling, int8 = (copy.deepcopy(standard) for _ in range(3))
        prepare_for_decoding(for_compiling, compiled=True)  # as generate.py --compile does
        prepare_for_decoding(int8, "int8", compiled=True)
        models |= {"nanollama (compiled, training layout)": (standard_compiled, True),
                   "nanollama (compiled)": (for_compiling, True), "nanollama (compiled, int8)": (int8, True)}
    steps = {variant: compile_decode_step(model) for variant, (model, compiled) in models.items() if compiled}
    variants = {variant: ours_runner(model, prompt, steps.get(variant)) for variant, (model, _) in models.items()}
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
    alone = {variant: statistics.median(step_alone_seconds(models[variant][0], step, NEW_TOKENS // 4)
                                        for _ in range(rounds)) for variant, step in steps.items()}
    hf_tokens = tokens["transformers generate (dynamic cache)"]
    hf_default = statistics.median(times["transformers generate (dynamic cache)"])
    rows = []
    for variant, t in times.items():
        model = models[variant][0] if variant in models else standard
        row = {"variant": variant, "tokens_per_s": round(NEW_TOKENS / statistics.median(t), 1),
               "step_bytes": step_bytes(model), "vs_transformers_dynamic": round(hf_default / statistics.median(t), 2),
               "same_tokens_as_transformers": tokens[variant] == hf_tokens}
        if variant in alone:
            row["step_alone_tokens_per_s"] = round(1 / alone[variant], 1)
        if "int8" in variant:
            row["teacher_forced_agreement"] = round(teacher_forced_agreement(model, prepared, prompt + hf_tokens), 3)
        rows.append(row)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=1)
    x = torch.tensor([prompt], device=device)
    ttft = {"nanollama": first_token_seconds(lambda: list(generate(prepared, [prompt], cfg)), device),
            "transformers": first_token_seconds(lambda: hf.generate(x, max_new_tokens=1, do_sample=False,
                                                                    pad_token_id=0).tolist(), device)}
    result = {"model": name, "device": device, "dtype": str(dtype).removeprefix("torch."),
              "params": prepared.num_params(), **decode_limits(prepared), "rows": rows, "failed": failed,
              "time_to_first_token_s": {k: round(v, 4) for k, v in ttft.items()}}
    if profile:
        for variant in ("nanollama (compiled)", "nanollama (compiled, int8)") if compile_ else ("nanollama (eager)",):
            result.setdefault("profile", {})[variant] = kernel_profile(variants[variant], device, NEW_TOKENS)
    if prepared.cfg.max_seq_len >= LONG_CONTEXT + 9:
        cached, uncached = long_context_step_seconds(prepared, True), long_context_step_seconds(prepared, False)
        result["at_1024_tokens"] = {"cached_s_per_token": round(cached, 5), "uncached_s_per_token": round(uncached, 4),
                                    "speedup": round(uncached / cached, 1)}
    return result


def print_report(result: dict, bandwidth: float, flops: float) -> None:
    on = describe_machine() if result["device"] == "cpu" else result["device"]
    print(f"\n{result['model']} ({result['dtype']}; {on}): {result['params'] / 1e6:.2f}M params, "
          f"{result['flops'] / 1e6:.1f} MFLOP per token -> compute allows {flops / result['flops']:,.0f} tokens/s "
          f"({flops / 1e12:.1f} TFLOP/s); memory: {bandwidth / 1e9:.1f} GB/s over each variant's bytes per token")
    print(f"| {'variant':<38} | {'tokens/s':>9} | {'MB/token':>8} | {'memory limit':>12} | {'of limit':>8} | "
          f"{'step alone':>16} | {'vs HF dynamic':>13} | same tokens |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 18}|{'-' * 15}|-------------|")
    for r in result["rows"]:
        limit = bandwidth / (r["step_bytes"] + result["kv_bytes"])
        same = "yes" if r["same_tokens_as_transformers"] else "no"
        if "teacher_forced_agreement" in r:
            same = f"{r['teacher_forced_agreement']:.0%} forced"
        alone = r.get("step_alone_tokens_per_s")
        alone = f"{alone:,.1f} ({alone / limit:.0%})" if alone else "-"
        print(f"| {r['variant']:<38} | {r['tokens_per_s']:>9,.1f} | {r['step_bytes'] / 1e6:>8.1f} | {limit:>12,.0f} | "
              f"{r['tokens_per_s'] / limit:>8.0%} | {alone:>16} | {r['vs_transformers_dynamic']:>12.2f}x | {same:>11} |")
    for variant, why in result["failed"].items():
        print(f"| {variant:<38} | failed: {why}")
    ttft = result["time_to_first_token_s"]
    print(f"time to first token: nanollama {1000 * ttft['nanollama']:.1f} ms, transformers "
          f"{1000 * ttft['transformers']:.1f} ms")
    for variant, where in result.get("profile", {}).items():
        unit = "kernels" if result["device"] == "cuda" else "operators"
        print(f"{variant}, profiled: {where['us_per_token']:,.1f} us of {unit} per token over "
              f"{where['kernels_per_token']:,.1f} {unit}; the largest:")
        for k in where["top"]:
            print(f"  {k['us_per_token']:>9,.1f} us {k['calls_per_token']:>6.2f}x  {k['name'][:100]}")
    if long := result.get("at_1024_tokens"):
        print(f"one token at a {LONG_CONTEXT}-token context: {1000 * long['cached_s_per_token']:.1f} ms with the KV "
              f"cache, {1000 * long['uncached_s_per_token']:.0f} ms without -> {long['speedup']}x")


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, device=True, extra=[(
        "--profile", {"action": "store_true", "help": "also profile one call of the compiled variants (eager with "
                                                       "--no-compile): time per token by kernel (operator on CPU)"})])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(0)
    if device == "cuda":
        models = {"TinyLlama-1.1B shape": lambda: Llama(TINYLLAMA)}
    else:
        models = {"reference config": lambda: Llama(REFERENCE)}
        if STORIES.is_file():
            models["stories260K"] = lambda: read_llama2c(STORIES)
    results = [bench_model(name, build(), args.rounds, not args.no_compile, device, args.profile)
               for name, build in models.items()]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth, flops = read_bandwidth(device), matmul_flops_per_s(device=device, dtype=dtype)
    for result in results:
        print_report(result, bandwidth, flops)
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **machine(),
               "read_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops, "models": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
