"""Chat templates rendered and tokenized as transformers' apply_chat_template does it, and the
assistant-token mask, on a Llama-3-style and a ChatML-style template built here."""

import contextlib
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import data
from chat import ChatError, ChatFormat, check_messages
from config import DataConfig, UserError
from prepare_data import prepare
from test_app import ARTIFACTS, browser  # noqa: F401 (browser is a fixture)
from test_open_models import DOCS, run_train

ROOT = Path(__file__).resolve().parent.parent

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
                 "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare, around 1600."}, {"role": "user", "content": "And Faust?"},
     {"role": "assistant", "content": "Goethe — in two parts."}],
    [{"role": "user", "content": "Ünïcode 🙂 and\nnew lines?"}, {"role": "assistant", "content": "  Both fine.  "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Hm."},
     {"role": "assistant", "content": "Yes."}],
]


def chat_folder(path: Path, template: str, adds_bos: bool = True) -> Path:
    """A byte-level BPE with chat special tokens (its post-processor adding BOS, which a template
    that writes its own BOS must not double) and the template in tokenizer_config.json."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(DOCS + [m["content"] for c in CONVERSATIONS for m in c], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                               special_tokens=[("<|begin_of_text|>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": template}))
    return path


def auto_ids(folder: Path, messages: list, **kw) -> list[int]:
    out = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("template", [LLAMA3, CHATML, CHATML_MARKED], ids=["llama3", "chatml", "chatml-marked"])
def test_ids_equal_apply_chat_template(template, tmp_path):
    folder = chat_folder(tmp_path / "tok", template)
    chat = ChatFormat.load(folder)
    for messages in CONVERSATIONS:
        assert chat.encode(messages) == auto_ids(folder, messages)
        prompt = messages[:-1]
        assert chat.encode(prompt, add_generation_prompt=True) == auto_ids(folder, prompt, add_generation_prompt=True)
        ids, mask = chat.encode_with_mask(messages)
        assert ids == auto_ids(folder, messages) and len(mask) == len(ids)
    if template == LLAMA3:  # the template writes BOS itself; the tokenizer's post-processor adds none on top
        assert chat.encode(CONVERSATIONS[0]).count(0) == 1


@pytest.mark.parametrize("template,turn_end", [(LLAMA3, "<|eot_id|>"), (CHATML, "<|im_end|>\n")],
                         ids=["llama3", "chatml"])
def test_the_mask_covers_exactly_the_assistant_turns(template, turn_end, tmp_path):
    """Without {% generation %} blocks: what each assistant message adds after the generation
    prompt, its end-of-turn marker included, and nothing else."""
    chat = ChatFormat.load(chat_folder(tmp_path / "tok", template))
    for messages in CONVERSATIONS:
        ids, mask = chat.encode_with_mask(messages)
        masked = chat.tokenizer.decode([i for i, m in zip(ids, mask) if m])
        content = (lambda m: m["content"].strip()) if template == LLAMA3 else (lambda m: m["content"])
        assert masked == "".join(content(m) + turn_end for m in messages if m["role"] == "assistant")


def test_generation_blocks_give_transformers_assistant_mask(tmp_path):
    folder = chat_folder(tmp_path / "tok", CHATML_MARKED)
    chat = ChatFormat.load(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        theirs = auto.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert chat.encode_with_mask(messages) == (list(theirs["input_ids"]), list(theirs["assistant_masks"]))


def test_bad_conversations_and_templates_are_one_line(tmp_path):
    with pytest.raises(ChatError, match="message 1 has role 'robot'; use one of system, user, assistant"):
        check_messages([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "x.jsonl:3")
    with pytest.raises(ChatError, match="message 0 \\(user\\) has no string \"content\""):
        check_messages([{"role": "user"}], "x.jsonl:3")
    with pytest.raises(ChatError, match="non-empty list"):
        check_messages([], "x.jsonl:3")
    folder = chat_folder(tmp_path / "plain", CHATML)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatError, match="has no chat template: add a Jinja template as chat_template.jinja"):
        ChatFormat.load(folder)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatError, match="the chat template refused the conversation: only user turns"):
        ChatFormat.load(folder).encode(CONVERSATIONS[0])
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatError, match="does not parse"):
        ChatFormat.load(folder)
    # A template whose beginning depends on the whole conversation hides where replies start.
    (folder / "chat_template.jinja").write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                                                "{% endfor %}")
    with pytest.raises(ChatError, match="mark them with \\{% generation %\\} blocks"):
        ChatFormat.load(folder).encode_with_mask(CONVERSATIONS[0])


def write_conversations(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_conversations_are_prepared_with_their_ids_mask_and_starts(tmp_path):
    folder = chat_folder(tmp_path / "tok", CHATML_MARKED)
    meta = prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), tokenizer=str(folder), workers=1,
                              input=str(write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS * 4)),
                              val_fraction=0.25))
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    train = [c for i, c in enumerate(CONVERSATIONS * 4) if int((i + 1) * 0.25) == int(i * 0.25)]
    expected = [auto.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                for c in train]
    split = data.open_conversations(tmp_path / "data" / "chat", "train")
    assert split.tokens.tokens.tolist() == [t for e in expected for t in e["input_ids"]]
    assert split.mask.tolist() == [m for e in expected for m in e["assistant_masks"]]
    assert split.lengths().tolist() == [len(e["input_ids"]) for e in expected]
    assert meta["conversations"] == {"train": 9, "val": 3}


def test_packed_rows_hold_whole_conversations_and_train_on_the_assistant_only(tmp_path):
    folder = chat_folder(tmp_path / "tok", CHATML)
    prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), tokenizer=str(folder), workers=1,
                       input=str(write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS * 4)), val_fraction=0.25))
    split = data.open_conversations(tmp_path / "data" / "chat", "train")
    stream, mask = split.tokens.tokens.tolist(), split.mask.tolist()
    spans = [(int(s), int(s + n)) for s, n in zip(split.starts, split.lengths())]
    packed = 0
    for block in (48, 256):  # conversations of about 50 to 130 tokens: cut to fit, or several to a row
        sampler = data.ConversationSampler(split, block, 4, seed=7, pad_id=1)
        x, y = sampler.get(3, 1)
        assert torch.equal(x, sampler.get(3, 1)[0]) and not torch.equal(x, sampler.get(4, 1)[0])
        for row, targets in zip(x.tolist(), y.tolist()):
            # The row is whole conversations laid end to end (the last one cut only if it alone is
            # longer than the row), then EOS padding; targets are the assistant's next tokens.
            position, expected, count = 0, [], 0
            while position < len(row) and row[position] != 1:
                begin, end = next((b, e) for b, e in spans
                                  if row[position:position + e - b] == stream[b:e][:len(row) - position])
                expected += [stream[t] if mask[t] else -100 for t in range(begin, end)]
                position, count = position + end - begin, count + 1
            assert position >= len(row) or set(row[position:]) == {1}
            assert targets == (expected[1:] + [-100] * len(row))[:len(row)]
            packed += count > 1
    assert packed  # some row held more than one conversation
    with pytest.raises(UserError, match="hold no assistant token: raise train.block_size"):
        data.ConversationSampler(split, 8, 4, seed=7, pad_id=1).get(0, 0)  # rows end before any reply begins
    skipping = data.ConversationSampler(split, 100, 8, seed=7, pad_id=1, skip_long=True)
    assert skipping.too_long == 3 and (split.lengths()[skipping.drawn] <= 101).all()
    x, _ = skipping.get(0, 0)
    assert all(any(row[:e - b] == stream[b:e] for b, e in spans if e - b <= 101) for row in x.tolist())

    # train.py trains on it: --init_from a model of this tokenizer, the loss on the assistant's tokens.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    result = run_train("--init_from", str(folder), "--data.data_dir", str(tmp_path / "data"), "--data.dataset", "chat",
                       "--train.out_dir", str(tmp_path / "run"), "--train.block_size", "64", "--train.batch_tokens",
                       "256", "--train.max_steps", "4", "--train.warmup_steps", "1", "--train.eval_interval", "4",
                       "--train.eval_iters", "1")
    assert result.returncode == 0, result.stderr
    assert "conversations are longer than block_size + 1 = 65 tokens: cut to their start" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")


def test_conversation_corpus_errors_are_one_line(tmp_path):
    corpus = write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS)
    with pytest.raises(UserError, match="holds conversations, which need a tokenizer with a chat template"):
        prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), input=str(corpus), tokenizer="bpe"))
    folder = chat_folder(tmp_path / "tok", CHATML)
    with pytest.raises(UserError, match="the val split has no conversation: give at least 10 conversations"):
        prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), input=str(corpus), tokenizer=str(folder),
                           workers=1, val_fraction=0.1))
    with corpus.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:4: message 0 has role 'narrator'"):
        prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), input=str(corpus), tokenizer=str(folder),
                           workers=1))


def chat_server_folder(tmp_path_factory) -> Path:
    """A random Llama whose tokenizer has a ChatML template (made once per test session)."""
    folder = tmp_path_factory.getbasetemp() / "chat-model" / "smol-chat"
    if not (folder / "config.json").is_file():
        chat_folder(folder, CHATML)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """app.py on chat_server_folder's model."""
    from test_app import start_server
    folder = chat_server_folder(tmp_path_factory)
    process, url = start_server(folder, "--eos", "auto", "--max_prompt_tokens", "0")
    yield folder, url
    process.terminate()
    process.wait(timeout=30)


