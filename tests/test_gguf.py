"""convert.py --to gguf: the file read back with gguf's own reader, and (slow) run by llama.cpp itself."""

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from checkpoint import rope_permute, save_hf, write_llama2c
from config import ModelConfig, SampleConfig
from convert import main
from generate import generate
from model import Llama
from test_model import PARITY_CONFIGS, make_model
from tokenizer import EOS, Tokenizer

gguf = pytest.importorskip("gguf")

# Multi-byte characters (2, 3 and 4 bytes in UTF-8) so the char-level mapping has merges to make.
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "A naïve café owner — from 東京 — said: it's 1234 yen 🎉\ttab  and   spaces.\n")


def export(model: Llama, tokenizer: Tokenizer | None, folder, *args: str) -> "gguf.GGUFReader":
    """Save `model` (and its tokenizer) as a checkpoint folder, convert it through the CLI, read it back."""
    save_hf(model, folder)
    if tokenizer is not None:
        tokenizer.save(folder)
    out = folder.parent / f"{folder.name}.gguf"
    assert main([str(folder), "--to", "gguf", str(out), *args]) == 0
    return gguf.GGUFReader(out)


def fields(reader: "gguf.GGUFReader") -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(reader: "gguf.GGUFReader") -> dict[str, tuple[np.ndarray, "gguf.GGMLQuantizationType"]]:
    """Every tensor dequantized to float32 in our (rows, cols) order, with the type it was stored in."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving axis first
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type
    return out


def ours_in_gguf_names(model: Llama) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, written out by hand (no code shared with llamacpp.py)."""
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = model.standard_state_dict()
    named = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not model.cfg.tie_embeddings:
        named["output.weight"] = state["lm_head.weight"]
    for i in range(model.cfg.n_layers):
        named.update({f"blk.{i}.{short}.weight": state[f"layers.{i}.{long}.weight"] for long, short in parts.items()})
    return {k: v.detach().float() for k, v in named.items()}


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """The divisors llama.cpp's converter computes for Llama 3.1 RoPE scaling, per frequency."""
    factors = []
    for i in range(0, cfg.head_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
        low, high = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor, cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(cfg.rope_scaling_factor)
        else:
            smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
                cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
            factors.append(1 / ((1 - smooth) / cfg.rope_scaling_factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The file read back with gguf's reader


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("config", ["gqa_untied", "gqa_tied", "llama31_rope", "wide_heads"])
def test_round_trip_metadata_and_every_tensor(config, dtype, tmp_path):
    cfg = dict(PARITY_CONFIGS[config]) if config in PARITY_CONFIGS else \
        dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32)  # heads wider than dim / n_heads
    tokenizer = Tokenizer.train_char(TEXT)
    cfg["vocab_size"] = tokenizer.vocab_size + 3  # a padded embedding: rows no token maps to
    model = make_model(**cfg)
    reader = export(model, tokenizer, tmp_path / "ckpt", "--dtype", dtype)
    meta, c = fields(reader), model.cfg
    assert meta["general.architecture"] == "llama"
    assert [meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                         "attention.head_count", "attention.head_count_kv", "attention.key_length",
                                         "attention.value_length", "rope.dimension_count", "vocab_size")] == \
        [c.max_seq_len, c.dim, c.n_layers, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, c.head_dim,
         c.vocab_size]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["llama.rope.freq_base"] == c.rope_theta
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert meta["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(c.vocab_size - 3, c.vocab_size)]

    stored, expected = tensors(reader), ours_in_gguf_names(model)
    if c.rope_scaling == "llama3":
        expected["rope_freqs.weight"] = torch.from_numpy(llama3_rope_factors(c))
    assert sorted(stored) == sorted(expected)  # tied: no output.weight, llama.cpp falls back to token_embd
    for name, (array, qtype) in stored.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # back from Meta's pair layout to ours
            array = rope_permute(torch.from_numpy(array.copy()), c.n_heads if "attn_q" in name else c.n_kv_heads).numpy()
        want = expected[name].numpy()
        if array.ndim == 1 or dtype == "f32":
            assert qtype == gguf.GGMLQuantizationType.F32, name
            # rope_freqs: ours are ratios of float32 frequencies, the oracle's are computed in float64
            np.testing.assert_allclose(array, want, rtol=1e-6 if name == "rope_freqs.weight" else 0, err_msg=name)
        elif dtype == "f16":
            assert qtype == gguf.GGMLQuantizationType.F16
            np.testing.assert_allclose(array, want, rtol=2**-11, atol=2**-24, err_msg=name)
        else:  # q8_0: 32-weight blocks, each rounded to steps of d = its largest magnitude / 127, and d
            # itself stored in f16: at most d/2 + 127 * d * 2^-11 = 0.56 d off
            assert qtype == gguf.GGMLQuantizationType.Q8_0
            blocks, error = want.reshape(-1, 32), (array - want).reshape(-1, 32)
            assert (np.abs(error) <= 0.57 * np.abs(blocks).max(1, keepdims=True) / 127 + 1e-7).all(), name


def test_rope_freqs_equal_the_ratio_our_model_applies(tmp_path):
    model = make_model(**PARITY_CONFIGS["llama31_rope"])
    factors = tensors(export(model, Tokenizer.train_char(TEXT), tmp_path / "ckpt"))["rope_freqs.weight"][0]
    scaled = 1 / factors  # llama.cpp divides each base frequency by its factor
    assert not np.allclose(scaled, 1) and not np.allclose(scaled, 1 / 8)  # the test covers all three regimes
    np.testing.assert_allclose(factors, llama3_rope_factors(model.cfg), rtol=1e-6)


def test_q8_0_falls_back_to_f16_for_rows_not_made_of_32_blocks(tmp_path):
    tokenizer = Tokenizer.train_char(TEXT)
    model = make_model(vocab_size=tokenizer.vocab_size, dim=48, n_layers=1, n_heads=4, hidden_dim=64)  # rows of 48
    types = {name: qtype.name for name, (_, qtype) in
             tensors(export(model, tokenizer, tmp_path / "ckpt", "--dtype", "q8_0")).items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # its rows hold hidden_dim=64 weights
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_char_vocab_is_a_byte_level_bpe_that_rebuilds_each_character(tmp_path):
    tokenizer = Tokenizer.train_char(TEXT)
    meta = fields(export(make_model(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4),
                         tokenizer, tmp_path / "ckpt"))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    byte_level = decoders.ByteLevel()
    for i, token in enumerate(tokens):
        if i == tokenizer.eos_id:
            assert token == EOS and types[i] == gguf.TokenType.CONTROL
        else:  # each token is its character's UTF-8 bytes in the byte-level alphabet
            assert byte_level.decode([token]) == tokenizer.decode([i]) and types[i] == gguf.TokenType.NORMAL
    assert tokens[tokenizer.encode(" ")[0]] == "Ġ" and tokens[tokenizer.encode("é")[0]] == "Ã©"
    # merges glue bytes left to right: 2 bytes need 1, 3 bytes 2, 4 bytes 3 (shared prefixes once)
    merges = meta["tokenizer.ggml.merges"]
    assert {"Ã ©", "æĿ ±", "ðŁİ ī", "ðŁ İ", "ð Ł"} <= set(merges)
    assert all(any(t.startswith(m.replace(" ", "")) for t in tokens) for m in merges)  # within one character
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tokenizer.eos_id,) * 2
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("adds_bos", [True, False])
def test_bpe_vocab_merges_specials_and_add_bos_as_the_post_processor_does(adds_bos, tmp_path):
    tokenizer = Tokenizer.train_bpe([TEXT * 5], vocab_size=300)
    # Set explicitly both ways: add_bos_token must follow what the post-processor really adds.
    tokenizer.backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]) if adds_bos else None
    meta = fields(export(make_model(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4),
                         tokenizer, tmp_path / "ckpt"))
    spec = json.loads(tokenizer.backend.to_str())
    assert all(meta["tokenizer.ggml.tokens"][i] == text for text, i in spec["model"]["vocab"].items())
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    # Llama 3's split; ignore_merges=false in our tokenizer.json, which is llama.cpp's "smaug-bpe"
    assert meta["tokenizer.ggml.pre"] == "smaug-bpe"
    ids = {key: meta[f"tokenizer.ggml.{key}_token_id"] for key in ("bos", "eos", "padding")}
    assert ids == {"bos": 0, "eos": 1, "padding": 2}
    assert [meta["tokenizer.ggml.token_type"][i] for i in ids.values()] == [gguf.TokenType.CONTROL] * 3
    assert meta["tokenizer.ggml.add_bos_token"] is adds_bos and meta["tokenizer.ggml.add_eos_token"] is False


