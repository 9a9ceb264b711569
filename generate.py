"""Sample text from a checkpoint: ours, a Hugging Face Llama folder, or a llama2.c .bin file.

    python generate.py --checkpoint out/run --prompt "Once upon a time" --top_p 0.9
    python generate.py --checkpoint ../shared/data/stories260K.bin --prompt_ids "1" --temperature 0
    echo "To be" | python generate.py --checkpoint out/run --json --num_samples 3
    python generate.py --help                     # every option (also spelled --sample.<key>)

Decoding runs on engine.py's Engine: each (prompt, sample) row gets a slot of a pre-allocated KV
cache, its prompt is read in one forward, then every step feeds each row one token at its own
position and sends only the last position through the LM head, so every row decodes as it would
alone. Every row draws from a generator of its own, seeded from (seed, prompt tokens, sample index)
by engine.row_seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import stat
import sys
import time
import typing
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import torch

import checkpoint
import devices
from chat import ChatFormat, chat_template
from config import ConfigError, EvalConfig, SampleConfig, expand_short_flags, load_json, parse_cli, script
from decoding import prepare_for_decoding
from engine import (Completion, DecodeStep, Engine, Request, Speculation, compile_decode_step, kept_on_slide,
                    row_seed, sample_next)
from model import Llama
from tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Decoding: batches of prompts on the engine


def new_rows(prompts: Sequence[Sequence[int]], num_samples: int, context: int) -> list[Completion]:
    """`num_samples` rows for each prompt; a ValueError when the longest prompt is empty or longer
    than `context`."""
    rows = [Completion(list(p), sample) for p in prompts for sample in range(num_samples)]
    if (longest := max(len(r.prompt_ids) for r in rows)) == 0 or longest > context:
        raise ValueError(f"prompts must hold 1 to {context} tokens, got {longest}")
    return rows


def cache_slots(needed: int, context: int) -> int:
    """KV-cache positions for a call that needs `needed`: rounded up to a multiple of 256 (at most
    the context), so that calls of other lengths reuse the compiled step instead of recompiling it."""
    return min(context, -(-needed // 256) * 256)


def run_engine(engine: Engine, rows: list[Completion], cfg: SampleConfig,
               eos_ids: Sequence[int]) -> Iterator[list[Completion]]:
    """Every row submitted to `engine`, then the rows after each of its steps until all finish."""
    for row in rows:
        engine.submit(row, cfg, eos_ids)
    try:
        while engine.busy:
            engine.step()
            yield rows
    finally:
        engine.close()


def generate(model: Llama, prompts: Sequence[Sequence[int]], cfg: SampleConfig, eos_ids: Sequence[int] = (), *,
             use_cache: bool = True, decode_step: DecodeStep | None = None,
             context: int | None = None) -> Iterator[list[Completion]]:
    """Decode cfg.num_samples samples of every prompt, one engine slot each, yielding the rows after
    each step.

    A row's token_ids grow by one per step until it finishes (EOS or max_new_tokens); a caller may
    end a row early by setting its finish_reason (stop strings do). `context` (default and at most
    the model's max_seq_len) is the longest window the model reads: a row that reaches it slides,
    keeping its last context // 2 tokens, so no position past what the model was trained on is ever
    used and every row still decodes as it would alone. Without the cache every step re-reads the
    whole window (reread_generate: the baseline the cache is measured against); `decode_step`
    comes from compile_decode_step.
    """
    context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
    rows = new_rows(prompts, cfg.num_samples, context)
    if not use_cache:
        yield from reread_generate(model, rows, cfg, set(eos_ids), context)
        return
    longest = max(len(r.prompt_ids) for r in rows)
    engine = Engine(model, len(rows), context=context, cache_len=cache_slots(longest + cfg.max_new_tokens - 1, context),
                    steps=[decode_step])
    yield from run_engine(engine, rows, cfg, eos_ids)


def reread_generate(model: Llama, rows: list[Completion], cfg: SampleConfig, eos: set[int],
                    context: int) -> Iterator[list[Completion]]:
    """Decoding without a KV cache, the reference: every step reads each row's whole window again
    (sliding as the engine does), and samples as the engine does."""
    device = model.embed_tokens.weight.device
    windows = [list(r.prompt_ids) for r in rows]
    generators = [torch.Generator(device).manual_seed(row_seed(cfg.seed, r.prompt_ids, r.sample)) for r in rows]
    seen = torch.zeros(len(rows), model.cfg.vocab_size, dtype=torch.bool, device=device)
    for i, window in enumerate(windows):
        seen[i, window] = True
    while not all(r.finish_reason for r in rows):
        for i, (row, window) in enumerate(zip(rows, windows)):
            if row.finish_reason:
                continue
            with torch.inference_mode():
                logits = model(torch.tensor([window], device=device), last_only=True)[0][:, -1]
                token = int(sample_next(logits, seen[i:i + 1], cfg, [generators[i]])[0])
            seen[i, token] = True
            if token in eos:
                row.finish_reason = "eos"
                continue
            row.token_ids.append(token)
            window.append(token)
            if len(row.token_ids) == cfg.max_new_tokens:
                row.finish_reason = "length"
            elif len(window) > context:
                windows[i] = window[-kept_on_slide(context):]
        yield rows


def speculative_generate(target: Llama, draft: Llama, prompts: Sequence[Sequence[int]], cfg: SampleConfig,
                         eos_ids: Sequence[int] = (), *, k: int = 4,
                         steps: tuple[DecodeStep, DecodeStep] | None = None, context: int | None = None,
                         stats: Speculation | None = None) -> Iterator[list[Completion]]:
    """generate() through speculative decoding (Leviathan et al., 2023), yielding the rows after each
    round; every row has a slot, and the rounds of all rows share their forwards.

    Each round the draft proposes k tokens one at a time; the target reads them all in one forward
    and keeps proposal i with probability min(1, p_i / q_i) (p: the target's sampling distribution,
    q: the draft's, filters and penalty applied to both). The first rejected proposal is replaced by
    a draw from max(p - q, 0), normalized; when all k are kept the target adds one of its own. The
    output follows the target's distribution whatever the draft is (greedy: it is the target's own
    greedy output); a draft that agrees often saves target forwards. `steps` are compiled steps for
    (target, draft) from compile_decode_step; the window slides as in generate().
    """
    context = min(context or target.cfg.max_seq_len, target.cfg.max_seq_len, draft.cfg.max_seq_len)
    rows = new_rows(prompts, cfg.num_samples, context)
    longest = max(len(r.prompt_ids) for r in rows)
    engine = Engine(target, len(rows), context=context, cache_len=cache_slots(longest + cfg.max_new_tokens, context),
                    steps=steps or (), draft=draft, k=k, stats=stats)
    yield from run_engine(engine, rows, cfg, eos_ids)


def generate_text(steps: Iterator[list[Completion]], render: Callable[[list[int]], str], stops: Sequence[str] = (),
                  *, live: bool = True) -> Iterator[tuple[list[Completion], list[str]]]:
    """The rows that generate() (or speculative_generate()) yields, with each row's text, as
    (rows, texts) after every step.

    A row's text is rendered after every step when `live` or when stop strings must be watched, else
    once, when the row finishes (rendering a growing text every step costs time). The first stop
    string in a row's text ends the row (finish_reason "stop"); the text keeps what precedes it.
    """
    texts: list[str] = []
    done: set[int] = set()
    for rows in steps:
        texts = texts or [""] * len(rows)
        for i, row in enumerate(rows):
            if i in done or not (live or stops or row.finish_reason):
                continue
            texts[i] = render(row.token_ids)
            if (cut := min((texts[i].find(s) for s in stops if s in texts[i]), default=-1)) >= 0:
                texts[i], row.finish_reason = texts[i][:cut], "stop"
            if row.finish_reason:
                done.add(i)
        yield rows, texts


def hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may not be printed yet: a half-decoded UTF-8 character, or
    the beginning of a stop string that the next tokens may complete."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):  # the longest prefix of stop ending text
            if text.endswith(stop[:n]):
                held = n
                break
    return held


def visible_text(text: str, finish_reason: str | None, stops: Sequence[str]) -> str:
    """What of a row's text may be shown now: all of it once the row has finished, else all but
    what hold_back keeps back."""
    return text if finish_reason else text[:len(text) - hold_back(text, stops)]


# ---------------------------------------------------------------------------------------------
# Tokenizer and special tokens


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to sample from."""
    model: Llama  # on the configured device and dtype, in eval mode
    tokenizer: Tokenizer | None  # None: the checkpoint has none (prompts are token ids)
    prefix: list[int]  # what every prompt starts with (BOS or nothing), as documents did in training
    start: list[int]  # what an empty prompt is
    eos: list[int]  # cfg.eos, when set, replaces the checkpoint's
    context: int  # the longest window to decode over: what the model was trained on, when recorded
    folder: Path | None  # the checkpoint's folder (None: a llama2.c file)
    quantize: str  # what the weights became: cfg.quantize, or "none" where int8 would be slower


def load_for_sampling(cfg: SampleConfig) -> Loaded:
    """cfg.checkpoint loaded for sampling, with its tokenizer and special tokens."""
    if cfg.checkpoint is None:
        raise ConfigError("no checkpoint given: pass --checkpoint PATH (a checkpoint, run or Hugging Face folder, "
                          "or a llama2.c .bin)")
    device, dtype = pick_device(cfg)
    model, folder = checkpoint.load_model(cfg.checkpoint, dtype)
    model = model.to(device).eval()
    quantize = decoding_quantization(cfg, device, dtype)
    prepare_for_decoding(model, quantize, cfg.compile)
    tokenizer = load_tokenizer(folder)
    prefix, start, eos = special_token_ids(folder, tokenizer)
    trained = checkpoint.trained_context(folder) if folder is not None else None
    return Loaded(model, tokenizer, prefix, start, eos if cfg.eos_ids() is None else cfg.eos_ids(),
                  min(trained or model.cfg.max_seq_len, model.cfg.max_seq_len), folder, quantize)


def decoding_quantization(cfg: SampleConfig, device: torch.device, dtype: torch.dtype) -> str:
    """cfg.quantize where it makes decoding faster. Int8 pays off only compiled, where the
    conversion fuses into the one-row matmuls (bench/README.md: CPUs of both ISAs and GPUs); eager, every
    call would convert whole matrices first, so there it says so and keeps the float weights."""
    if cfg.quantize == "none":
        return "none"
    float_name = str(dtype).removeprefix("torch.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--quantize int8 runs on cpu and cuda, not {device.type}: leave it out to decode in {float_name}")
    if not cfg.compile:
        print(f"note: int8 is faster than {float_name} only compiled: decoding in {float_name} "
              f"(add --compile for int8)", file=sys.stderr)
        return "none"
    return cfg.quantize


def detokenize(tokenizer: Tokenizer | None, ids: list[int]) -> str:
    """The text of `ids`; without a tokenizer, the ids themselves, each after a space."""
    return tokenizer.decode(ids) if tokenizer is not None else "".join(f" {i}" for i in ids)


def load_tokenizer(folder: Path | None) -> Tokenizer | None:
    """The folder's tokenizer, or None (llama2.c files, bare folders)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return Tokenizer.load(folder)


def special_token_ids(folder: Path | None, tokenizer: Tokenizer | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt prefix, empty prompt, EOS ids). The tokenizer decides the first two as it decided
    the training data (tokenizer.py: its post-processor's prefix; BOS, or EOS, to start from
    nothing); without one, config.json's BOS is both. EOS ids come from generation_config.json
    (Llama 3 lists several), then config.json, then the tokenizer. A llama2.c file has BOS 1,
    which also ends a sequence (TinyStories stories are BOS-separated)."""
    if folder is None:
        return [1], [1], [1]
    found: dict[str, typing.Any] = {}
    for name in ("config.json", "generation_config.json"):  # the later file wins
        if (folder / name).is_file():
            found.update({k: v for k, v in load_json(folder / name).items() if v is not None})
    eos = found.get("eos_token_id")
    if tokenizer is not None:
        prefix, start = tokenizer.prefix, tokenizer.start_ids()
        eos = eos if eos is not None else tokenizer.eos_id
    else:
        prefix = start = [found["bos_token_id"]] if isinstance(found.get("bos_token_id"), int) else []
    return prefix, start, [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# Sampling settings a generation_config.json may hold (SampleConfig names them alike).
GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(checkpoint_path: str | None) -> dict[str, typing.Any]:
    """The sampling settings a checkpoint's generation_config.json asks for, as SampleConfig
    fields: its temperature, top_k, top_p, min_p and repetition_penalty, or temperature 0 where it
    says do_sample=false (greedy, as transformers' generate then decodes)."""
    path = Path(checkpoint_path) if checkpoint_path else None
    if path is None or not path.is_dir():
        return {}
    file = checkpoint.resolve(path) / "generation_config.json"
    if not file.is_file():
        return {}
    found = load_json(file)
    if found.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: found[key] for key in GENERATION_DEFAULTS
            if isinstance(found.get(key), (int, float)) and not isinstance(found[key], bool)}


def with_generation_defaults(cfg: SampleConfig, explicit: set[str]) -> tuple[SampleConfig, set[str]]:
    """cfg with the checkpoint's generation_config.json defaults wherever the user set nothing,
    and the names of the sampling settings that are now chosen (by the user or the checkpoint)."""
    chosen = {key.split(".", 1)[1] for key in explicit if key.startswith("sample.")}
    taken = {k: v for k, v in generation_defaults(cfg.checkpoint).items() if k not in chosen}
    if taken:
        print("sampling with the checkpoint's generation_config.json defaults: "
              + ", ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr)
    cfg = dataclasses.replace(cfg, **taken)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"the checkpoint's generation_config.json: {e}") from None
    return cfg, chosen | set(taken)


# ---------------------------------------------------------------------------------------------
# Command line


def read_prompt_text(cfg: SampleConfig) -> str:
    if cfg.prompt_file == "-":
        return sys.stdin.read()
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt file {path} does not exist")
        return path.read_text()
    if cfg.prompt or cfg.prompt_ids is not None:
        return cfg.prompt
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):  # no usable stdin: closed, or replaced by a test harness
        return ""
    return sys.stdin.read() if stat.S_ISFIFO(mode) or stat.S_ISREG(mode) else ""  # piped in, not a terminal


