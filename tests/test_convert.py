"""convert.py: llama2.c legacy files in and out, checked against an independent run.c-style forward."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError, SampleConfig
from checkpoint import load_model, read_llama2c, rope_permute, write_llama2c
from convert import main
from generate import generate
from test_model import make_model

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.bin is absent")


def run_c_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's run.c forward, written from its source: weights read in file order, RoPE on
    adjacent pairs (x0, x1), (x2, x3)... Shares no code with convert.py or model.py."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, _ = struct.unpack("<7i", raw[:28])
    floats, offset, hd = np.frombuffer(raw, "<f4", offset=28), 0, dim // n_heads

    def take(*shape):
        nonlocal offset
        size = int(np.prod(shape))
        offset += size
        return torch.from_numpy(floats[offset - size:offset].copy()).view(shape)

    emb, rms_att, wq, wk, wv, wo = take(abs(vocab), dim), take(n_layers, dim), take(n_layers, dim, dim), \
        take(n_layers, n_kv * hd, dim), take(n_layers, n_kv * hd, dim), take(n_layers, dim, dim)
    rms_ffn, w1, w2, w3, rms_final = take(n_layers, dim), take(n_layers, hidden, dim), take(n_layers, dim, hidden), \
        take(n_layers, hidden, dim), take(dim)
    T = len(tokens)
    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)

    def rope(x, heads):
        pairs = x.view(T, heads, hd // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).view(T, heads, hd)

    x = emb[tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(n_layers):
        h = norm(x, rms_att[l])
        q, k = rope(h @ wq[l].T, n_heads), rope(h @ wk[l].T, n_kv).repeat_interleave(n_heads // n_kv, 1)
        v = (h @ wv[l].T).view(T, n_kv, hd).repeat_interleave(n_heads // n_kv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        att = torch.einsum("hts,shd->thd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + att.reshape(T, dim) @ wo[l].T
        h = norm(x, rms_ffn[l])
        x = x + (torch.nn.functional.silu(h @ w1[l].T) * (h @ w3[l].T)) @ w2[l].T
    classifier = emb if vocab > 0 else torch.from_numpy(floats[-abs(vocab) * dim:].copy()).view(-1, dim)
    return norm(x, rms_final) @ classifier.T


@needs_stories
def test_stories260k_imports_and_matches_run_c():
    model = read_llama2c(STORIES).eval()
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.vocab_size) == \
        (64, 5, 8, 4, 512) and model.cfg.tie_embeddings
    tokens = [1, 403, 407, 261, 378, 499, 13, 290]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0][0]
    assert ours.isfinite().all()
    torch.testing.assert_close(ours, run_c_logits(STORIES, tokens), atol=1e-4, rtol=1e-4)


@needs_stories
def test_stories260k_greedy_from_bos_is_deterministic():
    model = read_llama2c(STORIES).eval()
    cfg = SampleConfig(temperature=0.0, max_new_tokens=32)
    first = list(generate(model, [[1]], cfg))[-1][0].token_ids
    assert first == list(generate(model, [[1]], cfg))[-1][0].token_ids and len(first) == 32
    model.setup_cache(batch_size=1)
    with torch.no_grad():
        logits = model(torch.tensor([[1]]), last_only=True)[0]
    assert logits.isfinite().all() and model.layers[0].self_attn.cache.k.shape == (1, 4, 512, 8)


@needs_stories
def test_stories260k_export_reproduces_the_file_byte_for_byte(tmp_path):
    write_llama2c(read_llama2c(STORIES), tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == STORIES.read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_export_import_round_trip_gives_identical_logits(tied, tmp_path):
    model = make_model(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, tie_embeddings=tied)
    write_llama2c(model, tmp_path / "m.bin")
    header = struct.unpack("<7i", (tmp_path / "m.bin").read_bytes()[:28])
    assert header == (64, model.cfg.ffn_dim, 2, 8, 2, 67 if tied else -67, 64)
    back = read_llama2c(tmp_path / "m.bin")
    x = torch.randint(0, 67, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])
        # and run.c's own arithmetic on the exported file agrees: q/k went out in the pair layout
        torch.testing.assert_close(run_c_logits(tmp_path / "m.bin", x[0].tolist()), model(x[:1])[0][0],
                                   atol=1e-5, rtol=1e-5)
    assert back.cfg.tie_embeddings == tied


def test_rope_permute_round_trips():
    w = torch.randn(32, 12)
    assert torch.equal(rope_permute(rope_permute(w, 4, to_pairs=True), 4), w)
    assert not torch.equal(rope_permute(w, 4), w)


def test_cli_converts_bin_to_folder_and_back(tmp_path, capsys):
    model = make_model(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    write_llama2c(model, tmp_path / "m.bin")
    main([str(tmp_path / "m.bin"), str(tmp_path / "folder")])
    main([str(tmp_path / "folder"), str(tmp_path / "again.bin")])
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    assert load_model(tmp_path / "folder")[0].cfg.n_kv_heads == 2
    out = capsys.readouterr()
    assert out.out.count("wrote") == 2
    assert out.err == (f"note: {tmp_path / 'm.bin'} has no tokenizer, so {tmp_path / 'folder'} holds the weights "
                       f"alone: give prompts as token ids (--prompt_ids), or copy a tokenizer.json in\n")


def test_convert_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"llama2.c fixes rope_theta=10000.*this model has rope_theta=500000.*: it cannot run there"):
        write_llama2c(make_model(vocab_size=16, dim=16, n_layers=1, n_heads=2, rope_theta=500000.0), tmp_path / "x.bin")
    write_llama2c(make_model(vocab_size=16, dim=16, n_layers=1, n_heads=2), tmp_path / "m.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-8])
    with pytest.raises(ConfigError, match="the file is truncated or not a legacy llama2.c file"):
        read_llama2c(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="has no valid llama2.c header"):
        read_llama2c(tmp_path / "junk.bin")
    assert main([str(tmp_path / "m.bin")]) == 2
    assert capsys.readouterr().err.startswith("error: usage: python convert.py SRC DST")
