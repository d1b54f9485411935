"""The Transformers engine's batched sampler (``TransformersEngine._next_tokens``): one call picks
the next token of every row of a batch. Checked against the definitions: greedy is argmax, draws
follow softmax(logits / temperature) restricted by top-k and top-p, a repetition penalty changes
only the seen ids, presence and frequency penalties follow OpenAI's definition (a token's logit
lowered by ``frequency_penalty * count + presence_penalty * (count > 0)``, counts of this reply's
tokens), and a row's seed gives the same tokens whatever else shares the batch."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from engines.base import GenParams
from engines.transformers import TransformersEngine

torch = ENGINE = LOGITS = None         # set by _torch, when the tests run


@pytest.fixture(scope="module", autouse=True)
def _torch():
    """torch is imported when these tests run, not when pytest collects them (~1.5 s)."""
    global torch, ENGINE, LOGITS
    torch = pytest.importorskip("torch")
    ENGINE = SimpleNamespace(_torch=torch)
    LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def row(seed=0, seen=None, counts=None, **params):
    """A request as the sampler sees it; ``counts``: times each vocabulary entry was generated."""
    return SimpleNamespace(params=GenParams(**params), generator=torch.Generator().manual_seed(seed),
                           seen=None if seen is None else torch.tensor(seen),
                           counts=None if counts is None else torch.tensor(counts, dtype=torch.float32))


def pick(rows, logits):
    return TransformersEngine._next_tokens(ENGINE, rows, logits)


def draws(n=4000, seed=1, logits=None, **params):
    """``n`` draws for one request in one sampler call: a batch of ``n`` rows that are the same
    request (one generator, so each row takes the next uniform number from it: ``n`` independent
    draws), instead of ``n`` calls (4000 calls per case took 12 s of the fast tier)."""
    r = row(seed=seed, **params)
    logits = LOGITS if logits is None else logits
    return Counter(pick([r] * n, logits.unsqueeze(0).repeat(n, 1)))


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 100)
    rows = [row(temperature=0) for _ in range(5)]
    assert pick(rows, logits) == logits.argmax(-1).tolist()


def test_draws_follow_the_softmax_at_the_temperature():
    for temperature in (1.0, 0.5):
        counts = draws(temperature=temperature, top_k=0, top_p=1.0)
        want = torch.softmax(LOGITS / temperature, -1)
        for tok in range(len(LOGITS)):
            assert abs(counts[tok] / 4000 - float(want[tok])) < 0.03, (temperature, tok, counts)


def test_top_k_and_top_p_cut_the_tail():
    assert set(draws(temperature=1.0, top_k=2, top_p=1.0)) <= {0, 1}
    assert set(draws(temperature=1.0, top_k=1, top_p=1.0)) == {0}
    # softmax(LOGITS) starts 0.56, 0.21, 0.13: top_p 0.5 keeps only the first token (the one that
    # crosses it), 0.7 the first two
    assert set(draws(temperature=1.0, top_k=0, top_p=0.5)) == {0}
    counts = draws(temperature=1.0, top_k=0, top_p=0.7)
    assert set(counts) == {0, 1}
    p = torch.softmax(LOGITS, -1)[:2]
    assert abs(counts[0] / 4000 - float(p[0] / p.sum())) < 0.03


def test_each_row_keeps_its_own_limits_in_a_mixed_batch():
    # the four kinds of row 300 times over in one batch of 1200 (one call: 300 calls took 4 s)
    rows = [row(temperature=0), row(seed=2, temperature=1.0, top_k=2, top_p=1.0),
            row(seed=3, temperature=1.0, top_k=0, top_p=0.5), row(seed=4, temperature=1.0, top_k=0, top_p=1.0)] * 300
    toks = pick(rows, LOGITS.repeat(len(rows), 1))
    for i in range(0, len(rows), 4):
        assert toks[i] == 0 and toks[i + 1] in (0, 1) and toks[i + 2] == 0 and 0 <= toks[i + 3] < len(LOGITS)
    assert set(toks[1::4]) == {0, 1} and len(set(toks[3::4])) > 2, "the sampled rows really sample"


def test_a_seed_gives_the_same_tokens_alone_and_in_a_batch():
    def run(batch_others: int) -> list[int]:
        mine = row(seed=42, temperature=1.0, top_k=0, top_p=1.0)
        others = [row(seed=100 + i, temperature=0.9, top_k=3, top_p=0.9) for i in range(batch_others)]
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(40):
            logits = torch.cat([torch.randn(1, 50, generator=gen),   # mine: the same in every run
                                torch.randn(batch_others, 50)])       # the others': not
            out.append(pick([mine, *others], logits)[0])
        return out

    assert run(0) == run(3) == run(7)


def test_repetition_penalty_lowers_only_the_seen_tokens():
    logits = torch.tensor([[3.0, 2.9, 1.0, -1.0]])
    assert pick([row(temperature=0)], logits.clone()) == [0]
    assert pick([row(temperature=0, repetition_penalty=1.2, seen=[0])], logits.clone()) == [1]
    # a negative logit is multiplied (divided, it would have come first)
    assert pick([row(temperature=0, repetition_penalty=2.0, seen=[0])], torch.tensor([[-0.1, -0.15]])) == [1]


# ---------------------------------------------------------------- presence and frequency penalties
def penalized(logits, counts, presence=0.0, frequency=0.0):
    """OpenAI's definition, written out: logit - frequency * count - presence * (count > 0)."""
    c = torch.tensor(counts, dtype=torch.float32)
    return logits - frequency * c - presence * (c > 0).float()


