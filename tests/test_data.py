"""Token files, the batch sampler, and prepare_data.py end to end on small corpora."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import prepare_data
from config import DataConfig

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HASH = "ab" * 32


def write(path: Path, tokens, vocab_size: int = 100) -> Path:
    data.write_tokens(path, [np.asarray(tokens)], vocab_size, HASH)
    return path


def test_round_trip_through_memmap(tmp_path):
    tokens = np.arange(1000) % 97
    f = data.read_tokens(write(tmp_path / "a.bin", tokens))
    assert isinstance(f.tokens, np.memmap) and f.tokens.dtype == np.uint16
    assert np.array_equal(f.tokens, tokens) and f.vocab_size == 100 and f.tokenizer_hash == HASH


def test_large_vocab_uses_uint32(tmp_path):
    f = data.read_tokens(write(tmp_path / "a.bin", [70000, 1, 2], vocab_size=100_000))
    assert f.tokens.dtype == np.uint32 and list(f.tokens) == [70000, 1, 2]


def test_header_checks(tmp_path):
    path = write(tmp_path / "a.bin", np.arange(100))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(data.DataError, match="is truncated or corrupt: its header promises 100 tokens"):
        data.read_tokens(path)
    (tmp_path / "b.bin").write_bytes(b"not a token file at all" * 4)
    with pytest.raises(data.DataError, match="is not a nanollama token file"):
        data.read_tokens(tmp_path / "b.bin")
    with pytest.raises(data.DataError, match="does not exist: create it with python prepare_data.py"):
        data.read_tokens(tmp_path / "missing.bin")


def test_interrupted_write_leaves_no_bin(tmp_path):
    def chunks():
        yield np.arange(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.write_tokens(tmp_path / "a.bin", chunks(), 100, HASH)
    assert not (tmp_path / "a.bin").exists()


def test_compatibility_checks(tmp_path):
    train = data.read_tokens(write(tmp_path / "train.bin", np.arange(100)))
    val = data.read_tokens(write(tmp_path / "val.bin", np.arange(20)))
    data.check_compatible(train, val, model_vocab_size=100, block_size=16)
    with pytest.raises(data.DataError, match="does not fit model.vocab_size=50: set --model.vocab_size 100"):
        data.check_compatible(train, val, model_vocab_size=50, block_size=16)
    with pytest.raises(data.DataError, match="holds 20 tokens, fewer than block_size \\+ 1 = 33"):
        data.check_compatible(train, val, model_vocab_size=100, block_size=32)
    with pytest.raises(data.DataError, match="tokenized with another tokenizer than ckpt's .*: use its data"):
        data.check_compatible(train, val, model_vocab_size=100, block_size=16,
                              model_tokenizer=("cd" * 32, "ckpt", "use its data"))
    other = tmp_path / "other.bin"
    data.write_tokens(other, [np.arange(50)], 100, "cd" * 32)
    with pytest.raises(data.DataError, match="come from different tokenizers"):
        data.check_compatible(train, data.read_tokens(other), model_vocab_size=100, block_size=16)


def test_sampler_is_a_function_of_seed_step_and_index(tmp_path):
    f = data.read_tokens(write(tmp_path / "a.bin", np.arange(5000) % 100))
    sampler = data.BatchSampler(f, block_size=16, batch_size=4, seed=7)
    x, y = sampler.get(step=3, index=1)
    assert x.shape == y.shape == (4, 16) and x.dtype.is_floating_point is False
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    again = data.BatchSampler(f, block_size=16, batch_size=4, seed=7)  # a "resumed" run
    assert all(np.array_equal(a, b) for a, b in zip(sampler.get(3, 1), again.get(3, 1)))
    assert not np.array_equal(sampler.get(3, 1)[0], sampler.get(4, 1)[0])
    assert not np.array_equal(sampler.get(3, 1)[0], sampler.get(3, 2)[0])
    assert not np.array_equal(sampler.get(3, 1)[0], data.BatchSampler(f, 16, 4, seed=8).get(3, 1)[0])
    assert np.array_equal(sampler.get_eval(0)[0], sampler.get_eval(0)[0])


# --- prepare_data.py ------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_txt_corpus_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, a small corpus. " * 200)
    result = run("--data.dataset", "mine", "--data.data_dir", str(tmp_path), "--data.input", str(corpus),
                 "--data.tokenizer", "char", "--data.workers", "1")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "mine"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_chars"] == int(len(corpus.read_text()) * 0.9) and meta["documents_split"] is False
    assert meta["train_tokens"] == meta["train_chars"]  # char level: one token per character
    assert meta["source_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    train = data.open_split(out, "train")
    assert len(train) == meta["train_tokens"] and train.tokenizer_hash == meta["tokenizer_sha256"]
    assert "tokens/s" in result.stdout and not (tmp_path / "mine.tmp").exists()


def test_jsonl_folder_split_by_document_is_deterministic(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for shard in range(2):
        lines = [json.dumps({"text": f"story {shard}-{i}: once upon a time {i * 'la '}"}) for i in range(25)]
        (folder / f"shard{shard}.jsonl").write_text("\n".join(lines) + "\n")
    metas = []
    for run_dir in ("a", "b"):
        cfg = DataConfig(dataset="stories", data_dir=str(tmp_path / run_dir), input=str(folder), tokenizer="bpe",
                         vocab_size=300, workers=1)
        metas.append(prepare_data.prepare(cfg))
    assert metas[0]["documents_split"] and metas[0]["tokenizer_sha256"] == metas[1]["tokenizer_sha256"]
    a, b = (data.open_split(tmp_path / d / "stories", "val") for d in ("a", "b"))
    assert np.array_equal(a.tokens, b.tokens)
    eos = metas[0]["eos_id"]
    val_docs = int(np.sum(np.asarray(a.tokens) == eos))
    assert val_docs == 5  # every 10th of the 50 documents, each closed by EOS


def test_named_dataset_from_local_source_and_file_url(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 50
    source = tmp_path / "input.txt"
    source.write_text(text)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for src in (str(source), source.as_uri()):
        cfg = DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path / "d"), source=src, sha256=digest,
                         workers=1)
        meta = prepare_data.prepare(cfg)
        assert meta["tokenizer"] == "char" and meta["source_sha256"] == digest


def test_bad_inputs_are_one_line(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("not shakespeare")
    result = run("--data.dataset", "shakespeare_char", "--data.data_dir", str(tmp_path), "--data.source", str(source))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"checksum mismatch for {source}: expected sha256 86c4e6aa" in result.stderr
    result = run("--data.dataset", "shakespeare_char", "--data.source", str(tmp_path / "nope.txt"))
    assert result.stderr.strip() == f"error: source {tmp_path / 'nope.txt'} does not exist: pass an existing file to --data.source"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run("--data.dataset", "e", "--data.data_dir", str(tmp_path), "--data.input", str(empty))
    assert result.stderr.strip() == "error: the corpus is empty: give a file with some text"
    result = run("--data.dataset", "unknown_name", "--data.data_dir", str(tmp_path))
    assert "is not a named dataset" in result.stderr and result.returncode == 2


def test_dataset_without_published_checksum_needs_one(tmp_path):
    source = tmp_path / "stories.txt"
    source.write_text("Once upon a time.\n<|endoftext|>\nThe end.\n")
    cfg = DataConfig(dataset="tinystories", data_dir=str(tmp_path), source=str(source), workers=1)
    with pytest.raises(data.DataError, match="has no published sha256 to check; it hashes to"):
        prepare_data.prepare(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_tiny_shakespeare_matches_nanogpt_split(tmp_path):
    meta = prepare_data.prepare(DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path), source=str(SHAKESPEARE)))
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1_003_854, 111_540, 66)
