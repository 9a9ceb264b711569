"""Every mathematical claim and worked-example number in docs/, checked against our code.

Each test names the page whose claim it checks. A number that appears in a page appears here
(or is drawn by docs/make_figures.py), so a page cannot drift from the code it describes.
"""

import dataclasses
import importlib.util
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
from config import ModelConfig, SampleConfig, TrainConfig
from checkpoint import rope_permute
from decoding import Int8Linear
from engine import apply_repetition_penalty, min_p_filter, sample_next, top_k_filter, top_p_filter
from model import FeedForward, Llama, RMSNorm, apply_rope, reference_attention, rope_cos_sin, rope_frequencies
from tokenizer import Tokenizer
from train import lr_at, rng_state, set_rng_state

_spec = importlib.util.spec_from_file_location("make_figures", Path(__file__).parent.parent / "docs" / "make_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

GiB, MiB, KiB = 2**30, 2**20, 2**10


def rope_tables(head_dim: int, max_seq_len: int = 64, **kw) -> tuple[ModelConfig, torch.Tensor, torch.Tensor]:
    cfg = ModelConfig(dim=head_dim, n_heads=1, max_seq_len=max_seq_len, **kw)
    cfg.validate()
    return (cfg, *rope_cos_sin(cfg))


def rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope on vectors x (n, head_dim), vector i placed at positions[i]."""
    return apply_rope(x[None, None], cos[positions], sin[positions])[0, 0]


# --- rmsnorm.md ---------------------------------------------------------------------------------


def test_rmsnorm_worked_example():
    y = RMSNorm(4, eps=1e-5)(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert math.sqrt(7.5) == pytest.approx(2.7386, abs=1e-4)
    assert y.tolist() == pytest.approx([0.3651, 0.7303, 1.0954, 1.4606], abs=1e-4)


@pytest.mark.parametrize("a", [0.5, 3.0, 1000.0])
def test_rmsnorm_is_scale_invariant(a):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    with torch.no_grad():
        for eps, tol in ((0.0, 1e-6), (1e-5, 1e-4)):  # exact without eps; eps/mean(x^2) off with it
            norm = RMSNorm(64, eps=eps)
            norm.weight.uniform_(0.5, 1.5)
            torch.testing.assert_close(norm(a * x), norm(x), atol=tol, rtol=tol)
        # ...and the output's rms is 1 (times the gains): the vector keeps only its direction.
        unit = RMSNorm(64, eps=1e-5)(x)
        torch.testing.assert_close(unit.pow(2).mean(-1), torch.ones(8), atol=1e-4, rtol=0)


def test_rmsnorm_eps_error_is_as_stated():
    torch.manual_seed(0)
    x = 0.5 * torch.randn(1, 64)
    exact, with_eps = RMSNorm(64, eps=0.0)(x), RMSNorm(64, eps=1e-5)(x)
    relative = (1 - with_eps / exact).mean().item()
    assert relative == pytest.approx(1e-5 / (2 * x.pow(2).mean().item()), rel=0.01)


def test_rmsnorm_invariance_fails_near_eps():
    x = torch.randn(1, 512)
    x = x / x.pow(2).mean().sqrt()
    small = RMSNorm(512, eps=1e-5)(math.sqrt(1e-5) * x)  # rms(a x) = sqrt(eps): output rms is 1/sqrt(2)
    assert small.pow(2).mean().sqrt().item() == pytest.approx(1 / math.sqrt(2), rel=1e-4)


# --- rope.md ------------------------------------------------------------------------------------


def test_rope_worked_example():
    cfg, cos, sin = rope_tables(4)
    assert rope_frequencies(cfg).tolist() == pytest.approx([1.0, 0.01])
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(3, 4)
    y = rotate(x, torch.arange(3), cos, sin)
    assert y[1].tolist() == pytest.approx([0.5403, 0.0, 0.8415, 0.0], abs=1e-4)
    assert y[2].tolist() == pytest.approx([-0.4161, 0.0, 0.9093, 0.0], abs=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    _, cos, sin = rope_tables(32)
    q, k = torch.randn(1, 32), torch.randn(1, 32)
    for m, n, shift in ((2, 5, 10), (7, 0, 40), (13, 13, 1)):
        base = rotate(q, torch.tensor([m]), cos, sin) @ rotate(k, torch.tensor([n]), cos, sin).T
        moved = rotate(q, torch.tensor([m + shift]), cos, sin) @ rotate(k, torch.tensor([n + shift]), cos, sin).T
        torch.testing.assert_close(base, moved, atol=1e-5, rtol=1e-5)


def test_rope_preserves_norms():
    torch.manual_seed(0)
    _, cos, sin = rope_tables(64)
    x = torch.randn(64, 64)
    y = rotate(x, torch.arange(64), cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


def rope_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Meta's (and llama2.c's) layout: pair j is (x[2j], x[2j+1]), rotated as a complex number."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    turns = torch.polar(torch.ones(len(positions), len(inv_freq)), torch.outer(positions.float(), inv_freq))
    return torch.view_as_real(pairs * turns[:, None, :]).flatten(-2)


def test_rope_layouts_agree_after_permutation():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
    cfg.validate()
    cos, sin = rope_cos_sin(cfg)
    hd, T = cfg.head_dim, 12
    x = torch.randn(T, cfg.dim)
    wq_meta, wk_meta = torch.randn(cfg.n_heads * hd, cfg.dim), torch.randn(cfg.n_kv_heads * hd, cfg.dim)
    positions = torch.arange(T)

    # Meta: project, then rotate adjacent pairs. (T, heads, hd)
    q_meta = rope_adjacent_pairs((x @ wq_meta.T).view(T, cfg.n_heads, hd), positions, rope_frequencies(cfg))
    k_meta = rope_adjacent_pairs((x @ wk_meta.T).view(T, cfg.n_kv_heads, hd), positions, rope_frequencies(cfg))
    # Ours: permute the weight rows once, project, then rotate halves. (heads, T, hd)
    q_ours = apply_rope((x @ rope_permute(wq_meta, cfg.n_heads).T).view(T, cfg.n_heads, hd).transpose(0, 1), cos[:T], sin[:T])
    k_ours = apply_rope((x @ rope_permute(wk_meta, cfg.n_kv_heads).T).view(T, cfg.n_kv_heads, hd).transpose(0, 1), cos[:T], sin[:T])

    # The rotated vectors are the same numbers in another order: evens first, then odds...
    halves_order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    torch.testing.assert_close(q_ours, q_meta[..., halves_order].transpose(0, 1), atol=1e-4, rtol=1e-4)
    # ...so every attention score (a dot product, blind to the order) is identical.
    rep = cfg.n_heads // cfg.n_kv_heads
    scores_meta = torch.einsum("qhd,khd->hqk", q_meta, k_meta.repeat_interleave(rep, dim=1))
    scores_ours = q_ours @ k_ours.repeat_interleave(rep, dim=0).transpose(-2, -1)
    torch.testing.assert_close(scores_ours, scores_meta, atol=1e-3, rtol=1e-4)


def test_llama31_scaling_as_quoted():
    plain = ModelConfig(dim=4096, n_heads=32, rope_theta=500000.0)
    scaled = ModelConfig(dim=4096, n_heads=32, rope_theta=500000.0, rope_scaling="llama3")
    plain.validate(), scaled.validate()
    before, after = rope_frequencies(plain), rope_frequencies(scaled)
    wavelength = 2 * math.pi / before
    assert len(before) == 64
    assert wavelength[0].item() == pytest.approx(6.28, abs=0.01)
    assert wavelength[-1].item() == pytest.approx(2.56e6, rel=0.01)
    ratio = before / after
    kept, scaled_8, blended = ratio == 1, torch.isclose(ratio, torch.tensor(8.0)), (ratio > 1) & (ratio < 8 - 1e-4)
    assert (kept.sum().item(), blended.sum().item(), scaled_8.sum().item()) == (29, 6, 29)
    assert (wavelength[kept] < 8192 / 4).all() and (wavelength[scaled_8] > 8192 / 1).all()
    assert ((wavelength[blended] >= 2048) & (wavelength[blended] <= 8192)).all()


# --- attention.md and kv_cache.md -----------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [32, 8, 1])
def test_kv_cache_buffers_follow_the_formula(n_kv_heads):
    cfg = ModelConfig(**{**figures.LLAMA3_8B, "n_kv_heads": n_kv_heads})
    with torch.device("meta"):  # real shapes and dtypes, no memory
        model = Llama(cfg)
    model.setup_cache(batch_size=1, dtype=torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for layer in model.layers for b in layer.self_attn.cache.buffers())
    assert buffers == figures.kv_cache_bytes(32, n_kv_heads, 128, 8192, 1, 2)
    assert buffers == {32: 4 * GiB, 8: 1 * GiB, 1: 128 * MiB}[n_kv_heads]
    assert buffers // 8192 == {32: 512 * KiB, 8: 128 * KiB, 1: 16 * KiB}[n_kv_heads]  # per token


def test_llama3_8b_shape_as_quoted():
    with torch.device("meta"):
        n = Llama(ModelConfig(**figures.LLAMA3_8B)).num_params()
    assert n == 8_030_261_248
    assert n * 2 / GiB == pytest.approx(14.96, abs=0.01)
    # At 128K tokens the GQA cache outgrows the weights.
    assert figures.kv_cache_bytes(32, 8, 128, 131072, 1, 2) == 16 * GiB


def small_reference_model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=66, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                             attention="reference")).eval()


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_forward_flops_formula_matches_the_model():
    model = small_reference_model()
    cfg = model.cfg
    assert counted_flops(lambda: model(torch.zeros(1, 64, dtype=torch.long))) == figures.forward_flops(cfg, 64, 64)
    model.setup_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 63, dtype=torch.long))  # prefill 63 tokens
    decode = counted_flops(lambda: model(torch.zeros(1, 1, dtype=torch.long), start_pos=63))
    assert decode == figures.decode_step_flops(cfg, 64, cached=True) == 1_622_528
    model.clear_cache()


def test_decode_cost_as_quoted():
    cfg = ModelConfig(**figures.BENCH_CONFIG)
    cached, uncached = figures.decode_step_flops(cfg, 1024, True), figures.decode_step_flops(cfg, 1024, False)
    assert (cached, uncached) == (34_603_008, 35_433_480_192)
    for t in (1, 128, 1024):  # without the cache the step after t tokens costs t times as much
        assert figures.decode_step_flops(cfg, t, False) == t * figures.decode_step_flops(cfg, t, True)


# --- swiglu.md ----------------------------------------------------------------------------------


def test_swiglu_hidden_size_and_parameters():
    cfg = ModelConfig(dim=4096, n_heads=32, multiple_of=256)
    assert 2 * 4 * 4096 / 3 == pytest.approx(10922.67, abs=0.01)
    assert cfg.ffn_dim == 11008  # Llama 2 7B's
    with torch.device("meta"):
        swiglu = sum(p.numel() for p in FeedForward(cfg).parameters())
    gelu = 2 * 4096 * (4 * 4096)  # up and down, hidden 4 * dim
    assert (swiglu, gelu) == (135_266_304, 134_217_728)
    assert swiglu / gelu == pytest.approx(1.0078, abs=1e-4)
    assert ModelConfig(dim=128).ffn_dim == 352  # configs/shakespeare_char_cpu.toml


def test_parameter_count_adds_up():
    model = small_reference_model()
    c = model.cfg
    attention = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    per_layer = attention + 3 * c.dim * c.ffn_dim + 2 * c.dim
    assert model.num_params() == 2 * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim == 755_328


# --- flash_attention.md ---------------------------------------------------------------------------


def test_online_softmax_worked_example():
    trace = []
    out = figures.online_softmax_attention(torch.tensor([[1.0]]), torch.tensor([[1.0], [3.0], [2.0], [5.0]]),
                                           torch.tensor([[10.0], [20.0], [30.0], [40.0]]), 2, trace)
    (m1, l1, o1), (m2, l2, o2) = trace
    assert (m1.item(), m2.item()) == (3.0, 5.0)
    assert l1.item() == pytest.approx(1.1353, abs=1e-4)
    assert l2.item() == pytest.approx(1.2034, abs=1e-4)
    assert l2.item() == pytest.approx(l1.item() * math.exp(-2) + math.exp(-3) + 1, abs=1e-6)
    assert (o1.item(), out.item()) == (pytest.approx(18.8080, abs=1e-4), pytest.approx(36.8806, abs=1e-4))


@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_online_softmax_equals_full_attention(block):
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 16), torch.randn(40, 16) * 3, torch.randn(40, 16)
    full = reference_attention(q[None, None], k[None, None], v[None, None], None)[0, 0]
    torch.testing.assert_close(figures.online_softmax_attention(q, k, v, block), full, atol=1e-5, rtol=1e-5)


def test_score_matrix_size_as_quoted():
    assert 8192 * 8192 * 4 == 256 * MiB  # one head's fp32 scores at 8K context


def test_sdpa_flash_kernel_runs_our_attention():
    """On this CPU build the flash backend alone serves both our calls: is_causal training and
    the explicit mask of cached decoding; its output equals the reference attention's."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=66, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    sdpa, ref = Llama(ModelConfig(**cfg)).eval(), Llama(ModelConfig(**cfg, attention="reference")).eval()
    ref.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 66, (2, 20))
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.testing.assert_close(sdpa(tokens)[0], ref(tokens)[0], atol=1e-5, rtol=1e-5)
        sdpa.setup_cache(2)
        sdpa(tokens[:, :12])
        chunk = sdpa(tokens[:, 12:], start_pos=12)[0]  # offset-causal: an explicit mask
        torch.testing.assert_close(chunk, ref(tokens)[0][:, 12:], atol=1e-5, rtol=1e-5)


