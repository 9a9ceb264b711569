"""generate.py: greedy decoding against transformers, the sampling filters on fixed logits,
batching, reproducibility, the command line and its one-line errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import ConfigError, SampleConfig, build_config, expand_short_flags
from checkpoint import read_llama2c, save_hf, write_llama2c
from decoding import use_decoding_layout
from engine import (Completion, apply_repetition_penalty, compile_decode_step, min_p_filter, sample_next, top_k_filter,
                    top_p_filter)
from generate import generate, hold_back, main
from test_convert import STORIES
from test_model import make_model

transformers = pytest.importorskip("transformers")

GQA = dict(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=128)
ROOT = Path(__file__).resolve().parent.parent


def decode(model, prompts, **sample) -> list[Completion]:
    cfg = SampleConfig(**{"temperature": 0.0, "max_new_tokens": 16, **sample})
    for rows in generate(model, prompts, cfg):
        pass
    return rows


# --- decoding ---------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(tmp_path):
    ours = make_model(**GQA)
    save_hf(ours, tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [5, 17, 3, 60, 22, 9, 41]
    expected = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert decode(ours, [prompt], max_new_tokens=64)[0].token_ids == expected


def test_cached_uncached_and_fixed_shape_decoding_agree():
    model = make_model(**GQA)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=24)
    prompts = [[1, 2, 3, 4, 5]]
    cached = []
    for rows in generate(model, prompts, cfg):
        assert not torch.is_inference_mode_enabled()  # never leaks into the caller's code
        cached = [r.token_ids for r in rows]
    uncached = [r.token_ids for r in list(generate(model, prompts, cfg, use_cache=False))[-1]]
    # The compiled step's code path (tensor position, whole-cache attention), run eagerly here.
    def fixed_shape_step(tokens, positions):
        return model(tokens, start_pos=positions)[0]
    fixed = [r.token_ids for r in list(generate(model, prompts, cfg, decode_step=fixed_shape_step))[-1]]
    assert cached == uncached == fixed and len(cached[0]) == 24


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gqa", "stories260K"])
def test_compiled_decoding_matches_eager(which):
    if which == "stories260K" and not STORIES.is_file():
        pytest.skip("../shared/data/stories260K.bin is absent")
    model = make_model(**GQA) if which == "gqa" else read_llama2c(STORIES).eval()
    step = compile_decode_step(model)
    for prompts in ([[1, 2, 3], [4, 5, 6, 7, 8, 9]], [[9, 8, 7, 6]], [[10, 11, 12, 13]]):  # fresh caches, same step
        eager = decode(model, prompts, max_new_tokens=12)
        compiled = list(generate(model, prompts, SampleConfig(temperature=0.0, max_new_tokens=12), decode_step=step))[-1]
        assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]


@pytest.mark.slow
def test_compile_time_is_reported_apart_from_tokens_per_second(tmp_path, capsys):
    save_hf(make_model(**GQA), tmp_path)
    assert main(["--checkpoint", str(tmp_path), "--prompt_ids", "1 2 3", "--max_new_tokens", "8", "--compile",
                 "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["compile_s"] > 0 and "compiling took" in out.err and "not counted" in out.err


@pytest.mark.parametrize("tied", [False, True])
def test_decoding_layout_keeps_logits_and_tokens(tied):
    model = make_model(**GQA, tie_embeddings=tied)
    tokens = torch.tensor([[5, 17, 3, 60, 22, 9, 41]])
    before, greedy = model(tokens)[0], decode(model, [tokens[0].tolist()], max_new_tokens=32)[0].token_ids
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    use_decoding_layout(model)
    assert not model.layers[0].mlp.up_proj.weight.is_contiguous()  # widening: transposed in memory
    assert model.layers[0].mlp.down_proj.weight.is_contiguous()  # narrowing: as it was
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert (model(tokens)[0] - before).abs().max() <= 1e-5
    assert decode(model, [tokens[0].tolist()], max_new_tokens=32)[0].token_ids == greedy


def test_batched_rows_of_different_lengths_equal_solo_runs():
    model = make_model(**GQA)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [30]]
    for sample in (dict(), dict(temperature=1.0, top_k=20, seed=3, num_samples=2)):
        batched = decode(model, prompts, **sample)
        solo = [row for p in prompts for row in decode(model, [p], **sample)]
        assert [r.token_ids for r in batched] == [r.token_ids for r in solo]
    with torch.no_grad():  # and the logits themselves: two cache rows at their own positions
        model.setup_cache(2, max_seq_len=16)
        model(torch.tensor([[1, 2]]), start_pos=0, cache_rows=0)
        model(torch.tensor([[7, 8, 9, 10, 11, 12, 13]]), start_pos=0, cache_rows=1)
        logits = model(torch.tensor([[3, 4], [14, 15]]), start_pos=torch.tensor([2, 7]))[0]
        model.clear_cache()
        torch.testing.assert_close(logits[0], model(torch.tensor([[1, 2, 3, 4]]))[0][0, 2:], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], model(torch.tensor([prompts[1] + [15]]))[0][0, 7:], atol=1e-5, rtol=0)


def test_every_prompt_and_sample_draws_its_own_stream():
    """Rows of different prompts in one batch must not share random draws (they once did, through
    seed + sample): with a uniform next-token distribution, their draws are independent."""
    model = make_model(**GQA)
    torch.nn.init.zeros_(model.lm_head.weight)  # every token equally likely: the draws are the stream
    cfg = SampleConfig(temperature=1.0, max_new_tokens=40, num_samples=2, seed=5)
    rows = list(generate(model, [[1, 2, 3], [4, 5, 6]], cfg))[-1]
    draws = [r.token_ids for r in rows]
    assert len({tuple(d) for d in draws}) == 4  # 2 prompts x 2 samples, four different streams
    assert all(sum(a == b for a, b in zip(draws[0], d)) < 10 for d in draws[1:])  # no shared run of draws
    again = list(generate(model, [[4, 5, 6]], cfg))[-1]  # reproducible, and whatever shares the batch
    assert [r.token_ids for r in again] == draws[2:]


def test_same_seed_same_tokens_and_eos_stops():
    model = make_model(**GQA)
    kw = dict(temperature=1.0, max_new_tokens=20, num_samples=2)
    first, again, other = decode(model, [[1, 2]], **kw), decode(model, [[1, 2]], **kw), decode(model, [[1, 2]], seed=7, **kw)
    assert [r.token_ids for r in first] == [r.token_ids for r in again] != [r.token_ids for r in other]
    assert first[0].token_ids != first[1].token_ids  # samples of one prompt differ
    eos = first[0].token_ids[5]
    cfg = SampleConfig(temperature=1.0, max_new_tokens=20)
    row = list(generate(model, [[1, 2]], cfg, eos_ids=[eos]))[-1][0]
    assert row.finish_reason == "eos" and row.token_ids == first[0].token_ids[:first[0].token_ids.index(eos)]


def test_decoding_slides_past_the_context():
    """Past the context a row's window slides to its last context // 2 tokens, read again from
    position 0: cached, uncached and fixed-shape decoding agree, batched rows equal solo ones,
    and every step equals a plain forward over the row's window."""
    model = make_model(**{**GQA, "max_seq_len": 10})
    prompts, cfg = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]], SampleConfig(temperature=0.0, max_new_tokens=30)

    def fixed_shape_step(tokens, positions):
        return model(tokens, start_pos=positions)[0]

    runs = [list(generate(model, prompts, cfg, **kw))[-1] for kw in ({}, {"use_cache": False},
                                                                     {"decode_step": fixed_shape_step})]
    solo = [list(generate(model, [p], cfg))[-1][0] for p in prompts]
    tokens = [[r.token_ids for r in rows] for rows in runs + [solo]]
    assert all(t == tokens[0] for t in tokens) and all(len(t) == 30 for t in tokens[0])
    for prompt, generated in zip(prompts, tokens[0]):  # the reference: re-read the window every step
        window = list(prompt)
        with torch.no_grad():
            for token in generated:
                assert model(torch.tensor([window]))[0][0, -1].argmax().item() == token
                window = (window + [token])[-5:] if len(window) == 10 else window + [token]


