"""The model against production references: torch's RMSNorm and SDPA, and transformers' Llama."""

import dataclasses
import json

import pytest
import torch

from checkpoint import load_hf, save_hf
from config import ConfigError, ModelConfig
from model import KVCache, Llama, RMSNorm, causal_mask, reference_attention

transformers = pytest.importorskip("transformers")

# Small configs that still exercise every option the parity claim covers.
PARITY_CONFIGS = {
    "gqa_untied": dict(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=2),
    "gqa_tied": dict(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, tie_embeddings=True),
    "mqa_theta": dict(vocab_size=101, dim=48, n_layers=3, n_heads=6, n_kv_heads=1, rope_theta=500000.0),
    "mha_hidden": dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=72),
    "llama31_rope": dict(vocab_size=67, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                         rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_seq_len=16),
}
TOL = 1e-5


def make_model(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    kw.setdefault("max_seq_len", 64)
    model = Llama(ModelConfig(**kw)).eval()
    with torch.no_grad():  # random norm gains, so a wrong norm placement cannot hide behind ones
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def hf_config(**kw) -> "transformers.LlamaConfig":
    cfg = ModelConfig(**kw)
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor,
                        "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=64, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=cfg.tie_embeddings)


def tokens(vocab_size: int, batch: int = 2, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_ours_to_transformers(name, tmp_path):
    kw = PARITY_CONFIGS[name]
    ours = make_model(**kw)
    save_hf(ours, tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(kw["vocab_size"])
    with torch.no_grad():
        diff = (ours(x)[0] - theirs(x).logits).abs().max().item()
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_transformers_to_ours(name, tmp_path):
    kw = PARITY_CONFIGS[name]
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.05 if p.dim() == 2 else 0.3).add_(1.0 if p.dim() == 1 else 0.0)
    # A tiny shard size forces the sharded layout (model.safetensors.index.json + several files).
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path)
    assert ours.cfg.tie_embeddings == kw.get("tie_embeddings", False)
    if ours.cfg.tie_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    x = tokens(kw["vocab_size"])
    with torch.no_grad():
        diff = (ours(x)[0] - theirs(x).logits).abs().max().item()
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"


def test_training_loss_matches_transformers(tmp_path):
    ours = make_model(**PARITY_CONFIGS["gqa_untied"])
    save_hf(ours, tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(67, length=33)
    _, loss = ours(x[:, :-1], x[:, 1:])
    with torch.no_grad():
        hf_loss = theirs(x, labels=x).loss  # HF shifts the labels itself
    assert abs(loss.item() - hf_loss.item()) <= TOL


def test_saved_config_is_plain_json(tmp_path):
    save_hf(make_model(**PARITY_CONFIGS["llama31_rope"]), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_key_value_heads"] == 2 and saved["rope_scaling"]["rope_type"] == "llama3"
    original = make_model(**PARITY_CONFIGS["llama31_rope"]).cfg
    assert load_hf(tmp_path).cfg == dataclasses.replace(original, hidden_dim=original.ffn_dim)


# --- components against torch's own ---------------------------------------------------------


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(40, eps=1e-5), torch.nn.RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 40) * 5
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("q_len,k_len", [(16, 16), (1, 16), (5, 16)])
def test_reference_attention_matches_sdpa(n_kv_heads, q_len, k_len):
    torch.manual_seed(0)
    q = torch.randn(2, 8, q_len, 16)
    k, v = torch.randn(2, n_kv_heads, k_len, 16), torch.randn(2, n_kv_heads, k_len, 16)
    mask = causal_mask(q_len, k_len, q.device)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(reference_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


def test_reference_model_matches_sdpa_model():
    kw = PARITY_CONFIGS["gqa_untied"]
    sdpa, ref = make_model(**kw), make_model(**kw, attention="reference")
    x = tokens(67)
    torch.testing.assert_close(sdpa(x)[0], ref(x)[0], atol=TOL, rtol=0)


# --- KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_cached_decoding_matches_full_forward(attention, n_kv_heads):
    model = make_model(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=n_kv_heads, attention=attention)
    x = tokens(67, length=20)
    with torch.no_grad():
        full = model(x)[0]
        model.setup_cache(batch_size=2)
        # A multi-token prefill, a multi-token chunk after it (offset mask), then single steps.
        chunks = [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 20)]
        for start, end in chunks:
            step = model(x[:, start:end], start_pos=start)[0]
            torch.testing.assert_close(step, full[:, start:end], atol=TOL, rtol=0)
            last = model.layers[0].self_attn.cache
        model.clear_cache()
    assert last.k.shape == (2, n_kv_heads, 64, 8) and last.v.shape == (2, n_kv_heads, 64, 8)


def test_cache_is_kv_heads_over_heads_of_mha():
    mha = KVCache(1, 8, 128, 16, torch.float32)
    gqa = KVCache(1, 2, 128, 16, torch.float32)
    assert gqa.k.numel() * 4 == mha.k.numel()


def test_last_only_logits_equal_last_row():
    model = make_model(**PARITY_CONFIGS["gqa_tied"])
    x = tokens(67)
    torch.testing.assert_close(model(x, last_only=True)[0], model(x)[0][:, -1:])


def test_too_long_sequence_is_refused():
    model = make_model(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- accounting -------------------------------------------------------------------------------


def test_param_count_and_flops():
    cfg = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    untied, tied = make_model(**cfg), make_model(**cfg, tie_embeddings=True)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert untied.num_params() == 2 * per_layer + 32 + 2 * 100 * 32
    assert tied.num_params() == untied.num_params() - 100 * 32
    assert untied.num_params(non_embedding=True) == untied.num_params() - 100 * 32
    matmul = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64) + 100 * 32
    assert untied.flops_per_token(seq_len=10) == 6 * matmul + 12 * 2 * 32 * 10


def test_init_scales_residual_projections():
    model = Llama(ModelConfig(vocab_size=64, dim=256, n_layers=8, n_heads=4))
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.0005


# --- loading errors ---------------------------------------------------------------------------


def test_load_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_hf(tmp_path)
    hf_config(**PARITY_CONFIGS["gqa_untied"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="only pickled pytorch_model.bin"):
        load_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="only 'llama' is supported"):
        load_hf(tmp_path)
