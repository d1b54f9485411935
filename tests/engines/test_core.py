"""The engine in a process of its own (``engines/core.py``): what crosses the process boundary
(deltas, refusals with their parameter, errors mid-stream, aborts, calls), and what happens when the
engine's process dies: every waiting stream and call hears it, the manager's places come back, and a
new engine can be loaded. Real child processes, real threads; the engine in the child is
``tests/engines/core_engine.py`` (the Transformers one in the slow test at the end)."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from engines.base import (ChatMessage, ChatRequest, EngineError, EngineUnavailable, GenParams, InvalidRequest,
                          ModelLoadError)
from engines.core import CoreEngine, portable, rebuild
from engines.manager import EngineManager

FACTORY = "tests.engines.core_engine:ScriptedEngine"
PUSHING = "tests.engines.core_engine:PushingEngine"


def req(text: str, rid: str | None = None, **params) -> ChatRequest:
    kw = {"request_id": rid} if rid else {}
    return ChatRequest((ChatMessage("user", text),), GenParams(**params), **kw)


@pytest.fixture(scope="module", params=[FACTORY, PUSHING], ids=["pump", "push"])
def core(request):
    """Each contract test runs on both of the child's paths: a pump thread per stream, and an
    engine that pushes its Deltas from a loop of its own (LMDeploy's way)."""
    eng = CoreEngine(request.param)
    eng.pushes = request.param == PUSHING
    yield eng
    eng.close()


def wait_for(cond, timeout=5.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_the_engine_runs_in_another_process_and_streams_every_delta(core):
    assert core.pid != os.getpid() and psutil.pid_exists(core.pid)
    assert core.info.backend == "scripted" and core.info.extra["engine_process"] == core.pid
    deltas = list(core.stream(req("count 50")))
    assert "".join(d.text for d in deltas) == "".join(f" w{i}" for i in range(1, 51))
    assert deltas[-1].tokens == 50 and deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[0].prompt_tokens == 2            # the engine's own count crosses too
    assert core.live_requests() == 0


def test_many_streams_at_once_each_get_their_own_text(core):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return "".join(d.text for d in core.stream(req(f"count {20 + i}")))

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(32)))
    assert texts == ["".join(f" w{k}" for k in range(1, 21 + i)) for i in range(32)]


def test_a_refusal_keeps_its_class_parameter_and_code(core):
    with pytest.raises(InvalidRequest) as e:
        core.stream(req("refuse"))
    assert e.value.param == "temperature" and e.value.code == "test_refusal"
    assert "refuses" in e.value.message
    assert core.live_requests() == 0


def test_an_error_mid_stream_comes_after_the_text_before_it(core):
    got = []
    if core.pushes:
        deltas = list(core.stream(req("fail after 4")))       # the push path: an error Delta
        assert deltas[-1].finish_reason == "error" and "failed on purpose" in deltas[-1].error
        got = [d.text for d in deltas]
    else:
        with pytest.raises(RuntimeError, match="the engine failed on purpose"):  # the same type as in-process
            for d in core.stream(req("fail after 4")):
                got.append(d.text)
    assert "".join(got) == " w1 w2 w3"


def _settled(read, quiet=0.3, timeout=10.0):
    """``read()`` once it gave the same value for ``quiet`` seconds."""
    t0, last, since = time.time(), read(), time.time()
    while time.time() - t0 < timeout:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            break
    return last


def test_the_push_path_wakes_no_thread_per_stream(core):
    """16 streams at once: the pump path holds a thread per stream in the engine's process, the
    push path none (what it is for: nothing of ours woken per token)."""
    child = psutil.Process(core.pid)
    assert wait_for(lambda: core.live_requests() == 0)
    idle = _settled(child.num_threads)      # earlier tests' pump threads may still be on their way out
    its = [core.stream(req("forever")) for _ in range(16)]
    try:
        assert all(next(it).text == " w1" for it in its)
        grew = child.num_threads() - idle
        assert (grew <= 1) if core.pushes else (grew >= 16)
    finally:
        for it in its:
            it.close()
    assert wait_for(lambda: core.live_requests() == 0)


def test_aborts_on_the_push_path_end_at_once_and_nothing_follows():
    eng = CoreEngine(PUSHING)
    try:
        r = req("forever")
        it = eng.stream(r)
        assert next(it).text == " w1"
        eng.abort(r.request_id)
        rest = list(it)
        assert rest and rest[-1].finish_reason == "abort"
        assert all(d.finish_reason is None for d in rest[:-1])
        # an abort that comes right behind the start, in frame order: never lost
        for _ in range(20):
            r = req("forever")
            it = eng.stream(r)
            eng.abort(r.request_id)
            assert list(it)[-1].finish_reason == "abort"
        assert wait_for(lambda: eng.live_requests() == 0)
    finally:
        eng.close()