def start_prompt(ids: Sequence[int], loaded: Loaded, source: str) -> list[int]:
    """A prompt's ids checked against the vocabulary and starting as documents did in training
    (with BOS when the tokenizer puts one there); an empty prompt starts from `loaded.start`."""
    vocab_size = loaded.model.cfg.vocab_size
    if (bad := next((i for i in ids if not 0 <= i < vocab_size), None)) is not None:
        raise ConfigError(f"prompt token id {bad} is outside the vocabulary of {source} (0..{vocab_size - 1})")
    prefix = loaded.prefix
    ids = list(ids) if list(ids[:len(prefix)]) == prefix else [*prefix, *ids]
    if not ids and not loaded.start:
        raise ConfigError(f"the prompt is empty and {source} defines no BOS token to start from: give a prompt")
    return ids or list(loaded.start)


def prompt_token_ids(cfg: SampleConfig, loaded: Loaded, source: str) -> tuple[list[str | None], list[list[int]]]:
    """(prompt texts, None for raw ids; prompt token ids) each starting as documents did in training."""
    tokenizer = loaded.tokenizer
    if cfg.prompt_ids is not None:
        id_lists = cfg.prompt_id_lists()
        texts: list[str | None] = [None] * len(id_lists)
    else:
        text = read_prompt_text(cfg)
        texts = [line for line in text.splitlines() if line.strip()] if cfg.batch_lines else [text]
        texts = texts or [""]
        if tokenizer is None and any(texts):
            raise ConfigError(f"{source} has no tokenizer.json: give the prompt as token ids, e.g. --prompt_ids '1 403 9'")
        id_lists = [tokenizer.encode(t) if t else [] for t in texts]
    return texts, [start_prompt(ids, loaded, source) for ids in id_lists]


