"""The Transformers engine's batched sampler (``TransformersEngine._next_tokens``): one call picks
the next token of every row of a batch. Checked against the definitions: greedy is argmax, draws
follow softmax(logits / temperature) restricted by top-k and top-p, a repetition penalty changes
only the seen ids, and a row's seed gives the same tokens whatever else shares the batch."""
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


def row(seed=0, seen=None, **params):
    return SimpleNamespace(params=GenParams(**params), generator=torch.Generator().manual_seed(seed),
                           seen=None if seen is None else torch.tensor(seen))


def pick(rows, logits):
    return TransformersEngine._next_tokens(ENGINE, rows, logits)


def draws(n=4000, **params):
    r = row(seed=1, **params)
    return Counter(pick([r], LOGITS.unsqueeze(0))[0] for _ in range(n))


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
    logits = LOGITS.repeat(4, 1)
    for _ in range(300):
        rows = [row(temperature=0), row(seed=2, temperature=1.0, top_k=2, top_p=1.0),
                row(seed=3, temperature=1.0, top_k=0, top_p=0.5), row(seed=4, temperature=1.0, top_k=0, top_p=1.0)]
        toks = pick(rows, logits)
        assert toks[0] == 0 and toks[1] in (0, 1) and toks[2] == 0 and 0 <= toks[3] < len(LOGITS)


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
