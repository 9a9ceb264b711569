"""Token files and the training batch sampler.

A `.bin` token file is a 64-byte header followed by the tokens:

    magic "NLTOKENS" | format version (u32) | bytes per token (u32: 2 = uint16, 4 = uint32)
    | token count (u64) | vocab size (u64) | sha256 of the tokenizer.json (32 bytes)

Reading maps the tokens with `np.memmap`, so a file of any size costs no memory, and checks the
header and the file length before anything trains on it.

A sharded dataset (prepare_data.py --data.shard_documents) holds `<split>_000000.bin`, ... in this
format, and meta.json's "shards" index lists each with its token count: open_split checks every
shard against it and returns a TokenShards, which BatchSampler draws from as from one file.

A conversation dataset (prepare_data.py on chat .jsonl) adds, per split, `<split>_mask.bin` (the
same format, one 0/1 per token: 1 where the token is the assistant's) and `<split>_starts.npy`
(where each conversation begins), and trains through ConversationSampler.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import UserError, disk_write

if typing.TYPE_CHECKING:
    import torch

MAGIC = b"NLTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")  # 64 bytes, so the tokens that follow stay aligned
EVAL_STREAM = 2**32 - 1  # a step number no run reaches: evaluation windows never repeat training ones


class DataError(UserError):
    """A problem with a dataset whose message is one line meant for the user."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# What a failed write while preparing a dataset says: nothing finished is lost.
PREPARE_AGAIN = ("the files finished before it are intact: free disk space (or make the folder writable) and run "
                 "it again (a sharded run skips the shards it finished)")


class TokenWriter:
    """A token file written piece by piece into `<path>.tmp`, renamed to `path` by close(): an
    interrupted write never leaves a .bin that looks whole (a failed one removes its .tmp). A full
    or read-only disk is one WriteError line, with what the file needed so far."""

    def __init__(self, path: str | Path, vocab_size: int, tokenizer_hash: str):
        self.path, self.vocab_size, self.dtype = Path(path), vocab_size, token_dtype(vocab_size)
        self.digest, self.count = bytes.fromhex(tokenizer_hash), 0
        self.tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with self.disk_write(0):
            self.file = self.tmp.open("wb")
            self.file.write(self._header())

    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab_size, self.digest)

    def disk_write(self, more_tokens: int) -> contextlib.AbstractContextManager:
        return disk_write(self.path.parent, HEADER.size + (self.count + more_tokens) * self.dtype.itemsize,
                          f"writing {self.path.name}", PREPARE_AGAIN)

    def write(self, tokens: np.ndarray) -> None:
        with self.disk_write(len(tokens)):
            self.file.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self.count += len(tokens)

    def close(self) -> int:
        """Finish the file (its header's count, fsync, rename); returns the token count."""
        with self.disk_write(0):
            self.file.seek(0)
            self.file.write(self._header())
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        return self.count

    def abandon(self) -> None:
        with contextlib.suppress(OSError):  # the buffered rest of a file on a full disk cannot be flushed
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_tokens(path: str | Path, chunks: Iterable[np.ndarray], vocab_size: int, tokenizer_hash: str) -> int:
    """Stream token arrays into `path` (see TokenWriter); returns the count."""
    writer = TokenWriter(path, vocab_size, tokenizer_hash)
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abandon()
        raise
    return writer.close()


@dataclass
class TokenFile:
    path: Path
    tokens: np.memmap
    vocab_size: int
    tokenizer_hash: str

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def files(self) -> list[TokenFile]:
        """The token files of the split: this one (what a sampler iterates, as for TokenShards)."""
        return [self]


@dataclass
class TokenShards:
    """A split prepared in shards (prepare_data.py --data.shard_documents): its token files in the
    order meta.json's index lists them, each memory-mapped, so a corpus of any size costs no memory."""
    path: Path  # <folder>/<split>_*.bin: what messages name
    files: list[TokenFile]
    vocab_size: int
    tokenizer_hash: str

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)


def read_tokens(path: str | Path) -> TokenFile:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: create it with python prepare_data.py")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise DataError(f"{path} is not a nanollama token file (bad header): re-run prepare_data.py")
    _, version, itemsize, count, vocab_size, digest = HEADER.unpack(raw)
    if version != VERSION:
        raise DataError(f"{path} has format version {version}, this code reads {VERSION}: re-run prepare_data.py")
    if itemsize not in (2, 4):
        raise DataError(f"{path} declares {itemsize}-byte tokens; only 2 and 4 exist: re-run prepare_data.py")
    if size != HEADER.size + count * itemsize:
        raise DataError(f"{path} is truncated or corrupt: its header promises {count:,} tokens "
                        f"({HEADER.size + count * itemsize:,} bytes) but the file has {size:,} bytes; "
                        f"re-run prepare_data.py")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))
    return TokenFile(path, tokens, vocab_size, digest.hex())


