"""The LMDeploy adapter's own logic, run without LMDeploy against a fake of the parts of LMDeploy
0.18 it uses (the GPU tests run the real one): a pipeline with its event-loop thread, an
``AsyncEngine`` with ``preprocess``/``generate``, sessions that take one of ``max_batch_size``
request handles for the request's life (``Session.request_handle``), an engine cancel
(``async_cancel``) that ends the sequence with finish reason "abort".

Checked: abort by request id in every state (before LMDeploy has the request, waiting for a handle,
decoding) ends the stream within a second and leaves no session or handle behind; a finished stream
ends at its last output; dead-engine detection; the LLaVA image-token shim; the model read once per
load (config.json once, TurboMind's support check once)."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
import weakref
from contextlib import asynccontextmanager

import pytest

from engines.base import ChatMessage, ChatRequest, GenParams
from engines.lmdeploy import LMDeployEngine, _use_own_image_token
from tests.clients import Reader, wait_until


# ---------------------------------------------------------------- a fake LMDeploy 0.18
class FakeHandle:
    """An engine instance: ``async_cancel`` ends that session's sequence at its next step."""

    def __init__(self):
        self.cancelled: set[int] = set()

    async def async_cancel(self, session_id):
        self.cancelled.add(session_id)


class FakeSession:
    """LMDeploy 0.18's Session as far as the adapter and ``generate`` use it."""

    def __init__(self, session_id, mgr):
        self.session_id = session_id
        self._session_mgr = weakref.ref(mgr)
        self._handle = None
        self._active = None
        self._remove_on_request_exit = False

    @asynccontextmanager
    async def request_handle(self):
        mgr = self._session_mgr()
        self._handle = await mgr.pool().get()
        self._active = asyncio.Event()
        try:
            yield self._handle
        except (asyncio.CancelledError, GeneratorExit):
            await self._handle.async_cancel(self.session_id)
        finally:
            mgr.pool().put_nowait(self._handle)
            self._handle = None
            self._active.set()
            if self._remove_on_request_exit:
                mgr.remove(self)

    async def async_abort(self):
        if self._handle is not None:
            await self._handle.async_cancel(self.session_id)

    async def async_close(self):
        if self._handle is not None:
            await self.async_abort()
            await self._active.wait()
        mgr = self._session_mgr() if self._session_mgr is not None else None
        if mgr is not None:
            mgr.remove(self)
        self._session_mgr = None


class FakeSessionManager:
    def __init__(self, handles: int):
        self.sessions: dict[int, FakeSession] = {}
        self.handles = [FakeHandle() for _ in range(handles)]
        self._pool = None
        self._ids = iter(range(10**9))

    def pool(self) -> asyncio.Queue:
        if self._pool is None:
            self._pool = asyncio.Queue()
            for h in self.handles:
                self._pool.put_nowait(h)
        return self._pool

    def get(self) -> FakeSession:
        s = FakeSession(next(self._ids), self)
        self.sessions[s.session_id] = s
        return s

    def remove(self, session):
        self.sessions.pop(session.session_id, None)


class FakeDetokenizeState:
    def __init__(self, ids_offset=0, prev_tokens=None, prefix_offset=0, read_offset=0):
        self.ids_offset, self.seen = ids_offset, prev_tokens


class FakeTokenizer:
    """LMDeploy's Tokenizer as the adapter uses it: ``encode``, and ``detokenize_incrementally``
    over all ids so far (prompt ids are >= 1000 and make no text; id ``i`` is ``"t{i} "``)."""

    def __init__(self, *args, **kwargs):
        pass

    def encode(self, s, add_bos=True):
        return [0] * (len(s.split()) + add_bos)

    def detokenize_incrementally(self, all_input_ids, state, skip_special_tokens=True,
                                 spaces_between_special_tokens=True):
        new = all_input_ids[state.ids_offset:]
        text = "".join(f"t{i} " for i in new if i < 1000)
        return text, FakeDetokenizeState(len(all_input_ids), True)