def fit_context(id_lists: list[list[int]], cfg: SampleConfig, context: int) -> list[list[int]]:
    """Refuse prompts longer than the context, or with --truncate left keep each prompt's end."""
    if cfg.truncate == "left":
        return [ids[-context:] for ids in id_lists]
    if (longest := max(map(len, id_lists))) > context:
        raise ConfigError(f"the prompt has {longest} tokens but the model's context is {context}: shorten it, "
                          f"or pass --truncate left to keep its last tokens")
    return id_lists


def pick_device(cfg: SampleConfig | EvalConfig) -> tuple[torch.device, torch.dtype]:
    """The device and weights dtype to sample or score on: auto is bf16 on CUDA GPUs that do it,
    fp32 elsewhere (on MPS too: bf16 there only when asked for)."""
    section = "sample" if isinstance(cfg, SampleConfig) else "eval"
    device = devices.resolve(cfg.device, f"{section}.device")
    if cfg.dtype != "auto":
        return device, devices.checked_dtype(device, cfg.dtype, f"{section}.dtype")
    on_bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if on_bf16_gpu else torch.float32


def token_steps(loaded: Loaded, cfg: SampleConfig,
                id_lists: list[list[int]]) -> tuple[Iterator[list[Completion]], Speculation | None]:
    """The rows after every step: from generate(), or with cfg.draft from speculative_generate()
    (then also its running Speculation counts)."""
    step = compile_decode_step(loaded.model) if cfg.compile else None
    if cfg.draft is None:
        return generate(loaded.model, id_lists, cfg, loaded.eos, decode_step=step, context=loaded.context), None
    draft = load_draft(cfg, loaded)
    speculation = Speculation()
    steps = (step, compile_decode_step(draft)) if cfg.compile else None
    return speculative_generate(loaded.model, draft, id_lists, cfg, loaded.eos, k=cfg.draft_tokens, steps=steps,
                                context=loaded.context, stats=speculation), speculation


