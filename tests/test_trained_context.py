"""Sampling never runs past what the model learned: a checkpoint records the longest window it was
trained on, and decoding slides inside it, so samples far longer than that window keep their quality."""

import json
import random

import pytest
import torch

import checkpoint
import generate
import prepare_data
import train
from config import SampleConfig

TRAINED, CONTEXT = 32, 128  # train.block_size, model.max_seq_len


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny char model trained on 32-token windows of a toy language, with room for 128 positions."""
    root = tmp_path_factory.mktemp("context")
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log red big small happy sad".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(4000)]
    (root / "corpus.txt").write_text("\n".join(lines))
    assert prepare_data.main(["--data.dataset", "toy", "--data.data_dir", str(root / "data"), "--data.input",
                              str(root / "corpus.txt"), "--data.workers", "1"]) == 0
    assert train.main(["--model.vocab_size", "64", "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4",
                       "--model.max_seq_len", str(CONTEXT), "--train.block_size", str(TRAINED),
                       "--train.micro_batch_size", "16", "--train.batch_tokens", "512", "--train.warmup_steps", "10",
                       "--train.lr", "3e-3", "--train.max_steps", "300", "--train.eval_interval", "300",
                       "--train.eval_iters", "2", "--train.compile", "false", "--train.peak_tflops", "1",
                       "--data.data_dir", str(root / "data"), "--data.dataset", "toy",
                       "--train.out_dir", str(root / "run")]) == 0
    return root / "run"


def scored_loss(model, ids: list[int]) -> torch.Tensor:
    """Each token's loss under the model reading at most TRAINED - 1 tokens before it: the model
    within what it learned, as the judge of a sample."""
    seq = torch.tensor(ids)
    windows = [seq[max(0, i - TRAINED + 1):i] for i in range(1, len(seq))]
    with torch.no_grad():
        last = [model(w[None])[0][0, -1] for w in windows]
    return torch.nn.functional.cross_entropy(torch.stack(last), seq[1:], reduction="none")


def chunk_means(losses: torch.Tensor, size: int = 32) -> list[float]:
    return [losses[a:a + size].mean().item() for a in range(0, len(losses) - size + 1, size)]


def test_the_checkpoint_records_its_trained_context(run):
    assert checkpoint.trained_context(checkpoint.resolve(run)) == TRAINED
    assert generate.load_for_sampling(SampleConfig(checkpoint=str(run))).context == TRAINED


def test_samples_keep_their_quality_far_past_the_trained_context(run, capsys):
    model, _ = checkpoint.load_model(run)
    assert generate.main(["--checkpoint", str(run), "--prompt", "the cat sat on a mat.\nthe", "--temperature", "1",
                          "--max_new_tokens", "224", "--num_samples", "8", "--seed", "1", "--json"]) == 0
    out = capsys.readouterr()
    assert f"trained on windows of {TRAINED} tokens; past that, decoding slides" in out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    n_prompt = len(rows[0]["prompt_ids"])
    sliding = torch.stack([scored_loss(model, r["prompt_ids"] + r["token_ids"])[n_prompt - 1:] for r in rows]).mean(0)
    # The same samples without the window: positions the model never trained on.
    cfg = SampleConfig(temperature=1.0, max_new_tokens=224, num_samples=8, seed=1)
    unbounded = list(generate.generate(model, [rows[0]["prompt_ids"]], cfg, context=CONTEXT))[-1]
    past = torch.stack([scored_loss(model, r.prompt_ids + r.token_ids)[n_prompt - 1:] for r in unbounded]).mean(0)
    steady, drifting = chunk_means(sliding), chunk_means(past)
    assert max(steady) <= 1.25 * steady[0], steady  # flat: the late text is as good as the early text
    assert max(drifting[2:]) >= 1.5 * drifting[0], drifting  # the failure the window prevents is real