class FakeAsyncEngine:
    def __init__(self, mgr: FakeSessionManager, step: float):
        self.session_mgr = mgr
        self.step = step
        self.preprocessed = 0
        self.hold_end: threading.Event | None = None    # LMDeploy lets go of a finished request later
        self.tokenizer = FakeTokenizer()
        self.chat_template = types.SimpleNamespace(
            messages2prompt=lambda msgs: " ".join(m["content"] for m in msgs))

    async def preprocess(self, messages, session_id, gen_config):
        self.preprocessed += 1
        await asyncio.sleep(0)
        prompt = " ".join(m["content"] for m in messages).split()
        return types.SimpleNamespace(session=session_id, n=gen_config["max_new_tokens"],
                                     inputs={"input_ids": [1000 + len(w) for w in prompt]})

    async def generate(self, request, stream_response=True):
        session = request.session
        session._remove_on_request_exit = True
        # as LMDeploy's generate: the ids so far (prompt first), each output's text from the
        # tokenizer's incremental detokenizer, the new ids beside it
        token_ids = list(request.inputs["input_ids"])
        state = FakeDetokenizeState(len(token_ids))
        async with session.request_handle() as handle:
            for i in range(request.n):
                if session.session_id in handle.cancelled:
                    yield types.SimpleNamespace(response="", generate_token_len=i, finish_reason="abort",
                                                token_ids=[])
                    return
                await asyncio.sleep(self.step)
                token_ids.append(i)
                offset = state.ids_offset
                response, state = self.tokenizer.detokenize_incrementally(token_ids, state)
                yield types.SimpleNamespace(response=response, generate_token_len=i + 1, finish_reason=None,
                                            token_ids=token_ids[offset:])
            yield types.SimpleNamespace(response="", generate_token_len=request.n, finish_reason="length",
                                        token_ids=[])
            if self.hold_end is not None:
                while not self.hold_end.is_set():
                    await asyncio.sleep(0.01)


class FakePipe:
    def __init__(self, handles: int = 2, step: float = 0.01):
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()
        self.internal_thread = types.SimpleNamespace(loop=self.loop, thread=thread)
        self.session_mgr = FakeSessionManager(handles)
        self.async_engine = FakeAsyncEngine(self.session_mgr, step)
        self.backend_config = types.SimpleNamespace(session_len=4096, max_batch_size=handles, dtype="bfloat16",
                                                    cache_block_seq_len=64)

    def session(self):
        return self.session_mgr.get()

    def block_loop(self) -> threading.Event:
        """Hold LMDeploy's loop (what a busy loop does): nothing submitted to it starts until set."""
        go = threading.Event()
        self.loop.call_soon_threadsafe(go.wait, 10)
        return go

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fake_lmdeploy(monkeypatch):
    """LMDeployEngine's LMDeploy-facing steps replaced by the fake; returns the pipes it built. The
    fake lives in this process, so the engine is built here too (``engine_process`` off; the engine
    core itself is tested in tests/engines/test_core.py, on the GPU in tests/gpu)."""
    from engines import core, lmdeploy

    monkeypatch.setattr(core, "wants_process", lambda config: False)

    pipes = []

    def pipeline(resolved, config):
        pipes.append(FakePipe(handles=config.max_batch or 2))
        return pipes[-1]

    monkeypatch.setattr(LMDeployEngine, "_check_gpu", staticmethod(lambda config: None))
    monkeypatch.setattr(LMDeployEngine, "_check_weights_fit", staticmethod(lambda *a: None))
    monkeypatch.setattr(LMDeployEngine, "_check_kv_room", staticmethod(lambda *a: None))
    monkeypatch.setattr(LMDeployEngine, "_pipeline", staticmethod(pipeline))
    monkeypatch.setattr(LMDeployEngine, "_gen_config", staticmethod(lambda p: {"max_new_tokens": p.max_new_tokens}))
    monkeypatch.setattr(lmdeploy, "lmdeploy_available", lambda: (True, ""))
    monkeypatch.setattr(lmdeploy, "turbomind_supports", lambda path, trust_remote_code=False: (True, ""))
    # close() collects garbage to give device memory back: the fake holds none, and a full
    # collection of this process's heap (torch, transformers, gradio) took ~1 s per test
    monkeypatch.setattr(lmdeploy, "heap", types.SimpleNamespace(collect=lambda *a: None))
    yield pipes
    for p in pipes:
        p.close()


