"""FSDP2 and multi-node torchrun on CPU/gloo: each equals one process with accumulation, and their
checkpoints resume on another world size and mode. Pinned to CPU also where CUDA is visible: these
tests are about the arithmetic and the checkpoints, not devices."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from config import Config, ConfigError, ModelConfig, TrainConfig, build_config, load_toml
from model import Block, Llama
from test_train import ROOT, args, data_dir, run_cli, train_losses  # noqa: F401 (data_dir is a fixture)

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
COMMON = ["--train.max_steps", "10", "--train.eval_interval", "5", "--train.batch_tokens", "256",
          "--train.device", "cpu"]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    """One process, accumulation 2: the run every parallel layout must reproduce."""
    out = tmp_path_factory.mktemp("single")
    result = run_cli(*args(data_dir, out, *COMMON))
    assert result.returncode == 0, result.stderr
    assert "accumulation 2" in result.stdout
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == 10 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_fsdp_equals_one_process_and_resumes_on_one(data_dir, single, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp"
    fsdp = run_cli(*args(data_dir, out, *COMMON, "--train.parallel", "fsdp"),
                   launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert fsdp.returncode == 0, fsdp.stderr
    assert "world 2 (fsdp)" in fsdp.stdout and "accumulation 1" in fsdp.stdout
    assert close(train_losses(out), train_losses(single))
    # The main process gathered the shards into a plain model folder: the single run's weights.
    ours, reference = checkpoint.load_model(out / "ckpt-000010")[0], checkpoint.load_model(single / "ckpt-000010")[0]
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    assert (out / "ckpt-000005" / checkpoint.OPTIMIZER_DIR / ".metadata").is_file()
    # Resumed without torchrun (no FSDP, one process): the optimizer shards are read back whole.
    resumed = run_cli(*args(data_dir, out, *COMMON, "--resume", str(out / "ckpt-000005")))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "accumulation 2" in resumed.stdout
    assert close(train_losses(out), train_losses(single))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(data_dir, single, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(single, out)
    resumed = run_cli(*args(data_dir, out, *COMMON, "--train.parallel", "fsdp", "--resume", str(out / "ckpt-000005")),
                      launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert resumed.returncode == 0, resumed.stderr
    assert close(train_losses(out), train_losses(single))


def launch_nodes(out_dirs: list[Path], data: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """Two "machines" of one process each, meeting through torchrun's c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = (TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", "nanollama-test")
    nodes = [run_cli(*args(data, out, *COMMON, *extra), wait=False, launcher=launcher) for out in out_dirs]
    results = []
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, "", stderr))
    return results


# The DDP variant runs with the slow tests (CI runs those too), to keep the default suite short.
@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_nodes_equal_one_process(data_dir, single, tmp_path, parallel):  # noqa: F811
    out = tmp_path / "shared"
    for node in launch_nodes([out, out], data_dir, "--train.parallel", parallel):
        assert node.returncode == 0, node.stderr
    assert close(train_losses(out), train_losses(single))


def test_a_run_folder_the_nodes_do_not_share_is_refused(data_dir, tmp_path):  # noqa: F811
    nodes = launch_nodes([tmp_path / "machine_a", tmp_path / "machine_b"], data_dir)
    assert all(node.returncode != 0 for node in nodes)
    assert any("is not the same folder for every process: on several machines put it on a filesystem they all "
               "mount" in node.stderr for node in nodes)


