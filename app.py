"""Serve a checkpoint: a web demo in the browser and an OpenAI-compatible completions and chat API.

    pip install -r requirements-app.txt
    python app.py --checkpoint out/shakespeare_char_cpu        # demo at http://127.0.0.1:7860/
    python app.py --checkpoint out/run --port 8000 --max_tokens 256 --compile
    python app.py --help                                       # every option ([sample] and [serve])

The API answers `GET /v1/models`, `POST /v1/completions` (prompt string or list, max_tokens,
temperature, top_p, n, stop, seed, stream as server-sent events) and, for a checkpoint whose
tokenizer has a chat template, `POST /v1/chat/completions` (messages instead of a prompt), so the
`openai` client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")
    client.completions.create(model="shakespeare_char_cpu", prompt="ROMEO:", max_tokens=64)
    client.chat.completions.create(model="smol-chat", messages=[{"role": "user", "content": "Hi!"}])

top_k, min_p and repetition_penalty go through the client's `extra_body`. Requests share one
decoding engine (engine.py) of `--max_batch` slots: concurrent requests decode in one batch, each
streaming on its own; rows that find every slot busy wait in a queue of `--max_queue`, and past it
a request gets a 429 with Retry-After. A client that disconnects frees its slots at the next step.
`GET /metrics` reports slots in use, queue length and tokens/s (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import math
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline server

from chat import ChatError, ChatFormat, chat_template
from config import SampleConfig, ServeConfig, UserError, bounds_of, expand_short_flags, parse_cli, script
from engine import Completion, Engine, Request, compile_decode_step
from generate import (Loaded, detokenize, generate_text, load_for_sampling, new_rows, start_prompt, visible_text,
                      with_generation_defaults)

try:
    import fastapi
    import pydantic
    import uvicorn
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as missing:  # the server's packages are an optional extra
    print(f"error: app.py needs {missing.name}: pip install -r requirements-app.txt", file=sys.stderr)
    sys.exit(2)


class RequestError(UserError):
    """A bad request: answered with an OpenAI-style error body naming the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.param, self.status, self.code, self.retry_after = param, status, code, retry_after

    def response(self) -> JSONResponse:
        kind = "rate_limit_error" if self.status == 429 else "invalid_request_error"
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------------------------
# The server: one model, one decoding engine, one thread that steps it


@dataclasses.dataclass
class RowText:
    """One completion as far as it has been decoded: its showable text (stop strings cut, a
    possible stop-string start held back), finish reason ("eos", "stop", "length" or None while
    decoding) and token count."""
    text: str
    finish_reason: str | None
    n_tokens: int


@dataclasses.dataclass
class Update:
    rows: list[RowText]
    elapsed_s: float  # since the request arrived


@dataclasses.dataclass
class Job:
    """One request: its rows (prompts x n), each a request to the engine once the thread takes it."""
    rows: list[Completion]
    cfg: SampleConfig
    stops: list[str]
    live: bool  # render every row's text after every token (streaming), or only when it finishes
    emit: Callable[[Update | BaseException | None], None]  # None: the job is over
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    requests: list[Request] = dataclasses.field(default_factory=list)
    queued: int = 0  # of its rows, how many still wait for a slot (counted in Server.queued)
    texts: Iterator[tuple[list[Completion], list[str]]] | None = None
    shown: list[tuple[int, str | None]] = dataclasses.field(default_factory=list)  # what the last update said


def chat_format(loaded: Loaded) -> ChatFormat | None:
    """The checkpoint's tokenizer with its chat template, or None when it has no template."""
    if loaded.tokenizer is None:
        return None
    try:
        return ChatFormat(loaded.tokenizer, chat_template(loaded.folder))
    except ChatError:
        return None


