"""ui/gradio_patches.py: a new Gradio session no longer builds every component's config up front,
and what it reads back is the same as Gradio's own (measured effect: bench/bench_web.py)."""
from __future__ import annotations

import os
import time

import pytest


@pytest.fixture(scope="module", autouse=True)
def gr():
    """Gradio, imported when these tests run (~4 s on the 2-core machine), not when pytest collects them."""
    return pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def demo(gr, tmp_path_factory):
    import settings as sm
    from engines.manager import EngineManager
    from engines.quantize import JobRunner
    from engines.servers import ServerManager
    from ui.app import build_app
    from ui.common import Context
    from ui.vision import VisionSlot

    d = str(tmp_path_factory.mktemp("cache"))
    s = sm.from_args(["--no-load", "--cache-dir", d], env={})
    ctx = Context(settings=s, manager=EngineManager(d))
    ctx.vision = VisionSlot(ctx)
    ctx.jobs = JobRunner(d)
    ctx.servers = ServerManager(os.path.join(d, "servers"))
    yield build_app(ctx)
    ctx.jobs.close()


def test_sessions_are_cheap_and_read_back_the_same_configs(demo):
    from gradio.state_holder import SessionState

    from ui.gradio_patches import lazy_session_config

    eager = [SessionState(demo) for _ in range(3)]
    t0 = time.perf_counter()
    for _ in range(3):
        SessionState(demo)
    eager_s = (time.perf_counter() - t0) / 3
    assert lazy_session_config() and lazy_session_config(), "installs once, idempotent"
    t0 = time.perf_counter()
    lazy = [SessionState(demo) for _ in range(3)]
    lazy_s = (time.perf_counter() - t0) / 3
    assert lazy_s < eager_s / 5, (eager_s, lazy_s)
    assert list(lazy[0].components) == list(eager[0].components)
    assert len(list(lazy[1].components)) == len(demo.blocks) > 100


def test_a_value_set_before_any_read_lands_in_the_config(demo, gr):
    from gradio.state_holder import SessionState

    from ui.gradio_patches import lazy_session_config

    lazy_session_config()
    key = next(k for k, b in demo.blocks.items() if isinstance(b, gr.Textbox))
    a, b = SessionState(demo), SessionState(demo)
    a._update_value_in_config(key, "hello")
    assert a.config_values[key]["props"]["value"] == "hello"
    assert b.config_values[key]["props"].get("value") != "hello", "sessions do not share configs"
    assert key in a.config_values and a.config_values.get(key) is a.config_values[key]


