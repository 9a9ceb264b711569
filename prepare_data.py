"""Text in, token files out: data/<dataset>/{train.bin, val.bin, tokenizer.json, meta.json}.

    python prepare_data.py --data.dataset shakespeare_char                 # download, verify, tokenize
    python prepare_data.py --data.dataset shakespeare_char --data.source ../shared/data/tinyshakespeare.txt
    python prepare_data.py --data.dataset mybooks --data.input 'books/*.txt' --data.tokenizer bpe
    python prepare_data.py --data.dataset shakespeare_smol --data.input ../shared/data/tinyshakespeare.txt \
        --data.tokenizer path/to/SmolLM2-135M          # a pretrained model's tokenizer folder, as it is

Named datasets are downloaded once into data/downloads/ and checked against their sha256. Your own
corpus (`--data.input`) can be .txt files (one document each, or several separated by lines of
`<|endoftext|>`) and .jsonl files (one document per line, in a "text" field). Each document is
tokenized as its tokenizer's post-processor poses it (with BOS for Llama-style tokenizers, as
AutoTokenizer gives it) and followed by EOS. The split is deterministic: with several documents
every 1/val_fraction-th document goes to val; a single document keeps its tail for val (each part
then starts as a document does and has no EOS, as the text goes on beyond it).
"""

from __future__ import annotations

import glob
import itertools
import hashlib
import json
import math
import multiprocessing
import multiprocessing.pool
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
from chat import ChatFormat, chat_template, check_messages
from config import ConfigError, DataConfig, parse_cli, script
from tokenizer import Tokenizer

DOC_SEPARATOR = "<|endoftext|>"
BATCH_CHARS = 1 << 20  # documents are tokenized in batches of about a megabyte


@dataclass(frozen=True)
class NamedDataset:
    url: str
    sha256: str | None  # None: no published checksum; the user must pass --data.sha256
    tokenizer: str  # char, bpe, or conversations (made from the text; a tokenizer folder with a chat template reads them)


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASETS = {
    "shakespeare_char": NamedDataset(SHAKESPEARE_URL, SHAKESPEARE_SHA256, "char"),
    "shakespeare": NamedDataset(SHAKESPEARE_URL, SHAKESPEARE_SHA256, "bpe"),
    # Tiny Shakespeare as "continue the verse" conversations, for the chat walk-through (README).
    "shakespeare_lines": NamedDataset(SHAKESPEARE_URL, SHAKESPEARE_SHA256, "conversations"),
    "tinystories": NamedDataset(
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
        None, "bpe"),
}


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's contents (sha1 of "blob <size>\\0" + contents): the checksum a
    repository's tree publishes for every file, for sources that publish no sha256."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DIGESTS = {"sha256": sha256_of, "git blob sha1": git_blob_sha1}


def fetch(source: str, cache_dir: Path, expected: str | None, digest: str = "sha256") -> Path:
    """A verified local copy of `source` (a path, a file:// or an http(s) URL), checked against
    the `expected` hex digest of kind `digest` (a key of DIGESTS)."""
    local = Path(source.removeprefix("file://")) if "://" not in source or source.startswith("file://") else None
    if local is not None:
        if not local.is_file():
            raise data.DataError(f"source {source} does not exist: pass an existing file to --data.source")
        path = local
    else:
        path = cache_dir / Path(source.split("?")[0]).name
        if not path.is_file():
            download(source, path)
    actual = DIGESTS[digest](path)
    if expected is None:
        raise data.DataError(f"{path} has no published {digest} to check; it hashes to {actual}: if you trust the "
                             f"file, pass --data.sha256 {actual}")
    if actual != expected.lower():
        raise data.DataError(f"checksum mismatch for {path}: expected {digest} {expected}, got {actual}; "
                             f"delete it and download again, or pass the right file")
    return path


