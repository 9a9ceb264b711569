"""The decoding engine: every decoded token in nanollama comes from Engine.step().

An Engine owns a static KV cache of `slots` rows. A request (a prompt, its sampling settings, its
own random generator and stop rules) waits until a slot is free, is prefilled into it, then decodes
with every other active slot in one forward per step: each row at its own position (RoPE, cache
write and mask per row), so the step keeps one shape and compiles once. A long prompt is read in
chunks of at most `prefill_chunk` tokens per step while other slots decode, and a request that
finishes or is cancelled frees its slot at once. A slot keeps the tokens its cache holds after its
request is done: the next request that starts the same way (a chat's next turn) reads only what
differs. With a draft model the engine decodes speculatively, every slot's round in the same
forwards. generate.py's batches and chat, app.py's server and speculative decoding all run here;
docs/serving.md explains the design.

Exactness: a row draws only from its own generator, seeded from (seed, prompt, sample) by row_seed,
so a request decodes the same text alone or in company.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import torch

from config import SampleConfig
from model import Llama

# ---------------------------------------------------------------------------------------------
# Sampling: each function maps (batch, vocab) logits to logits, -inf marking what was dropped


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's rule on every token already in the prompt or output (`seen`, a (batch, vocab)
    bool mask): positive logits are divided by the penalty, negative ones multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits (ties broken by topk, so never more than k)."""
    if k >= logits.shape[-1]:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # 0 for the top token, so it always stays
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def filtered_logits(logits: torch.Tensor, seen: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """The logits sampling draws from, in Hugging Face's order: repetition penalty, temperature,
    top-k, top-p, min-p (cfg.temperature > 0)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p > 0.0:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of (batch, vocab) probabilities, row i drawing from generators[i].

    argmax(p / E) with E ~ Exp(1) picks token i with probability p_i (the exponential race);
    unlike torch.multinomial it never syncs with the device. One generator per row keeps a row's
    draws independent of what else shares the batch."""
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, cfg: SampleConfig,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The next token of each row, (batch,). Stays on the device: nothing here waits for the GPU."""
    if cfg.temperature == 0:
        logits = logits.float()
        if cfg.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return logits.argmax(dim=-1)
    return draw(filtered_logits(logits, seen, cfg).softmax(dim=-1), generators)


def next_token_probs(logits: torch.Tensor, seen: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """The distribution sample_next draws from, (vocab,) from (vocab,) logits; greedy decoding's is
    all on its argmax."""
    if cfg.temperature > 0:
        return filtered_logits(logits[None], seen[None], cfg)[0].softmax(dim=-1)
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()


def judge_proposals(verified: torch.Tensor, proposals: list[int], draft_probs: list[torch.Tensor],
                    seen: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> tuple[list[int], int]:
    """Speculative sampling's test of one round: the proposals the target keeps (each with probability
    min(1, p / q)), then the token it adds: a draw from max(p - q, 0) at the first rejection, from
    its own distribution after the last proposal when all are kept. `verified`: the target's logits
    for every proposal and one past them."""
    kept, kept_seen = [], seen.clone()
    for i, (token, q) in enumerate(zip(proposals, draft_probs)):
        p = next_token_probs(verified[i], kept_seen, cfg)
        if not torch.rand((), device=verified.device, generator=generator) * q[token] < p[token]:
            residual = (p - q).clamp(min=0)
            return kept, int(draw((residual / residual.sum())[None], [generator])[0])
        kept.append(token)
        kept_seen[token] = True
    return kept, int(draw(next_token_probs(verified[len(proposals)], kept_seen, cfg)[None], [generator])[0])


def row_seed(seed: int, prompt_ids: Sequence[int], sample: int) -> int:
    """The seed of one (prompt, sample) pair's random stream: a hash of the seed, the prompt's tokens
    and the sample index. Different prompts never share draws, and a row draws the same numbers
    whatever else shares its batch, so a batch reproduces its rows' solo runs."""
    key = f"{seed}:{sample}:{','.join(map(str, prompt_ids))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # 63 bits: manual_seed's range