def poster(loop: asyncio.AbstractEventLoop, updates: asyncio.Queue) -> Callable[[Update | BaseException | None], None]:
    """How the decoding thread hands a request its updates: onto the request's event loop. A loop
    that has closed (the request is over: it raised, or its client left) takes nothing, and must
    not take the decoding thread down with it."""
    def post(item: Update | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(updates.put_nowait, item)
        except RuntimeError:  # "Event loop is closed": nobody is listening any more
            pass
    return post


class Server:
    """Loads a checkpoint and serves every request on one engine of serve.max_batch slots: the
    rows of all requests decode together, each streaming on its own. Rows that find every slot
    busy wait in a queue of at most serve.max_queue; past it a request is refused with a 429."""

    def __init__(self, sample: SampleConfig, serve: ServeConfig, chosen: set[str] = frozenset()):
        loaded = load_for_sampling(sample)
        self.loaded, self.model, self.tokenizer, self.eos = loaded, loaded.model, loaded.tokenizer, loaded.eos
        self.name = serve.model_name or Path(sample.checkpoint).name
        self.chat = chat_format(loaded)
        if self.chat is not None and sample.eos_ids() is None:  # replies end at the template's end of turn
            self.eos = sorted({*self.eos, *self.chat.turn_end_ids()})
        self.context = loaded.context  # what the model was trained on: decoding slides past it
        # A prompt must also leave room in the context for at least one new token.
        self.max_prompt_tokens = min(serve.max_prompt_tokens or self.context, self.context)
        self.defaults = sample
        # Sampling settings the command line or the checkpoint's generation_config.json chose: a
        # request that omits one gets it, instead of the API's neutral default.
        self.chosen = chosen
        steps = [compile_decode_step(self.model)] if sample.compile else []
        self.engine = Engine(self.model, serve.max_batch, context=self.context, steps=steps,
                             prefill_chunk=serve.prefill_chunk)
        self.render = functools.partial(detokenize, self.tokenizer)
        self.max_queue, self.lock = serve.max_queue, threading.Lock()
        self.queued = 0  # rows accepted that have no slot yet
        self.meter = Meter(serve.max_batch)
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, name="decoder", daemon=True).start()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's ids, up to the assistant's turn to speak; bad ones raise RequestError."""
        if self.chat is None:
            raise RequestError(f"{self.name} has no chat template: use /v1/completions, or serve a checkpoint whose "
                               f"tokenizer has one", "messages")
        try:
            ids = self.chat.encode(messages, add_generation_prompt=True)
        except ChatError as e:
            raise RequestError(str(e), "messages") from None
        return self.within_limit(ids, "conversation", "messages")

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's ids, starting as training documents did; bad prompts raise RequestError."""
        if isinstance(prompt, str) and self.tokenizer is None:
            raise RequestError(f"{self.name} has no tokenizer: send the prompt as a list of token ids", "prompt")
        try:
            ids = start_prompt(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, self.loaded,
                               self.name)
        except UserError as e:
            raise RequestError(str(e), "prompt") from None
        return self.within_limit(ids, "prompt", "prompt")

    def within_limit(self, ids: list[int], what: str, field: str) -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the {what} has {len(ids)} tokens, more than the {self.max_prompt_tokens} this server "
                               f"accepts: shorten it", field)
        return ids

    def admit(self, job: Job) -> None:
        """Count a request's rows into the queue, or refuse it (429) when they would not fit."""
        with self.lock:
            waiting = self.queued + len(job.rows) - self.meter.free_slots
            if waiting > self.max_queue:
                raise RequestError(f"the server is busy: every slot is taken and {self.queued} completion(s) are "
                                   f"queued (limit {self.max_queue}); retry later", status=429,
                                   code="rate_limit_exceeded", retry_after=self.meter.retry_after(waiting))
            self.queued += len(job.rows)
            job.queued = len(job.rows)

    def stream(self, prompts: list[list[int]], cfg: SampleConfig, stops: list[str],
               live: bool) -> AsyncIterator[Update]:
        """Queue a request, or refuse it now (RequestError, 429) when the queue is full; its
        progress comes as it decodes (with `live`, every row's text so far; else a row's text once
        it has finished). Leaving the iterator early (a client that went away) cancels the request
        and frees its slots at the next step. Call it from the request's event loop."""
        updates: asyncio.Queue = asyncio.Queue()
        rows = new_rows(prompts, cfg.num_samples, self.context)
        job = Job(rows, cfg, stops, live, poster(asyncio.get_running_loop(), updates))
        self.admit(job)
        self.jobs.put(job)
        return self.updates(job, updates)

    @staticmethod
    async def updates(job: Job, updates: asyncio.Queue) -> AsyncIterator[Update]:
        try:
            while (item := await updates.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _work(self) -> None:
        active: list[Job] = []
        while True:
            self.take_jobs(active)
            for job in active:
                if job.cancelled.is_set():
                    for request in job.requests:
                        self.engine.cancel(request)
            try:
                self.engine.step()
            except Exception as e:  # reported to the requests decoding now; the server goes on
                for job in list(active):
                    for request in job.requests:
                        self.engine.cancel(request)
                    job.emit(e)
                    self.finish(job, active)
            self.report(active)

    def take_jobs(self, active: list[Job]) -> None:
        """New requests onto the engine: wait for one while nothing decodes, else take what came."""
        while True:
            try:
                job = self.jobs.get(block=not active and not self.engine.busy)
            except queue.Empty:
                return
            job.requests = [self.engine.submit(row, job.cfg, self.eos) for row in job.rows]
            job.texts = generate_text(itertools.repeat(job.rows), self.render, job.stops, live=job.live)
            active.append(job)

    def report(self, active: list[Job]) -> None:
        """After a step: the queue and speed counts, then each request's new text, or its end. (The
        counts first: a client that reads its update may send its next request at once.)"""
        for job in active:
            self.count_queued(job, sum(not (r.started or r.done) for r in job.requests))
        # Rows taken in since this step began wait for the next one, not for a slot: not queued.
        self.meter.stepped(self.engine.generated, self.engine.in_use, len(self.engine.waiting))
        for job in list(active):
            if not job.cancelled.is_set():
                rows, texts = next(job.texts)
                shown = [(len(r.token_ids), r.finish_reason) for r in rows]
                if shown != job.shown:
                    job.shown = shown
                    job.emit(Update([RowText(visible_text(text, row.finish_reason, job.stops), row.finish_reason,
                                             len(row.token_ids)) for row, text in zip(rows, texts)],
                                    time.perf_counter() - job.arrived))
            if all(r.done for r in job.requests):
                self.meter.finished(time.perf_counter() - job.arrived)
                self.finish(job, active)

    def count_queued(self, job: Job, queued: int) -> None:
        with self.lock:
            self.queued += queued - job.queued
            job.queued = queued

    def finish(self, job: Job, active: list[Job]) -> None:
        self.count_queued(job, 0)
        job.emit(None)
        active.remove(job)


class Meter:
    """What /metrics and the periodic log line say: slots in use, rows queued, tokens/s over the
    last LOG_EVERY_S seconds; and how long a refused client should wait before retrying."""
    LOG_EVERY_S = 10.0

    def __init__(self, slots: int):
        self.slots, self.in_use, self.queued = slots, 0, 0
        self.request_s = 1.0  # a running mean of request durations (for Retry-After)
        self.window_start, self.window_generated, self.tokens_per_s = time.perf_counter(), 0, 0.0

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_use

    def retry_after(self, waiting: int) -> int:
        """Seconds until about `waiting` rows ahead have been served, at least 1."""
        return max(1, math.ceil(self.request_s * waiting / self.slots))

    def finished(self, seconds: float) -> None:
        self.request_s = 0.9 * self.request_s + 0.1 * seconds

    def stepped(self, generated: int, in_use: int, queued: int) -> None:
        """After a step: `generated`, the engine's count of tokens so far."""
        self.in_use, self.queued = in_use, queued
        now = time.perf_counter()
        if now - self.window_start >= self.LOG_EVERY_S:
            self.tokens_per_s = (generated - self.window_generated) / (now - self.window_start)
            if self.tokens_per_s or in_use or queued:
                print(f"serving: {in_use}/{self.slots} slots in use, {queued} queued, "
                      f"{self.tokens_per_s:.1f} tokens/s", file=sys.stderr, flush=True)
            self.window_start, self.window_generated = now, generated

    def snapshot(self) -> dict[str, Any]:
        return {"slots": self.slots, "slots_in_use": self.in_use, "queued": self.queued,
                "tokens_per_s": round(self.tokens_per_s, 1)}


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible API


class StreamOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def knob(default: Any, sample_key: str) -> Any:
    """An API field with the bounds SampleConfig declares for `sample_key` (the defaults are
    OpenAI's, which differ from the command line's)."""
    return pydantic.Field(default, allow_inf_nan=False, **bounds_of(SampleConfig, sample_key).as_kwargs())


# The request fields that set a SampleConfig knob.
API_KNOBS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "n": "num_samples",
             "seed": "seed", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


class SamplingRequest(pydantic.BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. Strict: a field of the wrong type
    or an unknown field is an error, not something to guess at. OpenAI fields we do not implement
    are accepted only at their neutral value; top_k, min_p and repetition_penalty extend the API
    as vLLM does."""
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int = knob(16, "max_new_tokens")
    temperature: float = knob(1.0, "temperature")
    top_p: float = knob(1.0, "top_p")
    n: int = knob(1, "num_samples")
    stop: str | list[str] | None = None
    seed: int | None = knob(None, "seed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int = knob(0, "top_k")
    min_p: float = knob(0.0, "min_p")
    repetition_penalty: float = knob(1.0, "repetition_penalty")
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise RequestError("stop takes up to 4 non-empty strings", "stop")
        return stops


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_ids(self, server: Server) -> list[list[int]]:
        """Each prompt's ids: a string or a token-id list is one prompt."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [server.encode(self.prompt)]
        if not self.prompt:
            raise RequestError("prompt is an empty list: send a string, token ids, or a list of either", "prompt")
        return [server.encode(p) for p in self.prompt]


class Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions: the conversation so far; the reply is the assistant's next turn."""
    messages: list[Message] = pydantic.Field(min_length=1)
    logprobs: Literal[False] | None = None

    def prompt_ids(self, server: Server) -> list[list[int]]:
        return [server.encode_chat([{"role": m.role, "content": m.content} for m in self.messages])]


UNSUPPORTED = {"echo": "false", "logprobs": "null", "best_of": "1", "suffix": "null", "frequency_penalty": "0",
               "presence_penalty": "0"}


def describe_validation_error(error: pydantic.ValidationError) -> RequestError:
    """pydantic's first complaint as one line that names the field."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    where = ".".join(loc) or "the request body"
    if first["type"] == "extra_forbidden":
        return RequestError(f"unknown field {where!r}: this server implements the OpenAI completions and chat "
                            f"fields plus top_k, min_p and repetition_penalty", field)
    if first["type"] == "missing":
        return RequestError(f"{where} is required", field)
    if field in UNSUPPORTED:
        return RequestError(f"{field} is not supported by this server (only {UNSUPPORTED[field]} is accepted)", field)
    return RequestError(f"{where}: {first['msg'].lower()}, got {json.dumps(first.get('input'), default=str)[:80]}",
                        field)


def parse_request(body: bytes, server: Server, serve: ServeConfig, kind: type[SamplingRequest] = CompletionRequest
                  ) -> tuple[SamplingRequest, list[list[int]], SampleConfig, list[str]]:
    """Validate a completions (or, with kind=ChatRequest, chat) request: (request, prompt ids,
    sampling config, stop strings). Raises RequestError."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = kind.model_validate(data)
    except pydantic.ValidationError as e:
        raise describe_validation_error(e) from None
    if request.model != server.name:
        raise RequestError(f"the model {request.model!r} does not exist: this server serves {server.name!r}",
                           "model", status=404, code="model_not_found")
    if request.max_tokens > serve.max_tokens:
        raise RequestError(f"max_tokens={request.max_tokens} is more than this server's limit of {serve.max_tokens}",
                           "max_tokens")
    ids = request.prompt_ids(server)
    if len(ids) * request.n > serve.max_choices:
        raise RequestError(f"{len(ids)} prompt(s) x n={request.n} is more than this server's limit of "
                           f"{serve.max_choices} completions per request", "n")
    stops = request.stop_strings()
    if stops and server.tokenizer is None:
        raise RequestError(f"{server.name} has no tokenizer, so it cannot watch for stop strings", "stop")
    knobs = {ours: getattr(request, field) for field, ours in API_KNOBS.items()
             if field in request.model_fields_set or ours not in server.chosen}
    knobs["seed"] = secrets.randbits(31) if request.seed is None else request.seed  # fresh draws per request
    cfg = dataclasses.replace(server.defaults, **knobs)
    try:
        cfg.validate()
    except UserError as e:
        raise RequestError(str(e)) from None
    return request, ids, cfg, stops


OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def completion_body(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: dict[str, int] | None = None, kind: str = "text_completion") -> dict[str, Any]:
    body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_of(prompts: list[list[int]], rows: list[RowText]) -> dict[str, int]:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(r.n_tokens for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_api(server: Server, serve: ServeConfig) -> fastapi.FastAPI:
    api = fastapi.FastAPI(title="nanollama", docs_url=None, redoc_url=None)

    @api.exception_handler(RequestError)
    async def request_error(_: fastapi.Request, error: RequestError) -> JSONResponse:
        return error.response()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "nanollama", "max_model_len": server.context}]}

    @api.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return server.meter.snapshot()

    @api.post("/v1/completions")
    async def completions(raw: fastapi.Request) -> Any:
        request, prompts, cfg, stops = parse_request(await raw.body(), server, serve)
        request_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        updates = server.stream(prompts, cfg, stops, live=request.stream)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(sse_events(updates, request_id, created, server.name, prompts, include_usage),
                                     media_type="text/event-stream")
        rows = await last_rows(updates, raw)
        choices = [{"text": r.text, "index": i, "logprobs": None, "finish_reason": OPENAI_FINISH[r.finish_reason]}
                   for i, r in enumerate(rows)]
        return completion_body(request_id, created, server.name, choices, usage_of(prompts, rows))

    @api.post("/v1/chat/completions")
    async def chat_completions(raw: fastapi.Request) -> Any:
        request, prompts, cfg, stops = parse_request(await raw.body(), server, serve, ChatRequest)
        request_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        updates = server.stream(prompts, cfg, stops, live=request.stream)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(sse_events(updates, request_id, created, server.name, prompts, include_usage,
                                                chat=True), media_type="text/event-stream")
        rows = await last_rows(updates, raw)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": OPENAI_FINISH[r.finish_reason]} for i, r in enumerate(rows)]
        return completion_body(request_id, created, server.name, choices, usage_of(prompts, rows), "chat.completion")

    return api