def hf_folder_tokenizer(folder, pre_tokenizer, ignore_merges: bool, **config) -> int:
    """A Hugging Face style byte-level BPE tokenizer folder (no nanollama files); returns its size."""
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                     merges=[], ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return backend.get_vocab_size()


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, name", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False), False, "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), False, "smollm"),  # SmolLM2
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
        behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True, "llama-bpe"),
])
def test_hugging_face_pre_tokenizers_map_to_llama_cpp_names(pre_tokenizer, ignore_merges, name, tmp_path):
    folder = tmp_path / "hf"
    size = hf_folder_tokenizer(folder, pre_tokenizer, ignore_merges, eos_token="<|endoftext|>",
                               chat_template="{{ messages[0]['content'] }}")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": size - 2, "eos_token_id": [size - 1, 5]}))
    meta = fields(export(make_model(vocab_size=size, dim=32, n_layers=1, n_heads=4), None, folder))
    assert meta["tokenizer.ggml.pre"] == name
    # generation_config.json's ids win; of several end tokens the first is the EOS
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (size - 2, size - 1)
    assert meta["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("change, message", [
    (lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()])),
     "splits text with Whitespace \\+ ByteLevel before BPE, a pre-tokenizer llama.cpp does not implement"),
    (lambda b: setattr(b, "normalizer", normalizers.NFC()), "normalizes text first \\(NFC\\)"),
    (lambda b: setattr(b, "post_processor", processors.TemplateProcessing(
        single="<|pad|> <|begin_of_text|> $A", special_tokens=[("<|pad|>", 2), ("<|begin_of_text|>", 0)])),
     r"puts \[2, 0\] before and \[\] after a text; llama.cpp can only add one BOS \(0\)"),
])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused_in_one_line(change, message, tmp_path, capsys):
    tokenizer = Tokenizer.train_bpe([TEXT], vocab_size=280)
    change(tokenizer.backend)
    folder = tmp_path / "ckpt"
    save_hf(make_model(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4), folder)
    tokenizer.save(folder)
    assert main([str(folder), str(tmp_path / "m.gguf")]) == 2  # the .gguf name alone picks the format
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "m.gguf").exists()


