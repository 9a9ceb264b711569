"""LoRA through peft: adapters on a frozen pretrained folder, saved in peft's format (transformers
+ peft load them), merged into a plain folder with the same logits, resumed exactly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import checkpoint
from config import ConfigError, DataConfig
from prepare_data import prepare
from test_open_models import corpus, make_pretrained
from test_open_models import run_train as fine_tune

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return make_pretrained(tmp_path_factory.mktemp("pretrained"))


def random_adapters(adapters) -> None:
    """peft starts B at zero (the adapted model equals the base); give every adapter weight a value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)


def test_adapters_save_in_peft_format_and_merge_exactly(pretrained, tmp_path):
    model = checkpoint.load_hf(pretrained)
    adapters = checkpoint.add_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    random_adapters(adapters)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        adapted = model.eval()(tokens)[0]
        assert (adapted - checkpoint.load_hf(pretrained)(tokens)[0]).abs().max() > 1e-3

    folder = tmp_path / "adapter"
    folder.mkdir()
    checkpoint.save_lora(adapters, folder, pretrained)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(pretrained)
    with torch.no_grad():
        merged = checkpoint.load_lora(folder)
        assert all(type(m).__name__ != "Linear" or "lora" not in type(m).__module__ for m in merged.modules())
        assert (merged(tokens)[0] - adapted).abs().max().item() <= 1e-5
        # peft itself, on the transformers model, reads our adapters and computes the same logits.
        hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(pretrained), folder)
        assert (hf.eval()(tokens).logits - adapted).abs().max().item() <= 1e-5

    moved = json.loads((folder / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(tmp_path / "gone")}
    (folder / "adapter_config.json").write_text(json.dumps(moved))
    with pytest.raises(ConfigError, match="holds LoRA adapters for the base model .*gone, which is not here"):
        checkpoint.load_lora(folder)


def run_train(*extra: str) -> subprocess.CompletedProcess:
    """test_open_models's short CPU run: 8 steps, a checkpoint and an evaluation every 4."""
    return fine_tune("--train.lr", "1e-2", "--train.eval_interval", "4", "--train.eval_iters", "1",
                     "--train.ckpt_interval", "4", "--train.max_steps", "8", *extra)


@pytest.mark.slow  # the default suite's longest test (~25 s): CI runs it with the slow ones
def test_lora_fine_tune_resumes_exactly_samples_and_converts(pretrained, tmp_path):
    prepare(DataConfig(dataset="docs", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                       tokenizer=str(pretrained), workers=1, val_fraction=0.25))
    lora = ["--train.init_from", str(pretrained), "--data.data_dir", str(tmp_path / "data"), "--data.dataset", "docs",
            "--train.lora_rank", "4", "--train.lora_alpha", "8", "--train.lora_dropout", "0.1",
            "--train.lora_targets", "q_proj,v_proj,gate_proj"]
    straight = run_train(*lora, "--train.out_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    assert "trainable)" in straight.stdout + straight.stderr
    ckpt = checkpoint.resolve(tmp_path / "straight")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is not copied into every checkpoint

    # Resume from the middle: the adapters at the end are the uninterrupted run's, bit for bit.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", symlinks=True)
    shutil.rmtree(tmp_path / "resumed" / "ckpt-000008")
    checkpoint.write_pointer(tmp_path / "resumed", "latest", "ckpt-000004")
    resumed = run_train(*lora, "--train.out_dir", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ours = safetensors.torch.load_file(str(tmp_path / "resumed" / "ckpt-000008" / "adapter_model.safetensors"))
    theirs = safetensors.torch.load_file(str(ckpt / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # Sampling reads the LoRA checkpoint as the merged model; convert.py writes it as a plain folder.
    out = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(tmp_path / "straight"), "--prompt", "Once",
                          "--temperature", "0", "--max_new_tokens", "5", "--json"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    merged_dir = tmp_path / "merged"
    converted = subprocess.run([sys.executable, "convert.py", str(tmp_path / "straight"), str(merged_dir),
                                "--merge-lora"], cwd=ROOT, capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    refused = subprocess.run([sys.executable, "convert.py", str(merged_dir), str(tmp_path / "again"), "--merge-lora"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "holds no LoRA adapters" in refused.stderr
    tokens = torch.tensor([[0, 5, 9, 17, 33]])
    with torch.no_grad():
        hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(pretrained), ckpt)
        plain = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
        assert (plain(tokens).logits - hf.eval()(tokens).logits).abs().max().item() <= 1e-5
        assert (plain(tokens).logits - transformers.AutoModelForCausalLM.from_pretrained(pretrained)(tokens).logits
                ).abs().max().item() > 1e-4  # the adapters did train

    # Resuming with other LoRA settings is refused in one line.
    shutil.rmtree(tmp_path / "resumed" / "ckpt-000008")
    checkpoint.write_pointer(tmp_path / "resumed", "latest", "ckpt-000004")
    other = run_train(*lora, "--train.lora_targets", "q_proj", "--train.out_dir", str(tmp_path / "resumed"), "--resume")
    assert other.returncode == 2 and "holds other adapters than train.lora_rank" in other.stderr, other.stderr


def test_lora_settings_are_checked(pretrained):
    model = checkpoint.load_hf(pretrained)
    with pytest.raises(ConfigError, match="LoRA target 'c_attn' is not a projection of this Llama"):
        checkpoint.add_lora(model, 4, 8.0, 0.0, ["c_attn"])
    result = run_train("--train.lora_rank", "4")
    assert result.returncode == 2 and "train.lora_rank is set but train.init_from is not" in result.stderr
    result = run_train("--train.lora_rank", "4", "--train.init_from", str(pretrained), "--train.optimizer", "muon")
    assert result.returncode == 2 and "use adamw" in result.stderr