# --- muon.md ------------------------------------------------------------------------------------


def test_muon_quintic_as_quoted():
    p = figures.newton_schulz_polynomial
    assert 3.4445 - 4.7750 + 2.0315 == pytest.approx(0.701)
    out = p(torch.linspace(0.01, 1, 20000, dtype=torch.float64), 5)
    assert out.min().item() == pytest.approx(0.682, abs=1e-3) and out.max().item() == pytest.approx(1.134, abs=1e-3)
    assert p(torch.tensor(0.001, dtype=torch.float64), 5).item() == pytest.approx(0.471, abs=1e-3)
    x = torch.randn(6, 4, dtype=torch.float64)  # the matrix iteration acts on each singular value alone
    u, sv, vh = torch.linalg.svd(x / x.norm(), full_matrices=False)
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x / x.norm()
    y = a * y + b * (y @ y.T) @ y + c * (y @ y.T) @ (y @ y.T) @ y
    torch.testing.assert_close(y, u @ torch.diag(p(sv, 1)) @ vh)


def test_muon_update_singular_values():
    grad = figures.cpu_model_gradient("layers.0.mlp.gate_proj.weight")
    before, after = torch.linalg.svdvals(grad), torch.linalg.svdvals(figures.muon_update(grad))
    assert 900 < (before[0] / before[-1]).item() < 1000  # "about 950"
    assert ((after >= 0.6) & (after <= 1.21)).sum().item() == 112 and len(after) == 128
    assert after.min().item() == pytest.approx(0.16, abs=0.01) and after.max().item() == pytest.approx(1.20, abs=0.01)