# --- sampling on fixed logits -----------------------------------------------------------------


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0, 2.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.sum() == 2 and bool((logits[kept] == 3.0).all())
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    kept = top_k_filter(logits, 5).isfinite()
    assert (kept.sum(-1) == 5).all()
    assert (logits.masked_fill(~kept, float("inf")).amin(-1) >= logits.masked_fill(kept, float("-inf")).amax(-1)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    for p, expected in ((0.45, [1]), (0.7, [1, 3]), (0.9, [1, 2, 3]), (0.99, [0, 1, 2, 3])):
        assert top_p_filter(logits, p).isfinite()[0].nonzero().flatten().tolist() == expected
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    kept = top_p_filter(logits, 0.6).isfinite()
    probs = logits.softmax(-1)
    for row in range(8):  # brute force: the k most likely, k the first count whose mass reaches p
        ordered = probs[row].sort(descending=True).values
        k = int((ordered.cumsum(0) < 0.6).sum()) + 1
        assert kept[row].sum() == k and probs[row][kept[row]].min() >= ordered[k - 1]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = torch.tensor([[0.5, 0.3, 0.12, 0.08]]).log()
    assert min_p_filter(logits, 0.2).isfinite()[0].tolist() == [True, True, True, False]
    assert min_p_filter(logits, 0.7).isfinite()[0].tolist() == [True, False, False, False]


def test_repetition_penalty_equals_transformers():
    scores = torch.randn(3, 30, generator=torch.Generator().manual_seed(2)) * 3
    input_ids = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(3))
    seen = torch.zeros(3, 30, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(input_ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.3), expected, rtol=0, atol=0)


