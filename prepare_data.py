"""Text in, token files out: data/<dataset>/{train.bin, val.bin, tokenizer.json, meta.json}.

    python prepare_data.py --data.dataset shakespeare_char                 # download, verify, tokenize
    python prepare_data.py --data.dataset shakespeare_char --data.source ../shared/data/tinyshakespeare.txt
    python prepare_data.py --data.dataset mybooks --data.input 'books/*.txt' --data.tokenizer bpe
    python prepare_data.py --data.dataset shakespeare_smol --data.input ../shared/data/tinyshakespeare.txt \
        --data.tokenizer path/to/SmolLM2-135M          # a pretrained model's tokenizer folder, as it is
    python prepare_data.py --data.dataset web --data.input 'web/*.parquet' --data.tokenizer bpe \
        --data.shard_documents 50000 [--data.shard_range 0:40]    # shards, resumable, over several machines

Named datasets are downloaded once into data/downloads/ and checked against their sha256. Your own
corpus (`--data.input`) is .txt, .jsonl(.gz/.zst) or .parquet files, or a Hugging Face dataset
(corpus.py reads them all as a stream of documents). Each document is tokenized as its tokenizer's
post-processor poses it (with BOS for Llama-style tokenizers, as AutoTokenizer gives it) and
followed by EOS. The split is deterministic: with several documents every 1/val_fraction-th
document goes to val; a single document keeps its tail for val (each part then starts as a
document does and has no EOS, as the text goes on beyond it).

Worker processes tokenize (one thread each) while this process reads the corpus and writes the
token files, so that neither waits for the other. With data.shard_documents N, document i goes to
shard i // N: which documents a shard holds is known before anything is tokenized, so a rerun and
several machines agree on it without reading each other's output.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from tqdm import tqdm

import data
from chat import ChatFormat, chat_template, check_messages
from config import ConfigError, DataConfig, parse_cli, replace_file, script
from corpus import DOC_SEPARATOR, Corpus, documents, lone_document, lone_pieces, open_corpus, text_lines
from tokenizer import Tokenizer

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
    # Tiny Shakespeare as "continue the verse" conversations, for the chat walk-through (docs/chat.md).
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


def in_val(i: int, val_fraction: float) -> bool:
    """Whether document i goes to val: every 1/val_fraction-th one does."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def is_chat(source: Corpus) -> bool:
    """Whether the corpus is conversations: its first .jsonl row holds "messages"."""
    if not source.files or source.files[0].suffix != ".jsonl":
        return False
    first = next((line for _, line in text_lines(source.files[0]) if line.strip()), "")
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


SPLITS = ("train", "val")


@dataclass(frozen=True)
class Batch:
    """About a megabyte of one split's text, for one worker to tokenize."""
    split: str
    shard: int | None  # None: the dataset is not sharded
    texts: list[str]
    whole_documents: bool  # False: lines of a single document, tokenized without BOS or EOS


_worker_tokenizer: Tokenizer | None = None


def _init_worker(folder: str) -> None:
    # One thread per worker: `tokenizers` would otherwise spread every encode_batch over all cores,
    # so that --data.workers N used more than N and a second worker only fought the first for them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(folder)


def _encode(batch: Batch) -> np.ndarray:  # runs in a worker process
    tokenizer = _worker_tokenizer
    ids = tokenizer.encode_documents(batch.texts) if batch.whole_documents else tokenizer.encode_batch(batch.texts)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=data.token_dtype(tokenizer.vocab_size),
                       count=sum(map(len, ids)))