def open_split(dataset_dir: str | Path, split: str) -> TokenFile | TokenShards:
    """A split of a prepared dataset: its <split>.bin, or its shards when meta.json indexes some."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DataError(f"data folder {dataset_dir} does not exist: create it with python prepare_data.py "
                        f"--data.dataset {dataset_dir.name} --data.data_dir {dataset_dir.parent}")
    meta_file = dataset_dir / "meta.json"
    meta = read_meta(meta_file) if meta_file.is_file() else {}
    if "shards" not in meta:
        return read_tokens(dataset_dir / f"{split}.bin")
    return read_shards(dataset_dir, split, meta)


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a JSON object: re-run prepare_data.py")
    return meta


def read_shards(dataset_dir: Path, split: str, meta: dict) -> TokenShards:
    """Every shard meta.json's index lists for `split`, checked: present, whole, as long as the
    index says and made by the dataset's tokenizer. A shard that fails is named, with the fix."""
    redo = "delete it and run the same prepare_data.py command again (it rewrites only missing shards)"
    files = []
    for entry in meta["shards"][split]:
        path = dataset_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}, a shard meta.json lists, is missing: run the same prepare_data.py command "
                            f"again (it rewrites only missing shards)")
        shard = read_tokens(path)
        if len(shard) != entry["tokens"]:
            raise DataError(f"{path} holds {len(shard):,} tokens but meta.json's index says {entry['tokens']:,}: "
                            f"it comes from another preparation; {redo}")
        if shard.tokenizer_hash != meta["tokenizer_sha256"]:
            raise DataError(f"{path} was tokenized with another tokenizer than the dataset's (sha256 "
                            f"{shard.tokenizer_hash[:12]} vs {meta['tokenizer_sha256'][:12]} in meta.json); {redo}")
        files.append(shard)
    if not files:
        raise DataError(f"{dataset_dir}/meta.json lists no {split} shard: re-run prepare_data.py")
    return TokenShards(dataset_dir / f"{split}_*.bin", files, files[0].vocab_size, files[0].tokenizer_hash)


def check_compatible(train: TokenFile | TokenShards, val: TokenFile | TokenShards, model_vocab_size: int,
                     block_size: int, model_tokenizer: tuple[str, str, str] | None = None,
                     padded: bool = False) -> None:
    """Refuse data the model cannot train on, naming the mismatch. `model_tokenizer` is the
    (sha256, folder, fix) of the tokenizer the model comes with, when it has one; `padded` data
    (conversations) fills its rows with padding, so it needs no block's worth of tokens."""
    if train.tokenizer_hash != val.tokenizer_hash:
        raise DataError(f"{train.path} and {val.path} come from different tokenizers: re-run prepare_data.py")
    if model_tokenizer is not None and train.tokenizer_hash != model_tokenizer[0]:
        digest, folder, fix = model_tokenizer
        raise DataError(f"{train.path} was tokenized with another tokenizer than {folder}'s (sha256 "
                        f"{train.tokenizer_hash[:12]} vs {digest[:12]}): {fix}")
    if train.vocab_size > model_vocab_size:
        fix = (f"prepare the data with the model's own tokenizer ({model_tokenizer[1]})" if model_tokenizer
               else f"set --model.vocab_size {train.vocab_size} (or more)")
        raise DataError(f"the data's vocab of {train.vocab_size} ids does not fit model.vocab_size="
                        f"{model_vocab_size}: {fix}")
    for split in () if padded else (train, val):
        longest = max(len(f) for f in split.files)  # a window never crosses from one shard into the next
        if longest < block_size + 1:
            what = ("holds" if isinstance(split, TokenFile)
                    else "has no shard of block_size + 1 tokens; the longest holds")
            raise DataError(f"{split.path} {what} {longest:,} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}: lower train.block_size or use more data")