@pytest.fixture
def engine(fake_lmdeploy, tiny_llama):
    from engines import models
    from engines.configs import LMDeployConfig

    # a resolved model of its own: TurboMind's support answer is kept per resolved model
    resolved = models.resolve(tiny_llama.path, "/tmp")
    eng = LMDeployEngine(resolved, LMDeployConfig(backend="turbomind", max_batch=1))
    yield eng
    eng.close()


class Pushed:
    """``engine.start(request, sink)`` read as the engine process's parent reads it: Deltas until
    the one with a finish reason. ``check`` then holds the push path to its promises: nothing after
    the closing Delta, and ``None`` exactly once, last (when LMDeploy has let go)."""

    def __init__(self, engine, request):
        import queue

        self.got: list = []
        self.q = queue.SimpleQueue()
        engine.start(request, self._sink)

    def _sink(self, d):
        self.got.append(d)
        self.q.put(d)

    def __iter__(self):
        while True:
            d = self.q.get(timeout=10)
            assert d is not None, "the end came before a closing Delta"
            yield d
            if d.finish_reason:
                return

    def check(self):
        assert wait_until(lambda: self.got and self.got[-1] is None), f"LMDeploy never let go: {self.got}"
        time.sleep(0.02)                     # anything late would show up here
        assert self.got.count(None) == 1 and self.got[-1] is None
        reasons = [i for i, d in enumerate(self.got[:-1]) if d.finish_reason]
        assert reasons == [len(self.got) - 2], f"a Delta after the closing one: {self.got}"


@pytest.fixture(params=["stream", "push"])
def run(request):
    """Each state test on both of the adapter's paths: ``stream`` (pull, a queue read by the caller)
    and ``start`` (push, the engine process's path; each push checked at the test's end)."""
    if request.param == "stream":
        yield lambda eng, req: eng.stream(req)
        return
    pushes = []

    def push(eng, req):
        pushes.append(Pushed(eng, req))
        return iter(pushes[-1])

    yield push
    for p in pushes:
        p.check()


def ask(n=200) -> ChatRequest:
    return ChatRequest((ChatMessage("user", "hello there"),), GenParams(max_new_tokens=n))


def _nothing_left(eng, pipe):
    """No request of ours, no LMDeploy session, every handle back in the pool."""
    def check():
        pool = pipe.session_mgr._pool
        return (eng.live_requests() == 0 and eng.lmdeploy_sessions() == 0
                and (pool is None or pool.qsize() == len(pipe.session_mgr.handles)))
    return wait_until(check)


# ---------------------------------------------------------------- the contract's states
def test_info_and_capabilities(engine):
    info = engine.info
    assert info.backend == "turbomind" and info.max_batch == 1 and info.context_length == 4096
    assert info.capabilities.penalties is False, "LMDeploy 0.18's GenerationConfig has no presence/frequency penalty"
    assert info.capabilities.seed and not info.capabilities.vision


def test_a_finished_stream_ends_at_its_last_output_and_lmdeploy_lets_go_after(engine, fake_lmdeploy, run):
    pipe = fake_lmdeploy[0]
    pipe.async_engine.hold_end = threading.Event()
    t0 = time.perf_counter()
    deltas = list(run(engine, ask(3)))
    assert time.perf_counter() - t0 < 1, "the stream waited for LMDeploy to let go of the request"
    assert [d.text for d in deltas] == ["t0 ", "t1 ", "t2 ", ""] and deltas[-1].finish_reason == "length"
    assert deltas[-1].tokens == 3
    assert engine.live_requests() == 1, "LMDeploy still holds the request"
    pipe.async_engine.hold_end.set()
    assert _nothing_left(engine, pipe)