# ---------------------------------------------------------------------------------------------
# The compiled step


DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compile_decode_step(model: Llama) -> DecodeStep:
    """A compiled step, (slots, T) tokens at (slots,) positions -> (slots, T, vocab) logits (T is 1
    when decoding, k + 1 when a speculative round verifies k drafted tokens).

    Positions are a tensor and attention spans the whole cache, so every step has the same shapes
    and compiles once per slot count and cache length (gpt-fast's recipe); on GPUs CUDA graphs then
    remove the kernel-launch overhead. (Inductor's weight freezing with max_autotune decodes over
    twice as fast on CPU, but gave wrong tokens on stories260K in torch 2.13, so it stays off.)
    """
    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(tokens, start_pos=positions)[0]

    return torch.compile(step, fullgraph=True, options=decode_compile_options(model.embed_tokens.weight.is_cuda))


def decode_compile_options(on_gpu: bool) -> dict[str, bool]:
    """Inductor options for a compiled decoding step, given to that compile alone (a later compile
    in the process, a training step say, keeps the defaults).

    On GPUs: CUDA graphs (what mode="reduce-overhead" turns on) remove the kernel-launch overhead;
    with coordinate-descent tuning Inductor rewrites a one-row matmul as a reduction it can fuse
    with its neighbours (the norm before it, int8's conversion); max_autotune_pointwise starts that
    tuning from the best of several reduction shapes (+5% on an H100, bf16)."""
    if not on_gpu:
        return {}
    return {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "max_autotune_pointwise": True}


# ---------------------------------------------------------------------------------------------
# Requests and slots


@dataclasses.dataclass
class Completion:
    """One row: a prompt, which of its samples this is, and what was generated. finish_reason is
    None while decoding, then "eos", "length", "stop" (set by a caller watching stop strings) or
    "cancelled"; a caller that sets it ends the row at the next step."""
    prompt_ids: list[int]
    sample: int = 0
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class Speculation:
    """What speculative decoding did: rounds, tokens the draft proposed, and how many the target kept."""
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.proposed)


@dataclasses.dataclass
class Request:
    row: Completion
    cfg: SampleConfig
    eos: frozenset[int]
    generator: torch.Generator
    window: list[int]  # what the model reads: the prompt, then every new token (slid past the context)
    slide: bool  # at the context: keep the last half and go on (generate), or finish "length" (chat)
    started: bool = False  # it has had a slot

    @property
    def done(self) -> bool:
        return self.row.finish_reason is not None


@dataclasses.dataclass
class Slot:
    row: int  # its row of the KV cache
    cached: list[list[int]]  # per model (target, draft): the tokens its cache row holds, from position 0
    request: Request | None = None
    logits: torch.Tensor | None = None  # the next token's, when the prefill just read the whole window


