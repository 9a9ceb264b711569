"""The decoding fast paths: the on-device sampling loop against a plain host-side loop, fused
projections, int8 weights, and (with a GPU) a decoding loop that never waits for the device."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

import checkpoint
import data
from config import SampleConfig
from decoding import (Int8Linear, RowwiseLinear, fuse_projections, linear_from, pack_int8_columns, packed_one_row_matmul,
                      prepare_for_decoding, unfuse_projections, unpack_int8_columns)
from engine import Speculation, compile_decode_step, decode_compile_options, next_token_probs, row_seed
from generate import main, generate, speculative_generate
from model import attention_order
from test_convert import STORIES
from test_model import make_model
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GQA = dict(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=128)


def last_rows(model, prompts, cfg, **kw):
    for rows in generate(model, prompts, cfg, **kw):
        pass
    return rows


def reference_sample(model, prompt: list[int], sample: int, cfg: SampleConfig) -> list[int]:
    """One row decoded the plain way: the whole sequence through the model every step, the
    filters written out on a host-side copy of the logits, the row's own generator."""
    generator = torch.Generator().manual_seed(row_seed(cfg.seed, prompt, sample))
    ids, out = list(prompt), []
    for _ in range(cfg.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1].float().clone()
        for t in set(ids):
            logits[t] = logits[t] / cfg.repetition_penalty if logits[t] > 0 else logits[t] * cfg.repetition_penalty
        logits /= cfg.temperature
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[logits.topk(cfg.top_k).indices] = True
        mass = 0.0
        for t in logits.masked_fill(~keep, float("-inf")).softmax(-1).argsort(descending=True).tolist():
            probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
            if mass >= cfg.top_p:
                keep[t] = False
            mass += probs[t].item()
        probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        keep &= probs >= cfg.min_p * probs.max()
        probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        token = int((probs / noise).argmax())
        ids.append(token)
        out.append(token)
    return out


def test_sampling_on_the_device_equals_a_host_side_reference_loop():
    model = make_model(**GQA)
    cfg = SampleConfig(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
                       max_new_tokens=24, num_samples=2, seed=11)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    rows = last_rows(model, prompts, cfg)
    expected = [reference_sample(model, p, s, cfg) for p in prompts for s in range(cfg.num_samples)]
    assert [r.token_ids for r in rows] == expected


def test_finished_rows_stay_in_the_batch_and_others_go_on():
    model = make_model(**GQA)
    cfg = SampleConfig(temperature=1.0, max_new_tokens=30, num_samples=3, seed=2)
    free = last_rows(model, [[4, 5]], cfg)
    eos = free[0].token_ids[3]
    stopped = last_rows(model, [[4, 5]], cfg, eos_ids=[eos])
    for f, s in zip(free, stopped):
        cut = f.token_ids.index(eos) if eos in f.token_ids else None
        assert s.token_ids == f.token_ids[:cut] and s.finish_reason == ("eos" if cut is not None else "length")


