"""Chat: time to the first token of each turn, the conversation kept in the KV cache against read again.

    python bench/chat_latency.py [--rounds 3] [--turns 10] [--json out.json]

The model is the reference config (vocab 8192, 6 layers, dim 384, 6/2 heads, FFN 1024, random weights)
with a 2,048-token context and our BPE trained on Tiny Shakespeare with --data.chat's turn markers and
template. A conversation of --turns exchanges: a system prompt, then user messages of 24 tokens of
Tiny Shakespeare each, the replies 32 greedy tokens. generate.py's ChatSession answers each turn
feeding only what its cache lacks; the baseline forgets the cache before each turn, so it reads the
whole history again (what a stateless chat loop, or a server without prefix caching, does). Rounds
alternate between the two and medians are reported, per turn. fp32, CPU, eager.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
from chat import ChatFormat  # noqa: E402
from config import SampleConfig  # noqa: E402
from generate import ChatSession, load_for_sampling  # noqa: E402
from model import Llama  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_speed import REFERENCE, benchmark_args  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MESSAGE_TOKENS, REPLY_TOKENS = 24, 32


def conversation(session: ChatSession, messages: list[str], forget: bool) -> list[float]:
    """Seconds to the first token of each turn (the first piece of text, or the end of an empty reply)."""
    session.reset()
    ttft = []
    for text in messages:
        if forget:
            session.engine.forget()
        start = time.perf_counter()
        pieces = session.reply(text)
        next(pieces, None)
        ttft.append(time.perf_counter() - start)
        for _ in pieces:
            pass
    return ttft


def main() -> None:
    args = benchmark_args(__doc__, default_rounds=3, compiled=False, extra=[
        ("--turns", dict(type=int, default=10, help="exchanges per conversation"))])
    text = SHAKESPEARE.read_text()
    tokenizer = Tokenizer.train_bpe([text], REFERENCE.vocab_size, chat=True)
    ids = tokenizer.encode(text[len(text) // 2:])
    messages = [tokenizer.decode(ids[i * MESSAGE_TOKENS:(i + 1) * MESSAGE_TOKENS]) for i in range(args.turns)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint.save_hf(Llama(dataclasses.replace(REFERENCE, max_seq_len=2048)), tmp)
        tokenizer.save(tmp)
        cfg = SampleConfig(checkpoint=tmp, temperature=0.0, max_new_tokens=REPLY_TOKENS, eos="none")
        loaded = load_for_sampling(cfg)
        session = ChatSession(loaded, ChatFormat.load(tmp), cfg, "You speak in verse.")
        conversation(session, messages[:2], forget=False)  # warm-up
        variants = {"kept in the KV cache": False, "history read again": True}
        times: dict[str, list[list[float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, forget in variants.items():
                times[name].append(conversation(session, messages, forget))
        history = len(session.chat.encode(session.messages, add_generation_prompt=True))
    medians = {name: [statistics.median(r[t] for r in runs) for t in range(args.turns)] for name, runs in times.items()}
    rows = [{"variant": name, "first_turn_ms": round(1000 * m[0], 1), "last_turn_ms": round(1000 * m[-1], 1),
             "last_over_first": round(m[-1] / m[0], 2)} for name, m in medians.items()]
    print(f"\nreference config, 2,048-token context, fp32, CPU ({torch.get_num_threads()} threads): {args.turns} turns of "
          f"{MESSAGE_TOKENS}-token messages and {REPLY_TOKENS}-token replies; {history} tokens of history at the end")
    print(f"| variant | turn 1 TTFT (ms) | turn {args.turns} TTFT (ms) | turn {args.turns} / turn 1 |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['first_turn_ms']:.1f} | {r['last_turn_ms']:.1f} | {r['last_over_first']:.2f}x |")
    summary = {"turns": args.turns, "history_tokens": history, "rows": rows,
               "per_turn_ms": {name: [round(1000 * t, 1) for t in m] for name, m in medians.items()}}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
