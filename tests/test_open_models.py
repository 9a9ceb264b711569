"""Open models in and out: a pretrained Hugging Face Llama folder with its own tokenizer is
prepared for, fine-tuned, sampled and loaded back in transformers, with the same ids at every
stage. Everything is built here, offline: a random Llama saved by transformers (sharded, with a
head_dim that is not dim / n_heads) and a byte-level BPE made with the tokenizers library."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import app
import checkpoint
import data
import generate
from config import DataConfig, SampleConfig, ServeConfig, UserError
from prepare_data import prepare
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["Once upon a time there was a tiny model.", "It learned to speak — un peu — in short stories.",
        "Ünïcode and emoji 🙂 survive the bytes.", "The end came quickly, as ends do.",
        "Another story began the next morning.", "Numbers like 12345 split into groups."] * 6
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
GENERATION = {"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def make_tokenizer(folder: Path, adds_bos: bool) -> HFTokenizer:
    """A byte-level BPE whose post-processor adds BOS (Llama style) or nothing (GPT-2 style)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(DOCS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<|eot|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE}, indent=2))
    return backend


def make_pretrained(folder: Path, adds_bos: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """A random Llama as transformers saves it, in shards, with the tokenizer and a
    generation_config.json that lists two EOS ids."""
    backend = make_tokenizer(folder, adds_bos)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, max_shard_size="40KB")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return make_pretrained(tmp_path_factory.mktemp("pretrained"))


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def prepared_ids(folder: Path, split: str) -> list[int]:
    return data.read_tokens(folder / f"{split}.bin").tokens.tolist()


@pytest.mark.parametrize("adds_bos", [True, False])
def test_data_prepared_with_a_tokenizer_folder_has_autotokenizers_ids(adds_bos, tmp_path):
    folder = tmp_path / "tok"
    make_tokenizer(folder, adds_bos)
    meta = prepare(DataConfig(dataset="docs", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                              tokenizer=str(folder), workers=1, val_fraction=0.25))
    out = tmp_path / "data" / "docs"
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    documents = {"train": [d for i, d in enumerate(DOCS) if int((i + 1) * 0.25) == int(i * 0.25)],
                 "val": [d for i, d in enumerate(DOCS) if int((i + 1) * 0.25) > int(i * 0.25)]}
    for split, docs in documents.items():
        expected = [t for d in docs for t in auto(d)["input_ids"] + [auto.eos_token_id]]
        assert prepared_ids(out, split) == expected
    assert (prepared_ids(out, "train")[0] == auto.bos_token_id) == adds_bos
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert meta["tokenizer"] == "pretrained" and meta["dtype"] == "uint16"
    assert meta["document_prefix"] == ([auto.bos_token_id] if adds_bos else [])


def test_a_vocabulary_above_65535_ids_is_stored_as_uint32(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "bos_token": "<s>", "eos_token": "</s>"}))
    text = tmp_path / "words.jsonl"
    docs = [f"w69999 w{i} w65534 w3" for i in range(8)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare(DataConfig(dataset="big", data_dir=str(tmp_path / "data"), input=str(text),
                              tokenizer=str(folder), workers=1, val_fraction=0.25))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    train = [d for i, d in enumerate(docs) if int((i + 1) * 0.25) == int(i * 0.25)]
    assert prepared_ids(tmp_path / "data" / "big", "train") == [t for d in train for t in auto(d)["input_ids"] + [1]]
    assert max(prepared_ids(tmp_path / "data" / "big", "train")) == 70_001


def test_our_own_tokenizers_follow_the_same_policy(tmp_path):
    """Our BPE starts documents with BOS as Llama's do; char level adds nothing. Data, prompts
    and AutoTokenizer agree either way."""
    text = "\n".join(DOCS)
    for kind, tokenizer in (("bpe", Tokenizer.train_bpe([text], 300)), ("char", Tokenizer.train_char(text))):
        tokenizer.save(tmp_path / kind)
        auto = transformers.AutoTokenizer.from_pretrained(tmp_path / kind)
        assert tokenizer.encode_documents([DOCS[0]]) == [auto(DOCS[0])["input_ids"] + [tokenizer.eos_id]]
        assert tokenizer.encode_document("Once") == tokenizer.prefix + tokenizer.encode("Once") == auto("Once")["input_ids"]
        assert tokenizer.prefix == ([tokenizer.bos_id] if kind == "bpe" else [])
        assert tokenizer.start_ids() == [tokenizer.bos_id]


def run_train(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--train.device", "cpu", "--train.compile", "false",
                           "--train.micro_batch_size", "4", "--train.block_size", "32", "--train.batch_tokens", "128",
                           "--train.warmup_steps", "2", "--train.lr", "1e-3", "--train.log_interval", "5", *extra],
                          cwd=ROOT, capture_output=True, text=True)