async def last_rows(updates: AsyncIterator[Update], raw: fastapi.Request) -> list[RowText]:
    """A request's final rows; a client that has gone meanwhile cancels it (the next update notices)."""
    rows: list[RowText] = []
    async for update in updates:
        rows = update.rows
        if await raw.is_disconnected():
            break
    await updates.aclose()
    return rows


async def sse_events(updates: AsyncIterator[Update], request_id: str, created: int, model: str,
                     prompts: list[list[int]], include_usage: bool, chat: bool = False) -> AsyncIterator[str]:
    """Server-sent events: each chunk carries the new text of the choices that moved, a choice's
    last chunk its finish_reason; then usage if asked for, then [DONE]. Chat chunks carry the text
    as a `delta`, the first one with the assistant's role."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def choice(i: int, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if not chat:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    sent: dict[int, int] = {}  # characters sent so far, per choice
    closed: set[int] = set()  # choices whose finish_reason has been sent
    rows: list[RowText] = []
    try:
        async for update in updates:
            rows, choices = update.rows, []
            for i, row in enumerate(rows):
                if i in closed or (len(row.text) == sent.get(i, 0) and not row.finish_reason):
                    continue
                choices.append(choice(i, row.text[sent.get(i, 0):], OPENAI_FINISH.get(row.finish_reason),
                                      i not in sent))
                sent[i] = len(row.text)
                if row.finish_reason:
                    closed.add(i)
            if choices:
                yield event(completion_body(request_id, created, model, choices, kind=kind))
        if include_usage:
            yield event(completion_body(request_id, created, model, [], usage_of(prompts, rows), kind))
    except Exception as e:  # headers are gone already: the error travels as an event
        yield event({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                               "code": None}})
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The web demo


def slider_range(sample_key: str, step: float, top: float | None = None) -> tuple[float, float]:
    """A demo control's ends for a sampling knob: the bounds SampleConfig declares, an open end
    moved in by one step, and `top` where the knob has no upper bound."""
    b = bounds_of(SampleConfig, sample_key)
    low = b.ge if b.ge is not None else b.gt + step
    high = b.le if b.le is not None else b.lt - step if b.lt is not None else top
    return low, high


def chat_messages(system: str, history: list[dict[str, Any]], message: str) -> list[dict[str, str]]:
    """The conversation as the template reads it; the chatbot may hold a message's text as parts."""
    def text(content: Any) -> str:
        return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    opening = [{"role": "system", "content": system}] if system else []
    earlier = [{"role": m["role"], "content": text(m["content"])} for m in history]
    return opening + earlier + [{"role": "user", "content": message}]


