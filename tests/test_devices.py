"""Device and precision choice (devices.py) for train, generate, eval and app, with CUDA and MPS
availability faked; and the MPS-safe kernels of model.py, run on the CPU against the usual ones."""

from pathlib import Path

import pytest
import torch

import app
import devices
import eval as eval_py
import generate
import model as model_py
import train
from config import ConfigError, EvalConfig, ModelConfig, SampleConfig, TrainConfig
from checkpoint import save_hf
from model import KVCache, Llama


@pytest.fixture
def mac(monkeypatch):
    """A machine with an Apple GPU (on macOS 14+, unless a test says otherwise) and no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve("auto", "train.device") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto", "train.device") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.resolve("auto", "train.device") == torch.device("cpu")


def test_mps_is_accepted_wherever_a_device_is(mac):
    assert train.setup_runtime(TrainConfig(device="mps")).device == torch.device("mps")
    assert generate.pick_device(SampleConfig(device="mps")) == (torch.device("mps"), torch.float32)
    assert generate.pick_device(EvalConfig(device="mps")) == (torch.device("mps"), torch.float32)


def test_mps_trains_in_fp32_and_eagerly_by_default_and_in_bf16_on_request(mac):
    runtime = train.setup_runtime(TrainConfig())
    assert (runtime.device, runtime.amp_dtype) == (torch.device("mps"), torch.float32)
    assert not train.compiles(TrainConfig(), runtime.device)
    assert train.compiles(TrainConfig(compile=True), runtime.device)
    assert train.setup_runtime(TrainConfig(dtype="bfloat16")).amp_dtype == torch.bfloat16
    assert generate.pick_device(SampleConfig(dtype="bfloat16")) == (torch.device("mps"), torch.bfloat16)
    with pytest.raises(ConfigError, match="train.dtype=float16 on mps: fp16 training needs loss scaling"):
        train.setup_runtime(TrainConfig(dtype="float16"))


def test_cpu_and_cuda_choices_are_unchanged(cpu_only, monkeypatch):
    assert train.compiles(TrainConfig(), torch.device("cpu"))
    assert train.setup_runtime(TrainConfig()).amp_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.training_dtype(TrainConfig(), torch.device("cuda")) == torch.float16  # bf16 only emulated
    assert train.training_dtype(TrainConfig(dtype="bfloat16"), torch.device("cuda")) == torch.bfloat16
    assert train.compiles(TrainConfig(), torch.device("cuda"))


def test_bf16_where_the_device_cannot_is_one_line(mac):
    mac.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) < (14, 0))
    for call, key in ((lambda: train.setup_runtime(TrainConfig(dtype="bfloat16")), "train.dtype"),
                      (lambda: generate.pick_device(SampleConfig(dtype="bfloat16")), "sample.dtype"),
                      (lambda: generate.pick_device(EvalConfig(dtype="bfloat16")), "eval.dtype")):
        with pytest.raises(ConfigError, match=f"{key}=bfloat16 but macOS before 14 cannot compute in bf16: "
                                              f"use --{key} float32$"):
            call()


def test_torchrun_on_mps_is_refused_in_one_line(mac):
    mac.setenv("RANK", "0")
    mac.setenv("WORLD_SIZE", "2")
    for parallel in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match="train.device=mps runs one process: torchrun"):
            train.setup_runtime(TrainConfig(parallel=parallel))


@pytest.mark.parametrize("name", ["train", "generate", "eval", "app"])
@pytest.mark.parametrize("asked", ["mps", "cuda"])
def test_a_device_the_machine_lacks_is_one_line(cpu_only, capsys, tmp_path, name, asked):
    """The real entry points on this CPU machine: one `error:` line naming the key and the fix."""
    save_hf(Llama(ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8)), tmp_path / "hf")
    (tmp_path / "text.txt").write_text("some text\n")
    main, section, args = {
        "train": (train.main, "train", ["--train.out_dir", str(tmp_path / "run")]),
        "generate": (generate.main, "sample", ["--checkpoint", str(tmp_path / "hf")]),
        "eval": (eval_py.main, "eval", [str(tmp_path / "hf"), "--eval.data", str(tmp_path / "text.txt")]),
        "app": (app.main, "sample", ["--checkpoint", str(tmp_path / "hf")]),
    }[name]
    assert main([*args, f"--{section}.device", asked]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {section}.device={asked} but "), err
    assert err.endswith(f"use --{section}.device cpu\n"), err


def test_the_errors_quoted_in_the_docs_are_the_ones_printed(mac):
    page = (Path(__file__).parent.parent / "docs" / "devices.md").read_text()
    mac.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(ConfigError) as bf16:
        train.setup_runtime(TrainConfig(dtype="bfloat16"))
    mac.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as missing:
        train.setup_runtime(TrainConfig(device="mps"))
    for error in (bf16, missing):
        assert f"\nerror: {error.value}\n" in page


def test_an_unknown_device_name_is_refused_by_the_config():
    for config in (TrainConfig(device="metal"), SampleConfig(device="metal"), EvalConfig(device="metal")):
        with pytest.raises(ConfigError, match=r"device='metal' is not one of auto, cpu, cuda, cuda:N, mps"):
            config.validate()


# --- the MPS-safe kernels, run on the CPU ----------------------------------------------------------


def refused(name: str):
    def call(*args, **kwargs):
        raise AssertionError(f"{name} called on an MPS-safe device")
    return call


def test_the_per_row_cache_write_is_an_indexed_assignment(monkeypatch):
    """index_copy_ was missing, then ~100x slow, on MPS: the engine's per-row write never calls it."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    cache = KVCache(2, 2, 8, 4, torch.float32)
    monkeypatch.setattr(torch.Tensor, "index_copy_", refused("index_copy_"))
    got = cache.update(torch.tensor([2, 4]), k, v)
    assert torch.equal(got[0], cache.k) and torch.equal(got[1], cache.v)
    assert torch.equal(cache.k[0, :, 2:5], k[0]) and torch.equal(cache.k[1, :, 4:7], k[1])
    assert torch.equal(cache.v[0, :, 2:5], v[0]) and torch.equal(cache.v[1, :, 4:7], v[1])
    assert not cache.k[0, :, 5:].any() and not cache.k[1, :, :4].any() and not cache.k[1, :, 7:].any()


@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_the_explicit_causal_mask_equals_is_causal(monkeypatch, kernel):
    """Training's forward and a prefill followed by cached steps: the same logits either way."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                              attention=kernel)).eval()
    tokens = torch.randint(0, 32, (2, 12))

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            whole = model(tokens)[0]
            model.setup_cache(2)
            steps = torch.cat([model(tokens[:, :8], start_pos=0)[0]]
                              + [model(tokens[:, i:i + 1], start_pos=i)[0] for i in range(8, 12)], dim=1)
            model.clear_cache()
        return whole, steps

    usual = logits()
    monkeypatch.setattr(model_py, "MPS_SAFE_DEVICES", {"cpu"})
    sdpa = model_py.F.scaled_dot_product_attention

    def sdpa_without_is_causal(*args, is_causal=False, **kwargs):
        assert not is_causal, "is_causal reached SDPA on an MPS-safe device"
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(model_py.F, "scaled_dot_product_attention", sdpa_without_is_causal)
    safe = logits()
    for a, b in zip(usual, safe):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # And the explicit mask is causal: a changed last token moves no earlier position's logits.
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 32
    with torch.no_grad():
        assert torch.equal(model(changed)[0][:, :-1], safe[0][:, :-1])
