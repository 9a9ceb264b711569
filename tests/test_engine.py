"""engine.py: requests that arrive while others decode, in fewer slots than requests, give what
they give alone; long prompts are read in chunks without stalling the others; a finished or
cancelled request frees its slot at once; a slot reads only what its cache does not hold."""

import pytest

from config import SampleConfig
from engine import Completion, Engine
from generate import generate
from test_model import make_model

GQA = dict(vocab_size=67, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=48)
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=20)
SAMPLED = SampleConfig(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2, max_new_tokens=20, seed=4)


def alone(model, prompt: list[int], cfg: SampleConfig) -> list[int]:
    return list(generate(model, [prompt], cfg))[-1][0].token_ids


def run_until_done(engine: Engine, steps: int = 10_000) -> None:
    for _ in range(steps):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("step", ["eager", "fixed-shape"])
def test_requests_in_company_give_what_they_give_alone(step):
    """Seven requests, greedy and seeded sampling with different settings, through three slots:
    some arrive while others decode, some wait for a slot, and one slides past the context."""
    model = make_model(**GQA)
    steps = [lambda tokens, positions: model(tokens, start_pos=positions)[0]] if step == "fixed-shape" else []
    engine = Engine(model, 3, steps=steps)
    jobs = [([1, 2, 3], GREEDY), ([4, 5, 6, 7, 8, 9, 10, 11], SAMPLED), ([12], GREEDY),
            ([13, 14] * 10, SampleConfig(temperature=1.0, max_new_tokens=40, seed=9)),
            ([15, 16, 17], SampleConfig(temperature=0.7, min_p=0.05, max_new_tokens=12, seed=1)),
            ([5, 5, 5], GREEDY), ([1, 2, 3], SAMPLED)]
    rows = [Completion(prompt) for prompt, _ in jobs]
    for row, (_, cfg) in zip(rows[:2], jobs[:2]):
        engine.submit(row, cfg)
    for _ in range(3):
        engine.step()
    assert all(len(r.token_ids) == 3 for r in rows[:2])
    for row, (_, cfg) in zip(rows[2:], jobs[2:]):
        engine.submit(row, cfg)
    assert engine.in_use == 2 and len(engine.waiting) == 5
    run_until_done(engine)
    assert len(rows[3].prompt_ids) + len(rows[3].token_ids) > GQA["max_seq_len"]  # it slid
    for row, (prompt, cfg) in zip(rows, jobs):
        assert row.token_ids == alone(model, prompt, cfg) and row.finish_reason == "length"


def test_a_long_prompt_is_read_in_chunks_while_the_others_decode():
    model = make_model(**GQA)
    engine = Engine(model, 2, prefill_chunk=4)
    short, long = Completion([1, 2]), Completion(list(range(3, 33)))
    engine.submit(short, GREEDY)
    engine.step()
    engine.submit(long, GREEDY)
    read = []
    forward = model.forward

    def counting(tokens, *args, **kwargs):
        if kwargs.get("last_only"):  # a prefill chunk, not a decoding step
            read.append(tokens.shape[1])
        return forward(tokens, *args, **kwargs)

    model.forward = counting
    for step in range(7):  # 30 prompt tokens: chunks of 4 over 8 steps
        engine.step()
        assert len(short.token_ids) == step + 2 and not long.token_ids
    engine.step()  # the last chunk, then its first token in the same step
    assert read == [4] * 7 + [2] and len(long.token_ids) == 1 and len(short.token_ids) == 9
    del model.forward
    run_until_done(engine)
    assert short.token_ids == alone(model, [1, 2], GREEDY) and long.token_ids == alone(model, long.prompt_ids, GREEDY)


def test_finished_and_cancelled_requests_free_their_slot_at_once():
    model = make_model(**GQA)
    engine = Engine(model, 1)
    first, second, third = Completion([1, 2]), Completion([3, 4]), Completion([5, 6])
    requests = [engine.submit(row, GREEDY) for row in (first, second, third)]
    engine.step()
    engine.cancel(requests[2])  # still queued: it never takes the slot
    engine.cancel(requests[0])  # decoding: the slot goes to the next request in line
    assert engine.in_use == 0 and list(engine.waiting) == [requests[1]]
    engine.step()
    assert engine.slots[0].request is requests[1] and len(second.token_ids) == 1
    run_until_done(engine)
    assert first.finish_reason == third.finish_reason == "cancelled" and not third.token_ids
    assert second.token_ids == alone(model, [3, 4], GREEDY)


def test_a_slot_reads_only_what_its_cache_does_not_hold():
    """A request that starts as the last one on its slot did (a chat's next turn) feeds only the
    new tokens, and decodes as if read whole."""
    model = make_model(**GQA)
    engine = Engine(model, 2)
    first = Completion(list(range(1, 21)))
    engine.submit(first, GREEDY)
    run_until_done(engine)
    follow_up = first.prompt_ids + first.token_ids[:-1] + [7, 8, 9]
    read = []
    forward = model.forward
    model.forward = lambda tokens, *a, **kw: read.append(tokens.shape[1]) or forward(tokens, *a, **kw)
    second = Completion(follow_up)
    engine.submit(second, GREEDY)
    run_until_done(engine)
    del model.forward
    assert read[0] == 3  # 7, 8 and 9 after the 39 tokens the slot holds
    assert second.token_ids == alone(model, follow_up, GREEDY)
    engine.forget()
    assert all(not cached for slot in engine.slots for cached in slot.cached)


def test_eos_and_max_new_tokens_end_a_row():
    model = make_model(**GQA)
    free_run = alone(model, [1, 2, 3], SAMPLED)
    engine = Engine(model, 2)
    row = Completion([1, 2, 3])
    engine.submit(row, SAMPLED, eos=[free_run[4]])
    run_until_done(engine)
    assert row.finish_reason == "eos" and row.token_ids == free_run[:free_run.index(free_run[4])]
    with pytest.raises(ValueError, match="prompts must hold 1 to 48 tokens"):
        engine.submit(Completion([1] * 49), GREEDY)
