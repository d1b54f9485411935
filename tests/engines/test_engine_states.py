"""The engine contract's request states on the Transformers backend (CPU, tiny random-weight Llama):
``abort(request_id)`` ends a stream within a second with finish reason "abort" whether the request
waits behind a full batch, is being prefilled, or decodes; the engine lets go of it (``live_requests``)
and keeps serving. Also: the model is resolved once per load (config.json read once), and
``message_tokens`` counts each message's own text in one pass."""
from __future__ import annotations

import threading
import time

import pytest

from engines.base import ChatMessage, ChatRequest, GenParams
from tests.clients import Reader, wait_until

pytestmark = pytest.mark.slow       # generates with a model

PROMPT = (ChatMessage("user", "Write a long poem about the sea and the stars, with many verses."),)


def ask(n=400, **kw) -> ChatRequest:
    return ChatRequest(PROMPT, GenParams(temperature=0.7, seed=1, max_new_tokens=n, **kw))


@pytest.fixture
def engine(tiny_llama):
    """One request decodes at a time (max_batch 1): a second one waits in the engine's queue."""
    from engines import registry
    from engines.configs import TransformersConfig

    eng = registry.create(tiny_llama, TransformersConfig(device="cpu", max_batch=1))
    yield eng
    eng.close()


def _aborted_within_a_second(eng, req, reader):
    t0 = time.perf_counter()
    eng.abort(req.request_id)
    assert reader.ended.wait(1.0), "the stream did not end within 1 s of its abort"
    assert time.perf_counter() - t0 < 1.0
    assert reader.last.finish_reason == "abort"


def test_abort_while_queued_behind_a_full_batch(engine):
    running = ask()
    a = Reader(engine.stream(running))
    assert a.first.wait(30)
    queued = ask()
    b = Reader(engine.stream(queued))
    assert wait_until(lambda: engine.scheduler().waiting == 1)
    assert engine.live_requests() == 2
    _aborted_within_a_second(engine, queued, b)
    assert b.last.tokens == 0
    # it leaves the queue at once (it needs no place in the batch), while the other one decodes
    assert wait_until(lambda: engine.live_requests() == 1 and engine.scheduler().waiting == 0, 1.0)
    assert not a.ended.is_set(), "the running request must go on"
    _aborted_within_a_second(engine, running, a)
    assert wait_until(lambda: engine.live_requests() == 0)