def test_muon_takes_the_block_matrices():
    from train import configure_optimizers
    model = Llama(ModelConfig(vocab_size=66, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64))
    adamw, muon = configure_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu")).values()
    assert isinstance(muon, torch.optim.Muon)
    count = lambda opt: sum(p.numel() for g in opt.param_groups for p in g["params"])  # noqa: E731
    assert (count(muon), count(adamw), model.num_params()) == (737_280, 18_048, 755_328)
    assert len(muon.param_groups[0]["params"]) == 28


# --- lr_schedules.md ----------------------------------------------------------------------------


def test_lr_schedule_values_as_quoted():
    cosine = TrainConfig(lr_schedule="cosine", **figures.CPU_SCHEDULE)
    wsd = TrainConfig(lr_schedule="wsd", **figures.CPU_SCHEDULE)
    constant = TrainConfig(lr_schedule="constant", **figures.CPU_SCHEDULE)
    for c in (cosine, wsd, constant):
        assert lr_at(0, c) == pytest.approx(3e-5)
        assert lr_at(49, c) == pytest.approx(1.5e-3)
        assert lr_at(99, c) == pytest.approx(3e-3)
    assert lr_at(950, cosine) == pytest.approx(1.65e-3)
    assert lr_at(1800, cosine) == pytest.approx(3e-4)
    assert lr_at(1439, wsd) == pytest.approx(3e-3)
    assert lr_at(1620, wsd) == pytest.approx(1.65e-3)
    assert lr_at(1800, wsd) == pytest.approx(3e-4)
    assert lr_at(1700, constant) == pytest.approx(3e-3)