def reply(folder: Path, messages: list, max_new_tokens: int) -> tuple[str, int]:
    """What generate.py's decoding makes of the conversation (greedy), stopping at the end of
    turn: (reply, prompt tokens)."""
    from config import SampleConfig
    from generate import detokenize, generate, generate_text, load_for_sampling
    cfg = SampleConfig(checkpoint=str(folder), temperature=0.0, max_new_tokens=max_new_tokens)
    loaded = load_for_sampling(cfg)
    chat = ChatFormat.load(folder)
    ids = chat.encode(messages, add_generation_prompt=True)
    steps = generate(loaded.model, [ids], cfg, [*loaded.eos, *chat.turn_end_ids()], context=loaded.context)
    for _, texts in generate_text(steps, lambda out: detokenize(loaded.tokenizer, out)):
        pass
    return texts[0], len(ids)


def test_chat_completions_answer_the_openai_client_turn_after_turn(chat_server):
    openai = pytest.importorskip("openai")
    folder, url = chat_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = CONVERSATIONS[0][:2]
    for turn in range(2):
        done = client.chat.completions.create(model=folder.name, messages=messages, max_tokens=10, temperature=0)
        expected, prompt_tokens = reply(folder, messages, 10)
        message = done.choices[0].message
        assert (done.object, message.role, message.content) == ("chat.completion", "assistant", expected)
        assert done.usage.prompt_tokens == prompt_tokens and done.choices[0].finish_reason in ("stop", "length")
        messages = messages + [{"role": "assistant", "content": message.content}, {"role": "user", "content": "And?"}]
    chunks = list(client.chat.completions.create(model=folder.name, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply(folder, messages, 10)[0]
    with pytest.raises(openai.BadRequestError, match="messages.0.role"):
        client.chat.completions.create(model=folder.name, messages=[{"role": "robot", "content": "hi"}])


def test_chat_completions_need_a_chat_template(tmp_path):
    from test_app import TEXT, save_checkpoint
    import app
    from config import SampleConfig, ServeConfig
    from tokenizer import Tokenizer
    folder = save_checkpoint(tmp_path / "char", Tokenizer.train_char(TEXT))
    engine = app.Server(SampleConfig(checkpoint=str(folder)), ServeConfig())
    body = json.dumps({"model": engine.name, "messages": [{"role": "user", "content": "First"}]}).encode()
    with pytest.raises(app.RequestError, match="has no chat template: use /v1/completions") as error:
        app.parse_request(body, engine, ServeConfig(), app.ChatRequest)
    assert error.value.param == "messages"


def test_our_bpe_learns_a_chat_format_for_chat_models_made_here(tmp_path):
    corpus = write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    with pytest.raises(UserError, match="--data.tokenizer bpe --data.chat true"):
        prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), input=str(corpus), tokenizer="bpe"))
    prepare(DataConfig(dataset="chat", data_dir=str(tmp_path / "data"), input=str(corpus), tokenizer="bpe", chat=True,
                       vocab_size=300, workers=1, val_fraction=0.25))
    folder = tmp_path / "data" / "chat"
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    train = [c for i, c in enumerate(CONVERSATIONS * 4) if int((i + 1) * 0.25) == int(i * 0.25)]
    expected = [list(auto.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in train]
    split = data.open_conversations(folder, "train")
    assert split.tokens.tokens.tolist() == [t for e in expected for t in e]
    assert all(e.count(auto.bos_token_id) == 1 for e in expected)  # the template's BOS, not doubled
    chat = ChatFormat.load(folder)
    assert chat.turn_end_ids() == [auto.convert_tokens_to_ids("<|eot_id|>")]
    masked = chat.tokenizer.decode([t for t, m in zip(split.tokens.tokens.tolist(), split.mask.tolist()) if m])
    assert masked == "".join(m["content"] + "<|eot_id|>" for c in train for m in c if m["role"] == "assistant")


def test_chat_repl_keeps_the_conversation_in_the_cache(chat_server):
    """generate.py --chat answers as a fresh decode of the whole conversation would, turn after
    turn, while each turn feeds the model only the tokens the cache lacks."""
    folder, _ = chat_server
    system = "You answer in one line."
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(folder), "--chat", "--system", system,
                             "--temperature", "0", "--max_new_tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                            input="Who wrote Hamlet?\nAnd Faust?\n/reset\nHi there\n/exit\n")
    assert result.returncode == 0, result.stderr
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who wrote Hamlet?"}]
    first = reply(folder, messages, 8)[0]
    second = reply(folder, messages + [{"role": "assistant", "content": first},
                                       {"role": "user", "content": "And Faust?"}], 8)[0]
    third = reply(folder, [messages[0], {"role": "user", "content": "Hi there"}], 8)[0]
    assert result.stdout == f"{first}\n{second}\n[a new conversation]\n{third}\n"

    from config import SampleConfig
    from generate import ChatSession, load_for_sampling
    loaded = load_for_sampling(SampleConfig(checkpoint=str(folder), temperature=0.0, max_new_tokens=8))
    session = ChatSession(loaded, ChatFormat.load(folder), SampleConfig(temperature=0.0, max_new_tokens=8), system)
    fed = []
    forward = loaded.model.forward
    loaded.model.forward = lambda tokens, *a, **kw: fed.append(tokens.shape[1]) or forward(tokens, *a, **kw)
    "".join(session.reply("Who wrote Hamlet?"))
    first_prompt = len(session.chat.encode(session.messages[:2], add_generation_prompt=True))
    fed.clear()
    "".join(session.reply("And Faust?"))
    whole = len(session.chat.encode(session.messages[:-1], add_generation_prompt=True))
    # Re-read: at most the first reply (its text may tokenize differently once re-rendered), the new
    # message and the reply's header; never the system prompt and first question again.
    assert fed[0] <= whole - first_prompt and all(n == 1 for n in fed[1:])


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt(chat_server):
    import dataclasses

    from config import SampleConfig
    from generate import ChatSession, load_for_sampling
    folder, _ = chat_server
    loaded = dataclasses.replace(load_for_sampling(SampleConfig(checkpoint=str(folder))), context=96)
    session = ChatSession(loaded, ChatFormat.load(folder), SampleConfig(temperature=0.0, max_new_tokens=8), "Be brief.")
    notes = ["".join(session.reply(f"Question number {i}: what comes next?")) for i in range(6)]
    assert any("the context is full: dropped the oldest" in n for n in notes)
    assert session.messages[0] == {"role": "system", "content": "Be brief."} and len(session.engine.slots[0].cached[0]) <= 96
    before = list(session.messages)
    with pytest.raises(UserError, match=r"this message alone fills the 96-token context \(\d+ tokens with the "
                                         r"template\): shorten it; the conversation so far is kept"):
        "".join(session.reply("word " * 120))
    assert session.messages == before


@pytest.mark.slow
def test_the_chat_tab_holds_a_two_turn_conversation_in_a_browser(browser, tmp_path_factory):
    from test_app import start_server
    folder = tmp_path_factory.mktemp("demo") / "smol-chat"
    shutil.copytree(chat_server_folder(tmp_path_factory), folder)
    process, url = start_server(folder, "--eos", "auto", "--max_prompt_tokens", "0", "--temperature", "0",
                                "--max_new_tokens", "12")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="Chat").click()
        messages = []
        for turn, text in enumerate(("Who wrote Hamlet?", "And Faust?")):
            page.locator("#message textarea").fill(text)
            page.locator("#send").click()
            messages.append({"role": "user", "content": text})
            expected = reply(folder, messages, 12)[0]
            page.wait_for_function("() => !document.querySelector('#message textarea').value", timeout=60_000)
            bot = page.locator('#chatbot [data-testid="bot"]')
            page.wait_for_function("n => document.querySelectorAll('#chatbot [data-testid=bot]').length == n",
                                   arg=turn + 1, timeout=60_000)
            page.wait_for_timeout(500)
            assert " ".join(bot.last.inner_text().split()) == " ".join(expected.split())
            messages.append({"role": "assistant", "content": expected})
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app_chat.png"), full_page=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_chat_walk_through_runs_on_tiny_settings(tmp_path):
    """docs/chat.md's walk-through on Tiny Shakespeare (../shared), shortened: a chat BPE, a base
    model, "continue the verse" conversations, supervised fine-tuning, then generate.py --chat."""
    source = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not source.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not there")
    data_dir, quick = str(tmp_path / "data"), ["--train.max_steps", "20", "--train.warmup_steps", "2",
                                               "--train.eval_interval", "10", "--train.eval_iters", "2"]

    def run(*argv: str, stdin: str | None = None) -> str:
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, input=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("prepare_data.py", "--data.dataset", "shakespeare", "--data.source", str(source), "--data.chat", "true",
        "--data.vocab_size", "1024", "--data.data_dir", data_dir)
    run("train.py", "configs/shakespeare_chat_cpu.toml", "--data.data_dir", data_dir, "--train.out_dir",
        str(tmp_path / "base"), *quick)
    run("prepare_data.py", "--data.dataset", "shakespeare_lines", "--data.source", str(source), "--data.tokenizer",
        str(tmp_path / "data" / "shakespeare"), "--data.data_dir", data_dir)
    run("train.py", "configs/shakespeare_lines_sft.toml", "--data.data_dir", data_dir, "--train.init_from",
        str(tmp_path / "base"), "--train.out_dir", str(tmp_path / "sft"), *quick)
    out = run("generate.py", "--checkpoint", str(tmp_path / "sft"), "--chat", "--max_new_tokens", "16", "--seed", "1",
              stdin="To be, or not to be, that is the question:\n/exit\n")
    assert out.strip()  # one reply, ended by the turn marker or the token limit