def test_wait_end_ends_the_stream_when_lmdeploy_has_let_go(fake_lmdeploy, tiny_llama):
    from engines import models
    from engines.configs import LMDeployConfig

    eng = LMDeployEngine(models.resolve(tiny_llama.path, "/tmp"), LMDeployConfig(wait_end=True))
    try:
        pipe = fake_lmdeploy[0]
        pipe.async_engine.hold_end = threading.Event()
        r = Reader(eng.stream(ask(3)))
        assert wait_until(lambda: r.deltas and r.deltas[-1].finish_reason == "length")
        time.sleep(0.1)
        assert not r.ended.is_set()
        pipe.async_engine.hold_end.set()
        assert r.ended.wait(2) and eng.live_requests() == 0
    finally:
        eng.close()


def test_abort_during_stream_before_lmdeploy_has_it(engine, fake_lmdeploy, run, monkeypatch):
    """The id is marked while ``stream`` still prepares the request: it is never submitted."""
    pipe = fake_lmdeploy[0]
    req = ask()
    real = LMDeployEngine._gen_config

    def abort_meanwhile(p):
        engine.abort(req.request_id)
        return real(p)

    monkeypatch.setattr(LMDeployEngine, "_gen_config", staticmethod(abort_meanwhile))
    deltas = list(run(engine, req))
    assert deltas[-1].finish_reason == "abort" and deltas[-1].tokens == 0
    assert pipe.async_engine.preprocessed == 0
    assert _nothing_left(engine, pipe)


def test_abort_after_submission_before_the_request_started(engine, fake_lmdeploy, run):
    """Submitted to LMDeploy's loop, which has not run it yet: the coroutine checks the mark when
    it starts and LMDeploy never sees the request."""
    pipe = fake_lmdeploy[0]
    go = pipe.block_loop()
    req = ask()
    r = Reader(run(engine, req))
    t0 = time.perf_counter()
    engine.abort(req.request_id)
    assert r.ended.wait(1.0) and r.last.finish_reason == "abort"
    assert time.perf_counter() - t0 < 1.0
    go.set()
    assert _nothing_left(engine, pipe)
    assert pipe.async_engine.preprocessed == 0


def test_abort_while_waiting_for_a_place_in_lmdeploy(engine, fake_lmdeploy, run):
    """max_batch 1: the second request waits for LMDeploy's only request handle. Its abort ends its
    stream at once and cancels the wait; the first request is not disturbed; nothing is left."""
    pipe = fake_lmdeploy[0]
    first, second = ask(60), ask()
    a = Reader(run(engine, first))
    assert a.first.wait(5)
    b = Reader(run(engine, second))
    assert wait_until(lambda: pipe.async_engine.preprocessed == 2)
    time.sleep(0.05)
    assert not b.deltas, "the second request should be waiting for a handle"
    t0 = time.perf_counter()
    engine.abort(second.request_id)
    assert b.ended.wait(1.0) and b.last.finish_reason == "abort" and b.last.tokens == 0
    assert time.perf_counter() - t0 < 1.0
    assert a.ended.wait(10) and a.last.finish_reason == "length" and a.last.tokens == 60
    assert not pipe.session_mgr.handles[0].cancelled, "the waiting request's abort reached the engine"
    assert _nothing_left(engine, pipe)


def test_abort_while_decoding_is_an_engine_cancel(engine, fake_lmdeploy, run):
    pipe = fake_lmdeploy[0]
    req = ask(1000)
    r = Reader(run(engine, req))
    assert wait_until(lambda: len(r.deltas) >= 3)
    t0 = time.perf_counter()
    engine.abort(req.request_id)
    assert r.ended.wait(1.0) and r.last.finish_reason == "abort"
    assert time.perf_counter() - t0 < 1.0 and r.last.tokens < 1000
    # (the push path's stream ends at the closing Delta; LMDeploy's cancel follows on its loop)
    assert wait_until(lambda: pipe.session_mgr.handles[0].cancelled), "LMDeploy's own cancel was not used"
    assert _nothing_left(engine, pipe)
    # the engine serves the next request
    assert list(run(engine, ask(2)))[-1].finish_reason == "length"