def test_precision_numbers_as_quoted():
    fp16, bf16 = torch.finfo(torch.float16), torch.finfo(torch.bfloat16)
    assert (fp16.max, fp16.eps, fp16.tiny) == (65504.0, 2**-10, 2**-14)
    assert (bf16.eps, bf16.tiny) == (2**-7, torch.finfo(torch.float32).tiny)
    assert bf16.max == pytest.approx(3.39e38, rel=1e-3) and bf16.eps / fp16.eps == 8
    fp32 = torch.finfo(torch.float32)
    assert (fp32.max, fp32.tiny, fp32.eps) == (pytest.approx(3.4e38, rel=0.01), pytest.approx(1.2e-38, rel=0.02), 2**-23)
    assert torch.tensor(2**-24).half().item() == 2**-24 and torch.tensor(2**-26).half().item() == 0.0
    assert torch.tensor(1e-8).half().item() == 0.0  # a small gradient vanishes in fp16...
    scale = torch.amp.GradScaler("cpu").get_scale()
    assert scale == 65536.0
    scaled = torch.tensor(1e-8 * scale).half().item()  # ...but survives once scaled
    assert scaled / scale == pytest.approx(1e-8, rel=1e-3)
    assert torch.tensor(70000.0).half().item() == math.inf and torch.tensor(70000.0).bfloat16().item() == 70144.0


