"""app.py: the OpenAI-compatible API through the official `openai` client, concurrent requests,
bad requests, and the web demo driven in a real headless Chromium.

Each server is a real `python app.py` process on a free local port, serving a small random model
saved with its own tokenizer (char level for the API tests, BPE for the browser test). EOS is off
(`--eos none`) so that every completion runs to its max_tokens whatever the random weights say."""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import app
import checkpoint
from config import ConfigError, ModelConfig, SampleConfig, ServeConfig, bounds_of
from generate import detokenize, generate, generate_text, load_for_sampling, start_prompt
from model import Llama
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "out" / "test-artifacts"
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 4
MAX_TOKENS, MAX_PROMPT_TOKENS = 200, 64


def save_checkpoint(folder: Path, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=128))
    checkpoint.save_hf(model, folder)
    tokenizer.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", str(port),
                                "--max_tokens", str(MAX_TOKENS), "--max_prompt_tokens", str(MAX_PROMPT_TOKENS),
                                "--eos", "none", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("app.py did not answer within 120 s")


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("char"), Tokenizer.train_char(TEXT))


@pytest.fixture(scope="module")
def server(char_checkpoint):
    process, url = start_server(char_checkpoint)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def reference(checkpoint: Path, prompt: str, **sample) -> str:
    """What generate.py's own decoding makes of the prompt: the server must produce the same."""
    cfg = SampleConfig(checkpoint=str(checkpoint), eos="none", **sample)
    loaded = load_for_sampling(cfg)
    steps = generate(loaded.model, [start_prompt(loaded.tokenizer.encode(prompt), loaded, "the reference")], cfg, loaded.eos,
                     context=loaded.context)
    for rows, texts in generate_text(steps, lambda ids: detokenize(loaded.tokenizer, ids)):
        pass
    return texts[0]


# --- the openai client ----------------------------------------------------------------------


def test_models_lists_the_checkpoint(client, char_checkpoint):
    assert [m.id for m in client.models.list().data] == [char_checkpoint.name]


def test_completion_equals_generate_py(client, char_checkpoint):
    done = client.completions.create(model=char_checkpoint.name, prompt="First", max_tokens=24, seed=5,
                                     temperature=0.9, top_p=0.95)
    choice = done.choices[0]
    assert choice.text == reference(char_checkpoint, "First", max_new_tokens=24, seed=5, temperature=0.9, top_p=0.95)
    assert choice.finish_reason == "length" and choice.index == 0
    # Char level: one token per character, and no BOS in front (its documents have none either).
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len("First"), 24)
    assert done.usage.total_tokens == len("First") + 24


