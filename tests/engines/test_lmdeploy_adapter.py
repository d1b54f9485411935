"""The LMDeploy adapter's own logic that runs without LMDeploy (the GPU tests run the rest):
dead-engine detection, the LLaVA image-token shim, and how a stream ends (sessions closed
after the request lets go of its engine instance; aborted ones at once)."""
from __future__ import annotations

import threading
import types

from engines.lmdeploy import LMDeployEngine, _use_own_image_token


def _bare_engine():
    eng = object.__new__(LMDeployEngine)      # no pipeline: only the bookkeeping is exercised
    eng._closed, eng._fatal, eng._wait_end = False, None, False
    eng.pipe = types.SimpleNamespace(internal_thread=types.SimpleNamespace(thread=threading.current_thread()))
    return eng


def test_a_cuda_error_marks_the_engine_dead_and_an_ordinary_one_does_not():
    eng = _bare_engine()
    eng._note_error("prompt too long for this session")
    assert eng.dead is None
    eng._note_error("RuntimeError: CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
    assert "device-side assert" in eng.dead and "\n" not in eng.dead


def test_a_stopped_event_loop_marks_the_engine_dead():
    eng = _bare_engine()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    eng.pipe.internal_thread.thread = t
    assert "event loop" in eng.dead
    eng._closed = True
    assert eng.dead is None, "an unloaded engine is not reported as dead"


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


class _FakeSession:
    """LMDeploy 0.18's Session as far as the adapter uses it: an engine instance (``_handle``) held
    while the request runs, ``_active`` set when it is let go, closes run on the manager's loop."""

    def __init__(self, loop):
        import asyncio

        self._session_mgr = lambda: types.SimpleNamespace(loop=loop)
        self._handle = object()
        self._active = None
        self.events = []
        asyncio.run_coroutine_threadsafe(self._start(), loop).result()

    async def _start(self):
        import asyncio

        self._active = asyncio.Event()

    async def release(self):             # what request_handle's exit does at the request's end
        self._handle = None
        self._active.set()

    async def async_close(self):
        self.events.append(("close", self._handle is None))

    def abort(self):
        self.events.append(("abort", None))

    def close(self):
        self.events.append(("blocking close", self._handle is None))


def _loop_thread():
    import asyncio

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def _responses(n, release_after=None):
    """LMDeploy's sync responses: n texts, the last with a finish reason; the end marker (the
    iterator's end) comes only when ``release_after`` is set: until then the iterator blocks."""
    for i in range(n):
        yield types.SimpleNamespace(text=f"t{i} ", generate_token_len=i + 1,
                                    finish_reason="length" if i == n - 1 else None, error_message=None)
    if release_after is not None:
        release_after.wait(30)


def _engine_with_lock():
    eng = _bare_engine()
    eng._lock = threading.Lock()
    eng._sessions = {}
    return eng


def test_a_finished_stream_ends_at_its_last_response_and_closes_after_the_engine_lets_go():
    import asyncio
    import time

    loop = _loop_thread()
    eng = _engine_with_lock()
    session = _FakeSession(loop)
    end_marker = threading.Event()
    eng._sessions["u"] = [session]
    t0 = time.perf_counter()
    deltas = list(eng._relay(_responses(3, release_after=end_marker), session, "u"))
    assert time.perf_counter() - t0 < 1, "the stream waited for LMDeploy's end marker"
    assert [d.text for d in deltas] == ["t0 ", "t1 ", "t2 "] and deltas[-1].finish_reason == "length"
    assert "u" not in eng._sessions
    time.sleep(0.1)
    assert session.events == [], "closed while the request still held its engine instance"
    asyncio.run_coroutine_threadsafe(session.release(), loop).result()
    time.sleep(0.1)
    assert session.events == [("close", True)]
    end_marker.set()
    loop.call_soon_threadsafe(loop.stop)


def test_a_stream_left_early_is_aborted_and_closed_before_the_caller_goes_on():
    loop = _loop_thread()
    eng = _engine_with_lock()
    session = _FakeSession(loop)
    it = eng._relay(_responses(5), session, "v")
    next(it)
    it.close()
    assert session.events == [("abort", None), ("blocking close", False)]
    loop.call_soon_threadsafe(loop.stop)
