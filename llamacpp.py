"""Write a model as a GGUF file, the one-file format llama.cpp and Ollama run.

A GGUF file holds key/value metadata (the architecture's hyperparameters and the whole tokenizer)
followed by the tensors under llama.cpp's names. Three things differ from our checkpoints:

- RoPE layout. llama.cpp's "llama" architecture rotates adjacent pairs (x0, x1), (x2, x3)... as
  Meta's original code did, while we (like Hugging Face) rotate halves, so the rows of every q and
  k projection are permuted back to the pair layout, as llama.cpp's own converter does for HF models.
- Tokenizer. llama.cpp re-implements a few tokenizer families in C++ and picks one by name:
  byte-level BPE ("gpt2", with a named pre-tokenizer split: ours, Llama 3, SmolLM2) and
  sentencepiece ("llama": Llama 2, TinyLlama). Our char-level vocabulary has no family of its
  own, so it is written as a byte-level BPE whose merges only ever rebuild single characters
  (see `char_vocab`), which tokenizes every text into exactly our ids.
- Quantization. f16 and q8_0 (blocks of 32 weights sharing one f16 scale) shrink the matrices;
  1-D tensors (norm gains, RoPE factors) always stay f32, as llama.cpp expects.

docs/gguf.md describes the mapping and what was measured against llama.cpp itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from checkpoint import rope_permute, trained_context
from config import UserError, disk_write, load_json
from model import Llama, rope_frequencies
from tokenizer import LLAMA3_SPLIT

Q = gguf.GGMLQuantizationType
# --dtype -> (the type of every matrix, the file type llama.cpp reports)
DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


class GGUFError(UserError):
    """A model or tokenizer that cannot be expressed for llama.cpp; the message says why."""


def write_gguf(model: Llama, folder: Path | None, path: str | Path, dtype: str = "f32") -> None:
    """Write `model` with the tokenizer of its checkpoint `folder` to the GGUF file `path`, its
    matrices in `dtype` (a key of DTYPES)."""
    vocab = read_vocab(folder, model.cfg.vocab_size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # a failed write never leaves a half file under the real name
    writer = gguf.GGUFWriter(tmp, "llama")
    add_hyperparameters(writer, model, folder, DTYPES[dtype][1])
    vocab.add_to(writer)
    tensor_bytes = 0
    for name, array in gguf_tensors(model):
        data, qtype = encode(array, DTYPES[dtype][0])
        writer.add_tensor(name, data, raw_dtype=qtype)
        tensor_bytes += data.nbytes
    try:
        with disk_write(path.parent, tensor_bytes, f"writing {path.name}",
                        "any earlier file of that name is untouched: free disk space (or make the folder writable) "
                        "and convert again"):
            path.parent.mkdir(parents=True, exist_ok=True)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_hyperparameters(writer: gguf.GGUFWriter, model: Llama, folder: Path, file_type: gguf.LlamaFileType) -> None:
    cfg = model.cfg
    # The window the model was trained on when the checkpoint records it: llama.cpp takes this as
    # the default context, and our own sampler never reads past it either.
    writer.add_context_length(trained_context(folder) or cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    # Without these llama.cpp takes a head to be dim / n_heads wide; ours may be set apart from it.
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_tensors(model: Llama) -> list[tuple[str, np.ndarray]]:
    """Every tensor llama.cpp reads, in float32, under its GGUF name, q and k in the pair layout."""
    cfg = model.cfg
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    tensors = []
    for key, w in model.standard_state_dict().items():
        # llama.cpp reads token_embd as the output matrix when the file has none: tied weights are stored once.
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w = w.detach().float().cpu()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            w = rope_permute(w, cfg.n_heads if "q_proj" in key else cfg.n_kv_heads, to_pairs=True)
        hf_key = key if key == "lm_head.weight" else "model." + key
        tensors.append((names.get_name(hf_key, try_suffixes=(".weight",)), w.numpy()))
    if cfg.rope_scaling == "llama3":
        # llama.cpp applies Llama 3.1 scaling as one divisor per frequency (what its converter
        # writes as rope_freqs); the divisors are exactly the ratio of unscaled to scaled frequencies.
        plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
        tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                        (plain / rope_frequencies(cfg)).numpy()))
    return tensors


def encode(array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """The bytes of one tensor in `qtype`, and the type it really got: 1-D tensors stay f32, and a
    matrix whose rows do not split into q8_0's blocks of 32 falls back to f16 (as llama.cpp's
    converter does)."""
    if array.ndim == 1:
        qtype = Q.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.quants.QuantError:
        return gguf.quants.quantize(array, Q.F16), Q.F16


# ---------------------------------------------------------------------------------------------
# Tokenizer

# How a byte-level BPE spells each byte as one printable character (GPT-2's table: " " is "Ġ").
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
# llama.cpp refuses a BPE without merges and gguf will not write an empty list (an ASCII-only char
# vocabulary needs none), so such a file gets this one, which never applies: the byte-level
# spellings of a space (0x20) and a UTF-8 continuation byte (0x80), never side by side in valid UTF-8.
INERT_MERGE = "Ġ Ģ"


@dataclass
class Vocab:
    """What llama.cpp needs to tokenize exactly as the checkpoint's tokenizer.json does."""
    family: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece style)
    tokens: list[str]
    types: list[gguf.TokenType]
    scores: list[float] | None  # sentencepiece style: the merge order
    merges: list[str]  # byte-level BPE
    pre: str  # llama.cpp's name for the pre-tokenizer split
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.family)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.family == "llama":
            writer.add_token_scores(self.scores)
            writer.add_add_space_prefix(True)  # the "▁" Llama 2's normalizer puts in front of a text
        else:
            writer.add_token_merges(self.merges or [INERT_MERGE])
        for token_id, add in ((self.bos, writer.add_bos_token_id), (self.eos, writer.add_eos_token_id),
                              (self.pad, writer.add_pad_token_id)):
            if token_id is not None:
                add(token_id)
        # Written even when false: for some pre-tokenizer names llama.cpp assumes add_bos=true.
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(folder: Path | None, vocab_size: int) -> Vocab:
    """The vocabulary of a checkpoint folder's tokenizer.json, as many rows as the model has."""
    file = folder / "tokenizer.json" if folder is not None else None
    if file is None or not file.is_file():
        where = "a llama2.c .bin carries no tokenizer" if folder is None else f"{folder} has no tokenizer.json"
        raise GGUFError(f"{where}, but a GGUF file must hold one: convert the model to a folder (python convert.py "
                        f"SRC FOLDER), copy the tokenizer.json (and tokenizer_config.json) it was trained with into "
                        f"it, and convert that folder")
    spec = load_json(file)
    config, generation = (load_json(f) if (f := folder / name).is_file() else {}
                          for name in ("tokenizer_config.json", "generation_config.json"))
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a bare Exception for any unreadable file
        raise GGUFError(f"{file} is not a tokenizer the tokenizers library can read "
                        f"({str(e).splitlines()[0][:200]})") from None
    special = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    by_id = {i: text for text, i in backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise GGUFError(f"{file} has token ids up to {max(by_id)} but the model only {vocab_size} embeddings: "
                        f"the tokenizer and the model do not belong together")
    algorithm = spec.get("model") or {}
    spelling, merges, score_of = {}, [], {}
    if algorithm.get("type") == "BPE" and algorithm.get("byte_fallback"):
        family, pre = "llama", "default"
        score_of = sentencepiece_scores(spec, bpe_merges(algorithm), file)
    elif spec.get("normalizer") is not None:
        raise GGUFError(f"{file} normalizes text first ({spec['normalizer'].get('type')}), which llama.cpp's "
                        f"byte-level BPE does not: only tokenizers without a normalizer can be written")
    elif algorithm.get("type") == "WordLevel":
        family, pre = "gpt2", "llama-bpe"  # any split that keeps characters whole gives the same ids
        spelling, merges = char_vocab([t for t in by_id.values() if t not in special], file)
    elif algorithm.get("type") == "BPE":
        family, pre, merges = "gpt2", byte_level_pre(spec, file), bpe_merges(algorithm)
    else:
        raise GGUFError(f"{file} is a {algorithm.get('type')} tokenizer; only BPE (byte-level or sentencepiece "
                        f"style) and our char-level tokenizers can be written to GGUF")
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # a row no tokenizer id maps to (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(spelling.get(text, text))  # only our char level respells its tokens
        if family == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(gguf.TokenType.BYTE)  # byte fallback: what a character without a token becomes
        elif text == algorithm.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif text in special:
            types.append(gguf.TokenType.CONTROL if special[text] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    scores = [score_of.get(text, 0.0) for text in tokens] if family == "llama" else None
    probe = backend.decode([next(i for i, t in sorted(by_id.items()) if t not in special)])
    return Vocab(family, tokens, types, scores, merges, pre, *special_ids(backend, config, generation, probe, file),
                 chat_template(folder, config))


def char_vocab(chars: list[str], file: Path) -> tuple[dict[str, str], list[str]]:
    """Our char-level vocabulary as a byte-level BPE: each character is spelled as its UTF-8 bytes
    in the byte-level alphabet ("é" is "Ã©"), and the only merges glue a multi-byte character's
    bytes back together, left to right. No merge joins two characters, so every character of a
    text becomes exactly its own token, as in our tokenizer. (A character outside the vocabulary
    has no token there; ours refuses such text, llama.cpp drops it.)"""
    if word := next((c for c in chars if len(c) != 1), None):
        raise GGUFError(f"{file} is a word-level vocabulary ({word!r} is more than one character); only "
                        f"char-level ones can be written")
    spelling = {c: _BYTE_LEVEL.pre_tokenize_str(c)[0][0] for c in chars}
    merges = dict.fromkeys(f"{s[:k]} {s[k]}" for s in spelling.values() for k in range(1, len(s)))
    return spelling, list(merges)


def bpe_merges(algorithm: dict) -> list[str]:
    """tokenizer.json's merges as "left right" strings (newer files store [left, right] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in algorithm.get("merges", [])]


# How transformers writes a Llama 2 (sentencepiece) tokenizer.json: spaces become "▁" and one "▁"
# goes in front of every stretch of text, also after a special token, which is what llama.cpp's
# "llama" tokenizer does with add_space_prefix. (The newer Metaspace form puts it only in front of
# the first stretch, so ids after a special token would differ.)
_SENTENCEPIECE_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}


def sentencepiece_scores(spec: dict, merges: list[str], file: Path) -> dict[str, float]:
    """Scores for llama.cpp's sentencepiece tokenizer, which repeatedly joins the adjacent pair
    whose joined token scores highest: minus the merge rank of each token a merge makes, so it
    joins in tokenizer.json's merge order (other tokens are never the result of a join)."""
    if spec.get("normalizer") != _SENTENCEPIECE_NORMALIZER or spec.get("pre_tokenizer") is not None:
        raise GGUFError(f"{file} is a byte-fallback BPE that does not handle spaces as Llama 2's tokenizer.json "
                        f"does (a Prepend('▁') + Replace(' ', '▁') normalizer, no pre-tokenizer); llama.cpp's "
                        f"sentencepiece tokenizer would give other ids")
    return {merge.replace(" ", ""): -float(rank) for rank, merge in reversed(list(enumerate(merges)))}


# tokenizer.json pre-tokenizers that llama.cpp re-implements, as (step type, its setting) tuples,
# and llama.cpp's name for each.
_LLAMA3 = (("Split", LLAMA3_SPLIT), ("ByteLevel", False))
_KNOWN_PRE = {(("ByteLevel", True),): "gpt-2", (("Digits", True), ("ByteLevel", True)): "smollm"}


def byte_level_pre(spec: dict, file: Path) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, which must be one it implements."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    steps = tuple(map(_pre_step, parts))
    if steps == _LLAMA3:
        # Llama 3's split. "llama-bpe" also makes llama.cpp take a word that is itself a token
        # whole (tokenizer.json's ignore_merges); "smaug-bpe" is the same split with merges always
        # applied, as our own BPE does.
        return "llama-bpe" if spec["model"].get("ignore_merges") else "smaug-bpe"
    if steps not in _KNOWN_PRE:
        raise GGUFError(f"{file} splits text with {' + '.join(str(s[0]) for s in steps) or 'nothing'} before BPE, "
                        f"a pre-tokenizer llama.cpp does not implement (supported: Llama 3's, GPT-2's, SmolLM's)")
    return _KNOWN_PRE[steps]


def _pre_step(step: dict) -> tuple[str | None, object]:
    kind = step.get("type")
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return kind, (step.get("pattern") or {}).get("Regex")
    if kind == "ByteLevel" and not step.get("add_prefix_space"):
        return kind, step.get("use_regex", True)
    if kind == "Digits":
        return kind, step.get("individual_digits")
    return kind, None


def special_ids(backend: HFTokenizer, config: dict, generation: dict, probe: str,
                file: Path) -> tuple[int | None, int | None, int | None, bool, bool]:
    """bos, eos and pad ids (generation_config.json first: the ids the model generates with, then
    tokenizer_config.json's token names), and whether BOS/EOS go around a text, from what the
    tokenizer's post-processor (of tokenizer.json `file`) really adds to `probe`."""

    def lookup(key: str) -> int | None:
        value = generation.get(f"{key}_id")
        if isinstance(value, list):  # several end tokens (Llama 3 instruct): the first is the EOS
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name  # an AddedToken object
        return backend.token_to_id(name) if isinstance(name, str) else None

    bos, eos, pad = lookup("bos_token"), lookup("eos_token"), lookup("pad_token")
    plain = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    start = next((s for s in range(len(full) - len(plain) + 1) if full[s:s + len(plain)] == plain), None)
    if start is None:
        raise GGUFError(f"the post-processor of {file} rewrites a text's tokens "
                        f"({plain} became {full}); llama.cpp can only add BOS and EOS around them")
    prefix, suffix = full[:start], full[start + len(plain):]
    bos = prefix[0] if bos is None and len(prefix) == 1 else bos
    eos = suffix[0] if eos is None and len(suffix) == 1 else eos
    if prefix not in ([], [bos]) or suffix not in ([], [eos]):
        raise GGUFError(f"the post-processor of {file} puts {prefix} before and {suffix} "
                        f"after a text; llama.cpp can only add one BOS ({bos}) before and one EOS ({eos}) after")
    # Without a BOS of its own, BOS is the EOS, as in our tokenizer: the token before every document.
    return (eos if bos is None else bos), eos, pad, bool(prefix), bool(suffix)


def chat_template(folder: Path, config: dict) -> str | None:
    """The chat template (chat_template.jinja, else tokenizer_config.json's), so llama.cpp and
    Ollama format conversations as the model was tuned to."""
    if (file := folder / "chat_template.jinja").is_file():
        return file.read_text()
    return config["chat_template"] if isinstance(config.get("chat_template"), str) else None