class DemoActions:
    """What the demo's buttons do: read the sampling controls, then stream a generation."""

    def __init__(self, server: Server):
        self.server = server

    def sampling(self, temperature: float, top_k: float, top_p: float, repetition_penalty: float,
                 max_new_tokens: float, seed: float) -> SampleConfig:
        # A slider's value is min + k * step in binary floating point (1.0 can arrive as
        # 1.0000000000000002, which would switch the repetition penalty on): round to the steps.
        cfg = dataclasses.replace(self.server.defaults, temperature=round(temperature, 4), top_k=int(top_k),
                                  top_p=round(top_p, 4), repetition_penalty=round(repetition_penalty, 4),
                                  max_new_tokens=int(max_new_tokens), num_samples=1, seed=int(seed))
        cfg.validate()
        return cfg

    async def run(self, prompt: str, temperature: float, top_k: float, top_p: float, repetition_penalty: float,
                  max_new_tokens: float, seed: float) -> AsyncIterator[tuple[str, str]]:
        """Generate: the prompt and its continuation as it streams, and the speed."""
        import gradio as gr
        server = self.server
        try:
            ids = server.encode(prompt if server.tokenizer is not None else [int(t) for t in prompt.split()])
            cfg = self.sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed)
        except (UserError, ValueError) as e:
            raise gr.Error(str(e)) from None
        async for update in server.stream([ids], cfg, [], live=True):
            row = update.rows[0]
            speed = (f"{row.n_tokens} tokens in {update.elapsed_s:.2f} s · "
                     f"{row.n_tokens / update.elapsed_s:,.1f} tokens/s")
            yield prompt + row.text, speed + (f" · finished ({row.finish_reason})" if row.finish_reason else "")

    async def chat_turn(self, message: str, history: list[dict[str, Any]], system: str, temperature: float,
                        top_k: float, top_p: float, repetition_penalty: float, max_new_tokens: float,
                        seed: float) -> AsyncIterator[tuple[list[dict[str, str]], str]]:
        """Send: the conversation with the reply as it streams (and the message box emptied)."""
        import gradio as gr
        try:
            messages = chat_messages(system, history, message)
            ids = self.server.encode_chat(messages)
            cfg = self.sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed)
        except (UserError, ValueError) as e:
            raise gr.Error(str(e)) from None
        shown = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": ""}]
        async for update in self.server.stream([ids], cfg, [], live=True):
            shown[-1]["content"] = update.rows[0].text
            yield shown, ""