def kept_on_slide(context: int) -> int:
    """How many of its last tokens a full window keeps when it slides."""
    return max(1, context // 2)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def sampling_key(cfg: SampleConfig) -> tuple:
    """Rows whose sampling settings are equal sample in one batch."""
    return cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """`slots` rows decoding at once on `model` (and a speculative `draft`, proposing k tokens a
    round). `context` (at most the model's max_seq_len) is the longest window a row reads;
    `cache_len` (default and at most the context) is the longest window the caller expects: each
    slot's cache holds that many positions (plus k with a draft).
    `steps` are compiled steps from compile_decode_step for (model, draft), or None: eager."""

    def __init__(self, model: Llama, slots: int, *, context: int | None = None, cache_len: int | None = None,
                 steps: Sequence[DecodeStep | None] = (), draft: Llama | None = None, k: int = 4,
                 prefill_chunk: int = 256, stats: Speculation | None = None):
        self.models = [model] if draft is None else [model, draft]
        self.context = min(context or model.cfg.max_seq_len, *(m.cfg.max_seq_len for m in self.models))
        self.k = k if draft is not None else 0
        # A round's proposals may run k positions past the longest window.
        self.cache_len = min(cache_len or self.context, self.context) + self.k
        self.steps = list(steps) + [None] * (len(self.models) - len(steps))
        self.prefill_chunk, self.stats = prefill_chunk, stats if stats is not None else Speculation()
        self.device = model.embed_tokens.weight.device
        self.waiting: collections.deque[Request] = collections.deque()
        self.generated = 0  # tokens decoded, all requests together
        self.slots = [Slot(i, [[] for _ in self.models]) for i in range(slots)]
        with torch.inference_mode():  # the cache and the per-slot state live as inference tensors
            for m in self.models:
                m.setup_cache(slots, max_seq_len=self.cache_len)
            self.seen = torch.zeros(slots, model.cfg.vocab_size, dtype=torch.bool, device=self.device)

    def submit(self, row: Completion, cfg: SampleConfig, eos: Sequence[int] = (), slide: bool = True) -> Request:
        """Queue `row` (its prompt fits the context) to decode with cfg; it starts when a slot is free."""
        if not 0 < len(row.prompt_ids) <= self.context:
            raise ValueError(f"prompts must hold 1 to {self.context} tokens, got {len(row.prompt_ids)}")
        generator = torch.Generator(self.device).manual_seed(row_seed(cfg.seed, row.prompt_ids, row.sample))
        request = Request(row, cfg, frozenset(eos), generator, list(row.prompt_ids), slide)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now, queued or decoding; its slot is free for the next one."""
        if request.row.finish_reason is None:
            request.row.finish_reason = "cancelled"
        self.release_finished()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.request for s in self.slots)

    @property
    def in_use(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def forget(self) -> None:
        """Drop what the free slots' caches hold, so the next requests read their prompts whole."""
        for slot in self.slots:
            if slot.request is None:
                for cached in slot.cached:
                    cached.clear()

    def close(self) -> None:
        """Take the caches out of the models; a compiled step's next engine finds the same buffers."""
        for m, step in zip(self.models, self.steps):
            m.clear_cache(keep=step is not None)

    def step(self) -> None:
        """Admit waiting requests into free slots, read prompts (chunked), then give every slot
        that is ready one new token (with a draft: one speculative round)."""
        with torch.inference_mode():
            self.release_finished()
            self.admit()
            ready = self.prefill()
            if ready and self.k:
                self.speculate(ready)
            elif ready:
                self.decode(ready)
            self.release_finished()

    # --- the parts of a step ----------------------------------------------------------------

    def release_finished(self) -> None:
        self.waiting = collections.deque(r for r in self.waiting if not r.done)
        for slot in self.slots:
            if slot.request is not None and slot.request.done:
                slot.request, slot.logits = None, None

    def admit(self) -> None:
        """Waiting requests into free slots, each where the cache already holds most of its prompt."""
        while self.waiting and (free := [s for s in self.slots if s.request is None]):
            request = self.waiting.popleft()
            slot = max(free, key=lambda s: shared_prefix(s.cached[0], request.window))
            slot.request, request.started = request, True
            self.seen[slot.row] = False
            self.seen[slot.row, request.window] = True

    def prefill(self) -> list[Slot]:
        """Read what each new slot's caches lack of its window: all of it for plain decoding, whose
        first token is then sampled from the prefill's own logits (kept in slot.logits); all but
        the last token for speculative rounds, which feed it. While some slot is ready to decode,
        at most prefill_chunk prompt tokens are read per step, so a long prompt does not stall the
        others. Returns the slots that are ready."""
        active = [s for s in self.slots if s.request is not None]
        budget = self.prefill_chunk if any(self.is_ready(s) for s in active) else None
        for slot in (s for s in active if not self.is_ready(s)):
            window = slot.request.window
            for m, (model, cached) in enumerate(zip(self.models, slot.cached)):
                goal = len(window) - 1 if self.k else len(window)
                # At least the last token is read again: its logits are the first token's.
                del cached[min(shared_prefix(cached, window), len(window) - 1):]
                while len(cached) < goal and budget != 0:
                    n = goal - len(cached) if budget is None else min(budget, goal - len(cached))
                    chunk = window[len(cached):len(cached) + n]
                    logits = model(torch.tensor([chunk], device=self.device), start_pos=len(cached),
                                   cache_rows=slot.row, last_only=True)[0]
                    cached += chunk
                    budget = None if budget is None else budget - n
                    if len(cached) == len(window):
                        slot.logits = logits[0, -1]
        return [s for s in active if self.is_ready(s)]

    def is_ready(self, slot: Slot) -> bool:
        """Whether a slot can decode this step: its caches hold its window but the last token, which
        the step feeds, or (plain decoding, after its prefill) all of it, with the logits kept."""
        window = slot.request.window
        if slot.logits is not None:
            return len(slot.cached[0]) == len(window)
        return all(len(cached) == len(window) - 1 for cached in slot.cached)

    def forward(self, m: int, tokens: dict[int, list[int]], offset: int = 0) -> torch.Tensor:
        """Logits (slots, T, vocab) of model m reading tokens[slot.row] (T each) from position
        len(window) - 1 + offset of each of those slots.

        Compiled, every slot is in the batch (the step's shapes never change): the others read
        filler past what their caches hold, which is never read back. Eager, only the slots in
        `tokens` are, attending over no more positions than the furthest of them needs; their
        logits land in their rows of the result."""
        T = len(next(iter(tokens.values())))
        fed = [s for s in self.slots if s.row in tokens]
        positions = {s.row: len(s.request.window) - 1 + offset for s in fed}
        step = self.steps[m]
        if step is None:
            rows, starts = [s.row for s in fed], sorted(set(positions.values()))
            batch = self.on_device([tokens[row] for row in rows])
            within = starts[-1] + T <= self.models[m].cfg.max_seq_len  # speculative filler may run past it
            if len(starts) == 1 and rows == list(range(rows[0], rows[0] + len(rows))) and within:
                # One position, consecutive cache rows (a lone request, prompts alike): the plain
                # cached forward, over views of the cache with no mask to build.
                logits, _ = self.models[m](batch, start_pos=starts[0], cache_rows=rows[0])
            else:
                logits, _ = self.models[m](batch, start_pos=self.on_device([positions[row] for row in rows]),
                                           cache_rows=self.on_device(rows), keys=starts[-1] + T)
            return logits.new_zeros(len(self.slots), *logits.shape[1:]).index_copy_(0, self.on_device(rows), logits)
        for slot in self.slots:
            if slot.row not in tokens:  # written where the slot's cache holds nothing it will read again
                positions[slot.row] = min(len(slot.cached[m]), self.cache_len - T)
                del slot.cached[m][positions[slot.row]:]
        return step(self.on_device([tokens.get(s.row, [0] * T) for s in self.slots]),
                    self.on_device([positions[s.row] for s in self.slots]))

    def decode(self, ready: list[Slot]) -> None:
        """One token for every ready slot: one forward for those that need one (the others have
        their prefill's logits), then each group of rows that samples alike."""
        fed = [s for s in ready if s.logits is None]
        if fed:
            logits = self.forward(0, {s.row: [s.request.window[-1]] for s in fed})[:, -1]
        else:
            logits = torch.zeros(len(self.slots), self.models[0].cfg.vocab_size, device=self.device)
        groups: dict[tuple, list[Slot]] = collections.defaultdict(list)
        for slot in ready:
            if slot.logits is None:
                slot.cached[0].append(slot.request.window[-1])
            else:
                logits[slot.row], slot.logits = slot.logits, None
            groups[sampling_key(slot.request.cfg)].append(slot)
        order, tokens = [], []
        for group in groups.values():
            rows = [s.row for s in group]
            if rows == list(range(len(self.slots))):  # every slot, in order: no gather to copy
                group_logits, group_seen = logits, self.seen
            else:
                index = self.on_device(rows)
                group_logits, group_seen = logits[index], self.seen[index]
            tokens.append(sample_next(group_logits, group_seen, group[0].request.cfg,
                                      [s.request.generator for s in group]))
            order += group
        for slot, token in zip(order, self.to_host(torch.cat(tokens))):
            self.accept(slot, [token])

    def on_device(self, values: list) -> torch.Tensor:
        """A host list on the device without waiting: copied from pinned memory behind the queued work."""
        on_gpu = self.device.type == "cuda"
        return torch.tensor(values, pin_memory=on_gpu).to(self.device, non_blocking=on_gpu)

    def to_host(self, tokens: torch.Tensor) -> list[int]:
        """A step's tokens on the host. On a GPU the copy goes to pinned memory and the host waits for
        that copy alone (an event), never for the whole device."""
        if self.device.type != "cuda":
            return tokens.tolist()
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()
        return host.tolist()

    def speculate(self, ready: list[Slot]) -> None:
        """One speculative round for every ready slot: the draft proposes k tokens (k forwards of
        every slot), the target reads them all in one forward, and each row keeps what
        judge_proposals keeps. A row closer than k tokens to the context judges only what fits;
        its other proposals are filler."""
        room = {s.row: min(self.k, self.context - len(s.request.window)) for s in ready}
        proposals: dict[int, list[int]] = {s.row: [] for s in ready}
        draft_probs: dict[int, list[torch.Tensor]] = {s.row: [] for s in ready}
        proposal_seen = {s.row: self.seen[s.row].clone() for s in ready}
        feed = {s.row: [s.request.window[-1]] for s in ready}
        for i in range(self.k):
            logits = self.forward(1, feed, offset=i)[:, -1]
            for slot in ready:
                request, row = slot.request, slot.row
                token = 0
                if i < room[row]:
                    q = next_token_probs(logits[row], proposal_seen[row], request.cfg)
                    token = int(draw(q[None], [request.generator])[0])
                    draft_probs[row].append(q)
                    proposal_seen[row][token] = True
                proposals[row].append(token)
                feed[row] = [token]
        verified = self.forward(0, {s.row: [s.request.window[-1]] + proposals[s.row] for s in ready})
        for slot in ready:
            request, row, n = slot.request, slot.row, room[slot.row]
            kept, extra = judge_proposals(verified[row], proposals[row][:n], draft_probs[row], self.seen[row],
                                          request.cfg, request.generator)
            self.stats.rounds, self.stats.proposed, self.stats.accepted = (
                self.stats.rounds + 1, self.stats.proposed + n, self.stats.accepted + len(kept))
            slot.cached[0] += [request.window[-1]] + kept
            slot.cached[1] += [request.window[-1]] + kept[:self.k - 1]
            self.accept(slot, kept + [extra])

    def accept(self, slot: Slot, tokens: list[int]) -> None:
        """New tokens onto a slot's row, up to EOS or max_new_tokens; a window past the context
        slides (or, for a request that does not slide, the row finishes)."""
        request, row = slot.request, slot.request.row
        for token in tokens:
            if token in request.eos:
                row.finish_reason = "eos"
                return
            row.token_ids.append(token)
            request.window.append(token)
            self.generated += 1
            self.seen[slot.row, token] = True
            if len(row.token_ids) == request.cfg.max_new_tokens:
                row.finish_reason = "length"
                return
        if len(request.window) > self.context:
            if not request.slide:
                row.finish_reason = "length"
            else:  # the kept tokens are read again from position 0 by the next prefill
                request.window = request.window[-kept_on_slide(self.context):]