def download(url: str, path: Path) -> None:
    """Stream `url` into `path` through a .part file, with a progress bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise data.DataError(f"cannot download {url} ({reason}): fetch the file another way and pass its path "
                             f"with --data.source PATH (the quickstart reads SHAKESPEARE_SOURCE=PATH)") from None
    tmp.rename(path)


def input_files(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not files:
        raise data.DataError(f"--data.input {pattern} matches no .txt or .jsonl file")
    return files


def documents(files: list[Path]) -> Iterator[str]:
    """Each document of the corpus, streamed: memory holds one document at a time."""
    for file in files:
        lines = text_lines(file)
        if file.suffix == ".jsonl":
            for number, line in lines:
                if line.strip():
                    yield jsonl_text(file, number, line)
            continue
        parts: list[str] = []
        for _, line in lines:
            if line.strip() == DOC_SEPARATOR:
                if parts:
                    yield "".join(parts).strip("\n")
                parts = []
            else:
                parts.append(line)
        if parts:
            yield "".join(parts) if not any(DOC_SEPARATOR in p for p in parts) else "".join(parts).strip("\n")


def text_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; anything else is refused naming the line."""
    number = 0
    with file.open(encoding="utf-8", newline="") as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line
        except UnicodeDecodeError:
            raise data.DataError(f"{file} is not UTF-8 text (an undecodable byte after line {number}): give "
                                 f".txt or .jsonl files of UTF-8 text") from None