def load_draft(cfg: SampleConfig, loaded: Loaded) -> Llama:
    """cfg.draft, prepared like the model, after checking that both read the same tokens."""
    model = loaded.model
    draft, folder = checkpoint.load_model(cfg.draft, model.embed_tokens.weight.dtype)
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise ConfigError(f"the draft {cfg.draft} has a vocabulary of {draft.cfg.vocab_size} tokens and "
                          f"{cfg.checkpoint} one of {model.cfg.vocab_size}: a draft must share the model's tokenizer")
    files = [f / "tokenizer.json" if f is not None and (f / "tokenizer.json").is_file() else None
             for f in (loaded.folder, folder)]
    if files != [None, None] and (None in files or files[0].read_bytes() != files[1].read_bytes()):
        raise ConfigError(f"the draft {cfg.draft} and {cfg.checkpoint} do not have the same tokenizer.json: "
                          f"a draft must share the model's tokenizer")
    draft = draft.to(model.embed_tokens.weight.device).eval()
    prepare_for_decoding(draft, loaded.quantize, cfg.compile)
    return draft


# ---------------------------------------------------------------------------------------------
# Chat


class ChatSession:
    """A conversation kept in the KV cache of a one-slot engine between turns. Each turn renders the
    whole conversation with the chat template; the engine reads only what its slot's cache does not
    already hold (the new message and the reply's header), so the time to the first token does not
    grow with the history. When the conversation would not leave room for a reply, its oldest turns
    go (the system prompt stays) and the cache is read again from where the text first differs."""

    def __init__(self, loaded: Loaded, chat: ChatFormat, cfg: SampleConfig, system: str | None = None):
        self.chat, self.cfg, self.system = chat, cfg, system
        self.context = loaded.context
        self.eos = {*loaded.eos, *chat.turn_end_ids()}
        self.room = min(cfg.max_new_tokens, self.context // 2)  # kept free for the reply
        self.engine = Engine(loaded.model, 1, context=self.context)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self) -> tuple[list[int], int]:
        """The conversation's ids up to the reply, and how many turns had to go to leave room."""
        dropped = 0
        while True:
            ids = self.chat.encode(self.messages, add_generation_prompt=True)
            first = 1 if self.system else 0
            if len(ids) + self.room <= self.context or len(self.messages) - first <= 1:
                return ids, dropped
            del self.messages[first:first + 2]  # the oldest exchange: a user message and its reply
            dropped += 1

    def reply(self, text: str) -> Iterator[str]:
        """The assistant's answer to `text`, in pieces as they decode. Ends at the end of turn, after
        max_new_tokens, or when the context is full. A message that fills the context on its own is
        refused (ConfigError) and a reply cut short (Ctrl-C) is dropped: either way the conversation
        stays exactly as it was before the message."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        if len(ids) >= self.context:
            self.messages = before
            raise ConfigError(f"this message alone fills the {self.context}-token context ({len(ids)} tokens with "
                              f"the template): shorten it; the conversation so far is kept")
        if dropped:
            yield f"[the context is full: dropped the oldest {dropped} exchange(s)]\n"
        # The reply may fill the context, never slide past it.
        cfg = dataclasses.replace(self.cfg, max_new_tokens=min(self.cfg.max_new_tokens, self.context - len(ids)))
        request = self.engine.submit(Completion(ids), cfg, sorted(self.eos), slide=False)
        try:
            out = yield from self._decode(request)
        except BaseException:  # the slot keeps what it had read: the next turn reads on from there
            self.engine.cancel(request)
            self.messages = before
            raise
        self.messages.append({"role": "assistant", "content": self.chat.tokenizer.decode(out)})

    def _decode(self, request: Request) -> Generator[str, None, list[int]]:
        """Step the engine until the reply is done; yields its text as it grows and returns its ids."""
        out, shown = request.row.token_ids, ""
        while not request.done:
            self.engine.step()
            decoded = self.chat.tokenizer.decode(out)
            if decoded != shown and not decoded.endswith("\ufffd"):  # not in the middle of a character's bytes
                yield decoded[len(shown):]
                shown = decoded
        if (decoded := self.chat.tokenizer.decode(out)) != shown:
            yield decoded[len(shown):]
        return out


def line_reader() -> Callable[[], str]:
    """input() with a "> " marker, line editing and history (readline) on a terminal; without one
    (piped input), plain lines and no marker in the output."""
    if not sys.stdin.isatty():
        return input
    with contextlib.suppress(ImportError):  # absent on some platforms; input() still works
        import readline  # noqa: F401  (importing it gives input() editing and history)
    return lambda: input("> ")


def chat_repl(cfg: SampleConfig) -> None:
    """generate.py --chat: read a message, stream the reply, until /exit, Ctrl-D or Ctrl-C at the
    prompt. Empty lines are ignored; Ctrl-C during a reply stops it and drops that exchange; a
    message too long for the context is refused in one line, the conversation kept."""
    loaded = load_for_sampling(cfg)
    if loaded.folder is None or loaded.tokenizer is None:
        raise ConfigError(f"{cfg.checkpoint} has no tokenizer, so it cannot chat: use a checkpoint folder whose "
                          f"tokenizer has a chat template")
    session = ChatSession(loaded, ChatFormat(loaded.tokenizer, chat_template(loaded.folder)), cfg, cfg.system)
    read = line_reader()
    print("chat: /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            text = read()
        except (EOFError, KeyboardInterrupt):
            if sys.stdin.isatty():  # after "> ": the shell's prompt then starts on a line of its own
                print(flush=True)
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            session.reset()
            print("[a new conversation]", flush=True)
            continue
        if not text.strip():
            continue
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            print("\n[stopped: this exchange is dropped]", end="", flush=True)
        print(flush=True)


@script
def main(argv: list[str]) -> None:
    cfg = parse_cli(expand_short_flags(argv, ("sample",)), prog="generate.py", sections=("sample",))
    run(with_generation_defaults(cfg.sample, cfg.explicit)[0])


def run(cfg: SampleConfig) -> None:
    if cfg.chat:
        chat_repl(cfg)
        return
    loaded = load_for_sampling(cfg)
    tokenizer, context = loaded.tokenizer, loaded.context
    stops = cfg.stop_strings()
    if stops and tokenizer is None:
        raise ConfigError(f"stop strings need a tokenizer and {cfg.checkpoint} has none: stop on token ids with --eos")
    texts, id_lists = prompt_token_ids(cfg, loaded, cfg.checkpoint)
    id_lists = fit_context(id_lists, cfg, context)
    steps, speculation = token_steps(loaded, cfg, id_lists)
    if max(map(len, id_lists)) + cfg.max_new_tokens - 1 > context:
        print(f"note: {cfg.checkpoint} was trained on windows of {context} tokens; past that, decoding slides "
              f"the window, keeping the last {kept_on_slide(context)} tokens", file=sys.stderr)
    one_row = len(id_lists) * cfg.num_samples == 1
    if cfg.stream is True and not one_row:
        raise ConfigError("--stream prints a single sample: drop it, or use one prompt and num_samples=1")
    stream = one_row and not cfg.json and (sys.stdout.isatty() if cfg.stream == "auto" else cfg.stream)

    render = functools.partial(detokenize, tokenizer)
    finished_s: dict[int, float] = {}
    printed, token_times, start = 0, [], time.perf_counter()
    if stream:
        print(texts[0] if texts[0] is not None else render(id_lists[0]).lstrip(), end="", flush=True)
    for rows, texts_out in generate_text(steps, render, stops, live=stream):
        elapsed = time.perf_counter() - start
        token_times.append(elapsed)
        for i, row in enumerate(rows):
            if row.finish_reason and i not in finished_s:
                finished_s[i] = elapsed
        if stream:
            visible = visible_text(texts_out[0], rows[0].finish_reason, stops)
            print(visible[printed:], end="", flush=True)
            printed = max(printed, len(visible))
    if stream:
        print()
    # With --compile the step after the first token compiles: that time is reported on its own.
    compile_s = token_times[1] - token_times[0] if cfg.compile and len(token_times) > 1 else 0.0
    for i, row in enumerate(rows):
        text = texts_out[i]
        prompt = texts[i // cfg.num_samples]
        if cfg.json:
            print(json.dumps({"prompt": prompt, "prompt_ids": row.prompt_ids, "sample": row.sample, "text": text,
                              "token_ids": row.token_ids, "finish_reason": row.finish_reason,
                              "tokens_per_s": round(len(row.token_ids) / (finished_s[i] - compile_s), 2),
                              "time_to_first_token_s": round(token_times[0], 4),
                              "compile_s": round(compile_s, 3),
                              **({"draft_acceptance_rate": round(speculation.acceptance_rate, 4)}
                                 if speculation else {})}))
        elif not stream:
            shown_prompt = prompt if prompt is not None else render(row.prompt_ids).lstrip()
            print(("---\n" if i else "") + shown_prompt + text)
    n_tokens, elapsed = sum(len(r.token_ids) for r in rows), time.perf_counter() - start - compile_s
    compiled = f"; compiling took {compile_s:.1f}s, not counted" if cfg.compile else ""
    drafted = (f"; the target kept {speculation.acceptance_rate:.0%} of the draft's {speculation.proposed} tokens"
               if speculation else "")
    print(f"{n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tokens/s), first token after "
          f"{1000 * token_times[0]:.0f} ms{compiled}{drafted}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