def llama2_style_tokenizer(texts: list[str], vocab_size: int) -> HFTokenizer:
    """A tokenizer.json shaped like Llama 2's and TinyLlama's: BPE with byte fallback, <unk> <s> </s>
    and the 256 byte pieces first, spaces as "▁" with one in front of the text, BOS added."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


def save_llama2_style(backend: HFTokenizer, folder) -> None:
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))


def test_sentencepiece_style_vocab_scores_bytes_and_space_prefix(tmp_path):
    backend = llama2_style_tokenizer([TEXT * 5], vocab_size=400)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_llama2_style(backend, folder)
    meta = fields(export(make_model(vocab_size=backend.get_vocab_size(), dim=32, n_layers=1, n_heads=4), None, folder))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert "tokenizer.ggml.merges" not in meta and meta["tokenizer.ggml.add_space_prefix"] is True
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[-1] == backend.id_to_token(len(tokens) - 1)
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and set(types[259:]) == {gguf.TokenType.NORMAL}
    merges = json.loads(backend.to_str())["model"]["merges"]
    for rank in (0, 1, len(merges) - 1):  # the token each merge makes scores minus its rank
        assert scores[tokens.index("".join(merges[rank]))] == -rank
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True


def test_metaspace_style_byte_fallback_bpe_is_refused_in_one_line(tmp_path, capsys):
    backend = llama2_style_tokenizer([TEXT], vocab_size=300)
    backend.normalizer = None  # the newer form: a Metaspace pre-tokenizer that prefixes only the first stretch
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    folder = tmp_path / "ckpt"
    save_hf(make_model(vocab_size=backend.get_vocab_size(), dim=32, n_layers=1, n_heads=4), folder)
    save_llama2_style(backend, folder)
    assert main([str(folder), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err == (f"error: {folder / 'tokenizer.json'} is a byte-fallback BPE that does not "
                                       f"handle spaces as Llama 2's tokenizer.json does (a Prepend('▁') + "
                                       f"Replace(' ', '▁') normalizer, no pre-tokenizer); llama.cpp's sentencepiece "
                                       f"tokenizer would give other ids\n")


def test_cli_errors_are_one_line(tmp_path, capsys):
    model = make_model(vocab_size=16, dim=32, n_layers=1, n_heads=4)
    write_llama2c(model, tmp_path / "m.bin")
    cases = {
        ("--to", "gguf", "out.gguf", "--dtype", "q4_0"): "error: --dtype 'q4_0' is not supported; choose one of f32, f16, q8_0",
        ("out.gguf", "--dtype=bf16"): "error: --dtype 'bf16' is not supported; choose one of f32, f16, q8_0",
        ("out.bin", "--dtype", "f16"): "error: --dtype only applies to --to gguf (this writes llama2c)",
        ("--to", "onnx", "out"): "error: --to 'onnx' is not a format; choose one of hf, llama2c, gguf",
        ("out.gguf", "--to"): "error: --to needs a value; usage: python convert.py SRC DST",
        ("out.gguf", "--dtpye", "f16"): "error: unknown option --dtpye; usage: python convert.py SRC DST",
        ("--to", "gguf", "out.gguf"): "error: a llama2.c .bin carries no tokenizer, but a GGUF file must hold one",
    }
    for args, message in cases.items():
        assert main([str(tmp_path / "m.bin"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    tokenizer = Tokenizer.train_char(TEXT)
    folder = tmp_path / "ckpt"
    save_hf(make_model(vocab_size=tokenizer.vocab_size - 1, dim=32, n_layers=1, n_heads=4), folder)
    tokenizer.save(folder)
    assert main([str(folder), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    assert f"has token ids up to {tokenizer.vocab_size - 1} but the model only {tokenizer.vocab_size - 1} " \
           f"embeddings" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python builds it from source: requirements-gguf.txt)

STORY = ("Once upon a time a little fox named Lumi lived by a quiet lake. Every morning Lumi ran to the water, "
         "drank, and watched the herons fish. One day a heron said: \"Why do you run so fast?\" Lumi laughed: "
         "\"Because the café opens at nine — and the croissants go quickly!\" ")


def trained(tokenizer: Tokenizer, steps: int = 300, **cfg) -> Llama:
    """A small model that has memorized STORY, so its greedy path is far from any near-tie."""
    torch.manual_seed(0)
    ids = torch.tensor(tokenizer.encode(STORY * 4))
    model = Llama(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=160, **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (16,)).tolist()
        batch = torch.stack([ids[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def llama_cpp_greedy(path, prompt: list[int], n: int, f32_cache: bool = True) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of `prompt` and its logits after the prompt."""
    import llama_cpp
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, **cache)
    try:
        llm.eval(prompt)
        logits = np.array(llm.scores[len(prompt) - 1])
        return list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0), n)), logits
    finally:
        llm.close()


