"""Conversations as token ids: a tokenizer's chat template rendered as transformers'
`apply_chat_template` renders it, and which tokens are the assistant's (what supervised
fine-tuning learns from; everything else is context).

A chat template is a Jinja program shipped with the tokenizer (`chat_template` in
tokenizer_config.json, or chat_template.jinja). Templates come from model hubs, so they run in
Jinja's immutable sandbox, with the few helpers Hugging Face templates call. The assistant's
tokens are those the template marks with `{% generation %}` blocks where it has them; otherwise
they are found by rendering prefixes of the conversation: the text an assistant message adds
after the generation prompt, its end-of-turn marker included (so the model learns to stop).
"""

from __future__ import annotations

import contextvars
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from config import UserError, load_json
from tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_generation_spans: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = \
    contextvars.ContextVar("generation_spans", default=None)


class ChatError(UserError):
    """A conversation or chat template problem whose message is one line meant for the user."""


class GenerationBlocks(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: renders its body and, while a render records them,
    notes the character span it lands on."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        if (recording := _generation_spans.get()) is not None:
            written, spans = recording
            start = sum(map(len, written))
            spans.append((start, start + len(text)))
        return text


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def chat_template(folder: str | Path) -> str:
    """A tokenizer folder's chat template: chat_template.jinja, else tokenizer_config.json's."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ChatError(f"{folder} has no chat template: add a Jinja template as chat_template.jinja (or as "
                        f"\"chat_template\" in tokenizer_config.json)")
    return template


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """The conversation's messages, each a {"role", "content"} with a known role and string content."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise ChatError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"{where}: message {i} ({message['role']}) has no string \"content\"")
    return messages


class ChatFormat:
    """A tokenizer with its chat template: conversations to ids and assistant masks."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, compile_template(template)
        self.marks_generation = "endgeneration" in template
        # The names templates read their special tokens by, as transformers passes them.
        self.specials = {name: tokenizer.backend.id_to_token(i) for name, i in
                         (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i is not None}

    @classmethod
    def load(cls, folder: str | Path) -> "ChatFormat":
        return cls(Tokenizer.load(folder), chat_template(folder))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        written: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _generation_spans.set((written, spans))
        try:
            for piece in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **self.specials):
                written.append(piece)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"the chat template refused the conversation: {e}") from None
        finally:
            _generation_spans.reset(token)
        return "".join(written), spans

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant's turns."""
        text, spans = self._render(messages, False)
        if self.marks_generation:
            return text, spans
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ChatError("the chat template renders a conversation's beginning differently from the whole, "
                                "so the assistant's tokens cannot be found: mark them with {% generation %} blocks")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """The ids of AutoTokenizer.apply_chat_template(messages, tokenize=True): the rendered text
        with no special tokens added (the template writes its own, BOS included)."""
        return self.tokenizer.backend.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def encode_with_mask(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where token i belongs to an assistant turn (a token that
        straddles a span's edge counts as the assistant's)."""
        text, spans = self.assistant_spans(messages)
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        mask = [int(any(start < stop and begin < end for begin, stop in spans)) for start, end in encoding.offsets]
        return encoding.ids, mask

    def turn_end_ids(self) -> list[int]:
        """The special tokens the template closes an assistant turn with (<|eot_id|>, <|im_end|>, ...):
        decoding a reply stops at them."""
        ids, mask = self.encode_with_mask([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        specials = {i for i, token in self.tokenizer.backend.get_added_tokens_decoder().items() if token.special}
        return sorted({i for i, m in zip(ids, mask) if m and i in specials})