def test_fine_tune_a_pretrained_folder_and_hand_it_back_to_transformers(pretrained, tmp_path):
    prepare(DataConfig(dataset="docs", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                       tokenizer=str(pretrained), workers=1, val_fraction=0.25))
    result = run_train("--train.init_from", str(pretrained), "--data.data_dir", str(tmp_path / "data"),
                       "--data.dataset", "docs", "--train.out_dir", str(tmp_path / "run"), "--train.max_steps", "20",
                       "--train.eval_interval", "10", "--train.eval_iters", "2")
    assert result.returncode == 0, result.stderr
    assert "kept its max_seq_len=512, rope_theta=50000.0, rope_scaling=none" in result.stdout + result.stderr
    ckpt = checkpoint.resolve(tmp_path / "run")

    # A drop-in replacement: the model's own tokenizer files, chat template and generation config.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (pretrained / name).read_bytes()
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["max_position_embeddings"], config["head_dim"], config["rope_theta"]) == (512, 16, 50000.0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    auto = transformers.AutoTokenizer.from_pretrained(ckpt)
    ours, _ = checkpoint.load_model(ckpt)
    tokens = torch.tensor([auto(DOCS[1])["input_ids"]])
    with torch.no_grad():
        assert (ours.eval()(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-5
        before = transformers.AutoModelForCausalLM.from_pretrained(pretrained)(tokens).logits
        assert (hf(tokens).logits - before).abs().max().item() > 1e-3  # it did train

    # Greedy decoding through generate.py: the prompt's ids and the new ids are transformers'.
    out = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(ckpt), "--prompt", "Once upon",
                          "--temperature", "0", "--max_new_tokens", "12", "--json"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    prompt_ids = auto("Once upon")["input_ids"]
    assert row["prompt_ids"] == prompt_ids and prompt_ids[0] == auto.bos_token_id
    with torch.no_grad():
        reference = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)[0, len(prompt_ids):]
    assert row["token_ids"] == reference.tolist()[:len(row["token_ids"])]
    assert row["text"] == auto.decode(row["token_ids"])


def test_sampling_takes_eos_ids_and_defaults_from_generation_config(pretrained, capsys, tmp_path):
    loaded = generate.load_for_sampling(SampleConfig(checkpoint=str(pretrained)))
    assert loaded.eos == [1, 2] and loaded.prefix == [0]
    cfg, chosen = generate.with_generation_defaults(SampleConfig(checkpoint=str(pretrained)), set())
    assert (cfg.temperature, cfg.top_p, chosen) == (0.7, 0.9, {"temperature", "top_p"})
    assert "generation_config.json defaults: temperature=0.7, top_p=0.9" in capsys.readouterr().err
    cfg, chosen = generate.with_generation_defaults(SampleConfig(checkpoint=str(pretrained), temperature=0.2),
                                                    {"sample.temperature"})
    assert (cfg.temperature, cfg.top_p) == (0.2, 0.9)
    greedy = tmp_path / "greedy"
    greedy.mkdir()
    (greedy / "config.json").write_bytes((pretrained / "config.json").read_bytes())
    (greedy / "generation_config.json").write_text(json.dumps({**GENERATION, "do_sample": False}))
    assert generate.generation_defaults(str(greedy)) == {"temperature": 0.0}  # as transformers' generate decodes

    # The server: a request that leaves temperature out gets the checkpoint's, one that sets it keeps it.
    sample, chosen = generate.with_generation_defaults(SampleConfig(checkpoint=str(pretrained)), set())
    engine = app.Server(sample, ServeConfig(), chosen)
    body = {"model": engine.name, "prompt": "Once"}
    _, ids, cfg, _ = app.parse_request(json.dumps(body).encode(), engine, ServeConfig())
    assert (cfg.temperature, cfg.top_p, cfg.top_k, ids) == (0.7, 0.9, 0, [[0, *engine.tokenizer.encode("Once")]])
    _, _, cfg, _ = app.parse_request(json.dumps({**body, "temperature": 0.3}).encode(), engine, ServeConfig())
    assert (cfg.temperature, cfg.top_p) == (0.3, 0.9)


def test_init_from_refuses_data_from_another_tokenizer(pretrained, tmp_path):
    prepare(DataConfig(dataset="chars", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                       tokenizer="char", workers=1))
    result = run_train("--train.init_from", str(pretrained), "--data.data_dir", str(tmp_path / "data"),
                       "--data.dataset", "chars", "--train.out_dir", str(tmp_path / "run"), "--train.max_steps", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(tmp_path / "data" / "chars" / "train.bin") in result.stderr and str(pretrained) in result.stderr
    assert f"--data.tokenizer {pretrained}" in result.stderr


def test_init_from_keeps_an_explicit_context_and_refuses_what_is_no_llama(pretrained, tmp_path):
    prepare(DataConfig(dataset="docs", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                       tokenizer=str(pretrained), workers=1, val_fraction=0.25))
    common = ["--data.data_dir", str(tmp_path / "data"), "--data.dataset", "docs", "--train.max_steps", "2",
              "--train.eval_interval", "1", "--train.eval_iters", "1"]
    result = run_train("--train.init_from", str(pretrained), "--model.max_seq_len", "64", "--model.dim", "48",
                       "--train.out_dir", str(tmp_path / "run"), *common)
    assert result.returncode == 0, result.stderr
    assert "the config sets max_seq_len=64" in result.stdout + result.stderr
    assert "model.dim ignored" in result.stderr
    assert checkpoint.read_hf_config(checkpoint.resolve(tmp_path / "run")).max_seq_len == 64

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run_train("--train.init_from", str(gpt2), "--train.out_dir", str(tmp_path / "run2"), *common)
    assert result.returncode == 2 and "model_type='gpt2'; only 'llama' is supported" in result.stderr
    result = run_train("--train.init_from", str(tmp_path / "nowhere"), "--train.out_dir", str(tmp_path / "run3"), *common)
    assert result.returncode == 2 and "is not a folder: give a Hugging Face Llama folder" in result.stderr


def test_bf16_sharded_weights_load_as_fp32_one_tensor_at_a_time(tmp_path, monkeypatch):
    folder = make_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    reads = []
    get = checkpoint.SafetensorsWeights.__getitem__
    monkeypatch.setattr(checkpoint.SafetensorsWeights, "__getitem__", lambda self, k: reads.append(k) or get(self, k))
    model = checkpoint.load_hf(folder)
    assert len(reads) == len(set(reads)) == len(model.state_dict())  # each tensor read once, when needed
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight.float())


def test_tokenizer_folder_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(UserError, match="a sentencepiece tokenizer.model alone is not enough"):
        Tokenizer.load(tmp_path / "empty")
    with pytest.raises(UserError, match="neither char, bpe nor an existing folder"):
        prepare(DataConfig(dataset="x", data_dir=str(tmp_path), input=str(corpus(tmp_path)), tokenizer="nope"))
    folder = tmp_path / "noeos"
    folder.mkdir()
    backend = HFTokenizer(models.WordLevel({"a": 0}, unk_token=None))
    backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match="has no EOS token to end documents with: set eos_token"):
        prepare(DataConfig(dataset="x", data_dir=str(tmp_path), input=str(corpus(tmp_path)), tokenizer=str(folder)))


def test_data_and_model_vocab_must_fit(pretrained, tmp_path):
    """A tokenizer larger than the model's embedding is refused before training starts."""
    prepare(DataConfig(dataset="docs", data_dir=str(tmp_path / "data"), input=str(corpus(tmp_path)),
                       tokenizer=str(pretrained), workers=1, val_fraction=0.25))
    train = data.read_tokens(tmp_path / "data" / "docs" / "train.bin")
    with pytest.raises(data.DataError, match="does not fit model.vocab_size=100: set --model.vocab_size 320"):
        data.check_compatible(train, train, model_vocab_size=100, block_size=8)
    with pytest.raises(data.DataError, match="does not fit model.vocab_size=100: prepare the data with the model's "
                                             "own tokenizer \\(base\\)"):
        data.check_compatible(train, train, model_vocab_size=100, block_size=8,
                              model_tokenizer=(train.tokenizer_hash, "base", "unused"))
    assert np.asarray(train.tokens).max() < train.vocab_size