def sampling_controls(server: Server, serve: ServeConfig) -> list[Any]:
    """The demo's sampling controls, in DemoActions.sampling's order, each within SampleConfig's bounds."""
    import gradio as gr
    d = server.defaults
    with gr.Row():
        temperature = gr.Slider(*slider_range("temperature", 0.05), value=d.temperature, step=0.05,
                                label="Temperature (0 = greedy)", elem_id="temperature")
        top_k = gr.Slider(*slider_range("top_k", 1, top=server.model.cfg.vocab_size), value=d.top_k, step=1,
                          label="Top-k (0 = off)", elem_id="top_k")
        top_p = gr.Slider(*slider_range("top_p", 0.01), value=d.top_p, step=0.01, label="Top-p", elem_id="top_p")
    with gr.Row():
        repetition_penalty = gr.Slider(*slider_range("repetition_penalty", 0.05), value=d.repetition_penalty,
                                       step=0.05, label="Repetition penalty", elem_id="repetition_penalty")
        max_new_tokens = gr.Slider(*slider_range("max_new_tokens", 1, top=serve.max_tokens),
                                   value=min(d.max_new_tokens, serve.max_tokens), step=1, label="Max new tokens",
                                   elem_id="max_new_tokens")
        low, high = slider_range("seed", 1)
        seed = gr.Number(value=d.seed, precision=0, minimum=low, maximum=high, label="Seed", elem_id="seed")
    return [temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed]