def test_abort_ends_a_running_stream_in_the_child(core):
    r = req("forever")
    it = core.stream(r)
    first = next(it)
    assert first.text == " w1"
    core.abort(r.request_id)
    rest = list(it)
    assert rest[-1].finish_reason == "abort"
    assert wait_for(lambda: core.live_requests() == 0)


@pytest.mark.parametrize("read_first", [True, False])
def test_closing_a_stream_early_aborts_it_there(core, read_first):
    it = core.stream(req("forever"))
    if read_first:
        next(it)
    assert wait_for(lambda: core.live_requests() == 1)
    it.close()
    assert wait_for(lambda: core.live_requests() == 0)


def test_calls_and_extra_methods_cross(core):
    msgs = [ChatMessage("user", "one two three"), ChatMessage("assistant", "four")]
    assert core.count_tokens(msgs) == 4 + 6
    assert core.message_tokens(msgs) == [3, 1]
    assert core.health() is None and core.scheduler().active == 0
    got = core.perplexity("a b c", max_tokens=2)
    assert got.pop("frozen") > 1000, "the engine process froze its heap once built (engines/heap.py)"
    assert got == {"perplexity": 1.5, "tokens": 2, "pid": core.pid}
    assert getattr(core, "kv_capacity", None) is None     # the child's engine has none
    with pytest.raises(AttributeError):
        core.model      # noqa: B018 - what the manager's weight count asks of a Transformers engine


def test_frames_are_paced_only_under_load():
    from engines.core import FRAME_PACE, frame_pace

    assert [frame_pace(n) for n in (0, 1, 4)] == [0.0, 0.0, 0.0]       # a few users: every token at once
    paces = [frame_pace(n) for n in range(4, 200)]
    assert paces == sorted(paces) and frame_pace(64) == FRAME_PACE and frame_pace(500) == FRAME_PACE


def test_errors_are_rebuilt_as_their_own_class():
    e = rebuild(portable(InvalidRequest("bad", param="top_p", code="c")))
    assert type(e) is InvalidRequest and (e.message, e.param, e.code) == ("bad", "top_p", "c")
    assert type(rebuild(portable(ValueError("v")))) is ValueError
    odd = rebuild(portable(KeyError("k")))
    assert type(odd) is KeyError
    class Private(Exception):
        pass
    e = rebuild(portable(Private("p")))
    assert type(e) is EngineError and "Private: p" in e.message


def test_a_failed_load_is_raised_here_and_leaves_no_process():
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(ModelLoadError, match="asked this load to fail") as e:
        CoreEngine(FACTORY, (True,))
    assert e.value.code == "test_code"
    assert wait_for(lambda: {p.pid for p in psutil.Process().children()} <= before)


def test_when_the_engine_process_dies_everyone_waiting_hears_why_and_a_reload_works(tmp_path):
    m = EngineManager(str(tmp_path))
    m._engine = CoreEngine(FACTORY)
    pid = m._engine.pid
    long = m.submit(req("forever"))
    it = iter(long)
    assert next(it).text == " w1"
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineUnavailable, match=r"engine process exited \(exit code -9\)"):
        list(it)
    assert m.places_taken == 0 and m.running == 0        # nothing held by the dead engine's requests
    assert "exited" in m.health()
    with pytest.raises(EngineUnavailable, match="exited"):
        m.submit(req("count 3"))
    assert m.places_taken == 0
    # a stream cut by the process ending by itself mid-reply hears it the same way
    m._engine = CoreEngine(FACTORY)
    with pytest.raises(EngineUnavailable, match=r"exit code 3"):
        m.submit(req("die after 3")).text()
    m._engine = CoreEngine(FACTORY)
    assert m.submit(req("count 3")).text()[0] == " w1 w2 w3"
    m._engine.close()


def test_close_ends_the_process(tmp_path):
    eng = CoreEngine(FACTORY)
    proc = psutil.Process(eng.pid)
    eng.close()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(EngineUnavailable, match="unloaded"):
        eng.stream(req("count 2"))
    eng.close()                          # idempotent


