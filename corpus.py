"""The documents of a corpus, streamed: memory holds one document (or one bounded piece) at a time.

A corpus (`--data.input`) is files or a Hugging Face dataset:

    .txt                 one document, or several separated by lines of `<|endoftext|>`
    .jsonl .jsonl.gz .jsonl.zst   one document per line, in a "text" field (--data.text_field)
    .parquet             one document per row, read a record batch at a time
    hf:NAME[:CONFIG]     datasets.load_dataset(NAME, CONFIG, split="train", streaming=True); NAME may
                         be a local folder of data files, which works offline

Documents are numbered across the corpus in order (files sorted by path), so document i is the
same document on every machine and in every run: shards and the train/val split are defined on
these numbers. A corpus that is a single document (a .txt without separator lines) is never held
whole: `lone_document` measures it in one streaming pass and `lone_pieces` streams any range of it.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from data import DataError

DOC_SEPARATOR = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HF_PREFIX = "hf:"
OPTIONAL = "pip install -r requirements-data.txt"


@dataclass(frozen=True)
class Corpus:
    files: tuple[Path, ...]  # empty for a Hugging Face dataset
    hf: str | None  # "NAME[:CONFIG]" of a Hugging Face dataset
    text_field: str


@dataclass(frozen=True)
class DocumentEnd:
    """Closes a document in a stream of its parts; `strip`: it loses its leading and trailing
    newlines (a .txt document closed by a separator line, or holding the separator's text)."""
    strip: bool


def open_corpus(spec: str, text_field: str = "text") -> Corpus:
    """The corpus `--data.input` names: hf:NAME[:CONFIG], a file, a folder (searched recursively) or a glob."""
    if spec.startswith(HF_PREFIX):
        return Corpus((), spec.removeprefix(HF_PREFIX), text_field)
    path = Path(spec)
    found = path.rglob("*") if path.is_dir() else map(Path, glob.glob(spec, recursive=True))
    files = tuple(sorted(p for p in found if p.name.endswith(SUFFIXES) and p.is_file()))
    if not files:
        raise DataError(f"--data.input {spec} matches no {', '.join(SUFFIXES)} file: give such files, a folder "
                        f"of them, or hf:NAME[:CONFIG]")
    return Corpus(files, None, text_field)


def parts(corpus: Corpus) -> Iterator[str | DocumentEnd]:
    """The corpus as text parts, a DocumentEnd after each document's: a .txt file gives its lines
    (separator lines dropped), any other source one part per row."""
    for file in corpus.files:
        if file.suffix == ".txt":
            yield from txt_parts(file)
        else:
            for text in rows(corpus, file):
                yield text
                yield DocumentEnd(False)
    if corpus.hf is not None:
        for text in hf_rows(corpus, 0):
            yield text
            yield DocumentEnd(False)


def txt_parts(file: Path) -> Iterator[str | DocumentEnd]:
    started = marked = False  # a document has begun; one of its lines holds the separator's text
    for _, line in text_lines(file):
        if line.strip() == DOC_SEPARATOR:
            if started:
                yield DocumentEnd(True)
            started = marked = False
        else:
            started, marked = True, marked or DOC_SEPARATOR in line
            yield line
    if started:
        yield DocumentEnd(marked)


def documents(corpus: Corpus, start: int = 0) -> Iterator[str]:
    """Document `start` of the corpus and every one after it. Parquet files skip whole files and
    row groups by the counts in their metadata, unread; a Hugging Face dataset is asked to skip
    (IterableDataset.skip); other files are read past."""
    if corpus.hf is not None:
        yield from hf_rows(corpus, start)
    elif all(f.suffix == ".parquet" for f in corpus.files):
        for file in corpus.files:
            count = parquet_file(file).metadata.num_rows
            if start < count:
                yield from parquet_rows(file, corpus.text_field, start)
            start = max(start - count, 0)
    else:
        yield from itertools.islice(joined(parts(corpus)), start, None)


def joined(stream: Iterator[str | DocumentEnd]) -> Iterator[str]:
    pieces: list[str] = []
    for part in stream:
        if isinstance(part, DocumentEnd):
            text = "".join(pieces)
            yield text.strip("\n") if part.strip else text
            pieces = []
        else:
            pieces.append(part)


def lone_document(corpus: Corpus) -> tuple[int, int] | None:
    """None when the corpus holds several documents. When it holds one, the range of characters
    (begin, end) of its parts that is the document (a stripped one loses its outer newlines),
    measured in one streaming pass. An empty corpus is refused."""
    ended: DocumentEnd | None = None
    size = lead = trail = 0  # characters so far; newlines before the first other character, after the last
    for part in parts(corpus):
        if isinstance(part, DocumentEnd):
            ended = part
            continue
        if ended is not None:  # a part after the first document's end begins a second one
            return None
        if lead == size:
            lead += len(part) - len(part.lstrip("\n"))
        kept = part.rstrip("\n")
        trail = len(part) - len(kept) if kept else trail + len(part)
        size += len(part)
    begin, end = (lead, size - trail) if ended is not None and ended.strip else (0, size)
    if end <= begin:
        raise DataError("the corpus is empty: give a file with some text")
    return begin, end


def lone_pieces(corpus: Corpus, begin: int, end: int) -> Iterator[str]:
    """Characters begin to end-1 of a single-document corpus's parts, a line (or less) at a time."""
    at = 0
    for part in parts(corpus):
        if isinstance(part, DocumentEnd) or at >= end:
            return
        if piece := part[max(begin - at, 0):end - at]:
            yield piece
        at += len(part)


def rows(corpus: Corpus, file: Path) -> Iterator[str]:
    """The texts of a file with one document per row (.jsonl, compressed or not, or .parquet)."""
    if file.suffix == ".parquet":
        yield from parquet_rows(file, corpus.text_field, 0)
        return
    for number, line in text_lines(file):
        if line.strip():
            yield jsonl_text(file, number, line, corpus.text_field)


# --- files -----------------------------------------------------------------------------------


def text_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, decompressed by its suffix; anything else is
    refused naming the line."""
    number, damaged = 0, (OSError, EOFError, ValueError)  # what gzip raises for a damaged or cut file
    if file.name.endswith(".zst"):
        damaged += (optional_import("zstandard", file).ZstdError,)
    with open_text(file) as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text (an undecodable byte after line {number}): give "
                            f".txt or .jsonl files of UTF-8 text") from None
        except damaged as e:
            raise DataError(f"{file} cannot be decompressed after line {number} ({e}): the file is damaged or "
                            f"cut short; fetch it again") from None


def open_text(file: Path) -> IO[str]:
    if file.name.endswith(".gz"):
        return gzip.open(file, "rt", encoding="utf-8", newline="")
    if file.name.endswith(".zst"):
        zstandard = optional_import("zstandard", file)
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(file.open("rb"), closefd=True),
                                encoding="utf-8", newline="")
    return file.open(encoding="utf-8", newline="")


def optional_import(name: str, needed_by: Path | str):
    """A package of requirements-data.txt, or a one-line error saying how to install it."""
    try:
        return __import__(name)
    except ImportError:
        raise DataError(f"reading {needed_by} needs the {name} package: {OPTIONAL}") from None


def jsonl_text(file: Path, number: int, line: str, field: str = "text") -> str:
    """The text field of one .jsonl line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{number} is not valid JSON ({e.msg}): each line must be an object like "
                        f'{{"{field}": "..."}}') from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{file}:{number} has no string field '{field}': each line must be an object like "
                        f'{{"{field}": "..."}} (or name the field with --data.text_field)')
    return record[field]


