"""Corpora larger than memory: every input format, the single document streamed, token shards
(resume, ranges over several machines, the index), and the sampler and checks over shards."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import zstandard

import corpus
import data
import eval as eval_py
import prepare_data
from config import ConfigError, DataConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"story {i}: once upon a time " + "la " * (i % 7) + f"the end of {i}." for i in range(50)]
HASH, OTHER = "ab" * 32, "cd" * 32


def prepare(tmp_path: Path, source: str, run: str = "a", **settings) -> dict | None:
    cfg = DataConfig(dataset="d", data_dir=str(tmp_path / run), input=source, tokenizer="char",
                     **{"workers": 1, **settings})
    cfg.validate()
    return prepare_data.prepare(cfg)


def bins(folder: Path) -> dict[str, str]:
    """sha256 of every token file of a prepared dataset."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.bin"))}


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


# --- input formats ----------------------------------------------------------------------------------


def as_gzip(folder: Path) -> str:
    with gzip.open(folder / "docs.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return str(folder / "docs.jsonl.gz")


def as_zstd(folder: Path) -> str:
    text = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    return str(folder / "docs.jsonl.zst")


def as_parquet(folder: Path) -> str:
    """Two files of several row groups each, with another column beside the text."""
    for part, docs in enumerate((DOCS[:23], DOCS[23:])):
        table = pyarrow.table({"id": list(range(len(docs))), "text": docs})
        pyarrow.parquet.write_table(table, folder / f"part{part}.parquet", row_group_size=5)
    return str(folder)


def as_hf_folder(folder: Path) -> str:
    hub = folder / "hub_copy"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", DOCS)
    return f"hf:{hub}"


@pytest.mark.parametrize("make", [as_gzip, as_zstd, as_parquet, as_hf_folder], ids=lambda f: f.__name__)
def test_every_format_gives_the_documents_of_plain_jsonl(tmp_path, make):
    (tmp_path / "in").mkdir()
    prepare(tmp_path, str(write_jsonl(tmp_path / "docs.jsonl", DOCS)), "ref")
    expected = bins(tmp_path / "ref" / "d")
    prepare(tmp_path, make(tmp_path / "in"), "got")
    assert bins(tmp_path / "got" / "d") == expected


def test_parquet_skips_to_a_document_by_row_group_counts(tmp_path):
    source = corpus.open_corpus(as_parquet(tmp_path))
    assert list(corpus.documents(source)) == DOCS
    for start in (0, 4, 5, 22, 23, 24, 49, 50):
        assert list(corpus.documents(source, start)) == DOCS[start:]


def test_text_field_names_the_column(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    prepare(tmp_path, str(tmp_path / "docs.jsonl"), "a", text_field="content")
    prepare(tmp_path, str(write_jsonl(tmp_path / "ref.jsonl", DOCS)), "b")
    assert bins(tmp_path / "a" / "d") == bins(tmp_path / "b" / "d")


# --- one document, streamed -------------------------------------------------------------------------


def reference_lone_document(text: str, tokenizer: Tokenizer, val_fraction: float, batch_chars: int) -> dict:
    """The split as it was computed with the whole text in memory: the tail is val, each part cut
    into batches of lines of at least batch_chars characters."""
    cut = int(len(text) * (1 - val_fraction))
    out = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        batches, lines = [], []
        for line in part.splitlines(keepends=True):
            lines.append(line)
            if sum(map(len, lines)) >= batch_chars:
                batches.append("".join(lines))
                lines = []
        batches += ["".join(lines)] if lines else []
        out[split] = tokenizer.prefix + [t for ids in tokenizer.encode_batch(batches) for t in ids]
    return out


@pytest.mark.parametrize("separated", [False, True], ids=["plain", "closed by a separator line"])
def test_a_single_document_is_streamed_to_the_same_tokens(tmp_path, monkeypatch, separated):
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 300)  # many batches from a small text
    lines = [f"\n{'thou art ' * (i % 5)}line {i}\r\n" if i % 3 else f"speech {i}\n\n" for i in range(400)]
    text = "\n\n" + "".join(lines) + "\n"
    (tmp_path / "one.txt").write_text(text + ("<|endoftext|>\n" if separated else ""), newline="")
    cfg = DataConfig(dataset="d", data_dir=str(tmp_path), input=str(tmp_path / "one.txt"), tokenizer="bpe",
                     vocab_size=300, workers=1)
    meta = prepare_data.prepare(cfg)
    document = text.strip("\n") if separated else text
    expected = reference_lone_document(document, Tokenizer.load(tmp_path / "d"), cfg.val_fraction, 300)
    for split in ("train", "val"):
        assert data.open_split(tmp_path / "d", split).tokens.tolist() == expected[split]
    assert meta["documents_split"] is False and meta["train_chars"] + meta["val_chars"] == len(document)


def test_a_single_document_is_never_read_whole(tmp_path, monkeypatch):
    """Its passes see it a line at a time, and nothing joins its lines into one document."""
    (tmp_path / "one.txt").write_text("a line of verse, and then another\n" * 20_000)
    longest = []
    parts = corpus.parts
    monkeypatch.setattr(corpus, "parts", lambda source: (longest.append(len(p)) or p if isinstance(p, str) else p
                                                         for p in parts(source)))
    monkeypatch.setattr(corpus, "joined", lambda stream: pytest.fail("the single document was joined whole"))
    meta = prepare(tmp_path, str(tmp_path / "one.txt"))
    assert max(longest) < 100 and meta["train_tokens"] + meta["val_tokens"] == 34 * 20_000


# --- shards -----------------------------------------------------------------------------------------


@pytest.fixture
def docs_txt(tmp_path) -> str:
    (tmp_path / "docs.txt").write_text("".join(f"{d}\n<|endoftext|>\n" for d in DOCS))
    return str(tmp_path / "docs.txt")


def test_shards_hold_the_documents_an_unsharded_run_holds(tmp_path, docs_txt):
    meta = prepare(tmp_path, docs_txt, "sharded", shard_documents=7)
    folder = tmp_path / "sharded" / "d"
    assert [e["file"] for e in meta["shards"]["train"]] == [f"train_{i:06d}.bin" for i in range(8)]
    assert meta["shards"]["count"] == 8 and not list(folder.glob("*.tmp"))
    whole = prepare(tmp_path, docs_txt, "whole")
    for split in ("train", "val"):
        shards = data.open_split(folder, split)
        assert isinstance(shards, data.TokenShards) and len(shards) == whole[f"{split}_tokens"]
        joined = np.concatenate([f.tokens for f in shards.files])
        assert np.array_equal(joined, data.open_split(tmp_path / "whole" / "d", split).tokens)


def test_a_rerun_rewrites_only_the_missing_shard(tmp_path, docs_txt):
    prepare(tmp_path, docs_txt, shard_documents=7)
    folder = tmp_path / "a" / "d"
    before = bins(folder)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.bin")}
    (folder / "train_000003.bin").unlink()  # as if killed: one shard gone, another half written
    (folder / "val_000005.bin").rename(folder / "val_000005.bin.tmp")
    (folder / "meta.json").unlink()
    prepare(tmp_path, docs_txt, shard_documents=7)
    assert bins(folder) == before and (folder / "meta.json").is_file() and not list(folder.glob("*.tmp"))
    rewritten = {p.name for p in folder.glob("*.bin") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert rewritten == {"train_000003.bin", "val_000003.bin", "train_000005.bin", "val_000005.bin"}


def test_two_machines_fill_one_folder_like_one_run(tmp_path, docs_txt):
    prepare(tmp_path, docs_txt, "one", shard_documents=7)
    assert prepare(tmp_path, docs_txt, "two", shard_documents=7, shard_range="4:8") is None  # shards 0-3 missing
    assert not (tmp_path / "two" / "d" / "meta.json").exists()
    meta = prepare(tmp_path, docs_txt, "two", shard_documents=7, shard_range="0:4")
    assert meta is None  # this range stops before the corpus ends: it cannot tell whether all exist
    meta = prepare(tmp_path, docs_txt, "two", shard_documents=7)  # skips every shard, writes the index
    assert meta["shards"]["count"] == 8
    assert bins(tmp_path / "two" / "d") == bins(tmp_path / "one" / "d")
    one = json.loads((tmp_path / "one" / "d" / "meta.json").read_text())
    assert {k: v for k, v in meta.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}


def test_the_range_that_ends_the_corpus_writes_the_index(tmp_path, docs_txt):
    assert prepare(tmp_path, docs_txt, shard_documents=7, shard_range="0:0") is None  # the tokenizer alone
    assert (tmp_path / "a" / "d" / "tokenizer.json").is_file() and not bins(tmp_path / "a" / "d")
    assert prepare(tmp_path, docs_txt, shard_documents=7, shard_range="0:5") is None
    assert prepare(tmp_path, docs_txt, shard_documents=7, shard_range="5:100")["shards"]["count"] == 8


def test_one_and_two_workers_write_the_same_shards(tmp_path, docs_txt, monkeypatch):
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 100)  # many batches in flight at once
    for workers in (1, 2):
        prepare(tmp_path, docs_txt, f"w{workers}", shard_documents=9, workers=workers)
    assert bins(tmp_path / "w1" / "d") == bins(tmp_path / "w2" / "d")


@pytest.mark.parametrize("settings,error,message", [
    ({"shard_documents": 5, "shard_range": "3"}, ConfigError, "is not START:END"),
    ({"shard_documents": 5, "shard_range": "4:2"}, ConfigError, "is not START:END"),
    ({"shard_range": "0:2"}, ConfigError, "needs shards: set --data.shard_documents"),
    ({"shard_documents": 5, "shard_range": "20:30"}, data.DataError, "the corpus has no document 100"),
])
def test_bad_shard_settings(tmp_path, docs_txt, settings, error, message):
    with pytest.raises(error, match=message):
        prepare(tmp_path, docs_txt, **settings)


def test_a_rerun_with_other_shard_settings_is_refused(tmp_path, docs_txt):
    prepare(tmp_path, docs_txt, shard_documents=7, shard_range="0:2")
    for settings, shown in (({"shard_documents": 8}, "data.shard_documents=7, not 8"),
                            ({"shard_documents": 7, "val_fraction": 0.2}, "data.val_fraction=0.1, not 0.2")):
        with pytest.raises(data.DataError, match=f"holds shards prepared with {shown}: use the setting they were"):
            prepare(tmp_path, docs_txt, **settings)
    assert prepare(tmp_path, docs_txt, shard_documents=7)["shards"]["count"] == 8


def test_a_single_document_is_not_sharded(tmp_path):
    (tmp_path / "one.txt").write_text("just one long text\n" * 50)
    with pytest.raises(data.DataError, match="is a single document, which cannot be cut into shards"):
        prepare(tmp_path, str(tmp_path / "one.txt"), shard_documents=5)


def test_a_missing_optional_package_names_the_requirements(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    (tmp_path / "docs.jsonl.zst").write_bytes(b"")
    with pytest.raises(data.DataError, match="needs the zstandard package: pip install -r requirements-data.txt"):
        prepare(tmp_path, str(tmp_path / "docs.jsonl.zst"))


# --- loading shards ---------------------------------------------------------------------------------


def write_shards(folder: Path, lengths: list[int], hashes: list[str] | None = None) -> Path:
    """A sharded dataset whose shard k holds only the token k (so a window shows where it came from)."""
    folder.mkdir(parents=True, exist_ok=True)
    hashes = hashes or [HASH] * len(lengths)
    index = {}
    for split in ("train", "val"):
        index[split] = []
        for k, (n, digest) in enumerate(zip(lengths, hashes)):
            name = f"{split}_{k:06d}.bin"
            data.write_tokens(folder / name, [np.full(n, k)], 100, digest)
            index[split].append({"file": name, "tokens": n})
    meta = {"tokenizer_sha256": HASH, "shards": {"documents": 1, "count": len(lengths), **index}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_windows_are_drawn_across_shards_never_across_a_boundary(tmp_path):
    folder = write_shards(tmp_path / "d", [40, 10, 300, 17, 60])  # shard 1 is shorter than a window
    split = data.open_split(folder, "train")
    sampler = data.BatchSampler(split, block_size=16, batch_size=64, seed=3)
    seen = set()
    for step in range(20):
        x, y = sampler.get(step, index=0)
        windows = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
        assert (windows == windows[:, :1]).all()  # one shard per window
        seen |= set(windows[:, 0].tolist())
    assert seen == {0, 2, 3, 4}
    again = data.BatchSampler(data.open_split(folder, "train"), block_size=16, batch_size=64, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(sampler.get(7, 2), again.get(7, 2)))
    assert not np.array_equal(sampler.get(7, 2)[0], sampler.get(7, 3)[0])  # ranks draw their own windows


def test_one_shard_draws_what_one_file_draws(tmp_path):
    folder = write_shards(tmp_path / "d", [500])
    tokens = np.arange(500) % 100
    data.write_tokens(folder / "train_000000.bin", [tokens], 100, HASH)
    shards = data.BatchSampler(data.open_split(folder, "train"), 16, 8, seed=5)
    single = data.BatchSampler(data.read_tokens(folder / "train_000000.bin"), 16, 8, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(shards.get(4, 1), single.get(4, 1)))


def damage_missing(folder: Path) -> str:
    (folder / "train_000001.bin").unlink()
    return "train_000001.bin, a shard meta.json lists, is missing"


def damage_truncated(folder: Path) -> str:
    path = folder / "train_000002.bin"
    path.write_bytes(path.read_bytes()[:-6])
    return "train_000002.bin is truncated or corrupt"


def damage_other_tokenizer(folder: Path) -> str:
    data.write_tokens(folder / "train_000001.bin", [np.full(50, 1)], 100, OTHER)
    return "train_000001.bin was tokenized with another tokenizer than the dataset's"


def damage_count(folder: Path) -> str:
    data.write_tokens(folder / "train_000000.bin", [np.full(49, 0)], 100, HASH)
    return "train_000000.bin holds 49 tokens but meta.json's index says 50"


@pytest.mark.parametrize("damage", [damage_missing, damage_truncated, damage_other_tokenizer, damage_count],
                         ids=lambda f: f.__name__)
def test_a_damaged_shard_is_named(tmp_path, damage):
    folder = write_shards(tmp_path / "d", [50, 50, 50])
    message = damage(folder)
    with pytest.raises(data.DataError, match=message) as error:
        data.open_split(folder, "train")
    assert "\n" not in str(error.value)


def test_eval_scores_the_val_shards_in_order(tmp_path):
    folder = write_shards(tmp_path / "d", [5, 3, 4])
    scorer = types.SimpleNamespace(tokenizer=types.SimpleNamespace(hash=HASH))
    assert eval_py.dataset_ids(folder, scorer) == [0] * 5 + [1] * 3 + [2] * 4


def test_no_shard_as_long_as_a_window_is_refused(tmp_path):
    folder = write_shards(tmp_path / "d", [20, 30])
    train, val = data.open_split(folder, "train"), data.open_split(folder, "val")
    data.check_compatible(train, val, model_vocab_size=100, block_size=29)
    with pytest.raises(data.DataError, match="has no shard of block_size \\+ 1 tokens; the longest holds 30"):
        data.check_compatible(train, val, model_vocab_size=100, block_size=30)


def test_train_py_trains_on_shards(tmp_path, docs_txt):
    prepare(tmp_path, docs_txt, shard_documents=7)
    result = subprocess.run(
        [sys.executable, "train.py", "configs/shakespeare_char_cpu.toml", "--data.data_dir", str(tmp_path / "a"),
         "--data.dataset", "d", "--model.vocab_size", "64", "--model.dim", "32", "--model.n_layers", "1",
         "--train.block_size", "16", "--model.max_seq_len", "16", "--train.micro_batch_size", "4",
         "--train.batch_tokens", "64", "--train.max_steps", "3", "--train.warmup_steps", "0", "--train.eval_iters", "1",
         "--train.eval_interval", "2", "--train.device", "cpu",
         "--train.out_dir", str(tmp_path / "out"), "--train.compile", "false"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("kind") == "train" and m.get("step") == 3 for m in metrics)