def test_a_consumer_that_leaves_early_aborts_and_lmdeploy_lets_go_before_it_returns(engine, fake_lmdeploy):
    pipe = fake_lmdeploy[0]
    it = engine.stream(ask(1000))
    next(it)
    it.close()
    assert engine.live_requests() == 0 and engine.lmdeploy_sessions() == 0
    assert _nothing_left(engine, pipe)


def test_close_ends_every_open_stream(engine, fake_lmdeploy, run):
    r = Reader(run(engine, ask(1000)))
    assert r.first.wait(5)
    engine.close()
    assert r.ended.wait(1.0) and r.last.finish_reason == "abort"


def test_message_tokens_per_message_through_lmdeploys_tokenizer(engine):
    msgs = [ChatMessage("system", "be brief"), ChatMessage("user", "one two three"), ChatMessage("assistant", "")]
    assert engine.message_tokens(msgs) == [2, 3, 0]


# ---------------------------------------------------------------- the model read once
def test_an_auto_load_reads_config_json_once_and_asks_turbomind_once(fake_lmdeploy, tiny_llama, tmp_path,
                                                                      monkeypatch):
    """Before: ``turbomind_supports`` ran 3 times and config.json was read 3-4 times per auto load
    (choice, pre-check, backend, weights figure). Now resolve reads it and every step reads
    ``ResolvedModel.config``; TurboMind's answer is kept on the resolved model."""
    from engines import lmdeploy, models, registry
    from engines.manager import EngineManager

    reads, asks = [], []
    real_read = models.read_config
    monkeypatch.setattr(models, "read_config", lambda path: reads.append(path) or real_read(path))
    monkeypatch.setattr(lmdeploy, "turbomind_supports",
                        lambda path, trust_remote_code=False: asks.append(path) or (True, ""))
    monkeypatch.setattr(registry, "_cuda", lambda: True)
    mgr = EngineManager(str(tmp_path))
    try:
        info = mgr.load(tiny_llama.path, "auto")
        assert info.backend == "turbomind" and "TurboMind supports" in info.reason
        assert reads == [tiny_llama.path] and asks == [tiny_llama.path], (reads, asks)
        text, last = mgr.submit(ask(3)).text()
        assert text == "t0 t1 t2 " and last.finish_reason == "length"
    finally:
        mgr.close()


def test_turbomind_refusal_falls_back_to_pytorch_with_one_check(fake_lmdeploy, tiny_llama, tmp_path, monkeypatch):
    from engines import lmdeploy, registry
    from engines.manager import EngineManager

    asks = []
    monkeypatch.setattr(lmdeploy, "turbomind_supports", lambda path, trust_remote_code=False:
                        asks.append(path) or (False, "TurboMind does not support this architecture"))
    monkeypatch.setattr(registry, "_cuda", lambda: True)
    mgr = EngineManager(str(tmp_path))
    try:
        info = mgr.load(tiny_llama.path, "auto")
        assert info.backend == "pytorch" and "PyTorch" in info.reason and len(asks) == 1
    finally:
        mgr.close()


def test_a_long_prompt_is_counted_once_through_the_manager(fake_lmdeploy, tiny_llama, tmp_path, monkeypatch):
    """A prompt past the context's byte bound (and any with images) has its tokens counted while the
    manager fits the history; the engine takes that count instead of running the tokenizer again (in
    the engine process the second count ran on the thread every frame waits behind)."""
    from engines import registry
    from engines.manager import EngineManager

    monkeypatch.setattr(registry, "_cuda", lambda: True)
    mgr = EngineManager(str(tmp_path))
    try:
        mgr.load(tiny_llama.path, "turbomind")
        eng = mgr.require()
        counted = []
        real = LMDeployEngine.count_tokens
        monkeypatch.setattr(LMDeployEngine, "count_tokens",
                            lambda self, msgs: counted.append(len(msgs)) or real(self, msgs))
        long = ChatRequest((ChatMessage("user", "word " * 1200),), GenParams(max_new_tokens=3))
        text, last = mgr.submit(long).text()
        assert last.finish_reason == "length" and len(counted) == 1, counted
        # a short prompt is never counted at all (its byte bound fits)
        counted.clear()
        assert mgr.submit(ask(2)).text()[1].finish_reason == "length" and counted == []
        assert _nothing_left(eng, fake_lmdeploy[-1])
    finally:
        mgr.close()