class BatchSampler:
    """Random windows of block_size + 1 tokens, as (inputs, targets) int64 tensors.

    The windows of a batch depend only on (seed, step, index): a resumed run draws exactly the
    batches the uninterrupted one would have, and `index` = micro_step * world_size + rank makes
    every process's micro-batch the one a single process would draw at that accumulation slot.
    A sharded split draws each window's start uniformly over the starts of every shard; a window
    never crosses into the next shard. With one file this is exactly the draw of an unsharded split.
    """

    def __init__(self, data: TokenFile | TokenShards, block_size: int, batch_size: int, seed: int):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        # Window starts are numbered across the files: file k owns the numbers from ends[k] - starts[k]
        # to ends[k] - 1 (a file shorter than a window owns none).
        self.starts = np.array([max(len(f) - block_size, 0) for f in data.files], dtype=np.int64)
        self.ends = np.cumsum(self.starts)

    def _windows(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, index])
        numbers = rng.integers(0, int(self.ends[-1]), size=self.batch_size)
        files = np.searchsorted(self.ends, numbers, side="right")
        offsets = numbers - (self.ends[files] - self.starts[files])
        windows = np.stack([self.data.files[k].tokens[s:s + self.block_size + 1]
                            for k, s in zip(files, offsets)]).astype(np.int64)
        if (top := windows.max()) >= self.data.vocab_size:  # a corrupt file: the embedding would fail in torch
            path = self.data.files[files[np.argmax(windows.max(axis=1))]].path
            raise DataError(f"{path} holds token id {top} but its header declares a vocab of "
                            f"{self.data.vocab_size} ids: the file is corrupt; re-run prepare_data.py")
        import torch  # here, not at the top: prepare_data's worker processes import this module, and
        # torch would add ~220 MiB to each of them
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def get(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(step, index)

    def get_eval(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same evaluation batches at every evaluation, so successive losses compare."""
        return self._windows(EVAL_STREAM, index)


@dataclass
class Conversations:
    """A split of whole conversations: tokens, the assistant mask and each conversation's start."""
    tokens: TokenFile
    mask: np.ndarray
    starts: np.ndarray  # int64, ascending, starts[0] == 0; conversation i is tokens[starts[i]:starts[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(np.append(self.starts, len(self.tokens)))


def is_conversations(dataset_dir: str | Path) -> bool:
    return (Path(dataset_dir) / "train_mask.bin").is_file()


def open_conversations(dataset_dir: str | Path, split: str) -> Conversations:
    tokens = open_split(dataset_dir, split)
    mask = read_tokens(Path(dataset_dir) / f"{split}_mask.bin")
    starts_file = Path(dataset_dir) / f"{split}_starts.npy"
    starts = np.load(starts_file) if starts_file.is_file() else None
    if (len(mask) != len(tokens) or starts is None or starts.ndim != 1 or not len(starts) or starts[0] != 0
            or (np.diff(starts) <= 0).any() or starts[-1] >= len(tokens)):
        raise DataError(f"{dataset_dir}'s {split} conversations are inconsistent (mask or starts do not fit the "
                        f"tokens): re-run prepare_data.py")
    return Conversations(tokens, mask.tokens, starts)


class ConversationSampler:
    """Rows of whole conversations packed into block_size + 1 tokens, as (inputs, targets), where
    only the assistant's tokens are targets (-100 elsewhere, and on the EOS padding after the last
    conversation that fits). A row takes conversations drawn at random until the next one would
    cross its end; one longer than the row alone is cut to its first block_size + 1 tokens, or
    with skip_long never drawn.
    Like BatchSampler, a batch depends only on (seed, step, index), so resuming is exact."""

    def __init__(self, data: Conversations, block_size: int, batch_size: int, seed: int, pad_id: int,
                 skip_long: bool = False):
        self.data, self.block_size, self.batch_size, self.seed, self.pad_id = data, block_size, batch_size, seed, pad_id
        self.lengths = data.lengths()
        self.too_long = int((self.lengths > block_size + 1).sum())
        # The conversations rows draw from: all, or (skip_long) those that fit a row whole.
        self.drawn = np.flatnonzero(self.lengths <= block_size + 1) if skip_long else np.arange(len(self.lengths))
        if not len(self.drawn):
            raise DataError(f"every conversation of {data.tokens.path} is longer than block_size + 1 = {block_size + 1} "
                            f"tokens: raise train.block_size or set train.long_conversations truncate")

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.block_size + 1
        tokens, mask = np.full(size, self.pad_id, dtype=np.int64), np.zeros(size, dtype=bool)
        filled = 0
        while True:
            i = int(self.drawn[rng.integers(len(self.drawn))])
            n = min(int(self.lengths[i]), size)
            if filled and filled + n > size:
                return tokens, mask
            start = int(self.data.starts[i])
            tokens[filled:filled + n] = self.data.tokens.tokens[start:start + n]
            mask[filled:filled + n] = self.data.mask[start:start + n] == 1
            filled += n
            if filled == size:
                return tokens, mask

    def _windows(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, index])
        for _ in range(100):  # a batch needs a target: cut conversations may lose every assistant token
            rows = [self._row(rng) for _ in range(self.batch_size)]
            tokens = np.stack([t for t, _ in rows])
            targets = np.where(np.stack([m for _, m in rows]), tokens, -100)
            if (targets[:, 1:] != -100).any():
                break
        else:
            raise DataError(f"{self.data.tokens.path}: batches of block_size + 1 = {self.block_size + 1} tokens hold no "
                            f"assistant token: raise train.block_size or set train.long_conversations skip")
        if (top := tokens.max()) >= self.data.tokens.vocab_size:
            raise DataError(f"{self.data.tokens.path} holds token id {top} but its header declares a vocab of "
                            f"{self.data.tokens.vocab_size} ids: the file is corrupt; re-run prepare_data.py")
        import torch  # see BatchSampler._windows
        return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets[:, 1:])

    def get(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(step, index)

    def get_eval(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(EVAL_STREAM, index)