def test_abort_while_prefilling(engine):
    """The prompt pass is held (a long prompt's prefill, made deterministic): abort ends the stream
    while it runs; the engine lets go of the request when the pass is over and serves the next."""
    real = engine.model.forward
    entered, release = threading.Event(), threading.Event()

    def slow_prefill(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        if ids is not None and ids.shape[-1] > 1:      # the prompt pass, not a decode step
            entered.set()
            release.wait(10)
        return real(*a, **k)

    engine.model.forward = slow_prefill
    try:
        req = ask()
        r = Reader(engine.stream(req))
        assert entered.wait(10), "the prefill never started"
        assert engine.scheduler().waiting == 1          # being admitted, not decoding yet
        _aborted_within_a_second(engine, req, r)
        assert r.last.tokens == 0
        assert engine.live_requests() == 1, "the prefill is still running: the engine holds it"
    finally:
        release.set()
    assert wait_until(lambda: engine.live_requests() == 0)
    engine.model.forward = real
    deltas = list(engine.stream(ask(4)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 4


LONG_PROMPT = (ChatMessage("user", " ".join(f"word{i}" for i in range(700))),)   # ~2 000 tokens


def test_a_long_prompt_is_prefilled_in_pieces_and_an_abort_stops_it_between_two(engine):
    """A long prompt's prefill goes through in pieces (``_prefill_chunk`` tokens) and an abort is
    seen between two of them: the engine lets go of the request without computing the rest of the
    prompt (one 8k-token prompt on the 2-core CPU was 3-5 minutes of work that went on after its
    client had gone, holding up every other reply). Pieces give the same reply as one pass."""
    engine._prefill_chunk = 256
    n_prompt = engine.count_tokens(LONG_PROMPT)
    pieces = -(-n_prompt // 256)
    assert pieces >= 6, n_prompt
    real = engine.model.forward
    passes, entered, release = [], threading.Event(), threading.Event()

    def counted(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        if ids is not None and ids.shape[-1] > 1:      # a prompt pass, not a decode step
            passes.append(int(ids.shape[-1]))
            if len(passes) == 2:                      # hold the second piece
                entered.set()
                release.wait(10)
        return real(*a, **k)

    engine.model.forward = counted
    try:
        req = ChatRequest(LONG_PROMPT, GenParams(temperature=0, max_new_tokens=50))
        r = Reader(engine.stream(req))
        assert entered.wait(30), "the prefill never reached its second piece"
        _aborted_within_a_second(engine, req, r)
    finally:
        release.set()
    assert wait_until(lambda: engine.live_requests() == 0, 5.0)
    assert passes == [256, 256], f"pieces computed after the abort: {passes}"
    engine.model.forward = real
    # the same greedy reply in pieces as in one pass
    greedy = ChatRequest(LONG_PROMPT, GenParams(temperature=0, max_new_tokens=6))
    pieced = "".join(d.text for d in engine.stream(greedy))
    engine._prefill_chunk = 1 << 20
    whole = "".join(d.text for d in engine.stream(ChatRequest(LONG_PROMPT, greedy.params)))
    assert pieced == whole and pieced


def test_abort_while_decoding(engine):
    req = ask()
    r = Reader(engine.stream(req))
    assert wait_until(lambda: len(r.deltas) >= 3, 30)
    _aborted_within_a_second(engine, req, r)
    assert 0 < r.last.tokens < 400
    assert wait_until(lambda: engine.live_requests() == 0)


def test_abort_is_by_request_id_and_unknown_ids_are_ignored(engine):
    engine.abort("no-such-request")
    engine.max_batch = 2
    mine, other = ask(), ask(12)
    a, b = Reader(engine.stream(mine)), Reader(engine.stream(other))
    assert a.first.wait(30)
    engine.abort(mine.request_id)
    assert a.ended.wait(1.0) and a.last.finish_reason == "abort"
    assert b.ended.wait(60) and b.last.finish_reason == "length" and b.last.tokens == 12


def test_prefilling_request_aborted_through_the_manager_gives_its_place_back(tiny_llama, tmp_path):
    from engines.manager import EngineManager

    mgr = EngineManager(str(tmp_path), {"device": "cpu"})
    mgr.load(tiny_llama.path, "transformers")
    eng = mgr.require()
    real = eng.model.forward
    entered, release = threading.Event(), threading.Event()

    def slow_prefill(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        if ids is not None and ids.shape[-1] > 1:
            entered.set()
            release.wait(10)
        return real(*a, **k)

    eng.model.forward = slow_prefill
    try:
        sub = mgr.submit(ask())
        r = Reader(iter(sub))
        assert entered.wait(10)
        t0 = time.perf_counter()
        assert mgr.abort(sub.request_id)
        assert r.ended.wait(1.0) and r.last.finish_reason == "abort"
        assert wait_until(lambda: mgr.places_taken == 0 and mgr.running == 0, 1.0 - (time.perf_counter() - t0))
    finally:
        release.set()
        eng.model.forward = real
        mgr.close()


def test_message_tokens_counts_each_messages_own_text_in_one_tokenizer_call(engine):
    msgs = [ChatMessage("system", "You are brief."), ChatMessage("user", "Hello there, how are you?"),
            ChatMessage("assistant", ""), ChatMessage("user", "héllo wörld " * 20)]
    calls = []
    tok = engine.tokenizer
    real = type(tok).__call__

    def counting(self, *a, **k):
        calls.append(a[0] if a else k.get("text"))
        return real(self, *a, **k)

    type(tok).__call__ = counting
    try:
        counts = engine.message_tokens(msgs)
    finally:
        type(tok).__call__ = real
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == len(msgs)
    assert counts == [len(tok(m.content, add_special_tokens=False)["input_ids"]) for m in msgs]
    assert counts[2] == 0 and engine.message_tokens([]) == []


def test_config_json_is_read_once_per_load(tiny_llama, tmp_path, monkeypatch):
    """resolve reads config.json; the registry's choice and pre-check, the backend and the manager
    read ``ResolvedModel.config`` (the TurboMind path is counted in test_lmdeploy_adapter)."""
    from engines import models
    from engines.manager import EngineManager

    reads = []
    real = models.read_config
    monkeypatch.setattr(models, "read_config", lambda path: reads.append(path) or real(path))
    mgr = EngineManager(str(tmp_path), {"device": "cpu"})
    try:
        info = mgr.load(tiny_llama.path, "auto")
        assert info.backend == "transformers"
        assert reads == [tiny_llama.path], reads
    finally:
        mgr.close()


def test_model_defaults_come_from_generation_config(tiny_llama, tmp_path):
    """info.defaults: the model's own sampling defaults (generation_config.json), None without them."""
    import json
    import shutil

    from engines import models, registry
    from engines.configs import TransformersConfig

    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_llama.path, folder)
    gen = folder / "generation_config.json"
    base = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps({**base, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    eng = registry.create(models.resolve(str(folder), str(tmp_path)), TransformersConfig(device="cpu"))
    try:
        d = eng.info.defaults
        assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.95, 20, 1.0)
        assert d.max_new_tokens == GenParams().max_new_tokens
    finally:
        eng.close()
    assert models.sampling_defaults({"bos_token_id": 1}) is None
    assert models.sampling_defaults({"temperature": 9.0, "top_k": 5}).top_k == 5   # out of range: ours


# ---------------------------------------------------------------- the same states on LMDeploy (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_lmdeploy_abort_in_every_state(backend, tiny_llama):
    """Real LMDeploy with one place (max_batch 1): abort before LMDeploy has the request, while it
    waits for the place, and while it decodes; each stream ends within 1 s with "abort", the other
    request goes on, and neither our bookkeeping nor LMDeploy's sessions keep anything."""
    from engines import registry
    from engines.configs import LMDeployConfig
    from engines.lmdeploy import LMDeployEngine

    config = LMDeployConfig(backend=backend, cache_max_entry_count=0.2, session_len=4096, max_batch=1)
    registry.precheck(tiny_llama, config)
    eng = registry.create(tiny_llama, config)
    try:
        # before LMDeploy has it: aborted while stream() prepares it
        early = ask(50)
        real = LMDeployEngine._gen_config

        def abort_meanwhile(p):
            eng.abort(early.request_id)
            return real(p)

        eng._gen_config = abort_meanwhile
        deltas = list(eng.stream(early))
        del eng._gen_config
        assert deltas[-1].finish_reason == "abort" and deltas[-1].tokens == 0
        # decoding, with a second request waiting for the only place
        running, waiting = ask(3000), ask(50)
        a = Reader(eng.stream(running))
        assert a.first.wait(60)
        b = Reader(eng.stream(waiting))
        time.sleep(0.5)
        assert not b.deltas, "the second request should wait for LMDeploy's only place"
        _aborted_within_a_second(eng, waiting, b)
        assert not a.ended.is_set(), "the running request must go on"
        assert wait_until(lambda: len(a.deltas) >= 5, 30)
        _aborted_within_a_second(eng, running, a)
        assert a.last.tokens < 3000
        assert wait_until(lambda: eng.live_requests() == 0 and eng.lmdeploy_sessions() == 0, 5), \
            (eng.live_requests(), eng.lmdeploy_sessions())
        # and it serves again, the place given back
        deltas = list(eng.stream(ChatRequest(PROMPT, GenParams(temperature=0, max_new_tokens=8))))
        assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 8
        assert wait_until(lambda: eng.live_requests() == 0 and eng.lmdeploy_sessions() == 0, 5)
    finally:
        eng.close()