# ---------------------------------------------------------------- health and shims
def _bare_engine():
    eng = object.__new__(LMDeployEngine)      # no pipeline: only the bookkeeping is exercised
    eng._closed, eng._fatal = False, None
    eng.pipe = types.SimpleNamespace(internal_thread=types.SimpleNamespace(thread=threading.current_thread()))
    return eng


def test_a_cuda_error_marks_the_engine_dead_and_an_ordinary_one_does_not():
    eng = _bare_engine()
    eng._note_error("prompt too long for this session")
    assert eng.health() is None
    eng._note_error("RuntimeError: CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
    assert "device-side assert" in eng.health() and "\n" not in eng.health()


def test_a_stopped_event_loop_marks_the_engine_dead():
    eng = _bare_engine()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    eng.pipe.internal_thread.thread = t
    assert "event loop" in eng.health()
    eng._closed = True
    assert eng.health() is None, "an unloaded engine is not reported as dead"


def test_llava_placeholder_becomes_the_models_own_image_token():
    class LlavaHfVisionModel:
        image_token_id = 2                       # LMDeploy's pick: the pad token (SmolLM2's <|im_end|>)
        hf_config = types.SimpleNamespace(image_token_index=49152)

    m = LlavaHfVisionModel()
    _use_own_image_token(m)
    assert m.image_token_id == 49152

    class InternVLVisionModel:                   # other families keep LMDeploy's own choice
        image_token_id = 7
        hf_config = types.SimpleNamespace(image_token_index=99)

    other = InternVLVisionModel()
    _use_own_image_token(other)
    assert other.image_token_id == 7


def test_detokenize_elsewhere_sends_ids_that_make_the_same_text(engine, fake_lmdeploy, run, monkeypatch):
    """``detokenize_elsewhere`` (engines/core.py's ``TURBOSTUDIO_CORE_DETOKENIZE=1``): LMDeploy's
    detokenizer on its loop only advances offsets, every Delta carries its new token ids and no
    text, the first one also the prompt's ids (as preprocess made them); the named text side
    (``LMDeployText``, running LMDeploy's own ``detokenize_incrementally``) turns them into exactly
    the text LMDeploy made before."""
    from engines import lmdeploy

    fake_mod = types.ModuleType("lmdeploy.tokenizer")
    fake_mod.DetokenizeState, fake_mod.Tokenizer = FakeDetokenizeState, FakeTokenizer
    monkeypatch.setitem(sys.modules, "lmdeploy", types.ModuleType("lmdeploy"))
    monkeypatch.setitem(sys.modules, "lmdeploy.tokenizer", fake_mod)
    before = list(run(engine, ask(5)))
    spec = engine.detokenize_elsewhere()
    assert spec[0] == "engines.lmdeploy:LMDeployText" and spec[1][0] == engine._path
    after = list(run(engine, ask(5)))
    assert all(d.text == "" for d in after) and [len(d.ids) for d in after] == [1] * 5 + [0]
    assert after[0].prompt_ids == (1005, 1005) and all(d.prompt_ids is None for d in after[1:])
    assert [d.tokens for d in after] == [d.tokens for d in before]
    text = lmdeploy.LMDeployText(*spec[1])
    feed = text.stream(after[0].prompt_ids)
    assert [feed(d.ids) if d.ids else "" for d in after] == [d.text for d in before]
    assert "".join(d.text for d in before) == "t0 t1 t2 t3 t4 "
