"""Bad input of every kind, fed to every script's entry point: one `error:` line and status 2, never
a traceback, and never lost work (an --overwrite that fails leaves the previous run byte-identical)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import app
import checkpoint
import convert
import data
import model as model_py
import generate
import prepare_data
import train
from config import ModelConfig
from model import Llama

TINY = ["--model.vocab_size", "64", "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.max_seq_len", "32", "--train.block_size", "16", "--train.micro_batch_size", "4",
        "--train.batch_tokens", "64", "--train.warmup_steps", "0", "--train.compile", "false",
        "--train.eval_iters", "1", "--train.peak_tflops", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A prepared dataset, a finished run, a Hugging Face folder and a llama2.c file."""
    root = tmp_path_factory.mktemp("world")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    assert prepare_data.main(["--data.dataset", "tiny", "--data.data_dir", str(root / "data"),
                              "--data.input", str(root / "corpus.txt"), "--data.workers", "1"]) == 0
    assert train.main(train_args(root, root / "run", "--train.max_steps", "4", "--train.eval_interval", "2")) == 0
    model = Llama(ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=16))
    checkpoint.save_hf(model, root / "hf")
    checkpoint.write_llama2c(model, root / "m.bin")
    return root


def train_args(root: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data.data_dir", str(root / "data"), "--data.dataset", "tiny", "--train.out_dir", str(out_dir),
            *extra]