@pytest.mark.parametrize("tied", [False, True])
def test_fused_projections_keep_logits_tokens_and_the_checkpoint_layout(tmp_path, tied):
    model = make_model(**GQA, tie_embeddings=tied)
    tokens = torch.tensor([[5, 17, 3, 60, 22, 9, 41]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SampleConfig(temperature=0.0, max_new_tokens=32)
    before, greedy = model(tokens)[0], last_rows(model, [tokens[0].tolist()], cfg)[0].token_ids
    fuse_projections(model)
    assert model.layers[0].self_attn.q_proj is None and model.layers[0].mlp.gate_up_proj is not None
    assert set(model.standard_state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.standard_state_dict().items())
    torch.testing.assert_close(model(tokens)[0], before, atol=1e-5, rtol=0)
    assert last_rows(model, [tokens[0].tolist()], cfg)[0].token_ids == greedy
    checkpoint.save_hf(model, tmp_path)  # the checkpoint format does not change
    torch.testing.assert_close(checkpoint.load_hf(tmp_path)(tokens)[0], before, atol=1e-5, rtol=0)
    unfuse_projections(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_int8_weights_round_trip_within_half_a_step():
    weight = torch.randn(48, 32)
    q = Int8Linear(weight)
    assert q.int8_weight().dtype == torch.int8 and q.int8_weight().abs().max() == 127
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.int8_weight().float() * q.scales[:, None] - weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 32)
    torch.testing.assert_close(q(x), x @ (q.int8_weight().float() * q.scales[:, None]).T, atol=1e-5, rtol=1e-5)


def test_packed_int8_columns_round_trip_and_multiply_compiled():
    """CPU int8 weights are kept four to a word; a width that is not a multiple of four is padded,
    the extremes keep their sign, and the compiled one-row pass is the int8 matmul."""
    q = torch.randint(-127, 128, (6, 13), dtype=torch.int8)
    q[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    packed = pack_int8_columns(q)
    assert packed.dtype == torch.int32 and packed.shape == (6, 4)
    assert torch.equal(unpack_int8_columns(packed, 13), q)
    x = torch.randn(1, 1, 13)
    expected = x @ q.float().T
    torch.testing.assert_close(packed_one_row_matmul(x, packed), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.compile(packed_one_row_matmul)(x, packed), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_matmuls_equal_the_batched_ones(dtype):
    weight = torch.randn(48, 32)
    rowwise, int8 = linear_from(weight.to(dtype), False, RowwiseLinear), Int8Linear(weight.to(dtype))
    rows = torch.randn(3, 1, 32, dtype=dtype)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for layer in (rowwise, int8):
        batched = layer(rows)  # three rows: the matmul path
        for i in range(3):
            torch.testing.assert_close(layer(rows[i:i + 1]), batched[i:i + 1], **tolerance)


@pytest.mark.parametrize("tied", [False, True])
def test_rowwise_matmuls_keep_the_logits(tied):
    model = make_model(**GQA, tie_embeddings=tied)
    tokens = torch.tensor([[5, 17, 3, 60, 22, 9, 41]])
    cfg = SampleConfig(temperature=0.0, max_new_tokens=16)
    before, greedy = model(tokens)[0], last_rows(model, [tokens[0].tolist()], cfg)[0].token_ids
    prepare_for_decoding(model, compiled=True)
    assert isinstance(model.lm_head, RowwiseLinear) and (model.lm_head.weight is model.embed_tokens.weight) == tied
    torch.testing.assert_close(model(tokens)[0], before, atol=1e-5, rtol=0)
    assert last_rows(model, [tokens[0].tolist()], cfg)[0].token_ids == greedy


def test_an_int8_model_decodes_and_refuses_to_be_saved(tmp_path):
    model = make_model(**GQA)
    prepare_for_decoding(model, "int8")
    assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())
    rows = last_rows(model, [[1, 2, 3]], SampleConfig(temperature=0.0, max_new_tokens=8))
    assert len(rows[0].token_ids) == 8
    with pytest.raises(ValueError, match="save the model before quantizing"):
        checkpoint.save_hf(model, tmp_path)


def teacher_forced(model, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(greedy next token at every position, mean negative log-likelihood of the next tokens)."""
    with torch.no_grad():
        logits = model(tokens[None, :-1])[0][0].float()
    return logits.argmax(-1), torch.nn.functional.cross_entropy(logits, tokens[1:]).item()


@pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.bin is absent")
def test_int8_agrees_with_fp32_on_stories260k():
    model = checkpoint.read_llama2c(STORIES).eval()
    story = last_rows(model, [[1]], SampleConfig(temperature=1.0, max_new_tokens=400, seed=0))[0].token_ids
    tokens = torch.tensor([1, *story])
    fp32_next, fp32_nll = teacher_forced(model, tokens)
    prepare_for_decoding(model, "int8")
    int8_next, _ = teacher_forced(model, tokens)
    assert (int8_next == fp32_next).float().mean() >= 0.85


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare.txt is absent")
def test_int8_keeps_a_trained_models_perplexity_on_tiny_shakespeare(tmp_path):
    """The CPU preset's model, trained briefly: int8's perplexity on the whole validation split
    within 1% of fp32's, and its greedy next token the same at >= 85% of positions."""
    run = lambda script, *argv: subprocess.run([sys.executable, script, *argv], cwd=ROOT, check=True,
                                               capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    run("prepare_data.py", "--data.input", str(SHAKESPEARE), "--data.data_dir", str(tmp_path),
        "--data.dataset", "shakespeare_char", "--data.tokenizer", "char")
    run("train.py", "configs/shakespeare_char_cpu.toml", "--data.data_dir", str(tmp_path), "--train.out_dir",
        str(tmp_path / "run"), "--train.max_steps", "300", "--train.eval_interval", "300", "--train.eval_iters", "1",
        "--train.ckpt_interval", "300", "--train.warmup_steps", "30")
    model, _ = checkpoint.load_model(tmp_path / "run")
    val = torch.from_numpy(data.open_split(tmp_path / "shakespeare_char", "val").tokens.astype("int64"))
    windows = val[:len(val) // 65 * 65].view(-1, 65)  # every validation token, in windows of the trained context
    fp32 = [teacher_forced(model.eval(), w) for w in windows]
    prepare_for_decoding(model, "int8")
    int8 = [teacher_forced(model, w) for w in windows]
    agreement = torch.cat([a == b for (a, _), (b, _) in zip(fp32, int8)]).float().mean()
    perplexity = lambda nlls: math.exp(sum(nll for _, nll in nlls) / len(nlls))
    assert agreement >= 0.85
    assert abs(perplexity(int8) / perplexity(fp32) - 1) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_compiled_fast_paths_match_eager(quantize):
    model = make_model(**GQA)
    prepare_for_decoding(model, quantize, compiled=True)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=12)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    eager = last_rows(model, prompts, cfg)
    compiled = last_rows(model, prompts, cfg, decode_step=compile_decode_step(model))
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]


def test_a_decode_step_finds_the_same_cache_buffers_on_every_call():
    """A CUDA graph holds the addresses of the cache it was recorded with: with a decode step, every
    call of the same shape gets the same buffers, zeroed, the earlier call's keys never leak into
    the next one, and between calls the layers hold no cache, so a plain forward uses none."""
    model = make_model(**GQA)
    prepare_for_decoding(model, compiled=True)
    step = lambda tokens, positions: model(tokens, start_pos=positions)[0]  # the step, uncompiled
    cfg = SampleConfig(temperature=0.0, max_new_tokens=10)
    addresses = lambda caches: [c.k.data_ptr() for c in caches] + [c.v.data_ptr() for c in caches]
    first = last_rows(model, [[5, 6, 7, 8, 9, 10]], cfg, decode_step=step)
    buffers = addresses(model.kept_cache)
    assert all(layer.self_attn.cache is None for layer in model.layers)
    for prompt in ([1, 2], [5, 6, 7, 8, 9, 10], [3] * 20):
        reused = last_rows(model, [prompt], cfg, decode_step=step)
        assert addresses(model.kept_cache) == buffers
        assert reused[0].token_ids == last_rows(make_model(**GQA), [prompt], cfg)[0].token_ids
    assert reused[0].token_ids != first[0].token_ids
    with torch.inference_mode():  # as generate() sets it up
        model.setup_cache(1, max_seq_len=model.kept_cache[0].k.shape[2])
    assert addresses([layer.self_attn.cache for layer in model.layers]) == buffers
    assert all(not layer.self_attn.cache.k.any() and not layer.self_attn.cache.v.any() for layer in model.layers)
    model.clear_cache(keep=True)
    last_rows(model, [[1, 2], [3, 4]], cfg, decode_step=step)  # another batch size: other buffers
    assert model.kept_cache[0].k.shape[0] == 2 and model.kept_cache[0].k.data_ptr() not in buffers
    last_rows(model, [[1, 2]], cfg)  # eager decoding keeps nothing
    assert model.kept_cache is None


def test_the_gpu_steps_compile_options_stay_with_that_compile(monkeypatch):
    """The GPU step's Inductor options (CUDA graphs, tuned one-row reductions) are ones torch.compile
    knows, and compile_decode_step leaves Inductor's global configuration as it was: a later compile
    in the process (a training step) gets the defaults. Here the GPU's options go to a CPU model, where
    they change no kernel but their scope is the same."""
    import torch._inductor.config as inductor
    names = ("coordinate_descent_tuning", "max_autotune_pointwise")
    settings = lambda: {name: getattr(inductor, name) for name in names} | {"cudagraphs": inductor.triton.cudagraphs}
    before = settings()
    gpu_options = decode_compile_options(on_gpu=True)
    assert gpu_options == {"triton.cudagraphs": True} | {name: True for name in names}
    assert decode_compile_options(on_gpu=False) == {}
    monkeypatch.setattr("engine.decode_compile_options", lambda on_gpu: gpu_options)
    model = make_model(**GQA)
    prepare_for_decoding(model, compiled=True)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=4)
    compiled = last_rows(model, [[1, 2, 3]], cfg, decode_step=compile_decode_step(model))
    assert compiled[0].token_ids == last_rows(model, [[1, 2, 3]], cfg)[0].token_ids
    assert settings() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_the_decoding_loop_never_waits_for_the_gpu(compiled):
    """Sampling, EOS bookkeeping and the next step's inputs need no device-to-host sync: the
    only wait is the host's own, on the event after each step's token copy."""
    model = make_model(**GQA).cuda()
    prepare_for_decoding(model)
    step = compile_decode_step(model) if compiled else None
    cfg = SampleConfig(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                       max_new_tokens=40, num_samples=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    expected = [r.token_ids for r in last_rows(model, prompts, cfg, decode_step=step)]  # warm-up, graphs recorded
    rows = generate(model, prompts, cfg, decode_step=step)
    next(rows)  # setup and prefill copy prompts to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        for last in rows:
            pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [r.token_ids for r in last] == expected


def test_only_gpu_inference_at_varying_lengths_asks_for_flash_first():
    """model.attention_order on any machine (a device object needs no GPU): training, compiled
    decoding's fixed shapes and CPUs keep PyTorch's order; GPU inference puts flash first (cuDNN
    before math) while inside the context, and PyTorch's order comes back after it."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    before = torch._C._get_sdp_priority_order()
    assert isinstance(attention_order(cuda, fixed_shapes=False), contextlib.nullcontext)  # gradients on: training
    with torch.no_grad():
        assert isinstance(attention_order(cuda, fixed_shapes=True), contextlib.nullcontext)
        assert isinstance(attention_order(cpu, fixed_shapes=False), contextlib.nullcontext)
        with attention_order(cuda, fixed_shapes=False):
            order = [int(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                      SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)]
            assert torch._C._get_sdp_priority_order()[:4] == order
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_decoding_on_a_gpu_attends_with_flash_not_cudnn():
    """Eager decoding meets a new key length every token; cuDNN's attention (PyTorch's first
    choice on recent GPUs) would build a plan for each, flash needs none (model.VARYING_LENGTH_ORDER)."""
    from torch.profiler import ProfilerActivity, profile
    model = make_model(**GQA).cuda().to(torch.bfloat16)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=8, eos="none")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        last_rows(model, [[1, 2, 3, 4, 5]], cfg)
    kernels = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("flash" in k for k in kernels) and not any("cudnn" in k for k in kernels), kernels


@pytest.mark.parametrize("case", ["unknown shape", "no model.py", "not gpt-fast's model.py"])
def test_decode_scaling_refuses_what_it_cannot_run_in_one_line(tmp_path, monkeypatch, case):
    """bench/decode_scaling.py: a shape the device has not, or a --gpt-fast folder that holds no
    gpt-fast model, ends the run before anything is built, naming the fix."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import decode_scaling
    (tmp_path / "model.py").write_text("class Transformer:\n    pass\n")
    argv, expected = {
        "unknown shape": (["--shapes", "reference,huge"], "--shapes huge is not a cpu shape; choose from reference"),
        "no model.py": (["--gpt-fast", str(tmp_path / "missing")], "has no model.py; pass a checkout of"),
        "not gpt-fast's model.py": (["--gpt-fast", str(tmp_path)], "has no Transformer and ModelArgs; pass a gpt-fast"),
    }[case]
    monkeypatch.setattr(sys, "argv", ["decode_scaling.py", "--device", "cpu", *argv])
    with pytest.raises(SystemExit) as stop:
        decode_scaling.main()
    assert str(stop.value).startswith("error: ") and expected in str(stop.value) and "\n" not in str(stop.value)


# --- speculative decoding ---------------------------------------------------------------------


def speculate(target, draft, prompts, cfg, k, **kw):
    stats = Speculation()
    for rows in speculative_generate(target, draft, prompts, cfg, k=k, stats=stats, **kw):
        pass
    return rows, stats


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_is_the_targets_own_greedy_output(k):
    target, other = make_model(**GQA), make_model(seed=1, **{**GQA, "n_layers": 1})
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4]]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40, repetition_penalty=1.2)
    expected = [r.token_ids for r in last_rows(target, prompts, cfg)]
    for draft in (other, target):  # a draft that disagrees, and one that is always right
        rows, stats = speculate(target, draft, prompts, cfg, k)
        assert [r.token_ids for r in rows] == expected
        assert all(r.finish_reason == "length" for r in rows)
    assert stats.acceptance_rate == 1.0 and stats.rounds <= 2 * math.ceil(40 / (k + 1))