# --- resume.md ----------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_step_and_index(tmp_path):
    data.write_tokens(tmp_path / "t.bin", [np.arange(5000) % 66], vocab_size=66, tokenizer_hash="00" * 32)
    tokens = data.read_tokens(tmp_path / "t.bin")
    first = data.BatchSampler(tokens, 16, 4, seed=1337)
    for step in range(3):  # whatever the sampler drew before...
        first.get(step, 0)
    fresh = data.BatchSampler(tokens, 16, 4, seed=1337)  # ...a new process draws the same batch
    for a, b in zip(first.get(7, 5), fresh.get(7, 5)):
        assert torch.equal(a, b)
    assert not torch.equal(first.get(7, 5)[0], first.get(7, 4)[0])
    # Step 7, micro-step 2 of rank 1 in a 2-process run is index 2 * 2 + 1 = 5 of a 1-process run.
    assert 2 * 2 + 1 == 5


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# --- bpe.md -------------------------------------------------------------------------------------


def test_bpe_worked_example():
    tok = Tokenizer.train_bpe(["low lower lowest newer newest wider"] * 3, vocab_size=259 + 8)
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    assert [" ".join(m) for m in merges] == ["w e", "l o", "e we", "n ewe", "s t", "Ġ lo", "Ġ newe", "Ġlo we"]
    assert [tok.backend.id_to_token(i) for i in tok.encode("lowest newer")] == ["lo", "we", "st", "Ġnewe", "r"]


def test_bpe_pre_tokenizer_and_bytes():
    tok = Tokenizer.train_bpe(["a"], vocab_size=259)
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("We'll pay 12345 dollars!!\n\nOK")]
    assert pieces == ["We", "'ll", "Ġpay", "Ġ", "123", "45", "Ġdollars", "!!ĊĊ", "OK"]
    assert [tok.backend.id_to_token(i) for i in tok.encode("é")] == ["Ã", "©"]  # two UTF-8 bytes, two tokens
    text = "é🦙 ünïcode\tand\r\nany bytes"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("🦙")) == len("🦙".encode()) == 4


# --- sampling.md --------------------------------------------------------------------------------


def test_sampling_worked_example():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert logits.softmax(-1)[0].tolist() == pytest.approx([0.5630, 0.2071, 0.1256, 0.0762, 0.0280], abs=1e-4)
    assert (logits / 0.5).softmax(-1)[0].tolist() == pytest.approx([0.8292, 0.1122, 0.0413, 0.0152, 0.0021], abs=1e-4)
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == [True, True, False, False, False]
    assert kept(top_p_filter(logits, 0.8)) == [True, True, True, False, False]  # 0.563 + 0.207 < 0.8
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False, False]
    assert kept(min_p_filter(logits, 0.2)) == [True, True, True, False, False]  # 0.2 * 0.563 = 0.113
    seen = torch.tensor([[True, False, False, False, True]])
    assert apply_repetition_penalty(logits, seen, 1.3)[0].tolist() == pytest.approx([1.5385, 1.0, 0.5, 0.0, -1.3],
                                                                                     abs=1e-4)