def ours_greedy(model: Llama, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor, float]:
    """Our greedy continuation, our logits after the prompt, and the smallest top-1/top-2 gap on the way."""
    tokens = list(generate(model, [prompt], SampleConfig(temperature=0.0, max_new_tokens=n)))[-1][0].token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0][0, len(prompt) - 1:]
    top2 = logits.topk(2).values
    return tokens, logits[0], (top2[:, 0] - top2[:, 1]).min().item()


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    tokenizer = Tokenizer.train_char(STORY)
    # GQA and Llama 3.1 RoPE scaling (over a short original window, so it acts inside the test's positions)
    model = trained(tokenizer, n_kv_heads=2, rope_scaling="llama3", rope_original_max_seq_len=32)
    folder = tmp_path_factory.mktemp("char") / "ckpt"
    export(model, tokenizer, folder, "--dtype", "f32")
    return tokenizer, model, folder.parent


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    tokenizer = Tokenizer.train_bpe([STORY * 4], vocab_size=320)
    model = trained(tokenizer, tie_embeddings=True, head_dim=32)  # heads wider than dim / n_heads = 16
    folder = tmp_path_factory.mktemp("bpe") / "ckpt"
    export(model, tokenizer, folder, "--dtype", "f32")
    return tokenizer, model, folder.parent