@pytest.mark.parametrize("settings,message", [
    ({"optimizer": "muon"}, "train.parallel=fsdp with train.optimizer=muon"),
    ({"init_from": "x", "lora_rank": 4}, "train.parallel=fsdp with train.lora_rank"),
    ({"dtype": "float16"}, "train.parallel=fsdp with train.dtype=float16"),
])
def test_fsdp_refuses_what_it_cannot_shard(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(parallel="fsdp", **settings).validate()


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16))
    tokens = torch.randint(0, 50, (2, 17))
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    grads, runs = [], []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        calls.clear()
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        runs.append(len(calls))
    assert runs == [2, 4]  # with checkpointing the backward pass runs the block a second time
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_under_fsdp_each_block_compiles_alone_and_one_graph_serves_them_all():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16))
    tokens = torch.randint(0, 50, (2, 17))
    eager, names = model(tokens[:, :-1], tokens[:, 1:])[1], list(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert train.compile_for_training(model, types.SimpleNamespace(sharded=True)) is model
    assert all("forward" in vars(block) for block in model.layers)  # FSDP's gathers around them stay eager
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:])[1], eager, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert list(model.state_dict()) == names  # checkpoints and optimizer shards keep their names
    train.uncompiled(model)  # what compile="auto" falls back to
    assert not any("forward" in vars(block) for block in model.layers)
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:])[1], eager, atol=0, rtol=0)