def test_sampling_never_leaves_the_filtered_set():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(4))
    top3 = set(logits[0].topk(3).indices.tolist())
    cfg = SampleConfig(temperature=1.5, top_k=3)
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(1, 100, dtype=torch.bool)
    draws = {sample_next(logits, seen, cfg, [generator]).item() for _ in range(300)}
    assert draws == top3  # all three, and nothing else
    assert sample_next(logits, seen, SampleConfig(temperature=0.0), [generator]).item() == logits.argmax().item()


def test_hold_back_waits_for_partial_characters_and_stop_strings():
    assert hold_back("once upon\ufffd", []) == 1
    assert hold_back("The en", ["The end"]) == 6
    assert hold_back("so. The", ["The end", "\n\n"]) == 3
    assert hold_back("done\n", ["\n\n"]) == 1
    assert hold_back("nothing", ["\n\n"]) == 0


# --- command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A run folder: `latest` names ckpt-000002, a HF folder with a tiny byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    run = tmp_path_factory.mktemp("run")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["once upon a time there was a tiny model"] * 20, trainer)
    folder = run / "ckpt-000002"
    save_hf(make_model(**{**GQA, "vocab_size": 300, "max_seq_len": 64}), folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (run / "latest").write_text("ckpt-000002\n")
    return run


def cli(capsys, *args: str) -> list[dict]:
    main(list(args))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_json_stop_strings_and_streaming(checkpoint_dir, capsys):
    base = ["--checkpoint", str(checkpoint_dir), "--prompt", "once upon", "--temperature", "0",
            "--max_new_tokens", "20"]
    (full,) = cli(capsys, *base, "--json")
    # The tokenizer's post-processor adds no BOS, so neither does the prompt: it is what AutoTokenizer gives.
    expected = transformers.AutoTokenizer.from_pretrained(checkpoint_dir / "ckpt-000002")("once upon")["input_ids"]
    assert full["prompt_ids"] == expected and full["finish_reason"] == "length" and len(full["token_ids"]) == 20
    stop = full["text"][6:9]
    (stopped,) = cli(capsys, *base, "--json", "--stop", stop)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full["text"][:full["text"].find(stop)]
    main(base + ["--stream", "--stop", stop])
    assert capsys.readouterr().out == "once upon" + stopped["text"] + "\n"
    rows = cli(capsys, *base, "--json", "--sample.temperature=1", "--num_samples", "2", "--prompt", "a\nonce",
               "--batch_lines")
    assert [r["prompt"] for r in rows] == ["a", "a", "once", "once"] and [r["sample"] for r in rows] == [0, 1, 0, 1]


def test_cli_truncates_only_when_asked(checkpoint_dir, capsys):
    long_ids = " ".join(["5"] * 70)
    assert main(["--checkpoint", str(checkpoint_dir), "--prompt_ids", long_ids]) == 2
    assert capsys.readouterr().err == ("error: the prompt has 70 tokens but the model's context is 64: shorten it, "
                                       "or pass --truncate left to keep its last tokens\n")
    (row,) = cli(capsys, "--checkpoint", str(checkpoint_dir), "--prompt_ids", long_ids, "--truncate", "left",
                 "--max_new_tokens", "10", "--json")
    assert len(row["prompt_ids"]) == 64 and len(row["token_ids"]) == 10  # the window slides past the context


def test_int8_without_compile_says_so_and_decodes_in_float(checkpoint_dir, capsys):
    """Eager int8 would convert whole matrices every call, slower than the float weights: generate.py
    (and app.py, through load_for_sampling) keeps them and says so in one line."""
    base = ["--checkpoint", str(checkpoint_dir), "--prompt_ids", "5 6 7", "--max_new_tokens", "12", "--json"]
    (plain,) = cli(capsys, *base)
    main(base + ["--quantize", "int8"])
    out = capsys.readouterr()
    assert out.err.splitlines()[0] == "note: int8 is faster than float32 only compiled: decoding in float32 (add --compile for int8)"
    assert json.loads(out.out)["token_ids"] == plain["token_ids"]


def test_short_flags_map_to_the_sample_section():
    assert expand_short_flags(["--checkpoint", "x", "--json", "--top_k=5", "--compile", "--sample.stream"], ("sample",)) == [
        "--sample.checkpoint", "x", "--sample.json", "true", "--sample.top_k=5", "--sample.compile", "true",
        "--sample.stream", "true"]
    assert expand_short_flags(["cfg.toml", "--json", "false", "--model.dim", "8"], ("sample",)) == [
        "cfg.toml", "--sample.json", "false", "--model.dim", "8"]


@pytest.mark.parametrize("override,message", [
    (["--sample.top_p", "0"], "sample.top_p=0.0 must lie in (0, 1]"),
    (["--sample.top_p", "1.5"], "sample.top_p=1.5 must lie in (0, 1]"),
    (["--sample.top_k", "-1"], "sample.top_k=-1 must not be negative"),
    (["--sample.temperature", "-0.5"], "sample.temperature=-0.5 must lie in [0, 2]"),
    (["--sample.max_new_tokens", "0"], "sample.max_new_tokens=0 must be positive"),
    (["--sample.min_p", "1"], "sample.min_p=1.0 must lie in [0, 1)"),
    (["--sample.prompt", "a", "--sample.prompt_ids", "1"], "sample.prompt and sample.prompt_ids are both set"),
    (["--sample.eos", "two"], "sample.eos='two' must be auto, none or token ids"),
    (["--sample.prompt_ids", "1 x"], "sample.prompt_ids='1 x' must be integers"),
    (["--sample.stop", "[1]"], "is no JSON list of non-empty strings"),
    (["--sample.truncate", "right"], "bad value for sample.truncate: 'right' (expected none | left)"),
])
def test_bad_sample_config_messages(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=override)


@pytest.mark.parametrize("args,message", [
    ([], "error: no checkpoint given: pass --checkpoint PATH"),
    (["--checkpoint", "nowhere"], "error: checkpoint nowhere does not exist"),
    (["--checkpoint", "{bin}", "--prompt", "hi"], "has no tokenizer.json: give the prompt as token ids"),
    (["--checkpoint", "{bin}", "--stop", "x"], "stop strings need a tokenizer"),
    (["--checkpoint", "{bin}", "--prompt_ids", "1 16"], "prompt token id 16 is outside the vocabulary of {bin} (0..15)"),
])
def test_bad_cli_input_is_one_line(args, message, tmp_path, capsys):
    write_llama2c(make_model(vocab_size=16, dim=16, n_layers=1, n_heads=2), tmp_path / "m.bin")
    code = main([a.format(bin=tmp_path / "m.bin") for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.format(bin=tmp_path / "m.bin") in err


def test_cli_error_in_a_subprocess():
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", "x", "--top_p", "2"], cwd=ROOT,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2 and result.stderr == "error: sample.top_p=2.0 must lie in (0, 1]\n"