def test_the_engine_process_ends_when_the_app_is_killed(tmp_path):
    """An app killed with SIGKILL runs no cleanup: its engine's process sees its socket close and
    ends by itself (no orphan holding the GPU's memory)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "app.py"
    script.write_text("import sys, time\n"
                      f"sys.path.insert(0, {ROOT!r})\n"
                      "from engines.core import CoreEngine\n"
                      f"eng = CoreEngine({FACTORY!r})\n"
                      "it = eng.stream(__import__('tests.engines.test_core', fromlist=['req']).req('forever'))\n"
                      "next(it)\n"
                      "print(eng.pid, flush=True)\n"
                      "time.sleep(60)\n")
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = psutil.Process(int(app.stdout.readline()))
        assert child.is_running()
        app.kill()
        app.wait(10)
        child.wait(10)                   # raises TimeoutExpired if it lingers
    finally:
        if app.poll() is None:
            app.kill()


@pytest.mark.slow
def test_the_built_in_model_answers_the_same_in_its_own_process(tmp_path):
    """SmolLM2 on Transformers, greedy: the same text and token count in-process and in the engine
    core, through the manager (the config's ``engine_process``)."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "turbostudio")
    out = {}
    for mode in ("off", "on"):
        with EngineManager(cache, {"engine_process": mode}) as m:
            info = m.load(None, "transformers")
            assert ("engine_process" in info.extra) == (mode == "on")
            r = ChatRequest((ChatMessage("user", "What is the capital of France?"),),
                            GenParams(temperature=0, max_new_tokens=24))
            text, last = m.submit(r).text()
            out[mode] = (text, last.tokens, m.token_cost(list(r.messages)), info.extra["weights_bytes"])
    assert out["on"] == out["off"] and "Paris" in out["on"][0]


IDS = "tests.engines.core_engine:IdsEngine"


@pytest.mark.parametrize("push", [True, False], ids=["push", "pump"])
def test_text_made_in_this_process_from_the_childs_ids_is_the_same_text(push):
    """``detokenize=True``: the child sends token ids (``detokenize_elsewhere``), this process makes
    the text with what the child named; every stream reads the same text as with the child making
    it, also when one frame carries many outputs merged (64 streams at once, paced frames)."""
    plain = CoreEngine(IDS, push=push)
    ids = CoreEngine(IDS, push=push, detokenize=True)
    try:
        assert plain.info.extra["detokenize"] == "engine process"
        assert ids.info.extra["detokenize"] == "web process"
        want = "".join(d.text for d in plain.stream(req("count 40")))
        assert want == "".join(f" w{i}" for i in range(1, 41))
        streams = [ids.stream(req(f"count {30 + i}")) for i in range(64)]
        texts = ["".join(d.text for d in st) for st in streams]
        assert texts == ["".join(f" w{k}" for k in range(1, 31 + i)) for i in range(64)]
        deltas = list(ids.stream(req("count 3")))
        assert all(d.ids is None and d.prompt_ids is None for d in deltas)   # nothing of it leaves the proxy
        assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 3
        st = ids.stream(req("forever"))
        assert next(st).text.strip() == "w1"
        ids.abort(st.rid)
        assert [d.finish_reason for d in st][-1] == "abort"
    finally:
        plain.close()
        ids.close()


def test_an_engine_without_detokenize_elsewhere_keeps_making_its_text():
    eng = CoreEngine(FACTORY, detokenize=True)
    try:
        assert eng.info.extra["detokenize"] == "engine process"
        assert "".join(d.text for d in eng.stream(req("count 5"))) == " w1 w2 w3 w4 w5"
    finally:
        eng.close()


def test_a_text_side_that_cannot_be_built_fails_the_load_and_leaves_no_process():
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(EngineError, match="WordText.*the test asked the text side to fail"):
        CoreEngine(IDS, (False, True), detokenize=True)
    assert wait_for(lambda: {p.pid for p in psutil.Process().children()} <= before)


def test_a_paced_reader_wakes_once_a_pace_not_once_a_frame_and_gets_the_end_at_once(core):
    """The relay's pump naps on the stream (``_Stream.nap``) while its consumer paces: it takes the
    engine process's frames in bursts (one blocking read a pace instead of one a frame) and all the
    text arrives; the end cuts a nap short (a 5 s pace does not hold back a finished stream)."""
    import asyncio

    from engines.relay import relay

    st = core.stream(req("forever"))
    gets = [0]

    class Counted:            # the stream's queue, its reads that had to wait (a wake-up each) counted
        def __init__(self, q):
            self.q = q

        def get(self):
            gets[0] += self.q.empty()
            return self.q.get()

        def put(self, x):
            self.q.put(x)

        def empty(self):
            return self.q.empty()
    st.q = Counted(st.q)

    async def read_for(seconds):
        text, t0 = "", time.perf_counter()
        async for d in relay(st, on_cancel=lambda: core.abort(st.rid), interval=0.2, nap=st.nap):
            text += d.text
            if time.perf_counter() - t0 > seconds:
                break
        return text

    text = asyncio.run(read_for(1.0))
    words = text.split()
    assert len(words) >= 40 and words == [f"w{i}" for i in range(1, len(words) + 1)]
    assert gets[0] <= 15, f"{gets[0]} blocking reads for {len(words)} words: the pump woke per frame"

    st2 = core.stream(req("count 30"))

    async def read_all():
        t0, text = time.perf_counter(), ""
        async for d in relay(st2, interval=5.0, nap=st2.nap):
            text += d.text
        return time.perf_counter() - t0, text

    took, text = asyncio.run(read_all())
    assert text == "".join(f" w{i}" for i in range(1, 31)) and took < 2.0, took
