"""Byte-level BPE and character-level tokenizers, and any Hugging Face tokenizer folder, behind
one interface.

Ours are Hugging Face `tokenizers` pipelines saved as a standard `tokenizer.json` (plus
`tokenizer_config.json`), so `transformers.AutoTokenizer.from_pretrained(folder)` loads either one
and encodes identically, and a checkpoint folder carries its tokenizer with it. A pretrained
model's folder (SmolLM2, TinyLlama, Llama 3, ...) loads the same way, through its tokenizer.json.

BOS and EOS follow one policy everywhere (docs/bpe.md, "BOS and EOS"): a document is what the
tokenizer's own post-processor makes of a text (BOS in front for Llama tokenizers and our BPE,
nothing for GPT-2-style ones and our char level), followed by EOS; a prompt is the same without
the EOS. Data preparation, training, evaluation and sampling all ask this class.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from config import UserError, load_json

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# The files that make up a tokenizer folder; data folders and checkpoints carry byte-identical copies.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# With --data.chat our BPE also learns Llama 3's turn markers and carries a chat template in their
# format: each message is a header naming its role, a blank line, the content, then end of turn.
CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
                 "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Names other tokenizers give their boundary tokens, for folders whose tokenizer_config.json names none.
BOS_NAMES, EOS_NAMES = (BOS, "<s>", "<|bos|>", "<bos>"), (EOS, "</s>", "<|endoftext|>", "<|eos|>", "<eos>")
# Llama 3's pre-tokenizer split (the same rule as GPT-4's cl100k), which llama.cpp implements:
# contractions, letter runs, 1-3 digit groups, punctuation runs, newlines, other whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(UserError):
    """A tokenizer problem whose message is one line meant for the user."""


class Tokenizer:
    """encode/decode over a `tokenizers.Tokenizer`, with BOS/EOS ids, the ids its post-processor
    puts before a text, and a content hash."""

    def __init__(self, backend: HFTokenizer, kind: Literal["bpe", "char", "pretrained"],
                 bos_token: str | None = None, eos_token: str | None = None, chat_template: str | None = None):
        self.backend, self.kind, self.chat_template = backend, kind, chat_template
        self.eos_id = self._first_id([eos_token] if eos_token else EOS_NAMES)
        bos = self._first_id([bos_token] if bos_token else BOS_NAMES)
        self.bos_id = self.eos_id if bos is None else bos  # char level: one boundary token for both ends
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Ids from a different vocabulary would silently train garbage, so datasets and
        # checkpoints record this hash and refuse to mix.
        self.hash = hashlib.sha256(backend.to_str().encode()).hexdigest()
        self.prefix = self._post_processor_prefix()

    def _first_id(self, names: Iterable[str]) -> int | None:
        return next((i for name in names if (i := self.backend.token_to_id(name)) is not None), None)

    def _post_processor_prefix(self) -> list[int]:
        """The ids the post-processor puts before a text: [BOS] for Llama tokenizers, [] for GPT-2's.
        It wraps a probe text made of one ordinary token, so any vocabulary can encode it."""
        added = self.backend.get_added_tokens_decoder()
        ordinary = next((i for i in range(self.backend.get_vocab_size()) if i not in added), None)
        probe = self.backend.decode([ordinary]) if ordinary is not None else ""
        plain = self.backend.encode(probe, add_special_tokens=False).ids
        wrapped = self.backend.encode(probe, add_special_tokens=True).ids
        for start in range(len(wrapped) - len(plain) + 1):
            if wrapped[start:start + len(plain)] == plain:
                return wrapped[:start]
        raise TokenizerError(f"this tokenizer's post-processor rewrites the text's own tokens ({plain} became "
                             f"{wrapped}); only post-processors that add special tokens around a text are supported")

    # --- training ------------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, max_bytes: int = 100_000_000,
                  chat: bool = False) -> "Tokenizer":
        """Learn byte-level BPE merges from at most `max_bytes` of `texts` (memory stays bounded);
        with `chat`, also the turn markers of CHAT_TEMPLATE, which it then carries."""
        specials = [BOS, EOS, PAD, *(CHAT_SPECIALS if chat else ())]
        if vocab_size < 256 + len(specials):
            raise TokenizerError(f"BPE vocab_size={vocab_size} is below the 256-byte alphabet plus "
                                 f"{len(specials)} special tokens: use at least {256 + len(specials)}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(_bounded(texts, max_bytes), trainer=trainer)
        # Like Llama's tokenizers, every document starts with BOS (the trainer gave it id 0).
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                               special_tokens=[(BOS, 0)])
        return cls(backend, "bpe", chat_template=CHAT_TEMPLATE if chat else None)

    @classmethod
    def train_char(cls, text: str) -> "Tokenizer":
        """One id per distinct character of `text`, in sorted order (nanoGPT's shakespeare_char
        ids), then one boundary token that serves as BOS and EOS (as GPT-2's <|endoftext|> does),
        so Tiny Shakespeare's 65 characters make 66 ids."""
        chars = sorted(set(text))
        if not chars:
            raise TokenizerError("cannot build a char-level vocabulary from an empty corpus")
        vocab = {c: i for i, c in enumerate(chars)}
        backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([EOS])
        return cls(backend, "char")

    # --- use -----------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The text's own tokens, with no special token unless asked for."""
        if self.kind == "char":
            self._check_chars(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "char":
            for text in texts:
                self._check_chars(text)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_document(self, text: str) -> list[int]:
        """What the post-processor makes of a text: AutoTokenizer(text)["input_ids"] exactly, BOS
        (or whatever else it adds) included, none where it adds none."""
        return self.encode_documents([text], eos=False)[0]

    def encode_documents(self, texts: list[str], eos: bool = True) -> list[list[int]]:
        """Whole documents as training data holds them: each one's encode_document ids, then (with
        `eos`) EOS unless the post-processor already ends it with one."""
        if self.kind == "char":
            for text in texts:
                self._check_chars(text)
        docs = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)]
        if not eos:
            return docs
        return [ids if ids[-1:] == [self.eos_id] else ids + [self.eos_id] for ids in docs]

    def start_ids(self) -> list[int]:
        """What an empty prompt starts from: the prefix, or else BOS, which for tokenizers without
        one is EOS, the token that precedes every document of the training stream but the first."""
        return self.prefix or [self.bos_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def _check_chars(self, text: str) -> None:
        vocab = self.backend.get_vocab()
        unknown = next((c for c in text if c not in vocab), None)
        if unknown is not None:
            raise TokenizerError(f"character {unknown!r} (U+{ord(unknown):04X}) is not in this char-level "
                                 f"vocabulary of {self.vocab_size} ids; use text made of the training "
                                 f"corpus's characters or a BPE tokenizer")

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.backend.id_to_token(self.bos_id),
                  "eos_token": EOS,
                  "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False,
                  "nanollama_kind": self.kind}
        if self.backend.token_to_id(PAD) is not None:
            config["pad_token"] = PAD
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        """Ours or any Hugging Face tokenizer folder (tokenizer.json [+ tokenizer_config.json])."""
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            spm = " (a sentencepiece tokenizer.model alone is not enough: save the tokenizer with transformers' " \
                  "AutoTokenizer.save_pretrained to get one)" if (folder / "tokenizer.model").is_file() else ""
            raise TokenizerError(f"{folder} has no tokenizer.json{spm}: prepare the data with prepare_data.py or "
                                 f"point at a tokenizer folder that has one")
        config_file = folder / "tokenizer_config.json"
        config = load_json(config_file) if config_file.is_file() else {}
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for any unreadable file
            raise TokenizerError(f"{file} is not a tokenizer the tokenizers library can read "
                                 f"({str(e).splitlines()[0][:200]}): restore the file") from None
        return cls(backend, config.get("nanollama_kind", "pretrained"),
                   _token_name(config.get("bos_token")), _token_name(config.get("eos_token")))

    @staticmethod
    def files(folder: str | Path) -> list[Path]:
        """The tokenizer files a folder holds, to copy byte for byte."""
        return [p for name in TOKENIZER_FILES if (p := Path(folder) / name).is_file()]


def _token_name(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bounded(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        text = text[: max_bytes - seen]
        seen += len(text.encode())
        yield text