def test_stream_n_stop_and_seed(client, char_checkpoint):
    model = char_checkpoint.name
    whole = client.completions.create(model=model, prompt="All:", max_tokens=40, seed=11).choices[0].text
    chunks = list(client.completions.create(model=model, prompt="All:", max_tokens=40, seed=11, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    twice = [client.completions.create(model=model, prompt="All:", max_tokens=40, seed=11).choices[0].text
             for _ in range(2)]
    assert twice == [whole, whole]

    pair = client.completions.create(model=model, prompt="All:", max_tokens=40, seed=11, n=2).choices
    assert [c.index for c in pair] == [0, 1] and pair[0].text == whole and pair[1].text != whole

    stop = whole[10:12]  # a string the unstopped text holds: the same seed stops right before it
    stopped = client.completions.create(model=model, prompt="All:", max_tokens=40, seed=11, stop=[stop, "@@"])
    assert stopped.choices[0].text == whole[:whole.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_list_of_prompts_with_extensions(client, char_checkpoint):
    done = client.completions.create(model=char_checkpoint.name, prompt=["Speak", "You are"], max_tokens=8, n=2,
                                     temperature=0.0, extra_body={"repetition_penalty": 1.3, "top_k": 5})
    texts = [c.text for c in done.choices]
    greedy = [reference(char_checkpoint, p, max_new_tokens=8, temperature=0.0, repetition_penalty=1.3)
              for p in ("Speak", "You are")]
    assert texts == [greedy[0], greedy[0], greedy[1], greedy[1]]  # prompt-major, n per prompt


def test_stream_usage_chunk(server, char_checkpoint):
    with httpx.stream("POST", f"{server}/v1/completions", json={
            "model": char_checkpoint.name, "prompt": "All:", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


# --- sharing the model ----------------------------------------------------------------------


def test_twenty_concurrent_requests_are_unmixed(client, char_checkpoint):
    model = char_checkpoint.name
    jobs = [(p, seed, seed % 2 == 0) for seed, p in enumerate(["First", "All:", "Speak", "You", "hear"] * 4)]

    def run(prompt: str, seed: int, stream: bool) -> str:
        args = dict(model=model, prompt=prompt, max_tokens=30 + seed, seed=seed)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
        return client.completions.create(**args).choices[0].text

    expected = [run(*job) for job in jobs]
    assert len(set(expected)) == 20
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert list(pool.map(lambda job: run(*job), jobs)) == expected


def slots_in_use_becomes(url: str, wanted: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/metrics").json()["slots_in_use"] == wanted:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, char_checkpoint, client):
    for stream in (True, False):
        body = {"model": char_checkpoint.name, "prompt": "All:", "max_tokens": MAX_TOKENS, "n": 8, "stream": stream}
        with pytest.raises(httpx.ReadTimeout) if not stream else contextlib.nullcontext():
            with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=0.2) as response:
                next(response.iter_lines())
        assert slots_in_use_becomes(server, 0)  # long before its 8 x 200 tokens would have finished
    metrics = httpx.get(f"{server}/metrics").json()
    assert metrics["slots"] == 8 and metrics["queued"] == 0
    assert client.completions.create(model=char_checkpoint.name, prompt="All:", max_tokens=3).choices[0].text


def test_a_full_server_says_429_and_keeps_serving(char_checkpoint):
    """One slot and no queue: a request while the slot is busy gets a 429 with Retry-After (the
    openai client's RateLimitError); a prompt over the context, half a request and a client that
    leaves get their own answers; the request that holds the slot runs on untouched, and when it
    ends the next request is served."""
    process, url = start_server(char_checkpoint, "--max_batch", "1", "--max_queue", "0")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = char_checkpoint.name
    try:
        expected = client.completions.create(model=model, prompt="First", max_tokens=MAX_TOKENS, seed=3).choices[0].text
        stream = client.completions.create(model=model, prompt="First", max_tokens=MAX_TOKENS, seed=3, stream=True)
        pieces = [next(stream).choices[0].text]
        with pytest.raises(openai.RateLimitError, match="the server is busy") as refused:
            client.completions.create(model=model, prompt="All:", max_tokens=3)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.BadRequestError, match="more than the 64 this server accepts"):
            client.completions.create(model=model, prompt="a" * 100, max_tokens=3)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as half:
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n{\"model\": ")
        pieces += [c.choices[0].text for c in stream]
        assert "".join(pieces) == expected
        assert slots_in_use_becomes(url, 0)
        assert client.completions.create(model=model, prompt="All:", max_tokens=3).choices[0].text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_failed_decode_reaches_its_request_and_the_engine_goes_on(char_checkpoint):
    engine = app.Server(SampleConfig(checkpoint=str(char_checkpoint), eos="none"), ServeConfig())
    cfg = SampleConfig(max_new_tokens=4, eos="none")
    prompt = [engine.encode("All:")]

    async def collect(live: bool) -> list[app.Update]:
        return [update async for update in engine.stream(prompt, cfg, [], live=live)]

    async def events() -> list[str]:
        updates = engine.stream(prompt, cfg, [], live=True)
        return [e async for e in app.sse_events(updates, "cmpl-x", 0, engine.name, prompt, include_usage=False)]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    engine.model.forward = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(collect(live=True))
    *_, error, done = asyncio.run(events())
    assert "generation failed: out of memory" in json.loads(error.removeprefix("data: "))["error"]["message"]
    assert done == "data: [DONE]\n\n"
    del engine.model.forward
    live, final_only = asyncio.run(collect(live=True)), asyncio.run(collect(live=False))
    assert [u.rows[0].text for u in live][-1] == final_only[-1].rows[0].text
    assert all(u.rows[0].text == "" for u in final_only[:-1])  # not rendered until it finished


def test_a_request_whose_event_loop_closed_does_not_stop_the_engine(char_checkpoint):
    """The decoding thread once died posting to a request's closed event loop (a request that had
    raised, under load), and every later request waited forever."""
    engine = app.Server(SampleConfig(checkpoint=str(char_checkpoint), eos="none"), ServeConfig())
    cfg = SampleConfig(max_new_tokens=4, eos="none")
    prompt = [engine.encode("All:")]
    gone = asyncio.new_event_loop()
    gone.close()
    engine.jobs.put(app.Job([app.Completion(prompt[0])], cfg, [], True, app.poster(gone, asyncio.Queue())))

    async def collect() -> list[app.Update]:
        return [update async for update in engine.stream(prompt, cfg, [], live=True)]

    updates = asyncio.run(asyncio.wait_for(collect(), timeout=60))
    assert updates[-1].rows[0].finish_reason == "length"


def test_the_prompt_cap_never_exceeds_the_context(char_checkpoint):
    engine = app.Server(SampleConfig(checkpoint=str(char_checkpoint)), ServeConfig(max_prompt_tokens=10_000))
    assert engine.max_prompt_tokens == engine.context == 128
    with pytest.raises(app.RequestError, match="more than the 128 this server accepts") as e:
        engine.encode("a" * 200)
    assert e.value.param == "prompt"


# --- one declaration per sampling knob ------------------------------------------------------


def cli_accepts(key: str, value: float) -> bool:
    try:
        dataclasses.replace(SampleConfig(), **{key: value}).validate()
        return True
    except ConfigError:
        return False


def api_accepts(field: str, value: float) -> bool:
    try:
        app.CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
        return True
    except app.pydantic.ValidationError:
        return False


def test_cli_api_and_demo_agree_on_every_knob(char_checkpoint):
    """SampleConfig declares each knob's range once: the command line, the OpenAI schema and the
    demo's controls must all take exactly that range."""
    serve = ServeConfig(max_tokens=300)
    engine = app.Server(SampleConfig(checkpoint=str(char_checkpoint)), serve)
    controls = {block.elem_id: block for block in app.build_demo(engine, serve).blocks.values()
                if getattr(block, "elem_id", None)}
    integer = {"max_new_tokens", "num_samples", "seed", "top_k"}
    for field, key in app.API_KNOBS.items():
        b = bounds_of(SampleConfig, key)
        ends = [e for e in (b.ge, b.gt, b.le, b.lt) if e is not None]
        nudge = 1 if key in integer else 1e-6
        probes = {v for e in ends for v in (e - nudge, e, e + nudge)} | {nudge, -nudge}
        if key not in integer:
            probes |= {float("inf"), float("-inf"), float("nan")}
        for value in probes:
            value = int(value) if key in integer else float(value)
            assert cli_accepts(key, value) == api_accepts(field, value), (field, value)
        if key in controls:  # the control spans the declared range (an open end one step in)
            control = controls[key]
            assert cli_accepts(key, control.minimum) and cli_accepts(key, control.maximum), key
            step = getattr(control, "step", 1)
            if b.ge is not None or b.gt is not None:
                assert not cli_accepts(key, control.minimum - step), key
            if b.le is not None or b.lt is not None:
                assert not cli_accepts(key, control.maximum + step), key
    assert set(controls) >= {"temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed"}
    assert controls["top_k"].maximum == engine.model.cfg.vocab_size
    assert controls["max_new_tokens"].maximum == serve.max_tokens


def test_the_demos_generate_button_streams_what_generate_py_makes(char_checkpoint):
    """The demo's Generate action without a browser (the browser test needs chromium): the prompt
    and a growing continuation that ends as generate.py's, then the speed; a bad prompt is one
    Gradio error naming the problem."""
    gradio = pytest.importorskip("gradio")
    engine = app.Server(SampleConfig(checkpoint=str(char_checkpoint), eos="none"), ServeConfig())
    actions, d = app.DemoActions(engine), SampleConfig()

    async def shown(prompt: str) -> list[tuple[str, str]]:
        return [s async for s in actions.run(prompt, 0.9, d.top_k, 0.95, d.repetition_penalty, 24, 5)]

    texts, speeds = zip(*asyncio.run(shown("First")))
    assert texts[-1] == "First" + reference(char_checkpoint, "First", max_new_tokens=24, seed=5, temperature=0.9,
                                            top_p=0.95)
    assert len(texts) >= 2 and all(texts[-1].startswith(t) for t in texts)
    assert speeds[-1].startswith("24 tokens in ") and speeds[-1].endswith("tokens/s · finished (length)")
    with pytest.raises(gradio.Error) as refused:
        asyncio.run(shown("All: ~"))
    assert "character '~'" in refused.value.message


# --- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("body,param,message", [
    (b'{"model": "m", "prompt": "hi"', None, "the request body is not valid JSON"),
    (b'["not", "an", "object"]', None, "must be a JSON object"),
    ({"prompt": "All:", "max_tokens": "ten"}, "max_tokens", "max_tokens: input should be a valid integer"),
    ({"prompt": "All:", "temperature": "hot"}, "temperature", "temperature: input should be a valid number"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"prompt": "All:", "stream": "yes"}, "stream", "stream: input should be a valid boolean"),
    ({"prompt": "All:", "max_token": 5}, "max_token", "unknown field 'max_token'"),
    ({"prompt": "All:", "max_tokens": -3}, "max_tokens", "max_tokens: input should be greater than 0"),
    ({"prompt": "All:", "max_tokens": MAX_TOKENS + 1}, "max_tokens", f"more than this server's limit of {MAX_TOKENS}"),
    ({"prompt": "All:", "top_p": 2}, "top_p", "top_p: input should be less than or equal to 1, got 2"),
    ({"prompt": "All:", "n": 40}, "n", "completions per request"),
    ({"prompt": "All:", "logprobs": 3}, "logprobs", "logprobs is not supported"),
    ({"prompt": "a" * (MAX_PROMPT_TOKENS + 1)}, "prompt", f"more than the {MAX_PROMPT_TOKENS} this server accepts"),
    ({"prompt": "All: ~"}, "prompt", "character '~'"),
    ({"prompt": [1, 2, 999]}, "prompt", "token id 999 is outside the vocabulary"),
    ({"prompt": []}, "prompt", "prompt is an empty list"),
    ({"prompt": "All:", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"prompt": "All:", "seed": 2**70}, "seed", "seed: input should be less than or equal to"),
    ({"prompt": "All:", "seed": -1}, "seed", "seed: input should be greater than or equal to 0"),
    ({"prompt": "All:", "temperature": 5}, "temperature", "temperature: input should be less than or equal to 2"),
])
def test_bad_requests_get_a_400_naming_the_field(server, char_checkpoint, body, param, message):
    if isinstance(body, dict):
        body = json.dumps({"model": char_checkpoint.name, **body}).encode()
    response = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"] and "\n" not in error["message"]


def test_unknown_model_is_a_404_the_client_understands(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-5", prompt="All:", max_tokens=2)


def test_bad_command_lines_fail_in_one_line(char_checkpoint):
    for args, message in [([], "no checkpoint given"),
                          (["--checkpoint", str(char_checkpoint), "--port", "0"], "serve.port=0 must lie in"),
                          (["--checkpoint", str(char_checkpoint), "--max_tokens", "0"], "serve.max_tokens=0 must be"),
                          (["--checkpoint", str(char_checkpoint), "--hots", "x"], "did you mean 'serve.host'")]:
        done = subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_slots_out_of_range_are_refused_in_one_line():
    for slots in (0, 1000):
        with pytest.raises(ConfigError, match=f"serve.max_batch={slots} must lie in") as e:
            ServeConfig(max_batch=slots).validate()
        assert "\n" not in str(e.value)


# --- the web demo in a real browser ---------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("NANOLLAMA_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (CI installs Debian's chromium package)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        # Without the background-networking flags Chromium keeps calling Google's servers,
        # which an offline machine refuses.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.mark.slow
def test_demo_streams_text_in_a_browser(browser, tmp_path_factory):
    corpus = ["First Citizen: Before we proceed any further, hear me speak. ✓ ünïcödé"] * 20
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("bpe"), Tokenizer.train_bpe(corpus, 300))
    # As many tokens as the server allows (past the context: the window slides), so the text takes
    # long enough to arrive that the page is seen in several states.
    process, url = start_server(checkpoint, "--max_new_tokens", str(MAX_TOKENS), "--temperature", "0.8", "--seed", "3")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        assert f"{checkpoint.name}" in page.locator("#model-info").inner_text()
        page.locator("#prompt textarea").fill("First Citizen:")
        # Record every value the output box takes, to see the text arrive piece by piece.
        page.evaluate("""() => {
            window.seen = [];
            setInterval(() => {
                const box = document.querySelector('#output textarea');
                if (box && box.value !== window.seen[window.seen.length - 1]) window.seen.push(box.value);
            }, 2);
        }""")
        page.locator("#generate").click()
        page.wait_for_function("() => document.querySelector('#speed').innerText.includes('finished')",
                               timeout=60_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app_demo.png"), full_page=True)
        seen = [v for v in page.evaluate("window.seen") if v]
        final = page.locator("#output textarea").input_value()
        api = httpx.post(f"{url}/v1/completions", json={"model": checkpoint.name, "prompt": "First Citizen:",
                                                          "max_tokens": MAX_TOKENS, "temperature": 0.8,
                                                          "seed": 3}).json()
        # A textarea's value holds no carriage returns (HTML turns them into line feeds).
        assert final == ("First Citizen:" + api["choices"][0]["text"]).replace("\r\n", "\n").replace("\r", "\n")
        assert len(seen) >= 3 and seen[-1] == final
        assert all(final.startswith(v.rstrip("\ufffd")) for v in seen)  # pieces of one text, growing
        assert "tokens/s" in page.locator("#speed").inner_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
