"""Serving under load: app.py with continuous batching against one request at a time.

    python bench/serve_load.py [--threads 1] [--rounds 3] [--requests 2] [--levels 1,2,4,8,16] [--compile] [--json out.json]
    python bench/serve_load.py --plot bench/results/serve_load.json   # table and figure from a saved run

The model: 2,985,216 parameters (11.9 MB of fp32 weights), random weights, dim 256, 4 layers, 4
heads / 2 KV heads, FFN 704, a 256-token context, with a char tokenizer learned from Tiny
Shakespeare (66 ids), saved in a temporary folder with checkpoint.save_hf. `python app.py` serves it
twice per round, each its own process: `--max_batch 1` (one request decodes at a time, the others
wait: the server before continuous batching, the baseline) and `--max_batch 16` (every request
decodes in one batch of 16 slots), both eager (`--compile` passes --compile through), with `--eos
none` so every reply runs to its max_tokens, and the torch threads the machine gives (2 here) or
--threads (OMP_NUM_THREADS; with other jobs on the cores, two threads wait on each other: 1 is steadier).

For each concurrency C in 1, 2, 4, 8, 16, C client threads each send --requests streaming
completions back to back through the official `openai` client (greedy, max_tokens 64, a different
24-character line of Tiny Shakespeare as each request's prompt, none repeated within a round, so
no prompt is found in a slot's cache). Measured per request: time to the first chunk with text
(TTFT), the gaps between text chunks (per-token latency: with a char tokenizer the server sends one
chunk per decoded token, which the run checks against the chunks' characters and the usage counts
of `stream_options={"include_usage": True}`), and completion tokens. Aggregate tokens/s is all the
level's completion tokens over its wall time. The clients run in this process, on the same 2 cores
as the server. Rounds alternate which server goes first; medians over rounds. Also measured, in this
process with no server running: engine.py's Engine alone (the same weights, eager) decoding C rows
of 64 tokens in 16 slots and in 1 slot, the speed the server would have without HTTP, JSON and its
clients.

The limit: a decoding step reads every weight once whatever the batch (11.9 MB here, which stays in
the L3 cache, so at batch 1 the step's fixed costs, per-operator overhead, bound it rather than
memory bandwidth; for a model too large for the cache it is the weights' bytes over the bandwidth).
A step of 8 rows then costs about one step of 1 row plus the rows' attention and sampling, so
aggregate tokens/s can grow at most ~C-fold over one-at-a-time: the ratio at 8 clients is at most ~8x
(the issue's goal: at least 3x on CPU). A slot's per-token latency is the batch step's time, so the
goal that p99 per-token latency at 8 clients stay within 2x of 1 client's holds while a step of 8
rows costs under twice a step of 1. Eager, a step computes only the slots that are decoding, over no
more cache positions than the furthest of them needs; compiled (`--compile`), every step computes
all 16 slots over the whole cache (one shape), so there batching costs a lone client too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
from config import ModelConfig, SampleConfig  # noqa: E402
from engine import Completion, Engine  # noqa: E402
from generate import load_for_sampling  # noqa: E402
from model import Llama  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_speed import benchmark_args, describe_machine, machine  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPE = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)  # vocab: the char tokenizer's
MAX_TOKENS, PROMPT_CHARS, SLOTS = 64, 24, 16
SERVERS = {"one at a time": 1, "continuous batching": SLOTS}  # name: --max_batch
DEFAULT_JSON = ROOT / "bench" / "results" / "serve_load.json"
DEFAULT_FIGURE = ROOT / "docs" / "figures" / "serve_load.png"


def prompt_pool(text: str) -> list[str]:
    """Distinct 24-character openings of Tiny Shakespeare's spoken lines (speaker names left out)."""
    seen, pool = set(), []
    for line in text.splitlines():
        head = line.strip()[:PROMPT_CHARS]
        if len(head) == PROMPT_CHARS and not line.rstrip().endswith(":") and head not in seen:
            seen.add(head)
            pool.append(head)
    return pool[::7]  # spread over the play


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` on a free port, serving `folder` with `max_batch` slots, until closed."""

    def __init__(self, folder: Path, max_batch: int, compile_: bool, log: Path, threads: int = 0):
        import httpx
        self.port, self.name, self.log = free_port(), folder.name, log
        argv = [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(folder), "--port", str(self.port),
                "--max_batch", str(max_batch), "--eos", "none", *(["--compile"] if compile_ else [])]
        with open(log, "w") as out:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"app.py did not answer /v1/models within 300 s:\n{log.read_text()[-3000:]}")

    def metrics(self) -> dict:
        import httpx
        return httpx.get(f"{self.url}/metrics", timeout=5).json()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclasses.dataclass
class Sent:
    """One streamed request as the client saw it."""
    ttft_s: float | None = None
    gaps_s: list[float] = dataclasses.field(default_factory=list)  # per token, between text chunks
    chunks: int = 0  # chunks with text
    characters: int = 0
    completion_tokens: int | None = None  # from the usage chunk
    error: str | None = None


def stream_one(client, model: str, prompt: str, max_tokens: int) -> Sent:
    sent = Sent()
    start = last = time.perf_counter()
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                           stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            text = "".join(c.text or "" for c in chunk.choices)
            if text:
                if sent.ttft_s is None:
                    sent.ttft_s = now - start
                else:  # one chunk per token (checked: chunks against the usage count)
                    sent.gaps_s.append(now - last)
                sent.chunks, sent.characters, last = sent.chunks + 1, sent.characters + len(text), now
            if chunk.usage is not None:
                sent.completion_tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the run goes on and says what failed
        sent.error = f"{type(e).__name__}: {e}"
    return sent


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def load_level(server: AppServer, clients: int, requests: int, prompts: list[str], max_tokens: int) -> dict:
    """`clients` threads, each streaming `requests` completions back to back; the level's numbers."""
    import openai
    sent: list[list[Sent]] = [[] for _ in range(clients)]
    gate = threading.Barrier(clients + 1)

    def client_thread(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        gate.wait()
        for r in range(requests):
            sent[i].append(stream_one(client, server.name, prompts[i * requests + r], max_tokens))
        client.close()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    seen_in_use, seen_queued = 0, 0
    while any(t.is_alive() for t in threads):  # what /metrics says while the level runs
        try:
            m = server.metrics()
            seen_in_use, seen_queued = max(seen_in_use, m["slots_in_use"]), max(seen_queued, m["queued"])
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.25)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [s for per_client in sent for s in per_client]
    ok = [s for s in done if s.error is None]
    tokens = sum(s.completion_tokens or 0 for s in ok)
    gaps = [g for s in ok for g in s.gaps_s]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    return {"clients": clients, "requests": len(done), "errors": [s.error for s in done if s.error],
            "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "token_p50_ms": 1000 * percentile(gaps, 50) if gaps else None,
            "token_p99_ms": 1000 * percentile(gaps, 99) if gaps else None,
            "chunks": sum(s.chunks for s in ok), "characters": sum(s.characters for s in ok),
            "short_replies": sum((s.completion_tokens or 0) != max_tokens for s in ok),
            "max_slots_in_use_seen": seen_in_use, "max_queued_seen": seen_queued}


def engine_alone(folder: Path, slots: int, rows: int, prompts: list[str], tokenizer: Tokenizer,
                 max_tokens: int) -> float:
    """Tokens/s of engine.py's Engine decoding `rows` prompts in `slots` slots, in this process."""
    cfg = SampleConfig(checkpoint=str(folder), temperature=0.0, max_new_tokens=max_tokens, eos="none")
    loaded = load_for_sampling(cfg)
    engine = Engine(loaded.model, slots, context=loaded.context)
    completions = [Completion(tokenizer.encode(p)) for p in prompts[:rows]]
    start = time.perf_counter()
    for c in completions:
        engine.submit(c, cfg)
    while engine.busy:
        engine.step()
    seconds = time.perf_counter() - start
    engine.close()
    return sum(len(c.token_ids) for c in completions) / seconds


def summarize(runs: dict[str, list[list[dict]]]) -> dict[str, list[dict]]:
    """Per server and level, the median over rounds of each number (errors and checks summed)."""
    out = {}
    for name, rounds in runs.items():
        rows = []
        for i, level in enumerate(rounds[0]):
            per_round = [r[i] for r in rounds]
            row = {"clients": level["clients"]}
            for key in ("tokens_per_s", "ttft_p50_ms", "token_p50_ms", "token_p99_ms", "wall_s"):
                values = [r[key] for r in per_round if r[key] is not None]
                row[key] = round(statistics.median(values), 2) if values else None
            for key in ("requests", "completion_tokens", "chunks", "characters", "short_replies"):
                row[key] = sum(r[key] for r in per_round)
            row["errors"] = [e for r in per_round for e in r["errors"]]
            row["max_slots_in_use_seen"] = max(r["max_slots_in_use_seen"] for r in per_round)
            row["max_queued_seen"] = max(r["max_queued_seen"] for r in per_round)
            rows.append(row)
        out[name] = rows
    return out


def at(rows: list[dict], clients: int, key: str) -> float | None:
    return next((r[key] for r in rows if r["clients"] == clients), None)


def ratios(summary: dict[str, list[dict]]) -> dict[str, float | None]:
    one, batched = summary["one at a time"], summary["continuous batching"]

    def div(a, b):
        return round(a / b, 2) if a is not None and b else None
    return {"tokens_per_s_batched_over_one_at_8": div(at(batched, 8, "tokens_per_s"), at(one, 8, "tokens_per_s")),
            "token_p99_batched_8_over_1": div(at(batched, 8, "token_p99_ms"), at(batched, 1, "token_p99_ms"))}


def print_report(result: dict) -> None:
    print(f"\n{result['model']}; {result['machine_text']}; {result['requests_per_client']} requests per client of "
          f"{result['max_tokens']} greedy tokens, {result['rounds']} rounds, medians")
    for name, rows in result["summary"].items():
        print(f"\n{name} (--max_batch {SERVERS[name]}{', --compile' if result['compile'] else ''}):")
        print("| clients | tokens/s | TTFT p50 (ms) | per-token p50 (ms) | per-token p99 (ms) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['clients']} | {r['tokens_per_s']:,.1f} | {r['ttft_p50_ms']:,.1f} | {r['token_p50_ms']:.1f} | "
                  f"{r['token_p99_ms']:.1f} |")
    engine = result.get("engine_alone")
    if engine:
        print("\nengine alone (no server), tokens/s: "
              + ", ".join(f"{k} {statistics.median(v):,.1f}" for k, v in engine.items()))
    r = result["ratios"]
    print(f"\nbatched / one at a time, aggregate tokens/s at 8 clients: {r['tokens_per_s_batched_over_one_at_8']}x "
          f"(goal >= 3x); batched p99 per-token latency, 8 clients / 1 client: {r['token_p99_batched_8_over_1']}x "
          f"(goal <= 2x)")
    problems = [f"{name}, {row['clients']} clients: {what}" for name, rows in result["summary"].items() for row in rows
                for what in ([f"{len(row['errors'])} failed requests, e.g. {row['errors'][0]}"] if row["errors"] else [])
                + ([f"{row['short_replies']} replies short of {result['max_tokens']} tokens"] if row["short_replies"]
                   else [])
                + ([f"{row['chunks']} text chunks for {row['completion_tokens']} tokens"]
                   if row["chunks"] != row["completion_tokens"] else [])]
    print("checks: " + ("; ".join(problems) if problems else
                        "no errors, every reply 64 tokens, one text chunk per token"))


def plot(result: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = {"one at a time": "tab:gray", "continuous batching": "tab:blue"}
    for name, rows in result["summary"].items():
        c = [r["clients"] for r in rows]
        label = f"{name} (--max_batch {SERVERS[name]})"
        left.plot(c, [r["tokens_per_s"] for r in rows], "o-", color=colors[name], label=label)
        right.plot(c, [r["token_p50_ms"] for r in rows], "o-", color=colors[name], label=f"{name}: p50")
        right.plot(c, [r["token_p99_ms"] for r in rows], "s--", color=colors[name], label=f"{name}: p99")
    engine = result.get("engine_alone")
    if engine:
        c = [r["clients"] for r in result["summary"]["continuous batching"]]
        left.plot(c, [statistics.median(engine[f"{SLOTS} slots, {n} rows"]) for n in c], ":", color="tab:blue",
                  label=f"engine alone, {SLOTS} slots (no HTTP)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        shown = [r["clients"] for r in result["summary"]["continuous batching"]]
        ax.set_xticks(shown, [str(n) for n in shown])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.set_ylabel("aggregate tokens/s")
    left.set_title("Throughput, all clients together")
    right.set_ylabel("ms between streamed tokens")
    right.set_title("Per-token latency of a request")
    fig.suptitle(f"app.py under load: {result['model']}, CPU, {result['machine']['threads']} "
                 f"thread{'s' if result['machine']['threads'] != 1 else ''}", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, compiled=False, extra=[
        ("--requests", dict(type=int, default=2, help="requests each client sends, back to back")),
        ("--compile", dict(action="store_true", help="serve with app.py --compile (compiled decoding step)")),
        ("--levels", dict(default="1,2,4,8,16", help="client counts, comma-separated")),
        ("--threads", dict(type=int, default=0, help="torch threads of the servers and the engine-alone runs "
                                                      "(OMP_NUM_THREADS; 0: as torch picks, the cores)")),
        ("--figure", dict(type=Path, default=DEFAULT_FIGURE, help="where to draw the figure")),
        ("--plot", dict(type=Path, metavar="JSON", help="only print the tables and draw the figure of a saved run"))])
    if args.plot:
        result = json.loads(args.plot.read_text())
        print_report(result)
        plot(result, args.figure)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    text = SHAKESPEARE.read_text()
    tokenizer = Tokenizer.train_char(text)
    pool = prompt_pool(text)
    levels_ = [int(n) for n in args.levels.split(",")]
    per_server = sum(levels_) * args.requests
    assert len(pool) >= per_server + 2, "not enough distinct prompts"
    runs: dict[str, list[list[dict]]] = {name: [] for name in SERVERS}
    engine: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "serve_load_3m"
        torch.manual_seed(0)
        model = Llama(ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPE))
        params = model.num_params()
        checkpoint.save_hf(model, folder)
        tokenizer.save(folder)
        description = (f"{params / 1e6:.2f}M parameters (dim {SHAPE['dim']}, {SHAPE['n_layers']} layers, "
                       f"{SHAPE['n_heads']}/{SHAPE['n_kv_heads']} heads, FFN {model.cfg.ffn_dim}, char vocab "
                       f"{tokenizer.vocab_size}, context {SHAPE['max_seq_len']}), fp32, "
                       f"{'compiled' if args.compile else 'eager'}")
        print(f"model: {description}; {describe_machine()}", flush=True)
        for round_ in range(args.rounds):
            order = list(SERVERS) if round_ % 2 == 0 else list(SERVERS)[::-1]
            for name in order:
                started = time.perf_counter()
                server = AppServer(folder, SERVERS[name], args.compile, Path(tmp) / "app.log", args.threads)
                try:
                    load_level(server, 2, 1, pool[-2:], 8)  # warm-up (and compilation) outside the timings
                    levels, offset = [], 0
                    for clients in levels_:
                        prompts = pool[offset:offset + clients * args.requests]
                        offset += clients * args.requests
                        levels.append(load_level(server, clients, args.requests, prompts, MAX_TOKENS))
                        lv = levels[-1]
                        print(f"round {round_ + 1} {name}, {clients} clients: {lv['tokens_per_s']:.1f} tokens/s, "
                              f"TTFT p50 {lv['ttft_p50_ms']:.0f} ms, per-token p50/p99 {lv['token_p50_ms']:.1f}/"
                              f"{lv['token_p99_ms']:.1f} ms, slots in use up to {lv['max_slots_in_use_seen']}, "
                              f"queued up to {lv['max_queued_seen']}" + (f", {len(lv['errors'])} errors: "
                                                                         f"{lv['errors'][0]}" if lv["errors"] else ""),
                              file=sys.stderr, flush=True)
                finally:
                    server.close()
                log = (Path(tmp) / "app.log").read_text()
                if "Traceback" in log or "rror" in log:
                    print(f"app.py's log ({name}):\n{log[-3000:]}", file=sys.stderr)
                runs[name].append(levels)
                print(f"round {round_ + 1} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if not args.compile:  # the engine alone, in this process with no server running
                for rows in levels_:
                    engine.setdefault(f"{SLOTS} slots, {rows} rows", []).append(
                        engine_alone(folder, SLOTS, rows, pool, tokenizer, MAX_TOKENS))
                engine.setdefault("1 slot, 1 row", []).append(engine_alone(folder, 1, 1, pool, tokenizer, MAX_TOKENS))
                engine.setdefault("8 slots, 8 rows", []).append(engine_alone(folder, 8, 8, pool, tokenizer, MAX_TOKENS))
    summary = summarize(runs)
    result = {"model": description, "params": params, "config": {"vocab_size": tokenizer.vocab_size, **SHAPE},
              "machine": machine(), "machine_text": describe_machine(), "compile": args.compile,
              "rounds": args.rounds, "requests_per_client": args.requests, "max_tokens": MAX_TOKENS, "slots": SLOTS,
              "summary": summary, "ratios": ratios(summary), "engine_alone": engine, "runs": runs}
    print_report(result)
    print(json.dumps({"ratios": result["ratios"], "machine": result["machine"]}))
    path = args.json or DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    plot(result, args.figure)


if __name__ == "__main__":
    main()