def copy(world: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(world / name, target) if (world / name).is_dir() else shutil.copy(world / name, target)
    return target


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --- checkpoints: every load path names the file and what is wrong --------------------------


def truncate_weights(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return "model.safetensors cannot be read"


def garble_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return "config.json is not valid JSON"


def mismatch_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    return "the config and the weights disagree"


def garble_marker(folder: Path) -> str:
    (folder / checkpoint.MARKER).write_text("{not json")
    return "COMPLETE is not valid JSON"


def garble_tokenizer(folder: Path) -> str:
    (folder / "tokenizer.json").write_text("{}")
    return "tokenizer.json is not a tokenizer"


HF_DAMAGE = [truncate_weights, garble_config, mismatch_config]
RUN_DAMAGE = [*HF_DAMAGE, garble_marker]


@pytest.mark.parametrize("damage", HF_DAMAGE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("entry", ["generate", "app", "init_from", "convert"])
def test_a_damaged_hugging_face_folder(world, tmp_path, capsys, damage, entry):
    folder = copy(world, "hf", tmp_path)
    message = damage(folder)
    if entry == "init_from":
        code = train.main(train_args(world, tmp_path / "out", "--train.init_from", str(folder)))
    elif entry == "convert":
        code = convert.main([str(folder), str(tmp_path / "out.bin")])
    else:
        code = {"generate": generate.main, "app": app.main}[entry](["--checkpoint", str(folder), "--prompt_ids", "1"])
    assert_one_line_error(capsys, code, message)


@pytest.mark.parametrize("damage", RUN_DAMAGE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("entry", ["generate", "resume"])
def test_a_damaged_checkpoint_of_ours(world, tmp_path, capsys, damage, entry):
    run = copy(world, "run", tmp_path)
    message = damage(checkpoint.resolve(run))
    if damage is not garble_marker:  # the marker's hashes catch a damaged file before anything reads it
        message = "does not match its recorded sha256"
    if entry == "resume":
        code = train.main(train_args(world, run, "--train.max_steps", "4", "--train.eval_interval", "2", "--resume"))
    else:
        code = generate.main(["--checkpoint", str(run), "--prompt", "the"])
    assert_one_line_error(capsys, code, message)


def test_a_damaged_tokenizer(world, tmp_path, capsys):
    ckpt = checkpoint.resolve(copy(world, "run", tmp_path))
    message = garble_tokenizer(ckpt)
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker["sha256"].pop("tokenizer.json")  # damage the marker can't see: the loader must still say so
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    assert_one_line_error(capsys, generate.main(["--checkpoint", str(ckpt), "--prompt", "the"]), message)


def test_a_truncated_llama2c_file(world, tmp_path, capsys):
    (tmp_path / "cut.bin").write_bytes((world / "m.bin").read_bytes()[:-4])
    assert_one_line_error(capsys, generate.main(["--checkpoint", str(tmp_path / "cut.bin"), "--prompt_ids", "1"]),
                          "is truncated or not a legacy llama2.c file")


# --- input files for prepare_data.py --------------------------------------------------------


@pytest.mark.parametrize("name,content,message", [
    ("garbage.txt", b"\x80\x81\xfe\xff" * 100, "garbage.txt is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "cut\n', "bad.jsonl:2 is not valid JSON"),
    ("list.jsonl", b'{"text": "fine"}\n["text"]\n', "list.jsonl:2 has no string field 'text'"),
])
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_bad_corpus_files(tmp_path, capsys, name, content, message, tokenizer):
    (tmp_path / name).write_bytes(content)
    code = prepare_data.main(["--data.dataset", "x", "--data.data_dir", str(tmp_path / "data"), "--data.input",
                              str(tmp_path / name), "--data.tokenizer", tokenizer, "--data.vocab_size", "300"])
    assert_one_line_error(capsys, code, message)
    assert not (tmp_path / "data" / "x").exists()


def test_an_unreachable_download_says_how_to_pass_a_local_copy(tmp_path, capsys):
    # Port 9 on the loopback interface: nothing listens, the connection is refused at once.
    code = prepare_data.main(["--data.dataset", "shakespeare_char", "--data.data_dir", str(tmp_path),
                              "--data.source", "http://127.0.0.1:9/input.txt"])
    assert_one_line_error(capsys, code, "cannot download http://127.0.0.1:9/input.txt", "--data.source PATH",
                          "SHAKESPEARE_SOURCE")
    assert not list((tmp_path / "downloads").glob("*"))  # no partial file left behind


# --- numbers, prompts, paths ----------------------------------------------------------------


@pytest.mark.parametrize("toml,message", [
    ("[train]\nlr = inf\n", "train.lr=inf must be a finite number"),
    ("[train]\nlr = nan\n", "train.lr=nan must be a finite number"),
    ("[model]\nnorm_eps = -inf\n", "model.norm_eps=-inf must be a finite number"),
    ("[train]\nseed = -1\n", "train.seed=-1 must lie in [0, 9223372036854775807]"),
])
@pytest.mark.parametrize("script", ["train", "model"])
def test_bad_numbers_in_a_config_file(world, tmp_path, capsys, toml, message, script):
    (tmp_path / "exp.toml").write_text(toml)
    main = {"train": train.main, "model": model_py.main}[script]
    assert_one_line_error(capsys, main([str(tmp_path / "exp.toml"), *train_args(world, tmp_path / "out")]), message)


@pytest.mark.parametrize("extra,message", [
    (["--seed", str(2**70)], "sample.seed=1180591620717411303424 must lie in"),
    (["--seed", "-1"], "sample.seed=-1 must lie in"),
    (["--temperature", "5"], "sample.temperature=5.0 must lie in [0, 2]"),
    (["--prompt", "the ~"], "character '~' (U+007E) is not in this char-level vocabulary"),
])
def test_bad_sampling_input(world, capsys, extra, message):
    extra = ["--prompt", "the", *extra] if extra[0] != "--prompt" else extra
    assert_one_line_error(capsys, generate.main(["--checkpoint", str(world / "run"), *extra]), message)


@pytest.mark.parametrize("extra,message", [
    (["--train.optimizer", "muon", "--train.muon_momentum", "1"], "train.muon_momentum=1.0 must lie in [0, 1)"),
    (["--train.optimizer", "muon", "--train.muon_lr", "0"], "train.muon_lr=0.0 must be positive"),
    (["--train.optimizer", "muon", "--resume"], "trained with AdamW and train.optimizer=muon needs AdamW + Muon"),
])
def test_bad_optimizer_settings(world, tmp_path, capsys, extra, message):
    run = copy(world, "run", tmp_path)
    code = train.main(train_args(world, run, "--train.max_steps", "6", "--train.eval_interval", "2", *extra))
    assert_one_line_error(capsys, code, message)


def test_out_dir_that_is_a_file(world, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code = train.main(train_args(world, tmp_path / "taken"))
    assert_one_line_error(capsys, code, "is a file, not a folder")


def corrupt_dataset(world: Path, tmp_path: Path) -> Path:
    """The tiny dataset with one token id past the vocabulary its header declares."""
    root = tmp_path / "corrupt"
    shutil.copytree(world / "data", root / "data")
    split = data.read_tokens(root / "data" / "tiny" / "train.bin")
    tokens = np.array(split.tokens)
    tokens[::7] = split.vocab_size + 3
    data.write_tokens(split.path, [tokens], split.vocab_size, split.tokenizer_hash)
    return root


def test_token_ids_past_the_vocabulary(world, tmp_path, capsys):
    root = corrupt_dataset(world, tmp_path)
    code = train.main(train_args(root, tmp_path / "out", "--train.max_steps", "2"))
    assert_one_line_error(capsys, code, "train.bin holds token id", "the file is corrupt")


# --- work is never lost ---------------------------------------------------------------------


def test_overwrite_with_a_typo_leaves_the_previous_run_intact(world, tmp_path, capsys):
    run = copy(world, "run", tmp_path)
    before = file_hashes(run)
    code = train.main(train_args(world, run, "--overwrite", "--train.batch_tokens", "100"))
    assert_one_line_error(capsys, code, "train.batch_tokens=100 is not a multiple")
    assert file_hashes(run) == before


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_previous_run_back(world, tmp_path, capsys):
    run = copy(world, "run", tmp_path)
    before = file_hashes(run)
    root = corrupt_dataset(world, tmp_path)  # passes every check at start, fails at the first batch
    code = train.main(train_args(root, run, "--overwrite", "--train.max_steps", "2"))
    assert_one_line_error(capsys, code, "holds token id")
    assert file_hashes(run) == before and not checkpoint.replaced_path(run).exists()


def test_a_run_set_aside_and_never_deleted_is_not_overwritten(world, tmp_path, capsys):
    run = copy(world, "run", tmp_path)
    shutil.copytree(run, checkpoint.replaced_path(run))  # as a killed --overwrite would leave it
    code = train.main(train_args(world, run, "--overwrite", "--train.max_steps", "2"))
    assert_one_line_error(capsys, code, "holds a run an earlier --overwrite set aside")
    assert file_hashes(checkpoint.replaced_path(run)) == file_hashes(run)


def test_a_config_json_that_is_not_an_object(world, tmp_path, capsys):
    folder = copy(world, "hf", tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    assert_one_line_error(capsys, generate.main(["--checkpoint", str(folder), "--prompt_ids", "1"]),
                          "config.json holds a JSON list, not the object it should")


def test_overwrite_replaces_the_previous_run_once_the_new_one_has_a_checkpoint(world, tmp_path):
    run = copy(world, "run", tmp_path)
    assert train.main(train_args(world, run, "--overwrite", "--train.max_steps", "2", "--train.lr", "1e-4")) == 0
    assert [m["step"] for m in train.read_metrics(run / "metrics.jsonl") if m["kind"] == "train"] == [1, 2]
    assert not checkpoint.replaced_path(run).exists()