def jsonl_text(file: Path, number: int, line: str) -> str:
    """The "text" field of one .jsonl line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise data.DataError(f"{file}:{number} is not valid JSON ({e.msg}): each line must be an object like "
                             f'{{"text": "..."}}') from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise data.DataError(f"{file}:{number} has no string field 'text': each line must be an object like "
                             f'{{"text": "..."}}')
    return record["text"]


def is_multi_document(files: list[Path]) -> bool:
    docs = documents(files)
    first = next(docs, None)
    second = next(docs, None)
    if first is None or (not first and second is None):
        raise data.DataError("the corpus is empty: give a file with some text")
    return second is not None


def split_texts(files: list[Path], split: str, val_fraction: float, several: bool) -> Iterator[str]:
    """The texts of one split, streamed. Several documents: every 1/val_fraction-th one is val.
    One document: its tail is val, as nanoGPT splits Tiny Shakespeare (that document is read whole)."""
    if not several:
        text = next(documents(files))
        cut = int(len(text) * (1 - val_fraction))
        yield text[:cut] if split == "train" else text[cut:]
        return
    for i, doc in enumerate(documents(files)):
        if in_val(i, val_fraction) == (split == "val"):
            yield doc


def in_val(i: int, val_fraction: float) -> bool:
    """Whether document i goes to val: every 1/val_fraction-th one does."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def is_chat(files: list[Path]) -> bool:
    """Whether the corpus is conversations: its first .jsonl row holds "messages"."""
    if files[0].suffix != ".jsonl":
        return False
    first = next((line for _, line in text_lines(files[0]) if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "messages" in record


VERSE_SYSTEM = "Continue the verse: answer with the line that follows."


def write_verse_conversations(text_file: Path, out: Path) -> Path:
    """Tiny Shakespeare as conversations: within each speech (blocks between blank lines, the first
    line naming the speaker), every line asks for the one after it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for speech in text_file.read_text().split("\n\n"):
            lines = speech.strip("\n").splitlines()[1:]
            for line, following in zip(lines, lines[1:]):
                f.write(json.dumps({"messages": [{"role": "system", "content": VERSE_SYSTEM},
                                                 {"role": "user", "content": line},
                                                 {"role": "assistant", "content": following}]}) + "\n")
    return out


def conversations(files: list[Path]) -> Iterator[list[dict[str, str]]]:
    """Each conversation of .jsonl files of {"messages": [{"role", "content"}, ...]} rows, checked."""
    for file in files:
        if file.suffix != ".jsonl":
            raise data.DataError(f"{file}: a conversation corpus is .jsonl files of {{\"messages\": [...]}} rows only")
        for number, line in text_lines(file):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise data.DataError(f"{file}:{number} is not valid JSON ({e.msg})") from None
            yield check_messages(record.get("messages") if isinstance(record, dict) else None, f"{file}:{number}")


def write_conversations(files: list[Path], tokenizer: Tokenizer, folder: Path,
                        val_fraction: float) -> tuple[dict[str, int], dict[str, int], dict]:
    """Each split's conversations rendered with the tokenizer's chat template: <split>.bin, the
    assistant mask <split>_mask.bin and the conversations' starts <split>_starts.npy. Returns
    (tokens, characters of content, conversation counts) per split. Fine-tuning sets are small:
    the splits are assembled in memory, in one pass over the files."""
    chat = ChatFormat(tokenizer, chat_template(folder))
    splits = {split: ([], []) for split in ("train", "val")}  # per split: ids and masks, per conversation
    chars = {"train": 0, "val": 0}
    for i, messages in enumerate(tqdm(conversations(files), desc="conversations", unit="conversation")):
        split = "val" if in_val(i, val_fraction) else "train"
        conversation, mask = chat.encode_with_mask(messages)
        splits[split][0].append(np.array(conversation, dtype=np.int64))
        splits[split][1].append(np.array(mask, dtype=np.int64))
        chars[split] += sum(len(m["content"]) for m in messages)
    counts, stats = {}, {"conversations": {}, "assistant_tokens": {}}
    for split, (ids, masks) in splits.items():
        if not ids:
            raise data.DataError(f"the {split} split has no conversation: give at least {math.ceil(1 / val_fraction)} "
                                 f"conversations or change --data.val_fraction")
        counts[split] = data.write_tokens(folder / f"{split}.bin", ids, tokenizer.vocab_size, tokenizer.hash)
        data.write_tokens(folder / f"{split}_mask.bin", masks, 2, tokenizer.hash)
        np.save(folder / f"{split}_starts.npy", np.cumsum([0] + [len(c) for c in ids[:-1]]).astype(np.int64))
        stats["conversations"][split] = len(ids)
        stats["assistant_tokens"][split] = int(sum(m.sum() for m in masks))
    return counts, chars, stats


_worker_tokenizer: Tokenizer | None = None


def _init_worker(folder: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(folder)


def _encode(batch: tuple[list[str], bool]) -> np.ndarray:  # runs in a worker process
    texts, whole_documents = batch
    tokenizer = _worker_tokenizer
    ids = tokenizer.encode_documents(texts) if whole_documents else tokenizer.encode_batch(texts)
    return np.fromiter((t for doc in ids for t in doc), dtype=np.int64)


def batches(texts: Iterator[str], whole_documents: bool) -> Iterator[list[str]]:
    """About a megabyte of text per batch; a single long document is cut at line ends."""
    batch, size = [], 0
    for text in texts:
        for piece in [text] if whole_documents else text.splitlines(keepends=True):
            batch.append(piece)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield batch if whole_documents else ["".join(batch)]
                batch, size = [], 0
    if batch:
        yield batch if whole_documents else ["".join(batch)]


def encode_stream(pool: multiprocessing.pool.Pool, workers: int, texts: Iterator[str],
                  whole_documents: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(characters, token ids) per batch, in order. A few batches per worker are in flight at a
    time (pool.imap would read the whole corpus ahead), so memory stays bounded."""
    pending = batches(texts, whole_documents)
    while window := list(itertools.islice(pending, 4 * workers)):
        encoded = pool.map(_encode, [(batch, whole_documents) for batch in window])
        for batch, ids in zip(window, encoded):
            yield sum(len(t) for t in batch), ids


def pretrained_tokenizer(name: str) -> Path | None:
    """The tokenizer folder --data.tokenizer names, or None for char and bpe (trained here)."""
    if name in ("char", "bpe"):
        return None
    folder = Path(name)
    if not folder.is_dir():
        raise ConfigError(f"data.tokenizer={name!r} is neither char, bpe nor an existing folder: give a Hugging "
                          f"Face tokenizer folder (tokenizer.json [+ tokenizer_config.json])")
    tokenizer = Tokenizer.load(folder)
    if tokenizer.eos_id is None:
        raise ConfigError(f"{folder}'s tokenizer has no EOS token to end documents with: set eos_token in its "
                          f"tokenizer_config.json")
    return folder


def make_tokenizer(cfg: DataConfig, kind: str, files: list[Path], several: bool, out: Path,
                   folder: Path | None) -> Tokenizer:
    """The dataset's tokenizer, written into `out`: trained on the corpus, or the pretrained
    `folder`'s files copied byte for byte (so its hash, and a model's, compare exactly)."""
    if folder is not None:
        out.mkdir(parents=True)
        for file in Tokenizer.files(folder):
            shutil.copyfile(file, out / file.name)
        return Tokenizer.load(out)
    if kind == "char":
        chars: set[str] = set()
        for doc in documents(files):
            chars.update(doc)
        tokenizer = Tokenizer.train_char("".join(chars))
    elif is_chat(files):  # merges learned from what the train split's messages say
        contents = (m["content"] for i, c in enumerate(conversations(files)) if not in_val(i, cfg.val_fraction)
                    for m in c)
        tokenizer = Tokenizer.train_bpe(contents, cfg.vocab_size, cfg.bpe_train_bytes, chat=True)
    else:
        train_stream = split_texts(files, "train", cfg.val_fraction, several)
        tokenizer = Tokenizer.train_bpe(train_stream, cfg.vocab_size, cfg.bpe_train_bytes, chat=cfg.chat)
    tokenizer.save(out)
    return tokenizer


def encode_splits(cfg: DataConfig, files: list[Path], several: bool, tokenizer: Tokenizer, folder: Path,
                  counts: dict[str, int], chars_seen: dict[str, int]) -> None:
    """Each split's text tokenized by worker processes into <split>.bin, counting tokens and characters."""
    with multiprocessing.get_context("spawn").Pool(cfg.workers, _init_worker, (str(folder),)) as pool:
        for split in ("train", "val"):
            chars_seen[split] = 0
            with tqdm(unit="char", unit_scale=True, desc=split) as bar:
                def chunks() -> Iterator[np.ndarray]:
                    if not several:  # each part of a lone document starts as a document does
                        yield np.array(tokenizer.prefix, dtype=np.int64)
                    texts = split_texts(files, split, cfg.val_fraction, several)
                    for n_chars, ids in encode_stream(pool, cfg.workers, texts, several):
                        chars_seen[split] += n_chars
                        bar.update(n_chars)
                        yield ids
                counts[split] = data.write_tokens(folder / f"{split}.bin", chunks(), tokenizer.vocab_size,
                                                  tokenizer.hash)


def prepare(cfg: DataConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.data_dir) / cfg.dataset
    folder = pretrained_tokenizer(cfg.tokenizer)  # a bad folder is refused before any download
    if cfg.input is not None:
        files, kind, source = input_files(cfg.input), cfg.tokenizer, cfg.input
    elif cfg.dataset in DATASETS:
        named = DATASETS[cfg.dataset]
        source = cfg.source or named.url
        files = [fetch(source, Path(cfg.data_dir) / "downloads", cfg.sha256 or named.sha256)]
        kind = named.tokenizer
        if kind == "conversations":
            files = [write_verse_conversations(files[0], Path(cfg.data_dir) / "downloads" / f"{cfg.dataset}.jsonl")]
    else:
        raise ConfigError(f"data.dataset={cfg.dataset!r} is not a named dataset ({', '.join(DATASETS)}): "
                          f"pass --data.input with your own files")
    chat = is_chat(files)
    if chat and folder is None and not (kind == "bpe" and cfg.chat):
        raise ConfigError(f"{files[0]} holds conversations, which need a tokenizer with a chat template: pass "
                          f"--data.tokenizer bpe --data.chat true (ours), or --data.tokenizer FOLDER (one that has one)")
    several = chat or is_multi_document(files)
    tmp = out.with_name(out.name + ".tmp")  # the dataset appears whole, or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = make_tokenizer(cfg, kind, files, several, tmp, folder)
    kind = tokenizer.kind
    counts, chars_seen, chat_stats = {}, {}, {}
    if chat:
        counts, chars_seen, chat_stats = write_conversations(files, tokenizer, tmp, cfg.val_fraction)
    else:
        encode_splits(cfg, files, several, tokenizer, tmp, counts, chars_seen)
    seconds = time.perf_counter() - start
    meta = {"dataset": cfg.dataset, "source": str(source),
            "source_sha256": [sha256_of(f) for f in files] if len(files) > 1 else sha256_of(files[0]),
            "tokenizer": kind, "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.hash,
            "tokenizer_source": cfg.tokenizer if kind == "pretrained" else None,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "document_prefix": tokenizer.prefix,
            "dtype": data.token_dtype(tokenizer.vocab_size).name, "documents_split": several,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_chars": chars_seen["train"], "val_chars": chars_seen["val"], **chat_stats,
            "seconds": round(seconds, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"\n{out}/")
    for file in sorted(out.iterdir()):
        print(f"  {file.name:<22} {file.stat().st_size:>14,} bytes")
    tokens = counts["train"] + counts["val"]
    print(f"  {kind} tokenizer, {tokenizer.vocab_size:,} ids | train {counts['train']:,} tokens | "
          f"val {counts['val']:,} tokens | {tokens / seconds:,.0f} tokens/s")
    return meta


@script
def main(argv: list[str]) -> None:
    prepare(parse_cli(argv, prog="prepare_data.py", sections=("data",)).data)


if __name__ == "__main__":
    sys.exit(main())
