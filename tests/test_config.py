"""Config files, overrides and the one-line errors they promise."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import config
from config import ConfigError, build_config, to_toml

ROOT = Path(__file__).resolve().parent.parent


def test_toml_then_overrides(tmp_path):
    file = tmp_path / "exp.toml"
    file.write_text('[model]\ndim = 64\nn_heads = 4\n[train]\nlr = 3e-4\ncompile = false\n')
    cfg = build_config(config.load_toml(file), ["--train.lr", "1e-3", "--model.n_kv_heads=2",
                                               "--train.max_steps=7", "--train.warmup_steps", "2"])
    assert cfg.model.dim == 64 and cfg.model.n_heads == 4 and cfg.model.n_kv_heads == 2
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.train.compile is False
    assert cfg.data == config.DataConfig()  # untouched sections keep their defaults


@pytest.mark.parametrize("raw,expected", [
    (["--train.lr", "1"], ("train", "lr", 1.0)),  # an int is accepted for a float
    (["--train.lr=2e-4"], ("train", "lr", 2e-4)),
    (["--model.tie_embeddings", "true"], ("model", "tie_embeddings", True)),
    (["--model.tie_embeddings=False"], ("model", "tie_embeddings", False)),  # W&B agent spelling
    (["--model.n_kv_heads", "none"], ("model", "n_kv_heads", 6)),  # none = as many as n_heads
    (["--model.n_kv_heads=None"], ("model", "n_kv_heads", 6)),
    (["--train.compile", "auto"], ("train", "compile", "auto")),
    (["--train.compile", "true"], ("train", "compile", True)),
    (["--train.batch_tokens", "1_024"], ("train", "batch_tokens", 1024)),
])
def test_override_typing(raw, expected):
    section, key, value = expected
    got = getattr(getattr(build_config({}, raw), section), key)
    assert got == value and type(got) is type(value)


def test_int_in_toml_accepted_for_float():
    cfg = build_config({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_print_config_round_trips():
    cfg = build_config({}, ["--model.n_kv_heads", "3", "--model.n_heads", "6", "--data.source", 'a "quoted"\\path'])
    assert build_config(tomllib.loads(to_toml(cfg))) == cfg


@pytest.mark.parametrize("raw,message", [
    (["--model.dimm", "3"], "unknown config key 'model.dimm'; did you mean 'model.dim'?"),
    (["--lr", "3"], "unknown config key 'lr'; did you mean 'train.lr'?"),
    (["--modle.n_layers", "3"], "unknown config key 'modle.n_layers'; did you mean 'model.n_layers'?"),
    (["--train.lr", "fast"], "bad value for train.lr: 'fast' (expected float)"),
    (["--model.n_layers", "2.5"], "bad value for model.n_layers: '2.5' (expected int)"),
    (["--model.tie_embeddings", "yes"], "bad value for model.tie_embeddings: 'yes' (expected true | false)"),
    (["--model.attention", "flash"], "bad value for model.attention: 'flash' (expected sdpa | reference)"),
    (["--model.dim", "100", "--model.n_heads", "3"],
     "model.dim=100 is not divisible by model.n_heads=3: choose dim as a multiple of n_heads (or set model.head_dim)"),
    (["--model.n_heads", "6", "--model.n_kv_heads", "4"],
     "model.n_heads=6 is not divisible by model.n_kv_heads=4: use a divisor of n_heads (1 = MQA, n_heads = MHA)"),
    (["--model.dim", "90", "--model.n_heads", "6"],
     "model.dim/model.n_heads=15 is odd: RoPE rotates pairs, so the head dim must be even"),
    (["--model.head_dim", "7"], "model.head_dim=7 is odd: RoPE rotates pairs, so the head dim must be even"),
    (["--train.warmup_steps", "10", "--train.max_steps", "5"],
     "train.warmup_steps=10 exceeds train.max_steps=5: shorten the warmup or train longer"),
    (["--train.block_size", "512"],
     "train.block_size=512 exceeds model.max_seq_len=256: raise max_seq_len or shorten the block"),
    (["--train.lr", "-1"], "train.lr=-1.0 must be positive"),
    (["--sample.top_p", "2"], "sample.top_p=2.0 must lie in (0, 1]"),
    (["--train.lr"], "override --train.lr has no value: write --train.lr VALUE or --train.lr=VALUE"),
    (["train.lr", "1"], "unexpected argument 'train.lr': overrides look like --section.key value"),
])
def test_errors_are_one_clear_line(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config({}, raw)
    assert str(err.value) == message


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pick one from configs/"):
        config.load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load_toml(bad)
    with pytest.raises(ConfigError, match="unknown config key 'lr'; did you mean 'train.lr'"):
        build_config({"lr": 1e-3})


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        build_config(config.load_toml(path))


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "model.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_error_is_one_line_without_traceback():
    result = run_script("configs/shakespeare_char_cpu.toml", "--model.n_kv_heads", "3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.n_heads=4 is not divisible by model.n_kv_heads=3: use a divisor of n_heads (1 = MQA, n_heads = MHA)"]


def test_cli_help_lists_every_key():
    result = run_script("--help")
    assert result.returncode == 0
    for section in ("model", "train"):
        for field in dataclasses.fields(getattr(config.Config(), section)):
            assert f"--{section}.{field.name} " in result.stdout
    assert "  --model.dim" in result.stdout and "width of the residual stream" in result.stdout


def test_cli_print_config_is_loadable_toml():
    result = run_script("configs/shakespeare_char_cpu.toml", "--model.dim=256", "--print-config")
    assert result.returncode == 0
    assert tomllib.loads(result.stdout)["model"]["dim"] == 256
