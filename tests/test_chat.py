"""Chat templates rendered and tokenized as transformers' apply_chat_template does it, and the
assistant-token mask, on a Llama-3-style and a ChatML-style template built here."""

import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from chat import ChatError, ChatFormat, check_messages
from test_open_models import DOCS

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