def test_the_queue_wakes_on_events_and_sleeps_when_idle(gr):
    """event_driven_queue: a request starts at once (it wakes the loop; the fallback wait is 50 ms),
    a request waiting for a place starts when the place frees, and an idle queue loop runs ~20
    times a second instead of ~1000 (Gradio's 1 ms poll)."""
    import threading

    from gradio import queueing
    from gradio_client import Client

    from ui.gradio_patches import event_driven_queue

    assert event_driven_queue() and event_driven_queue(), "installs once, idempotent"
    started, ended = [], []

    def work(x):
        started.append(time.perf_counter())
        time.sleep(0.3)
        ended.append(time.perf_counter())
        return x

    with gr.Blocks() as app:
        box = gr.Textbox()
        gr.Button().click(work, box, box, api_name="work", concurrency_limit=1)
    app.queue()
    app.launch(prevent_thread_lock=True, server_port=None, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        calls = {"n": 0}
        real_len = queueing.Queue.__len__

        def counting_len(self):
            calls["n"] += 1
            return real_len(self)

        queueing.Queue.__len__ = counting_len
        try:
            time.sleep(1.0)
        finally:
            queueing.Queue.__len__ = real_len
        assert calls["n"] < 60, f"the idle queue loop ran {calls['n']} times in a second"
        jobs, sent = [], []
        for i in range(2):          # the second waits for the first's place (concurrency 1)
            sent.append(time.perf_counter())
            jobs.append(client.submit(str(i), api_name="/work"))
        assert [j.result(timeout=30) for j in jobs] == ["0", "1"]
        # client + HTTP included, so only a coarse bound (a loaded 2-core CI machine took 0.25 s);
        # the queue's own promptness is the next line's, measured inside the server
        assert started[0] - sent[0] < 1.0, "the first request started late"
        assert started[1] - ended[0] < 0.03, "the waiting request did not start when the place freed"
    finally:
        app.close()
    assert threading.active_count() < 200


def test_every_handler_that_asks_for_the_request_gets_it(demo):
    """Gradio injects ``gr.Request`` only into positional parameters: one declared after ``*args``
    silently stays None (the Chat page's requests were once all session "anonymous", so Stop and a
    closed tab could not find them, and owners were lost)."""
    import inspect

    from gradio.helpers import special_args

    missed = []
    for fn in demo.fns.values():
        f = fn.fn
        if f is None:
            continue
        params = inspect.signature(f).parameters
        if "request" not in params:
            continue
        n_inputs = len(fn.inputs)
        probe = object()
        filled, *_ = special_args(f, [None] * n_inputs, request=probe)
        if probe not in filled:
            missed.append(f"{fn.name or f.__name__} ({f.__qualname__})")
    assert not missed, f"handlers whose request is never injected: {missed}"


_EVALUATED: list = []


def _counted_request():
    """An annotation with a side effect: each evaluation of the string "_counted_request()" is
    recorded (to tell a kept type hint from one evaluated again)."""
    import gradio as gr

    _EVALUATED.append(1)
    return gr.Request


def test_handler_calls_keep_their_type_hints_and_do_not_look_for_a_missing_matplotlib(gr):
    """call_overheads: Gradio evaluates a handler's string annotations on every call (special_args);
    they are now evaluated once, the request is still injected, and a caller that changes the hints
    it got changes nothing kept. Without matplotlib, a call no longer searches sys.path for it."""
    import importlib.util
    import sys
    import typing

    from gradio import utils
    from gradio.helpers import special_args

    from ui.gradio_patches import call_overheads

    assert call_overheads() and call_overheads(), "installs once, idempotent"

    def handler(x: "int", request: "_counted_request()" = None):  # noqa: F821 - evaluated by typing
        return x

    request = gr.Request(username="ann")
    _EVALUATED.clear()
    for _ in range(5):
        args, _, _, _ = special_args(handler, [1], request)
        assert args[1] is request, "the request is still injected"
    assert len(_EVALUATED) == 1, f"hints evaluated {len(_EVALUATED)} times for 5 calls"
    hints = utils.get_type_hints(handler)
    assert hints == typing.get_type_hints(handler)
    hints.clear()
    assert utils.get_type_hints(handler), "what a caller does to its copy is not kept"

    if importlib.util.find_spec("matplotlib") is None:
        looked = []

        class Watch:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "matplotlib":
                    looked.append(name)
                return None

        sys.meta_path.insert(0, Watch)
        try:
            with utils.MatplotlibBackendMananger():
                pass
        finally:
            sys.meta_path.remove(Watch)
        assert looked == [], "a call searched for matplotlib"


def test_a_value_past_a_sliders_range_is_refused_without_a_traceback():
    """Gradio's own range check (Number and Slider) refuses with the same message, but as a user's
    error: no traceback in the server log (issue #16)."""
    import gradio as gr

    from ui.gradio_patches import quiet_range_refusals

    assert quiet_range_refusals() and quiet_range_refusals(), "installs once, idempotent"
    with pytest.raises(gr.Error) as e:
        gr.Slider(0, 2).preprocess(5)
    assert e.value.message == "Value 5 is greater than maximum value 2." and not e.value.print_exception
    with pytest.raises(gr.Error, match="less than minimum value 1"):
        gr.Number(minimum=1).preprocess(0)
    assert gr.Slider(0, 2).preprocess(1.5) == 1.5


@pytest.mark.parametrize("monitoring", [False, None])
def test_no_pandas_summary_after_each_event_while_gradios_monitoring_is_off(gr, monitoring):
    """no_queue_analytics: with ``enable_monitoring=False`` (the app's launch) the queue neither
    builds its DataFrame summary nor keeps 10 000 event records; with Gradio's default (None: its
    dashboard reachable) the summary is Gradio's own, computed as before."""
    from gradio import queueing
    from gradio_client import Client

    from ui.gradio_patches import no_queue_analytics

    assert no_queue_analytics() and no_queue_analytics(), "installs once, idempotent"
    frames = {"n": 0}
    real = queueing.Queue._get_df

    def counting(records):
        frames["n"] += 1
        return real(records)

    with gr.Blocks() as app:
        box = gr.Textbox()
        gr.Button().click(lambda x: x + "!", box, box, api_name="echo")
    app.queue()
    app.launch(prevent_thread_lock=True, quiet=True, enable_monitoring=monitoring)
    queueing.Queue._get_df = staticmethod(counting)
    try:
        client = Client(app.local_url, verbose=False)
        for i in range(30):
            assert client.predict(str(i), api_name="/echo") == f"{i}!"
        q = app._queue
        if monitoring is False:
            assert frames["n"] == 0 and len(q.event_analytics) <= 16
        else:
            # (the last event's summary may still be computing when its reply arrives)
            assert frames["n"] >= 29 and len(q.event_analytics) == 30
            assert q.cached_event_analytics_summary["functions"]["echo"]["total_requests"] >= 29
    finally:
        queueing.Queue._get_df = staticmethod(real)
        app.close()


def test_the_http_stack_is_the_measured_one_unless_asked():
    """By default uvicorn serves on asyncio and h11 even where uvloop and httptools are installed
    (they were measured no faster for users: ui/gradio_patches.http_stack); a value a caller sets is
    kept; asked for, uvicorn's own choice comes back."""
    import uvicorn

    from ui.gradio_patches import http_stack

    real = uvicorn.Config.__init__
    try:
        assert http_stack(False) == "asyncio + h11"
        cfg = uvicorn.Config(app=lambda *a: None)
        assert (cfg.loop, cfg.http) == ("asyncio", "h11")
        assert uvicorn.Config(app=lambda *a: None, loop="none").loop == "none", "a caller's value kept"
        assert http_stack(False) == "asyncio + h11"          # twice: still one wrapper
        assert http_stack(True) in {"asyncio + h11", "uvloop + h11", "asyncio + httptools", "uvloop + httptools"}
        assert uvicorn.Config(app=lambda *a: None).loop == "auto", "uvicorn's own default back"
    finally:
        uvicorn.Config.__init__ = real