def test_presence_penalty_is_subtracted_once_per_token_already_generated():
    logits = torch.tensor([[3.0, 2.9, 1.0, -1.0]])
    assert pick([row(temperature=0, counts=[0, 0, 0, 0], presence_penalty=0.5)], logits.clone()) == [0]
    # generated once or five times: the same 0.5 off token 0 (3.0 -> 2.5 < 2.9)
    assert pick([row(temperature=0, counts=[1, 0, 0, 0], presence_penalty=0.5)], logits.clone()) == [1]
    assert pick([row(temperature=0, counts=[5, 0, 0, 0], presence_penalty=0.05)], logits.clone()) == [0]
    # a negative penalty favours what was said (token 1 seen: 2.9 + 0.2 > 3.0)
    assert pick([row(temperature=0, counts=[0, 1, 0, 0], presence_penalty=-0.2)], logits.clone()) == [1]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.tensor([[3.0, 2.9, 1.0, -1.0]])
    # 0.05 per time: once 2.95 (still first), three times 2.85 (second)
    assert pick([row(temperature=0, counts=[1, 0, 0, 0], frequency_penalty=0.05)], logits.clone()) == [0]
    assert pick([row(temperature=0, counts=[3, 0, 0, 0], frequency_penalty=0.05)], logits.clone()) == [1]


def test_penalized_draws_follow_the_softmax_of_the_penalized_logits():
    counts = [3, 1, 0, 0, 2, 0]
    for temperature in (1.0, 0.7):
        got = draws(seed=5, counts=counts, temperature=temperature, top_k=0, top_p=1.0,
                    presence_penalty=0.4, frequency_penalty=0.3)
        want = torch.softmax(penalized(LOGITS, counts, 0.4, 0.3) / temperature, -1)
        for tok in range(len(LOGITS)):
            assert abs(got[tok] / 4000 - float(want[tok])) < 0.03, (temperature, tok, got)


def test_penalties_touch_only_the_rows_that_ask_for_them_in_a_mixed_batch():
    logits = torch.tensor([[3.0, 2.9, 1.0], [3.0, 2.9, 1.0], [3.0, 2.9, 1.0]])
    rows = [row(temperature=0, counts=[1, 0, 0], presence_penalty=1.0),
            row(temperature=0),
            row(temperature=0, counts=[0, 4, 0], frequency_penalty=0.5)]
    assert pick(rows, logits.clone()) == [1, 0, 0]


def test_a_penalized_rows_first_token_has_no_counts_and_its_seed_still_reproduces():
    """The reply's first token: nothing generated yet, so the penalty changes nothing; the row's
    count vector is created then (the engine adds each accepted token to it)."""
    r = row(seed=9, temperature=1.0, top_k=0, top_p=1.0, presence_penalty=2.0, frequency_penalty=2.0)
    plain = row(seed=9, temperature=1.0, top_k=0, top_p=1.0)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1))
    assert pick([r], logits.clone()) == pick([plain], logits.clone())
    assert r.counts is not None and r.counts.shape == (40,) and float(r.counts.sum()) == 0.0

    def run(batch_others: int) -> list[int]:
        mine = row(seed=42, temperature=1.0, top_k=0, top_p=1.0, counts=[0] * 50, presence_penalty=1.0)
        others = [row(seed=100 + i, temperature=0.9, counts=[1] * 50, frequency_penalty=0.5)
                  for i in range(batch_others)]
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(40):
            logits = torch.cat([torch.randn(1, 50, generator=gen), torch.randn(batch_others, 50)])
            tok = pick([mine, *others], logits)[0]
            mine.counts[tok] += 1
            out.append(tok)
        return out

    assert run(0) == run(3)


@pytest.mark.slow
def test_the_engine_counts_this_replys_tokens_as_the_definition_says(tiny_llama):
    """End to end on the tiny random-weight Llama: the engine's greedy reply with penalties equals a
    plain decode loop that applies OpenAI's definition itself (counts of the reply's own tokens)."""
    from engines import registry
    from engines.base import ChatMessage, ChatRequest
    from engines.configs import TransformersConfig

    eng = registry.create(tiny_llama, TransformersConfig(device="cpu"))
    try:
        msgs = (ChatMessage("user", "Tell me about the sea, the sea, the sea."),)
        n, presence, frequency = 24, 0.7, 0.4
        got = "".join(d.text for d in eng.stream(ChatRequest(msgs, GenParams(
            temperature=0, max_new_tokens=n, presence_penalty=presence, frequency_penalty=frequency))))
        plain = "".join(d.text for d in eng.stream(ChatRequest(msgs, GenParams(temperature=0, max_new_tokens=n))))

        from transformers import DynamicCache

        ids = eng._encode(msgs)["input_ids"]
        counts = [0] * eng.model.config.vocab_size
        out, cache, step = [], DynamicCache(config=eng.model.config), ids
        with torch.inference_mode():
            for _ in range(n):
                logits = eng.model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1].float()
                tok = int(penalized(logits, counts, presence, frequency).argmax())
                if tok in eng.eos_ids:
                    break
                counts[tok] += 1
                out.append(tok)
                step = torch.tensor([[tok]])
        assert got == eng.tokenizer.decode(out, skip_special_tokens=True)
        assert got != plain, "the penalties changed nothing: pick a prompt where they matter"
    finally:
        eng.close()