def test_speculative_greedy_slides_and_stops_like_generate():
    target, draft = make_model(**{**GQA, "max_seq_len": 32}), make_model(seed=1, **{**GQA, "max_seq_len": 32})
    cfg = SampleConfig(temperature=0.0, max_new_tokens=70)
    expected = last_rows(target, [[1, 2, 3]], cfg)[0].token_ids  # slides twice past the 32-token context
    rows, _ = speculate(target, draft, [[1, 2, 3]], cfg, 4)
    assert rows[0].token_ids == expected
    eos = expected[10]
    stopped = last_rows(target, [[1, 2, 3]], cfg, eos_ids=[eos])[0]
    rows, _ = speculate(target, draft, [[1, 2, 3]], cfg, 4, eos_ids=[eos])
    assert (rows[0].token_ids, rows[0].finish_reason) == (stopped.token_ids, "eos")


def test_speculative_sampling_follows_the_targets_distribution():
    """Over a 6-token vocabulary, the first two tokens of 3,000 speculative samples against the
    target's exact joint distribution (chi-square, p = 0.001); the draft's own is far from it."""
    tiny = dict(vocab_size=6, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)
    target, draft = make_model(seed=3, **tiny), make_model(seed=4, **tiny)
    with torch.no_grad():  # peaked and different distributions, so a wrong rule would show
        target.lm_head.weight.mul_(60)
        draft.lm_head.weight.mul_(60)
    cfg = SampleConfig(temperature=1.0, top_k=5, max_new_tokens=2, num_samples=3000)
    prompt = [0, 1]

    def joint(model) -> torch.Tensor:
        no_seen = torch.zeros(6, dtype=torch.bool)
        with torch.no_grad():
            first = next_token_probs(model(torch.tensor([prompt]))[0][0, -1], no_seen, cfg)
            rows = [next_token_probs(model(torch.tensor([prompt + [t]]))[0][0, -1], no_seen, cfg) for t in range(6)]
        return first[:, None] * torch.stack(rows)

    exact, drafts = joint(target), joint(draft)
    assert 0.5 * (exact - drafts).abs().sum() > 0.2
    rows, stats = speculate(target, draft, [prompt], cfg, 2)
    counts = torch.zeros(6, 6)
    for r in rows:
        counts[r.token_ids[0], r.token_ids[1]] += 1
    expected = exact.flatten() * cfg.num_samples
    big = expected >= 5  # cells expected fewer than 5 times are pooled into one
    observed = torch.cat([counts.flatten()[big], counts.flatten()[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = ((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum().item()
    df = len(expected) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, p = 0.001
    assert chi2 < critical
    assert 0 < stats.acceptance_rate < 1


def char_checkpoint(folder: Path, text: str, seed: int, n_layers: int = 2) -> Path:
    tokenizer = Tokenizer.train_char(text)
    model = make_model(seed=seed, vocab_size=tokenizer.vocab_size, dim=32, n_layers=n_layers, n_heads=4,
                       n_kv_heads=2)
    checkpoint.save_hf(model, folder)
    tokenizer.save(folder)
    return folder


def test_generate_py_with_a_draft(tmp_path, capsys):
    target = char_checkpoint(tmp_path / "target", "hello world", seed=0)
    draft = char_checkpoint(tmp_path / "draft", "hello world", seed=1, n_layers=1)
    common = ["--checkpoint", str(target), "--prompt", "hello", "--temperature", "0", "--max_new_tokens", "20",
              "--json"]
    assert main(common) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main([*common, "--draft", str(draft), "--draft_tokens", "3"]) == 0
    out = capsys.readouterr()
    drafted = json.loads(out.out)
    assert drafted["token_ids"] == alone["token_ids"] and 0 <= drafted["draft_acceptance_rate"] <= 1
    assert "of the draft's" in out.err


@pytest.mark.parametrize("case", ["vocabulary", "tokenizer", "k"])
def test_a_draft_that_cannot_serve_is_one_line(tmp_path, capsys, case):
    target = char_checkpoint(tmp_path / "target", "hello world", seed=0)
    other_text = {"vocabulary": "hello world!", "tokenizer": "jello world", "k": "hello world"}[case]
    draft = char_checkpoint(tmp_path / "draft", other_text, seed=1)
    k = "0" if case == "k" else "4"
    assert main(["--checkpoint", str(target), "--prompt", "hello", "--draft", str(draft), "--draft_tokens", k]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert {"vocabulary": "vocabulary of", "tokenizer": "same tokenizer.json", "k": "draft_tokens"}[case] in err


@pytest.mark.slow
def test_the_compiled_step_serves_other_lengths_without_recompiling():
    """Cache lengths come in multiples of 256, so calls of different prompt and output lengths
    reuse one compiled step."""
    from torch._dynamo.utils import counters
    model = make_model(**{**GQA, "max_seq_len": 512})
    step = compile_decode_step(model)
    last_rows(model, [[1, 2, 3]], SampleConfig(temperature=0.0, max_new_tokens=8), decode_step=step)
    compiled = counters["stats"]["unique_graphs"]
    for prompt, n in (([4, 5, 6, 7, 8], 30), ([9], 100), ([1] * 40, 60)):
        last_rows(model, [prompt], SampleConfig(temperature=0.0, max_new_tokens=n), decode_step=step)
    assert counters["stats"]["unique_graphs"] == compiled