def chat_tab(actions: DemoActions, knobs: list[Any]) -> None:
    """The Chat tab, for a tokenizer with a chat template: a system prompt, the conversation, a message."""
    import gradio as gr
    with gr.Tab("Chat"):
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360, render_markdown=False)
        system = gr.Textbox(label="System prompt", elem_id="system")
        message = gr.Textbox(label="Message", elem_id="message")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("New conversation", elem_id="clear")
        send.click(actions.chat_turn, [message, chatbot, system, *knobs], [chatbot, message])
        clear.click(lambda: ([], ""), None, [chatbot, message])


def build_demo(server: Server, serve: ServeConfig) -> Any:
    """A Gradio page: sampling controls, then a tab to continue a prompt (streamed output and speed)
    and, when the tokenizer has a chat template, a chat tab; None without Gradio."""
    try:
        import gradio as gr
    except ImportError:
        return None
    kind = server.tokenizer.kind if server.tokenizer is not None else "token ids"
    actions = DemoActions(server)
    with gr.Blocks(title=f"nanollama · {server.name}") as demo:
        gr.Markdown(f"## nanollama · {server.name}\n{server.model.num_params():,} parameters · {kind} tokenizer · "
                    f"context {server.context} tokens", elem_id="model-info")
        knobs = sampling_controls(server, serve)
        with gr.Tabs():
            with gr.Tab("Complete"):
                prompt = gr.Textbox(label="Prompt" if server.tokenizer is not None else "Prompt (token ids)",
                                    lines=3, elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                output = gr.Textbox(label="Output", lines=12, interactive=False, elem_id="output")
                speed = gr.Markdown(elem_id="speed")
                button.click(actions.run, [prompt, *knobs], [output, speed])
            if server.chat is not None:  # the tokenizer has a chat template
                chat_tab(actions, knobs)
    return demo


# ---------------------------------------------------------------------------------------------
# Command line


def build_app(sample: SampleConfig, serve: ServeConfig,
              chosen: set[str] = frozenset()) -> tuple[fastapi.FastAPI, bool]:
    """The server (API, plus the demo at / when Gradio is installed) and whether the demo is on.
    `chosen`: the sampling settings requests default to (see Server)."""
    server = Server(sample, serve, chosen)
    api = build_api(server, serve)
    demo = build_demo(server, serve)
    if demo is None:
        return api, False
    import gradio as gr
    # System fonts only: the default theme would fetch Google's, which an offline browser cannot.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(api, demo, path="/", theme=theme, footer_links=[]), True


@script
def main(argv: list[str]) -> None:
    cfg = parse_cli(expand_short_flags(argv, ("serve", "sample")), prog="app.py", sections=("sample", "serve"))
    sample, chosen = with_generation_defaults(cfg.sample, cfg.explicit)
    app, with_demo = build_app(sample, cfg.serve, chosen)
    host, port = cfg.serve.host, cfg.serve.port
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {cfg.sample.checkpoint}: "
          + (f"demo at http://{shown}:{port}/, " if with_demo else "no demo (pip install -r requirements-app.txt), ")
          + f"OpenAI API at http://{shown}:{port}/v1", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model "
              f"(there is no authentication)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