def parquet_file(file: Path):
    """A pyarrow ParquetFile (metadata read, no rows yet)."""
    optional_import("pyarrow", file)
    import pyarrow
    import pyarrow.parquet
    try:
        return pyarrow.parquet.ParquetFile(file)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{file} is not a readable parquet file ({str(e).splitlines()[0]}): fetch it again") from None


def parquet_rows(file: Path, field: str, start: int) -> Iterator[str]:
    """Rows `start` onwards of a parquet file's text column, a record batch at a time; row groups
    before `start` are skipped by their row counts in the file's metadata, never read."""
    parquet = parquet_file(file)
    import pyarrow
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{file} has no column '{field}' (it has {', '.join(parquet.schema_arrow.names)}): name "
                        f"the text column with --data.text_field")
    if not pyarrow.types.is_string(kind := parquet.schema_arrow.field(field).type) and \
            not pyarrow.types.is_large_string(kind):
        raise DataError(f"{file}'s column '{field}' holds {kind}, not text: name the text column with "
                        f"--data.text_field")
    groups, row = [], 0  # the row groups to read; the number of the first row they hold
    for g in range(parquet.num_row_groups):
        count = parquet.metadata.row_group(g).num_rows
        if row + count <= start and not groups:
            row += count
        else:
            groups.append(g)
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
        texts = batch.column(0).to_pylist()
        if None in texts:
            raise DataError(f"{file} row {row + texts.index(None)} has no {field} (null): remove the row or fill it")
        yield from texts[max(start - row, 0):]
        row += len(texts)


def hf_rows(corpus: Corpus, start: int) -> Iterator[str]:
    """The text field of every row from `start` of a Hugging Face dataset's train split, streamed."""
    name, _, config = corpus.hf.partition(":")
    datasets = optional_import("datasets", f"{HF_PREFIX}{corpus.hf}")
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except (OSError, ValueError, ConnectionError) as e:  # not found, offline, no such config
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open the Hugging Face dataset {corpus.hf} ({reason[:200]}): check its name and "
                        f"config, or download its files and pass hf:FOLDER or the files themselves") from None
    for number, row in enumerate(stream.skip(start) if start else stream, start):
        if not isinstance(text := row.get(corpus.text_field), str):
            raise DataError(f"{HF_PREFIX}{corpus.hf} row {number} has no string field '{corpus.text_field}' (it has "
                            f"{', '.join(row)}): name the text field with --data.text_field")
        yield text
