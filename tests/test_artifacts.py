"""Every folder a command writes stands on its own: a run's `latest`, a checkpoint converted to a
Hugging Face folder and a LoRA run merged into one each carry the source's tokenizer files, chat
template, generation_config.json and trained context byte for byte, and open in generate.py,
eval.py, app.py, transformers (AutoModelForCausalLM + AutoTokenizer) and, for LoRA, peft."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

import app
import checkpoint
from config import DataConfig, SampleConfig, ServeConfig
from prepare_data import prepare
from test_open_models import DOCS, corpus, make_pretrained, run_train

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(pretrained folder, a full fine-tune's run folder, a LoRA run's folder, a held-out text)."""
    tmp = tmp_path_factory.mktemp("artifacts")
    pretrained = make_pretrained(tmp / "pretrained")
    prepare(DataConfig(dataset="docs", data_dir=str(tmp / "data"), input=str(corpus(tmp)), tokenizer=str(pretrained),
                       workers=1, val_fraction=0.25))
    common = ["--train.init_from", str(pretrained), "--data.data_dir", str(tmp / "data"), "--data.dataset", "docs",
              "--train.max_steps", "4", "--train.eval_interval", "4", "--train.eval_iters", "1", "--train.lr", "1e-2"]
    for name, extra in (("full", []), ("lora", ["--train.lora_rank", "4", "--train.lora_alpha", "8"])):
        result = run_train(*common, *extra, "--train.out_dir", str(tmp / name))
        assert result.returncode == 0, result.stderr
    (tmp / "held_out.txt").write_text("\n".join(DOCS[:4]))
    return pretrained, tmp / "full", tmp / "lora", tmp / "held_out.txt"


def assert_usable_everywhere(folder: Path, source: Path, held_out: Path) -> None:
    """`folder` carries `source`'s files and trained context, and every tool reads it, agreeing
    with transformers on the ids and the greedy continuation."""
    for name in checkpoint.CARRIED_FILES:
        assert (folder / name).is_file() == (source / name).is_file(), name
        if (source / name).is_file():
            assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    assert checkpoint.trained_context(folder) == checkpoint.trained_context(source) is not None

    auto = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt_ids = auto("Once upon")["input_ids"]
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=None)[0, len(prompt_ids):].tolist()
    out = run("generate.py", "--checkpoint", str(folder), "--prompt", "Once upon", "--temperature", "0",
              "--max_new_tokens", "6", "--eos", "none", "--json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert (row["prompt_ids"], row["token_ids"]) == (prompt_ids, greedy)

    scored = run("eval.py", str(folder), "--eval.data", str(held_out))
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stderr.strip().splitlines()[-1])

    sample = SampleConfig(checkpoint=str(folder), temperature=0.0, max_new_tokens=6, eos="none")
    engine = app.Server(sample, ServeConfig())
    with TestClient(app.build_api(engine, ServeConfig())) as client:
        answer = client.post("/v1/completions", json={"model": engine.name, "prompt": "Once upon", "max_tokens": 6,
                                                      "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == auto.decode(greedy)


def test_a_run_folders_latest_is_a_complete_model_folder(runs):
    pretrained, full, _, held_out = runs
    assert (full / "latest").is_symlink()
    assert_usable_everywhere(full / "latest", checkpoint.resolve(full), held_out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):  # the model's own files
        assert (full / "latest" / name).read_bytes() == (pretrained / name).read_bytes()


def test_a_converted_checkpoint_is_a_complete_model_folder(runs, tmp_path):
    _, full, _, held_out = runs
    converted = run("convert.py", str(full), str(tmp_path / "hf"))
    assert converted.returncode == 0 and converted.stderr == "", converted.stderr
    assert_usable_everywhere(tmp_path / "hf", checkpoint.resolve(full), held_out)
    again = run("convert.py", str(full), str(tmp_path / "hf"))
    assert again.returncode == 2 and again.stderr == (f"error: {tmp_path / 'hf'} already exists: give a new folder to "
                                                      f"write the model into (convert.py never writes over one)\n")


def test_a_merged_lora_run_is_a_complete_model_folder(runs, tmp_path):
    pretrained, full, lora, held_out = runs
    merged = tmp_path / "merged"
    result = run("convert.py", str(lora / "latest"), str(merged), "--merge-lora")
    assert result.returncode == 0, result.stderr
    assert_usable_everywhere(merged, checkpoint.resolve(lora), held_out)
    with torch.no_grad():  # the same weights peft computes with, on the run folder itself and on latest
        tokens = torch.tensor([[0, 5, 9, 17, 33]])
        plain = transformers.AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
        for adapters in (lora, lora / "latest"):
            base = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
            assert (peft.PeftModel.from_pretrained(base, adapters).eval()(tokens).logits - plain).abs().max() <= 1e-5

    refused = run("convert.py", str(full), str(tmp_path / "other"), "--merge-lora")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "holds no LoRA adapters (adapter_config.json)" in refused.stderr
    exists = run("convert.py", str(lora), str(merged), "--merge-lora")
    assert exists.returncode == 2 and "already exists: give a new folder" in exists.stderr

    pytest.importorskip("gguf")  # the optional GGUF writer takes the merged folder's tokenizer
    gguf_file = run("convert.py", str(merged), "--to", "gguf", str(tmp_path / "merged.gguf"))
    assert gguf_file.returncode == 0, gguf_file.stderr
