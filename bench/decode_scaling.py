"""Compiled batch-1 decoding against its memory-bandwidth limit, as the model grows, float and int8.

    python bench/decode_scaling.py [--rounds 3] [--device auto] [--shapes NAME,...] [--gpt-fast DIR] [--json out.json]

A decoding step reads every weight once, so weight bytes over read bandwidth is its floor. A step
is also a fixed number of kernels per layer (about a dozen), and each kernel has a cost of its own
(launch, ramp-up, the tail of its last wave) that its bytes do not pay for: the smaller the
model, the larger that share. This bench measures generate.py's compiled step at Llama shapes of
growing size, float (bf16 on a GPU, fp32 on CPU) then int8, as a fraction of the limit: the step
alone (called back to back at one position) and one generate() call of 256 greedy tokens after a
16-token prompt (prefill included). Also the kernels per token (operators on CPU) from
torch.profiler. Random weights; each variant compiles from scratch.

Shapes on a GPU: TinyLlama-1.1B and Llama-2-7B; on CPU: the reference config and stories110M
(llama2.c's 110M model). The peer here is gpt-fast, whose recipe (a static cache, CUDA graphs,
Inductor's one-row reductions) generate.py follows: --gpt-fast DIR takes model.py from a local
checkout of pytorch-labs/gpt-fast and times its float step at each shape, with the same compile
options and the math attention its generate.py decodes with. generate_speed.py holds the other peer
(transformers) and the decoding loop's other variants.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import ModelConfig  # noqa: E402
from decoding import prepare_for_decoding, quantize_int8  # noqa: E402
from engine import compile_decode_step, decode_compile_options  # noqa: E402
from generate_speed import (NEW_TOKENS, PROMPT_LEN, REFERENCE, TINYLLAMA, bench_cache_slots, decode_limits,  # noqa: E402
                            kernel_profile, ours_runner, read_bandwidth, seconds_per_call, step_alone_seconds, step_bytes)
from model import Llama  # noqa: E402
from train_speed import benchmark_args, synchronize  # noqa: E402

LLAMA2_7B = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                        max_seq_len=4096)
STORIES110M = ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                          max_seq_len=1024, tie_embeddings=True)
SHAPES = {"cuda": {"TinyLlama-1.1B": TINYLLAMA, "Llama-2-7B": LLAMA2_7B},
          "cpu": {"reference": REFERENCE, "stories110M": STORIES110M}}


def measure(model: Llama, device: str, rounds: int) -> dict:
    """The compiled step's speed on `model` as it is now: generate() and the step alone, in tokens/s."""
    torch._dynamo.reset()  # a fresh compile per variant: the int8 model is the float one, changed in place
    step = compile_decode_step(model)
    prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    run = ours_runner(model, prompt, step)
    start = time.perf_counter()
    run()
    synchronize(device)
    warm_up = time.perf_counter() - start
    generate_s = statistics.median(run()[1] for _ in range(rounds))
    alone_s = statistics.median(step_alone_seconds(model, step, NEW_TOKENS // 4) for _ in range(rounds))
    profile = kernel_profile(run, device, NEW_TOKENS, top=1)
    return {"step_bytes": step_bytes(model), "tokens_per_s": round(NEW_TOKENS / generate_s, 1),
            "step_alone_tokens_per_s": round(1 / alone_s, 1), "kernels_per_token": profile["kernels_per_token"],
            "warm_up_s": round(warm_up, 1)}


def load_gpt_fast(folder: Path):
    """gpt-fast's model module, from model.py in a local checkout."""
    if not (folder / "model.py").is_file():
        sys.exit(f"error: --gpt-fast {folder} has no model.py; pass a checkout of github.com/pytorch-labs/gpt-fast")
    spec = importlib.util.spec_from_file_location("gpt_fast_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dynamo finds a traced function's globals through its module's name
    spec.loader.exec_module(module)
    if not hasattr(module, "Transformer") or not hasattr(module, "ModelArgs"):
        sys.exit(f"error: --gpt-fast {folder}/model.py has no Transformer and ModelArgs; pass a gpt-fast checkout")
    return module


def gpt_fast_step_alone(gpt_fast, cfg: ModelConfig, dtype: torch.dtype, device: str, rounds: int) -> float:
    """Tokens/s of gpt-fast's compiled step alone at cfg's shape (random weights), timed as
    step_alone_seconds times ours: over the same cache length, at one position."""
    torch._dynamo.reset()  # drops the compiled steps of ours, and the model they hold, first
    args = gpt_fast.ModelArgs(block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
                              n_head=cfg.n_heads, n_local_heads=cfg.n_kv_heads, dim=cfg.dim,
                              intermediate_size=cfg.ffn_dim, norm_eps=cfg.norm_eps, rope_base=cfg.rope_theta)
    torch.manual_seed(0)
    with torch.device(device):
        model = gpt_fast.Transformer(args)
    model = model.to(dtype).eval()
    with torch.device(device):
        model.setup_caches(1, bench_cache_slots(cfg.max_seq_len))

    def step(tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # as gpt-fast's generate.py decodes: Inductor writes the attention
            return model(tokens, input_pos)

    compiled = torch.compile(step, fullgraph=True, options=decode_compile_options(device == "cuda"))
    tokens, position = torch.ones(1, 1, dtype=torch.int, device=device), torch.tensor([PROMPT_LEN], device=device)
    with torch.inference_mode():
        return 1 / statistics.median(seconds_per_call(lambda: compiled(tokens, position), NEW_TOKENS // 4, device)
                                     for _ in range(rounds))


def bench_shape(name: str, cfg: ModelConfig, device: str, rounds: int, gpt_fast=None) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg)
    model = model.to(dtype).eval()
    prepare_for_decoding(model, compiled=True)
    result = {"shape": name, "params": model.num_params(), "kv_bytes": decode_limits(model)["kv_bytes"], "rows": []}
    for variant in (str(dtype).removeprefix("torch."), "int8"):
        if variant == "int8":
            quantize_int8(model)
        row = {"variant": variant, **measure(model, device, rounds)}
        print(f"[{name}] {variant}: {row}", file=sys.stderr, flush=True)
        result["rows"].append(row)
    if gpt_fast is not None:
        del model
        float_row = result["rows"][0]
        row = {"variant": f"gpt-fast {float_row['variant']}", "step_bytes": float_row["step_bytes"],
               "step_alone_tokens_per_s": round(gpt_fast_step_alone(gpt_fast, cfg, dtype, device, rounds), 1)}
        print(f"[{name}] {row['variant']}: {row}", file=sys.stderr, flush=True)
        result["rows"].append(row)
    return result


def print_report(results: list[dict], bandwidth: float) -> None:
    print(f"\nread bandwidth {bandwidth / 1e9:,.0f} GB/s; limit = bandwidth over the bytes a step reads "
          f"(weights and the KV cache at a {PROMPT_LEN + NEW_TOKENS // 2}-token context)")
    print(f"| {'shape':<15} | {'params':>7} | {'variant':<17} | {'MB/token':>8} | {'limit':>7} | {'step alone':>16} | "
          f"{'generate':>16} | int8 speed-up | kernels/token |")
    print(f"|{'-' * 17}|{'-' * 9}|{'-' * 19}|{'-' * 10}|{'-' * 9}|{'-' * 18}|{'-' * 18}|---------------|---------------|")
    for result in results:
        float_alone = result["rows"][0]["step_alone_tokens_per_s"]
        for r in result["rows"]:
            limit = bandwidth / (r["step_bytes"] + result["kv_bytes"])
            speedup = f"{r['step_alone_tokens_per_s'] / float_alone:.2f}x" if r["variant"] == "int8" else ""
            loop = f"{r['tokens_per_s']:>9,.1f} ({r['tokens_per_s'] / limit:>4.0%})" if "tokens_per_s" in r else "-"
            kernels = f"{r['kernels_per_token']:,.1f}" if "kernels_per_token" in r else "-"
            print(f"| {result['shape']:<15} | {result['params'] / 1e6:>6,.0f}M | {r['variant']:<17} | "
                  f"{r['step_bytes'] / 1e6:>8,.1f} | {limit:>7,.0f} | "
                  f"{r['step_alone_tokens_per_s']:>9,.1f} ({r['step_alone_tokens_per_s'] / limit:>4.0%}) | "
                  f"{loop:>16} | {speedup:>13} | {kernels:>13} |")


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, device=True, compiled=False, extra=[
        ("--shapes", {"help": "comma-separated shape names (default: all of the device's: "
                              + "; ".join(f"{d}: {', '.join(s)}" for d, s in SHAPES.items()) + ")"}),
        ("--gpt-fast", {"type": Path, "metavar": "DIR", "help": "a local checkout of pytorch-labs/gpt-fast: also "
                                                                "time its model.py's step at each shape"})])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = SHAPES[device]
    names = args.shapes.split(",") if args.shapes else list(shapes)
    if unknown := [n for n in names if n not in shapes]:
        sys.exit(f"error: --shapes {','.join(unknown)} is not a {device} shape; choose from {', '.join(shapes)}")
    gpt_fast = load_gpt_fast(args.gpt_fast) if args.gpt_fast else None
    results = []
    for name in names:
        results.append(bench_shape(name, shapes[name], device, args.rounds, gpt_fast))
        if device == "cuda":
            torch.cuda.empty_cache()
    bandwidth = read_bandwidth(device)
    print_report(results, bandwidth)
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
               "read_bandwidth_bytes_per_s": bandwidth, "shapes": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