def test_exponential_race_samples_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    cfg = SampleConfig(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, torch.zeros_like(logits, dtype=torch.bool), cfg, [gen])
                         for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


# --- decoding.md --------------------------------------------------------------------------------


def test_decoding_worked_examples():
    kept, out = figures.speculative_outcome(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3]))
    assert kept == pytest.approx(0.7) and torch.allclose(out, torch.tensor([0.5, 0.3, 0.2]))
    assert figures.tokens_per_round(0.5, 4) == 1.9375 and figures.tokens_per_round(1.0, 4) == 5
    int8 = Int8Linear(torch.tensor([[0.5, -1.27, 0.02], [0.3, -0.004, 0.0]]))
    assert int8.int8_weight().tolist() == [[50, -127, 2], [127, -2, 0]]
    assert int8.scales[1].item() == pytest.approx(0.002362, abs=1e-6)
    assert (int8.int8_weight()[1, 1] * int8.scales[1]).item() == pytest.approx(-0.004724, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_decoding_acceptance_rule_yields_the_target_distribution(seed):
    p, q = torch.rand(6, generator=torch.Generator().manual_seed(seed)).softmax(0), torch.rand(6).softmax(0)
    kept, out = figures.speculative_outcome(p, q)
    assert kept == pytest.approx(torch.minimum(p, q).sum().item()) and torch.allclose(out, p, atol=1e-6)


def test_decoding_limit_as_quoted():
    """2.07 GB per token for the 1.1B shape in bf16 (weights read by a step, one embedding row)."""
    with torch.device("meta"):
        model = Llama(ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  hidden_dim=5632, max_seq_len=2048))
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    step_bytes = 2 * (matmuls + norms + model.cfg.dim)
    assert round(step_bytes / 1e9, 2) == 2.07 and round(3.04e12 / step_bytes, -1) == 1470


def test_decoding_kernel_cost_fit_as_quoted():
    """The fit of bytes / B + kernels * c to the two bf16 rows of bench/README.md's H100 table, and
    what it implies for 65% of the limit at 1.1B."""
    def kernel_cost_fit(steps):  # the (bandwidth, seconds per kernel) that give both steps' seconds exactly
        seconds_per_byte, per_kernel = np.linalg.solve([[b, k] for b, k, _ in steps], [t for _, _, t in steps])
        return 1 / seconds_per_byte, per_kernel

    large, small = (13_290_192_896, 363.8, 1 / 165.6), (2_072_272_896, 296.4, 1 / 656.6)
    bandwidth, per_kernel = kernel_cost_fit([large, small])
    assert round(bandwidth / 1e12, 2) == 2.58 and round(per_kernel * 1e6, 1) == 2.4
    assert round(bandwidth / 2.99e12, 2) == 0.86
    assert [round(b / bandwidth * 1e3, 2) for b, _, _ in (large, small)] == [5.16, 0.8]
    assert [round(k * per_kernel * 1e3, 2) for _, k, _ in (large, small)] == [0.88, 0.72]
    step = small[0] / (0.65 * 2.99e12)
    assert round(step * 1e3, 2) == 1.07 and round((step - small[0] / bandwidth) * 1e3, 2) == 0.26
    kernels = (step - small[0] / bandwidth) / per_kernel
    assert round(kernels) == 108 and round(kernels / 22) == 5 and round(small[1] / 22) == 13
    int8_bandwidth, int8_per_kernel = kernel_cost_fit([(6_685_899_264, 332.9, 1 / 208.6),
                                                       (1_038_705_152, 297.1, 1 / 679.3)])
    assert round(int8_bandwidth / 1e12, 2) == 1.76 and round(int8_per_kernel * 1e6, 1) == 3.0


# --- chat.md ------------------------------------------------------------------------------------


def test_chat_rendering_as_shown():
    """The page's rendered conversation is what our chat BPE's template makes of it, and the mask
    covers the reply and its end-of-turn marker."""
    from chat import ChatFormat
    from tokenizer import CHAT_TEMPLATE
    page = (Path(__file__).parent.parent / "docs" / "chat.md").read_text()
    shown = re.search(r"```text\n(.*?)```", page, flags=re.S).group(1).rstrip("\n")
    tokenizer = Tokenizer.train_bpe(["Be brief. Hi! Hello."], 300, chat=True)
    chat = ChatFormat(tokenizer, CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}]
    assert chat.render(messages) == shown
    ids, mask = chat.encode_with_mask(messages)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Hello.<|eot_id|>"
    assert chat.encode(messages).count(tokenizer.bos_id) == 1