@pytest.fixture(scope="module")
def llama2_model(tmp_path_factory):
    backend = llama2_style_tokenizer([STORY * 4], vocab_size=360)
    tokenizer = Tokenizer(backend, "bpe")  # encode and decode through the wrapper, as for ours
    model = trained(tokenizer)
    folder = tmp_path_factory.mktemp("llama2") / "ckpt"
    folder.mkdir()
    save_llama2_style(backend, folder)
    export(model, None, folder, "--dtype", "f32")
    return tokenizer, model, folder.parent


MODELS = ["char_model", "bpe_model", "llama2_model"]


@pytest.mark.slow
@pytest.mark.parametrize("which", MODELS)
def test_llama_cpp_tokenizes_like_us(which, request):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer, _, folder = request.getfixturevalue(which)
    llm = llama_cpp.Llama(str(folder / "ckpt.gguf"), vocab_only=True, verbose=False)
    try:
        eos = next(t for t in (EOS, "</s>") if tokenizer.backend.token_to_id(t) is not None)
        texts = [STORY, STORY[:40] + eos + STORY[40:], "  Lumi,   the café — \"Why?\"  "]
        if tokenizer.kind != "char":  # a BPE covers any text, not only the story's characters
            texts += ["naïve 東京 🎉🦙 it's THEY'RE 1234567 3.14   runs \r\n\n\tx", "x" * 50, ""]
        for text in texts:
            for add_bos in (False, True):
                ours = tokenizer.backend.encode(text, add_special_tokens=add_bos).ids
                assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == ours, (text, add_bos)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("which", MODELS)
def test_llama_cpp_runs_the_f32_file_exactly_as_we_do(which, request):
    pytest.importorskip("llama_cpp")  # before the fixture trains a model for nothing
    tokenizer, model, folder = request.getfixturevalue(which)
    prompt = tokenizer.encode("Every morning Lumi")  # the model learned the story without BOS
    ours, our_logits, margin = ours_greedy(model, prompt, 32)
    assert margin > 0.1  # no near-tie on the path, so equal tokens are a real check
    for f32_cache in (True, False):  # llama.cpp's default KV cache is f16
        theirs, their_logits = llama_cpp_greedy(folder / "ckpt.gguf", prompt, 32, f32_cache)
        print(f"{which} f32 ({'f32' if f32_cache else 'f16'} KV cache): smallest top-2 gap {margin:.2f}, "
              f"logits max |diff| {np.abs(their_logits - our_logits.numpy()).max():.2e}")
        assert theirs == ours
        # measured: 3.8e-6 (char) and 5.3e-6 (BPE) with an f32 cache, 1e-3 with llama.cpp's default f16 one
        np.testing.assert_allclose(their_logits, our_logits.numpy(), atol=1e-5 if f32_cache else 5e-3)
    assert "the water" in tokenizer.decode(ours) or "heron" in tokenizer.decode(ours)  # it did learn the story


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_runs_smaller_dtypes_close_to_us(dtype, request, tmp_path):
    pytest.importorskip("llama_cpp")
    for which in MODELS:
        tokenizer, model, folder = request.getfixturevalue(which)
        out = tmp_path / f"{which}-{dtype}.gguf"
        assert main([str(folder / "ckpt"), "--to", "gguf", str(out), "--dtype", dtype]) == 0
        prompt = tokenizer.encode("One day a heron")
        ours, our_logits, _ = ours_greedy(model, prompt, 32)
        theirs, their_logits = llama_cpp_greedy(out, prompt, 32, f32_cache=False)
        agree = sum(a == b for a, b in zip(ours, theirs))
        print(f"{which} {dtype}: {agree}/32 greedy tokens agree, first logits max |diff| "
              f"{np.abs(their_logits - our_logits.numpy()).max():.4f}")
        assert agree >= 30  # measured: 32/32 for both dtypes and all three tokenizers


@pytest.mark.slow
def test_llama_cpp_loads_an_ascii_char_vocabulary_that_needs_no_merge(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tokenizer = Tokenizer.train_char(text)
    meta = fields(export(make_model(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4), tokenizer,
                         tmp_path / "ckpt"))
    assert meta["tokenizer.ggml.merges"] == ["Ġ Ģ"]  # llama.cpp needs a merge list: one that never applies
    llm = llama_cpp.Llama(str(tmp_path / "ckpt.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
    finally:
        llm.close()