def document_batches(numbered: Iterator[tuple[int, str]], shard_documents: int,
                     val_fraction: float) -> Iterator[Batch]:
    """Documents (numbered across the corpus) gathered into batches per shard and split, in order:
    every 1/val_fraction-th document goes to val, document i to shard i // shard_documents."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    shard = None
    for i, text in numbered:
        if shard_documents and i // shard_documents != shard:
            yield from (Batch(split, shard, texts, True) for split, texts in pending.items() if texts)
            pending, sizes, shard = {split: [] for split in SPLITS}, dict.fromkeys(SPLITS, 0), i // shard_documents
        split = "val" if in_val(i, val_fraction) else "train"
        pending[split].append(text)
        sizes[split] += len(text)
        if sizes[split] >= BATCH_CHARS:
            yield Batch(split, shard, pending[split], True)
            pending[split], sizes[split] = [], 0
    yield from (Batch(split, shard, texts, True) for split, texts in pending.items() if texts)


def lone_batches(source: Corpus, begin: int, end: int, val_fraction: float) -> Iterator[Batch]:
    """A single document's head (train) and tail (val), as nanoGPT splits Tiny Shakespeare, cut at
    line ends into batches of about a megabyte."""
    cut = begin + int((end - begin) * (1 - val_fraction))
    for split, (first, last) in zip(SPLITS, ((begin, cut), (cut, end))):
        lines, size = [], 0
        for piece in lone_pieces(source, first, last):
            for line in piece.splitlines(keepends=True):
                lines.append(line)
                size += len(line)
                if size >= BATCH_CHARS:
                    yield Batch(split, None, ["".join(lines)], False)
                    lines, size = [], 0
        if lines:
            yield Batch(split, None, ["".join(lines)], False)


def encode_stream(pool: multiprocessing.pool.Pool, workers: int,
                  batches: Iterator[Batch]) -> Iterator[tuple[Batch, np.ndarray]]:
    """Each batch with its token ids, in order. Four batches per worker stay in flight, so the
    workers tokenize while this process reads and writes, and memory stays bounded (pool.imap
    would read the whole corpus ahead)."""
    pending: collections.deque[tuple[Batch, multiprocessing.pool.AsyncResult]] = collections.deque()
    for batch in itertools.chain(batches, [None]):
        if batch is not None:
            pending.append((batch, pool.apply_async(_encode, (batch,))))
        while pending and (batch is None or len(pending) >= 4 * workers):
            done, result = pending.popleft()
            yield done, result.get()


def file_name(split: str, shard: int | None) -> str:
    return f"{split}.bin" if shard is None else f"{split}_{shard:06d}.bin"


class WrittenFile(NamedTuple):
    split: str
    tokens: int
    chars: int


@dataclass
class Written:
    """What write_splits wrote, per file name."""
    files: dict[str, WrittenFile] = field(default_factory=dict)

    def total(self, split: str, what: Literal["tokens", "chars"]) -> int:
        return sum(getattr(f, what) for f in self.files.values() if f.split == split)


def write_splits(cfg: DataConfig, batches: Iterator[Batch], tokenizer: Tokenizer, folder: Path,
                 prefix: list[int]) -> Written:
    """Tokenize the batches in worker processes and write each shard's (or the dataset's) train
    and val files, each starting with `prefix`. This process only reads and writes; a shard's
    files are renamed into place when its last batch is written."""
    written, writers, shard, chars = Written(), {}, None, {}

    def finish() -> None:
        for split, writer in writers.items():
            written.files[writer.path.name] = WrittenFile(split, writer.close(), chars[split])

    with multiprocessing.get_context("spawn").Pool(cfg.workers, _init_worker, (str(folder),)) as pool, \
            tqdm(unit="char", unit_scale=True, desc="tokenizing") as bar:
        try:
            for batch, ids in encode_stream(pool, cfg.workers, batches):
                if not writers or batch.shard != shard:
                    finish()
                    shard, chars = batch.shard, dict.fromkeys(SPLITS, 0)
                    writers = {split: data.TokenWriter(folder / file_name(split, shard), tokenizer.vocab_size,
                                                       tokenizer.hash) for split in SPLITS}
                    for writer in writers.values():
                        writer.write(np.array(prefix, dtype=np.int64))
                writers[batch.split].write(ids)
                size = sum(map(len, batch.texts))
                chars[batch.split] += size
                bar.update(size)
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise
        finish()
    return written


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


def make_tokenizer(cfg: DataConfig, kind: str, source: Corpus, lone: tuple[int, int] | None, out: Path,
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
        for text in documents(source) if lone is None else lone_pieces(source, *lone):
            chars.update(text)
        tokenizer = Tokenizer.train_char("".join(chars))
    elif is_chat(source):  # merges learned from what the train split's messages say
        contents = (m["content"] for i, c in enumerate(conversations(list(source.files)))
                    if not in_val(i, cfg.val_fraction) for m in c)
        tokenizer = Tokenizer.train_bpe(contents, cfg.vocab_size, cfg.bpe_train_bytes, chat=True)
    else:
        if lone is None:
            train = (doc for i, doc in enumerate(documents(source)) if not in_val(i, cfg.val_fraction))
        else:  # the head of the train part as one text, as the merges have always been learned from it
            begin, end = lone
            cut = begin + int((end - begin) * (1 - cfg.val_fraction))
            head = lone_pieces(source, begin, min(cut, begin + cfg.bpe_train_bytes))
            train = iter(["".join(head)])
        tokenizer = Tokenizer.train_bpe(train, cfg.vocab_size, cfg.bpe_train_bytes, chat=cfg.chat)
    tokenizer.save(out)
    return tokenizer


def resolve_source(cfg: DataConfig) -> tuple[Corpus, str, str]:
    """The corpus, the tokenizer kind it takes and the source meta.json names."""
    if cfg.input is not None:
        return open_corpus(cfg.input, cfg.text_field), cfg.tokenizer, cfg.input
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"data.dataset={cfg.dataset!r} is not a named dataset ({', '.join(DATASETS)}): "
                          f"pass --data.input with your own files")
    named = DATASETS[cfg.dataset]
    source = cfg.source or named.url
    file = fetch(source, Path(cfg.data_dir) / "downloads", cfg.sha256 or named.sha256)
    if named.tokenizer == "conversations":
        file = write_verse_conversations(file, Path(cfg.data_dir) / "downloads" / f"{cfg.dataset}.jsonl")
    return Corpus((file,), None, cfg.text_field), named.tokenizer, source


def prepare(cfg: DataConfig) -> dict | None:
    """Prepare the dataset; returns its meta.json, or None for a sharded run whose index must wait
    for shards that other runs prepare."""
    start = time.perf_counter()
    folder = pretrained_tokenizer(cfg.tokenizer)  # a bad folder is refused before any download
    source, kind, name = resolve_source(cfg)
    chat = is_chat(source)
    if chat and folder is None and not (kind == "bpe" and cfg.chat):
        raise ConfigError(f"{source.files[0]} holds conversations, which need a tokenizer with a chat template: pass "
                          f"--data.tokenizer bpe --data.chat true (ours), or --data.tokenizer FOLDER (one that has one)")
    if chat and cfg.shard_documents:
        raise ConfigError("conversation corpora are prepared whole (fine-tuning sets are small): leave "
                          "data.shard_documents at 0")
    lone = None if chat else lone_document(source)
    if cfg.shard_documents:
        if lone is not None:
            raise data.DataError(f"--data.input {name} is a single document, which cannot be cut into shards of "
                                 f"documents: separate its documents with {DOC_SEPARATOR} lines, or leave "
                                 f"data.shard_documents at 0")
        return prepare_shards(cfg, source, kind, name, folder, start)
    out = Path(cfg.data_dir) / cfg.dataset
    tmp = out.with_name(out.name + ".tmp")  # the dataset appears whole, or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = make_tokenizer(cfg, kind, source, lone, tmp, folder)
    chat_stats = {}
    if chat:
        tokens, chars, chat_stats = write_conversations(list(source.files), tokenizer, tmp, cfg.val_fraction)
    else:
        batches = (document_batches(enumerate(documents(source)), 0, cfg.val_fraction) if lone is None
                   else lone_batches(source, *lone, cfg.val_fraction))
        written = write_splits(cfg, batches, tokenizer, tmp, tokenizer.prefix if lone else [])
        tokens, chars = ({split: written.total(split, what) for split in SPLITS} for what in ("tokens", "chars"))
    meta = {**describe(cfg, source, name, tokenizer), "documents_split": lone is None,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "train_chars": chars["train"], "val_chars": chars["val"], **chat_stats,
            "seconds": round(time.perf_counter() - start, 2)}
    replace_file(tmp / "meta.json", json.dumps(meta, indent=2), data.PREPARE_AGAIN)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"\n{out}/")
    for file in sorted(out.iterdir()):
        print(f"  {file.name:<22} {file.stat().st_size:>14,} bytes")
    report(tokenizer, meta)
    return meta


# --- shards ------------------------------------------------------------------------------------


def prepare_shards(cfg: DataConfig, source: Corpus, kind: str, name: str, folder: Path | None,
                   start: float) -> dict | None:
    """Shards of data.shard_documents documents, written straight into the dataset folder, each
    file renamed into place whole: a rerun skips the shards that exist, and several machines (each
    with its --data.shard_range) fill one shared folder. meta.json, the index, is written once
    every shard of the corpus exists."""
    out = Path(cfg.data_dir) / cfg.dataset
    if (out / "train.bin").exists():
        raise data.DataError(f"{out} holds a dataset prepared without shards (train.bin): remove it, or prepare the "
                             f"shards under another --data.dataset")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = shared_tokenizer(cfg, kind, source, out, folder)
    check_shard_settings(cfg, out)
    per_shard = cfg.shard_documents
    first, end = cfg.shard_span()
    if first == end:
        print(f"{out}/tokenizer.json is ready; the range {cfg.shard_range} holds no shard to prepare")
        return None
    numbered = enumerate(documents(source, first * per_shard), first * per_shard)
    if end is not None:  # one document more than the range holds says whether the corpus goes on
        numbered = itertools.islice(numbered, (end - first) * per_shard + 1)
    seen = Seen()
    batches = document_batches(seen.documents(numbered, out, tokenizer, per_shard, end), per_shard,
                               cfg.val_fraction)
    write_splits(cfg, batches, tokenizer, out, [])
    if not (seen.written or seen.skipped):
        raise data.DataError(f"the corpus has no document {first * per_shard} (the first of shard {first}): give "
                             f"--data.shard_range a range inside the corpus")
    print(f"\n{out}/: shards {first} to {max(seen.written + seen.skipped)}: {len(seen.written)} written, "
          f"{len(seen.skipped)} already there")
    if seen.corpus_end is None:
        print(f"  the corpus goes on past shard {end - 1}: the index (meta.json) is written by the run that reaches "
              f"its end once every shard exists, or by the same command without --data.shard_range (it skips "
              f"the shards that exist)")
        return None
    total = math.ceil(seen.corpus_end / per_shard)
    counts = [shard_tokens(out, shard, tokenizer) for shard in range(total)]
    if missing := [shard for shard, count in enumerate(counts) if count is None]:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        print(f"  {len(missing)} of the corpus's {total} shards are missing ({shown}), so no index (meta.json) yet: "
              f"once the other ranges are done, run the same command without --data.shard_range (it skips the "
              f"shards that exist) to write it")
        return None
    index = {split: [{"file": file_name(split, shard), "tokens": count[split]} for shard, count in enumerate(counts)]
             for split in SPLITS}
    meta = {**describe(cfg, source, name, tokenizer), "documents_split": True,
            "train_tokens": sum(e["tokens"] for e in index["train"]),
            "val_tokens": sum(e["tokens"] for e in index["val"]),
            "seconds": round(time.perf_counter() - start, 2),
            "shards": {"documents": per_shard, "count": total, **index}}
    replace_file(out / "meta.json", json.dumps(meta, indent=2), data.PREPARE_AGAIN)
    report(tokenizer, meta)
    return meta


@dataclass
class Seen:
    """What a sharded run found while reading: the shards it writes and skips, and the number of
    documents in the corpus once it reached the end (None when its range stops before)."""
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    corpus_end: int | None = None

    def documents(self, numbered: Iterator[tuple[int, str]], out: Path, tokenizer: Tokenizer, per_shard: int,
                  end: int | None) -> Iterator[tuple[int, str]]:
        """The documents of the shards to write; those of shards that exist whole are read past."""
        count, shard, writing = None, None, False
        for i, text in numbered:
            if i // per_shard != shard:
                shard = i // per_shard
                if shard == end:
                    return  # the document after the range: the corpus goes on
                writing = shard_tokens(out, shard, tokenizer) is None
                (self.written if writing else self.skipped).append(shard)
            if writing:
                yield i, text
            count = i + 1
        self.corpus_end = count


SHARD_SETTINGS = ("shard_documents", "val_fraction", "text_field")  # what decides a shard's contents


def check_shard_settings(cfg: DataConfig, out: Path) -> None:
    """The first run over a folder records the settings that decide what each shard holds; a later
    run (a rerun, another machine) with others would mix shards cut two ways, so it is refused."""
    path = out / "shard_settings.json"
    ours = {key: getattr(cfg, key) for key in SHARD_SETTINGS}
    if not path.is_file():
        replace_file(path, json.dumps(ours), data.PREPARE_AGAIN)
        return
    recorded = data.read_meta(path)
    for key, value in ours.items():
        if recorded.get(key) != value:
            raise data.DataError(f"{out} holds shards prepared with data.{key}={recorded.get(key)!r}, not {value!r}: "
                                 f"use the setting they were made with, or another --data.dataset")


def shard_tokens(out: Path, shard: int, tokenizer: Tokenizer) -> dict[str, int] | None:
    """Each split's token count in a shard whose files both exist whole, made by this tokenizer;
    None for any other (a run that stopped leaves only .tmp files, which do not count)."""
    counts = {}
    for split in SPLITS:
        try:
            tokens = data.read_tokens(out / file_name(split, shard))
        except data.DataError:
            return None
        if tokens.tokenizer_hash != tokenizer.hash:
            return None
        counts[split] = len(tokens)
    return counts


def shared_tokenizer(cfg: DataConfig, kind: str, source: Corpus, out: Path, folder: Path | None) -> Tokenizer:
    """The tokenizer every run over this folder shares: the one already there, or else made as for
    an unsharded dataset and moved in whole (tokenizer.json last, as the sign that it is complete)."""
    if (out / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(out)
        expected = Tokenizer.load(folder).hash if folder is not None else None
        if tokenizer.kind != kind if folder is None else tokenizer.hash != expected:
            raise data.DataError(f"{out} already holds another tokenizer ({tokenizer.kind}, sha256 "
                                 f"{tokenizer.hash[:12]}) than --data.tokenizer {cfg.tokenizer}: give the one it was "
                                 f"prepared with, or another --data.dataset")
        return tokenizer
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = make_tokenizer(cfg, kind, source, None, tmp, folder)
    for file in sorted(Tokenizer.files(tmp), key=lambda f: f.name == "tokenizer.json"):
        file.replace(out / file.name)
    tmp.rmdir()
    return tokenizer


def describe(cfg: DataConfig, source: Corpus, name: str, tokenizer: Tokenizer) -> dict:
    """What meta.json says of the source and the tokenizer."""
    files = [sha256_of(f) for f in source.files]
    return {"dataset": cfg.dataset, "source": str(name),
            "source_sha256": files[0] if len(files) == 1 else files or None,
            "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.hash,
            "tokenizer_source": cfg.tokenizer if tokenizer.kind == "pretrained" else None,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "document_prefix": tokenizer.prefix,
            "dtype": data.token_dtype(tokenizer.vocab_size).name}


def report(tokenizer: Tokenizer, meta: dict) -> None:
    tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"  {tokenizer.kind} tokenizer, {tokenizer.vocab_size:,} ids | train {meta['train_tokens']:,} tokens | "
          f"val {meta['val_tokens']:,} tokens | {tokens / meta['seconds']:,.0f} tokens/s")


@script
def main(argv: list[str]) -> None:
    prepare(parse_cli(argv, prog="prepare_data.py", sections=("data",)).data)


if __name__ == "__main__":
    sys.exit(main())