# --- parallel.md --------------------------------------------------------------------------------


def recipe_1b():
    from config import build_config, load_toml
    return build_config(load_toml(figures.RECIPE_1B))


def test_training_state_is_16_bytes_a_parameter():
    """fp32 weight + gradient + AdamW's two moments, as the training loop holds them after a step."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 50, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    optimizer.step()
    held = [p for p in model.parameters()] + [p.grad for p in model.parameters()] + [
        t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    params = model.num_params()
    assert sum(t.numel() * t.element_size() for t in held) == figures.training_state_bytes(params) == 16 * params


def test_parallel_worked_example():
    cfg = recipe_1b()
    with torch.device("meta"):
        model = Llama(cfg.model)
    params, block = model.num_params(), sum(p.numel() for p in model.layers[0].parameters())
    assert (params, block) == (1_100_048_384, 44_044_288)
    assert round(16 * params / 1e9, 2) == 17.60 and round(16 * params / 8 / 1e9, 2) == 2.20
    assert round(2 * block / 1e6, 1) == 88.1 and round(4 * block / 1e6) == 176
    tokens = cfg.train.micro_batch_size * cfg.train.block_size
    assert tokens == 32_768 and cfg.model.n_layers == 22
    assert round(22 * tokens * 39_458 * 2 / 1e9, 1) == 56.9 and round(22 * tokens * 2048 * 2 / 1e9, 2) == 2.95


def block_activation_values(cfg: ModelConfig, recompute: bool, tokens: int = 64) -> float:
    """Values autograd keeps per token for one block's backward pass (parameters not counted),
    measured: the difference between a two-block and a one-block model of cfg's width."""
    kept = []
    for n_layers in (1, 2):
        torch.manual_seed(0)
        model = Llama(dataclasses.replace(cfg, n_layers=n_layers, vocab_size=64, max_seq_len=tokens))
        model.activation_checkpointing = recompute
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:  # each storage once, views included
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randint(0, 64, (1, tokens + 1))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x[:, :-1], x[:, 1:])
        kept.append(sum(storages.values()))
    return (kept[1] - kept[0]) / tokens / 4  # fp32 values


def test_checkpointing_keeps_block_inputs_only():
    """39,458 values a token per block of the 1B width (19.3 x dim) without checkpointing, the same
    at two sequence lengths; exactly the block's input (dim values) with it."""
    cfg = recipe_1b().model
    assert block_activation_values(cfg, recompute=False) == 39_458
    assert block_activation_values(cfg, recompute=False, tokens=128) == 39_458
    assert round(39_458 / cfg.dim, 1) == 19.3
    assert block_activation_values(cfg, recompute=True) == cfg.dim


def test_checkpointing_costs_the_blocks_forward_up_to_the_down_projection():
    """Checkpointed training FLOPs = plain ones + each block's forward except its down projection
    (whose output the backward does not need: the recomputation stops before it). For the 1B block:
    7.5 FLOPs per block weight per token instead of 6."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Llama(cfg)
    tokens = torch.randint(0, 64, (1, 33))

    def training_flops(recompute: bool) -> int:
        model.activation_checkpointing = recompute
        counter = FlopCounterMode(display=False)
        with counter:
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        return counter.get_total_flops()

    block_forward = counted_flops(lambda: [layer(torch.zeros(1, 32, cfg.dim), model.rope_cos[:32],
                                                 model.rope_sin[:32], 0) for layer in model.layers])
    down_projections = cfg.n_layers * 2 * 32 * cfg.ffn_dim * cfg.dim
    assert training_flops(True) - training_flops(False) == block_forward - down_projections
    big = recipe_1b().model
    weights = 4 * big.dim * big.dim - 2 * big.dim * (big.n_heads - big.n_kv_heads) * big.head_dim + 3 * big.dim * big.ffn_dim
    before_down = weights - big.dim * big.ffn_dim
    assert weights == 44_040_192 and round(before_down / weights, 3) == 0.738
    assert round(6 + 2 * before_down / weights, 1) == 7.5 and round((6 + 2 * before_down / weights) / 6, 2) == 1.25
