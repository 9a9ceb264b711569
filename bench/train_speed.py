"""Training-step throughput: ours against transformers' LlamaForCausalLM on the same config.

    python bench/train_speed.py [--rounds 5] [--no-compile] [--json out.json]

Reference config: vocab 8192, 6 layers, dim 384, 6 heads, 2 KV heads, FFN 1024, sequence 256,
batch 8, fp32. Every variant runs the same forward + backward + AdamW step on the same batch;
rounds alternate between variants so machine noise hits all of them, and medians are reported.
The ceiling is the FLOPs a step needs divided by a large fp32 matmul's rate, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
from config import ModelConfig  # noqa: E402
from model import Llama  # noqa: E402
from devices import bf16_matmul_is_native  # noqa: E402

REFERENCE = ModelConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024,
                        max_seq_len=256)
BATCH, SEQ = 8, 256
# What makes an AVX-512 machine compute as an AVX2-only one: ATen's kernels and Inductor's vector
# code (ATEN_CPU_CAPABILITY), and oneDNN's, which runs CPU bf16 matmuls (DNNL_MAX_CPU_ISA).
AVX2_EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}


def matmul_flops_per_s(n: int = 2048, reps: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so a host clock measures it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def hf_model(ours: Llama, attn: str) -> torch.nn.Module:
    import tempfile

    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_hf(ours, tmp)
        return transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation=attn)


def make_step(model: torch.nn.Module, is_hf: bool, compile_: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    forward = torch.compile(model) if compile_ else model

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if is_hf:
            loss = forward(input_ids=x, labels=None).logits.float()
            loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.shape[-1]), y.reshape(-1))
        else:
            loss = forward(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def emulate_avx2() -> None:
    """Start this benchmark again with the CPU capped at AVX2 (a no-op once it is). Inductor gets a
    cache folder of its own: its cache keys leave the ISA out, so it would serve kernels generated
    for AVX-512, whose 16-lane loops overrun AVX2's 8-lane vectors (seen: wrong sums)."""
    if all(os.environ.get(key) == value for key, value in AVX2_EMULATION.items()):
        return
    cache = Path(tempfile.gettempdir()) / "nanollama-inductor-avx2"
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, **AVX2_EMULATION, "TORCHINDUCTOR_CACHE_DIR": str(cache)})


def machine() -> dict:
    """What a CPU figure depends on: the vector ISA ATen runs, whether bf16 matmuls are native, threads."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_matmul_native": bf16_matmul_is_native(torch.device("cpu")), "threads": torch.get_num_threads()}


def describe_machine() -> str:
    m = machine()
    return (f"CPU capability {m['cpu_capability']}, bf16 matmuls {'native' if m['bf16_matmul_native'] else 'emulated'}, "
            f"{m['threads']} threads")


def benchmark_args(doc: str, default_rounds: int, device: bool = False, compiled: bool = True,
                   extra: Sequence[tuple[str, dict]] = ()) -> argparse.Namespace:
    """The options every benchmark here takes (--emulate-avx2 restarts it capped at AVX2),
    --no-compile for those with compiled variants, --device for those that run on a GPU too, and
    `extra` (flag, argparse keywords) of the benchmark's own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=default_rounds, help="timed rounds (medians are reported)")
    if compiled:
        parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run as on an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2)")
    if device:
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                            help="auto: cuda when a GPU is visible")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if args.emulate_avx2:
        emulate_avx2()
    return args


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=5)

    torch.manual_seed(0)
    ours = Llama(REFERENCE)
    tokens = torch.randint(0, REFERENCE.vocab_size, (BATCH, SEQ + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    compiles = [False] if args.no_compile else [False, True]
    variants = {}
    for compile_ in compiles:
        tag = "compiled" if compile_ else "eager"
        variants[f"nanollama ({tag})"] = make_step(_clone(ours), False, compile_)
        for attn in ("sdpa", "eager"):
            variants[f"transformers {attn}-attn ({tag})"] = make_step(hf_model(ours, attn), True, compile_)

    for name, step in variants.items():  # warm-up (and compilation) outside the timed rounds
        start = time.perf_counter()
        step(x, y)
        step(x, y)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f}s", file=sys.stderr)

    times = {name: [] for name in variants}
    ceilings = []
    for _ in range(args.rounds):
        ceilings.append(matmul_flops_per_s())
        for name, step in variants.items():
            start = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - start)

    flops_per_step = ours.flops_per_token(SEQ) * BATCH * SEQ
    ceiling = statistics.median(ceilings)
    best_hf = min(statistics.median(t) for n, t in times.items() if n.startswith("transformers"))
    rows = []
    for name, t in times.items():
        seconds = statistics.median(t)
        rows.append({"variant": name, "step_s": round(seconds, 4), "tokens_per_s": round(BATCH * SEQ / seconds),
                     "fraction_of_matmul_ceiling": round(flops_per_step / seconds / ceiling, 3),
                     "speed_vs_fastest_transformers": round(best_hf / seconds, 3)})
    print(f"\nconfig: {REFERENCE.n_layers} layers, dim {REFERENCE.dim}, {REFERENCE.n_heads} heads / "
          f"{REFERENCE.n_kv_heads} KV, FFN {REFERENCE.ffn_dim}, vocab {REFERENCE.vocab_size}, batch {BATCH} x {SEQ}, "
          f"fp32; {describe_machine()}")
    print(f"step needs {flops_per_step / 1e9:.1f} GFLOP; matmul ceiling {ceiling / 1e9:.0f} GFLOP/s -> "
          f"at most {ceiling / flops_per_step * BATCH * SEQ:,.0f} tokens/s\n")
    print(f"| {'variant':<38} | {'tokens/s':>9} | {'of ceiling':>10} | {'vs best HF':>10} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 12}|{'-' * 12}|")
    for r in rows:
        print(f"| {r['variant']:<38} | {r['tokens_per_s']:>9,} | {r['fraction_of_matmul_ceiling']:>10.0%} | "
              f"{r['speed_vs_fastest_transformers']:>9.2f}x |")
    result = {"config": {"batch": BATCH, "seq": SEQ, **REFERENCE.__dict__}, "flops_per_step": flops_per_step,
              "matmul_ceiling_flops": ceiling, **machine(), "rows": rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _clone(model: Llama) -> Llama:
    clone = Llama(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone


if __name__ == "__main__":
    main()