@pytest.mark.slow
def test_fsdp_with_compiled_blocks_equals_one_process(data_dir, single, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "fsdp"
    result = run_cli(*args(data_dir, out, *COMMON, "--train.parallel", "fsdp", "--train.compile", "true"),
                     launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr
    assert "compile True | world 2 (fsdp)" in result.stdout
    assert any((tmp_path / "inductor").rglob("*.py"))  # Inductor wrote the blocks' code
    losses, reference = train_losses(out), train_losses(single)
    assert len(losses) == len(reference) == 10 and max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4


def recipe(name: str) -> Config:
    return build_config(load_toml(ROOT / "configs" / f"{name}.toml"))


def test_recipes_state_their_budget():
    """The token budgets, batches and sizes the two recipes' comments promise."""
    small, large = recipe("llama_124m_fineweb"), recipe("llama_1b_fsdp")
    assert round(small.train.max_steps * small.train.batch_tokens / 1e9, 1) == 10.0
    assert round(large.train.max_steps * large.train.batch_tokens / 1e9, 1) == 22.0
    assert small.train.batch_tokens // (small.train.micro_batch_size * small.train.block_size * 8) == 2
    assert large.train.batch_tokens // (large.train.micro_batch_size * large.train.block_size * 8) == 8
    with torch.device("meta"):
        assert round(Llama(small.model).num_params() / 1e6) == 124
        assert round(Llama(large.model).num_params() / 1e9, 1) == 1.1
    assert large.train.parallel == "fsdp" and large.train.activation_checkpointing
    for cfg in (small, large):
        assert cfg.data.vocab_size == cfg.model.vocab_size or cfg.data.tokenizer not in ("bpe", "char")


@pytest.mark.parametrize("script", ["prepare_data.py", "train.py"])
@pytest.mark.parametrize("name", ["llama_124m_fineweb", "llama_1b_fsdp"])
def test_recipes_print_their_config(script, name):
    result = subprocess.run([sys.executable, script, f"configs/{name}.toml", "--print-config"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert build_config(tomllib.loads(result.stdout)) == recipe(name)


@pytest.mark.slow
def test_124m_recipe_trains_at_full_size_on_stand_in_data(data_dir, tmp_path):  # noqa: F811
    """Its model and optimizer as configured, on a tiny dataset, with short windows on CPU."""
    result = run_cli("configs/llama_124m_fineweb.toml", "--data.data_dir", str(data_dir), "--data.dataset", "tiny",
                     "--train.out_dir", str(tmp_path), "--train.compile", "false", "--train.device", "cpu",
                     "--train.block_size", "64", "--train.micro_batch_size", "1", "--train.batch_tokens", "64",
                     "--train.max_steps", "2", "--train.warmup_steps", "1", "--train.eval_interval", "2",
                     "--train.eval_iters", "1", "--eval.task", "none")
    assert result.returncode == 0, result.stderr
    assert "params 123,5" in result.stdout or "params 123,6" in result.stdout
    assert len(train_losses(tmp_path)) == 2 and (tmp_path / "ckpt-000002" / "model.safetensors").is_file()


def test_1b_recipe_trains_sharded_on_two_processes(data_dir, tmp_path):  # noqa: F811
    """Its training setup (FSDP, activation checkpointing, schedule, optimizer) on two processes, with
    the model shrunk to a few blocks so that it runs on a CPU."""
    small_model = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
                   "--model.hidden_dim", "128", "--model.vocab_size", "64", "--model.max_seq_len", "64"]
    result = run_cli("configs/llama_1b_fsdp.toml", *small_model, "--data.data_dir", str(data_dir),
                     "--data.dataset", "tiny", "--train.out_dir", str(tmp_path), "--train.compile", "false",
                     "--train.device", "cpu", "--train.block_size", "32", "--train.micro_batch_size", "2",
                     "--train.batch_tokens", "256", "--train.max_steps", "3", "--train.warmup_steps", "1",
                     "--train.eval_interval", "3", "--train.eval_iters", "1",
                     launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr
    assert "world 2 (fsdp) | activation checkpointing" in result.stdout and "accumulation 2" in result.stdout
    assert len(train_losses(tmp_path)) == 3 and (tmp_path / "ckpt-000003" / checkpoint.OPTIMIZER_DIR).is_dir()


def as_written_before_sharding(ckpt: Path) -> None:
    """Rewrite a checkpoint the way they were written before optimizer/ existed: the optimizer state
    whole, in training_state.pt."""
    cfg = build_config(load_toml(ckpt / "config.toml"))
    model = checkpoint.load_hf(ckpt)
    optimizers = train.configure_optimizers(model, cfg.train, torch.device("cpu"))
    checkpoint.load_optimizer(model, list(optimizers.values()), ckpt, distributed=False)
    state = checkpoint.load_training_state(ckpt)
    del state["optimizers"]
    state["optimizer"] = [o.state_dict() for o in optimizers.values()]
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    shutil.rmtree(ckpt / checkpoint.OPTIMIZER_DIR)
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != checkpoint.MARKER)
    (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": 5, "sha256": {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}))


def test_checkpoints_from_before_sharding_resume_and_fsdp_says_how(data_dir, single, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(single, out)
    as_written_before_sharding(out / "ckpt-000005")
    refused = run_cli(*args(data_dir, out, *COMMON, "--train.parallel", "fsdp", "--resume", str(out / "ckpt-000005")),
                      launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert refused.returncode != 0  # torchrun reports its processes' exit status 2 as a failure of its own
    assert "error: cannot resume" in refused.stderr and "holds its optimizer state whole, as checkpoints did before sharding; resume it once with parallel=ddp" \
        in refused.stderr
    resumed = run_cli(*args(data_dir, out, *COMMON, "--resume", str(out / "ckpt-000005")))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out) == train_losses(single)  # bit for bit: the same state, read the old way


@pytest.mark.slow
def test_fsdp_on_a_sharded_corpus_equals_one_process(tmp_path):
    """Windows drawn across shards are a function of (seed, step, index) too: two FSDP processes
    train on a sharded dataset exactly as one process with twice the accumulation."""
    import prepare_data
    from config import DataConfig
    docs = [f"{w} the quick brown fox {i} jumps over the lazy dog; " * 4 for i, w in enumerate("abcdefghij" * 8)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_data.prepare(DataConfig(dataset="tiny", data_dir=str(tmp_path), input=str(corpus), tokenizer="char",
                                    shard_documents=16, workers=1))
    assert len(list((tmp_path / "tiny").glob("train_*.bin"))) == 5
    one = run_cli(*args(tmp_path, tmp_path / "one", *COMMON))
    two = run_cli(*args(tmp_path, tmp_path / "two", *COMMON, "--train.parallel", "fsdp"),
                  launcher=(TORCHRUN, "--standalone", "--nproc_per_node", "2"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert close(train_losses(tmp_path / "one"), train_losses(tmp_path / "two"))