def terminal_session() -> None:
    """In the child before exec: the pty becomes its controlling terminal, and SIGINT is as a shell
    leaves it (not blocked, default action), whatever the test process did to its own mask and
    handlers: exec keeps both, and an inherited ignored or blocked SIGINT makes ^C do nothing."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def chat_in_a_terminal(folder: Path, keys: list[str]) -> tuple[list[str], int]:
    """generate.py --chat on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT,
    as from a keyboard): each item of `keys` is typed once the next "> " prompt shows. Returns
    what the terminal showed between prompts (escape sequences dropped) and the exit status."""
    main, terminal = os.openpty()
    process = subprocess.Popen([sys.executable, "generate.py", "--checkpoint", str(folder), "--chat", "--system",
                                "Be brief.", "--temperature", "0", "--max_new_tokens", "8"], cwd=ROOT,
                               stdin=terminal, stdout=terminal, stderr=terminal, env={**os.environ, "TERM": "xterm"},
                               start_new_session=True, preexec_fn=terminal_session)
    os.close(terminal)
    shown = b""

    def screen() -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace")).replace("\r\n", "\n")

    try:
        for key in [None, *keys]:
            if key is not None:
                time.sleep(0.5)  # as a person types: CPython's readline misses a ^C before it starts waiting
                os.write(main, key.encode())
            prompts, presses = screen().count("\n> "), 1
            while screen().count("\n> ") == prompts and process.poll() is None:
                if select.select([main], [], [], 2 if key == "\x03" else 120)[0] == []:
                    # A SIGINT that lands just before CPython's readline starts waiting is lost until
                    # the next key: as a person would, press ^C again (a few times at most).
                    if key == "\x03" and presses < 10:
                        os.write(main, key.encode())
                        presses += 1
                        continue
                    raise AssertionError(f"no prompt after {key!r}; the terminal shows {screen()!r}")
                with contextlib.suppress(OSError):  # EIO: the process has closed the terminal
                    shown += os.read(main, 65536)
        code = process.wait(timeout=60)
        with contextlib.suppress(OSError):
            shown += os.read(main, 65536)
    finally:
        process.kill()
        os.close(main)
    return screen().split("\n> "), code


def test_the_repl_on_a_terminal_edits_lines_ignores_empty_ones_and_keeps_the_history_through_a_refusal(
        tmp_path_factory):
    folder = chat_server_folder(tmp_path_factory)
    left, right = "\x1b[D", "\x1b[A"  # the arrow keys a terminal sends (right: history's up)
    screens, code = chat_in_a_terminal(folder, [
        "Who wrote Hamlet?\r", "\r", "word " * 400 + "\r", "And aust?" + left * 5 + "F\r", right + "\r", "\x04"])
    assert code == 0
    system = {"role": "system", "content": "Be brief."}
    asked, answers = [], []
    for question in ("Who wrote Hamlet?", "And Faust?", "And Faust?"):
        asked.append({"role": "user", "content": question})
        answers.append(reply(folder, [system, *asked], 8)[0])
        asked.append({"role": "assistant", "content": answers[-1]})
    assert screens[0].startswith("chat: /reset starts over")
    assert screens[1].endswith(f"\n{answers[0]}")  # the typed line, then the reply
    assert screens[2].strip() == ""  # the empty line: nothing sent, a new prompt
    too_long = len(ChatFormat.load(folder).encode([system, {"role": "user", "content": "word " * 400}],
                                                  add_generation_prompt=True))
    assert screens[3].strip().endswith(f"error: this message alone fills the 256-token context ({too_long} tokens "
                                       f"with the template): shorten it; the conversation so far is kept")
    assert screens[4].endswith(f"\n{answers[1]}")  # edited with the arrow keys; the first exchange still there
    assert screens[5].endswith(f"\n{answers[2]}")  # the line again, from the history
    assert screens[6] == "\n"  # Ctrl-D: the line ends, the process leaves


def test_ctrl_c_at_the_prompt_leaves_on_a_line_of_its_own(tmp_path_factory):
    screens, code = chat_in_a_terminal(chat_server_folder(tmp_path_factory), ["\x03"])
    assert code == 0 and screens[-1] == "\n"


def test_a_reply_cut_short_leaves_the_conversation_as_it_was(tmp_path_factory):
    from config import SampleConfig
    from generate import ChatSession, load_for_sampling
    folder = chat_server_folder(tmp_path_factory)
    loaded = load_for_sampling(SampleConfig(checkpoint=str(folder)))
    session = ChatSession(loaded, ChatFormat.load(folder), SampleConfig(temperature=0.0, max_new_tokens=8), "Be brief.")
    first = "".join(session.reply("Who wrote Hamlet?"))
    kept = list(session.messages)
    cut = session.reply("Tell me more")
    next(cut)
    cut.close()  # what Ctrl-C mid-reply does to the generator
    assert session.messages == kept
    second = "".join(session.reply("And Faust?"))
    assert second == reply(folder, [*kept, {"role": "user", "content": "And Faust?"}], 8)[0]
    assert first == reply(folder, kept[:2], 8)[0]
