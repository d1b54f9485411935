"""Gradio shims, each measured, guarded and explained (like engines/lmdeploy.py's LMDeploy shims).

``lazy_session_config``: every new Gradio session builds the config of every component of the app
(``SessionState.__init__`` -> ``config_for_block`` for all blocks), on the event loop that also
streams every user's tokens. TurboStudio has ~190 components, so that is ~9 ms a session on the
2-core CI machine, and a REST client (``/gradio_api/call/chat``, the OpenAI-style way to script the
app) is a new session on *every* request: 64 users arriving together held every first token back
by ~0.6 s here (bench/bench_web.py). Those configs are only read back when a deep link is saved;
this shim builds each one when it is first read or set, which gives the same values (the session's
blocks are untouched until then, and setting a block sets its config).

``event_driven_queue``: Gradio's queue loop looks for new events every 1 ms (``sleep_when_free``)
and its progress loop every 10 ms, whether or not anything happens: ~1100 wake-ups a second of the
event loop, each taking the GIL (an idle app used 3.0% of a core here, 1.1% with this shim). The GIL matters in this
process: TurboMind's engine thread takes it once a decode step to signal Python
(``turbomind.py:async_signal_cb``, seen in the H100 profile), so every short hold by another thread
can delay a GPU step; with one user that step is 2 ms. The shim wakes the loop when an event is
pushed or a job ends (the two things it waits for), with 50 ms as a fallback, and refreshes progress
bars 10 times a second.

``call_overheads``: two costs Gradio 6.31 pays on every call of an event handler (a REST request,
and every step of a streaming one), on the event loop: ``special_args`` asks ``typing.get_type_hints``
of the handler each time, which evaluates its string annotations anew (this app's modules use
``from __future__ import annotations``): ~10% of the server's time with 64 users arriving at once
(py-spy); the hints of a function do not change, so they are kept per function. And each call
enters ``MatplotlibBackendMananger``, whose ``import matplotlib`` searches every folder of
``sys.path`` twice per call when matplotlib is not installed (~3%): without matplotlib it does
nothing. Both measured side by side with ``bench/bench_web.py`` (server CPU per request).

``no_queue_analytics``: after every event (each REST call, each page event), Gradio 6.31's queue
rebuilds a pandas DataFrame of the last ``GRADIO_ANALYTICS_MAX_EVENTS`` (10 000) events, groups it
by function and takes percentiles (``Queue.compute_analytics_summary``, in a worker thread that
holds the GIL for most of it), for one reader: Gradio's ``/monitoring`` dashboard. Its cost grows
with the server's age, up to 10 000 events: found with py-spy (2026-12-02) as the largest single
cost of a ``/chat`` call, ~25% of the event loop's busy samples, after a few hundred requests.
TurboStudio has its own Monitor page and launches Gradio with ``enable_monitoring=False`` (its
dashboard endpoints answer 403); with monitoring off the shim skips the summary and keeps 16
events' records instead of 10 000 (each event copies the list). With monitoring on it changes nothing.

``UploadGuard``: Gradio's multipart ``POST /gradio_api/upload`` answered a part named ``files`` that
is not a file (a plain form field, or a file part with an empty file name, which Starlette reads as
a field) with a 500 and a traceback in the log ("File is not an instance of GradioUploadFile",
Gradio 6.31; found by schemathesis, reproduced with httpx). The guard is ASGI middleware on that one
path: such a failure, before any byte of the answer went out, becomes a 400 that says what a valid
upload is. Middleware rather than a route of our own in front of Gradio's: Gradio's route streams
the body through its own parser (size limit, temporary files), which a route of ours would have
to parse a second time or call with Gradio's private arguments.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class _LazyConfigValues(dict):
    """``SessionState.config_values``, filled on first read: ``pending`` holds block ids whose
    config has not been built yet."""

    def __init__(self, session, pending):
        super().__init__()
        self._session = session
        self._pending = dict.fromkeys(pending)      # ordered, like the eager dict was

    def _build(self, key):
        bc = self._session.blocks_config
        if key in bc.blocks:
            dict.__setitem__(self, key, bc.config_for_block(key, [], bc.blocks[key]))

    def _fill(self):
        while self._pending:
            key = next(iter(self._pending))
            self._pending.pop(key)
            if not dict.__contains__(self, key):
                self._build(key)

    def __setitem__(self, key, value):
        self._pending.pop(key, None)
        dict.__setitem__(self, key, value)

    def __getitem__(self, key):
        if key in self._pending:
            self._pending.pop(key)
            self._build(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key):
        return key in self._pending or dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)

    def __len__(self):
        self._fill()
        return dict.__len__(self)

    def items(self):
        self._fill()
        return dict.items(self)

    def keys(self):
        self._fill()
        return dict.keys(self)

    def values(self):
        self._fill()
        return dict.values(self)


def _gradio_class(module: str, name: str):
    """(the Gradio module, its class ``name``), or (None, None) where this Gradio has neither."""
    import importlib

    try:
        mod = importlib.import_module(f"gradio.{module}")
    except ImportError:
        return None, None
    return mod, getattr(mod, name, None)


def lazy_session_config() -> bool:
    """Install the shim; False (and Gradio untouched) when Gradio's SessionState is not the shape
    this was written against (Gradio 6.31: ``copy(blocks.default_config)``, then ``config_values``
    built with ``blocks_config.config_for_block``).

    How: during ``SessionState.__init__`` only, the session's own copy of the blocks config gets an
    instance-level ``config_for_block`` that builds nothing (the copy is made through
    ``state_holder.copy``, hooked for this thread while the constructor runs); afterwards the
    method is restored and ``config_values`` becomes a mapping that builds each entry on first use.
    Nothing shared is changed, so concurrent sessions and handlers see Gradio as it is."""
    import threading

    state_holder, cls = _gradio_class("state_holder", "SessionState")
    if cls is None:
        return False
    if getattr(cls, "_turbostudio_lazy", False):
        return True
    real_copy = getattr(state_holder, "copy", None)
    if real_copy is None:
        return False
    local = threading.local()

    def copy_hook(obj):
        made = real_copy(obj)
        if getattr(local, "active", False) and hasattr(made, "config_for_block") and local.made is None:
            made.config_for_block = lambda *a, **k: None
            local.made = made
        return made

    original = cls.__init__

    def __init__(self, blocks):
        local.active, local.made = True, None
        try:
            original(self, blocks)
        finally:
            local.active = False
        made = local.made
        local.made = None
        if made is None:
            return
        del made.config_for_block               # the class's method again
        values = getattr(self, "config_values", None)
        if made is self.blocks_config and isinstance(values, dict):
            self.config_values = _LazyConfigValues(self, list(values))   # all None: built nothing
        else:                                   # not the expected shape: build them as Gradio does
            self.config_values = {k: made.config_for_block(k, [], made.blocks[k]) for k in values or {}}

    state_holder.copy = copy_hook
    cls.__init__ = __init__
    cls._turbostudio_lazy = True
    log.info("Gradio sessions build component configs on first use (ui/gradio_patches.py)")
    return True


# Gradio 6.31's Queue.start_processing, the method the replacement below mirrors line for line
# (apart from the waits); any other source means another Gradio, and the shim stands down.
_START_PROCESSING_SHA = "d65be5a5cbed97d7"
_IDLE_WAIT = 0.05            # fallback: a wake-up missed would cost at most this much
_PROGRESS_INTERVAL = 0.1     # progress bars refreshed 10 times a second (Gradio: 100)


def _source_sha(fn) -> str:
    import hashlib
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""


def event_driven_queue() -> bool:
    """Install the queue shim; False (Gradio untouched) when ``Queue.start_processing`` is not the
    one it was written against."""
    import asyncio
    import time

    queueing, cls = _gradio_class("queueing", "Queue")
    if cls is None:
        return False
    if getattr(cls, "_turbostudio_event_driven", False):
        return True
    if _source_sha(cls.start_processing) != _START_PROCESSING_SHA:
        log.info("Gradio's queue loop is not the known one: left as it is")
        return False
    run_coro_in_background, set_task_name = queueing.run_coro_in_background, queueing.set_task_name

    def wake_event(queue) -> asyncio.Event:
        ev = queue.__dict__.get("_turbostudio_wake")
        if ev is None:
            ev = queue._turbostudio_wake = asyncio.Event()
        return ev

    async def idle(queue) -> None:
        ev = wake_event(queue)
        if not ev.is_set():
            try:
                await asyncio.wait_for(ev.wait(), _IDLE_WAIT)
            except asyncio.TimeoutError:
                pass
        ev.clear()          # the loop looks at the queue again before it waits again

    async def start_processing(self) -> None:
        try:
            while not self.stopped:
                if len(self) == 0:
                    await idle(self)
                    continue

                if None not in self.active_jobs:
                    await idle(self)
                    continue

                # Using mutex to avoid editing a list in use
                async with self.delete_lock:
                    event_batch = self.get_events()

                if event_batch:
                    events, batch, concurrency_id = event_batch
                    self.active_jobs[self.active_jobs.index(None)] = events
                    event_queue = self.event_queue_per_concurrency_id[concurrency_id]
                    event_queue.current_concurrency += 1
                    start_time = time.time()
                    fn = events[0].fn
                    event_queue.start_times_per_fn[fn].add(start_time)
                    for event in events:
                        if (a := self.event_analytics.get(event._id)) is not None:
                            a["status"] = "processing"
                    process_event_task = run_coro_in_background(
                        self.process_events, events, batch, start_time, fn
                    )
                    set_task_name(
                        process_event_task,
                        events[0].session_hash,
                        fn._id,
                        events[0]._id,
                        batch,
                    )

                    self._asyncio_tasks.add(process_event_task)
                    process_event_task.add_done_callback(self._asyncio_tasks.discard)
                    if self.live_updates:
                        self.broadcast_estimations(concurrency_id)
                else:
                    await idle(self)
        finally:
            self.stopped = True
            self._cancel_asyncio_tasks()

    real_push, real_process = cls.push, cls.process_events

    async def push(self, *a, **k):
        try:
            return await real_push(self, *a, **k)
        finally:
            wake_event(self).set()        # a new event to start

    async def process_events(self, *a, **k):
        try:
            return await real_process(self, *a, **k)
        finally:
            wake_event(self).set()        # a place freed for a waiting event

    real_init = cls.__init__

    def __init__(self, *a, **k):
        real_init(self, *a, **k)
        self.progress_update_sleep_when_free = max(self.progress_update_sleep_when_free, _PROGRESS_INTERVAL)

    cls.start_processing, cls.push, cls.process_events, cls.__init__ = start_processing, push, process_events, __init__
    cls._turbostudio_event_driven = True
    log.info("Gradio's queue wakes on events instead of polling every 1 ms (ui/gradio_patches.py)")
    return True


# Gradio 6.31's utils.get_type_hints and MatplotlibBackendMananger, the code call_overheads stands
# in for; any other source means another Gradio, and the shim leaves it alone.
_GET_TYPE_HINTS_SHA = "55f0d0378c39a844"
_MATPLOTLIB_MANAGER_SHA = "de9f0baab22d8525"


def call_overheads() -> bool:
    """Install both (see the module's docstring); False where this Gradio's code is not the known
    one (then nothing is changed)."""
    import importlib.util
    import inspect
    import weakref

    utils, real = _gradio_class("utils", "get_type_hints")
    if real is None:
        return False
    if getattr(utils, "_turbostudio_calls", False):
        return True
    manager = getattr(utils, "MatplotlibBackendMananger", None)
    if _source_sha(real) != _GET_TYPE_HINTS_SHA or manager is None or \
            _source_sha(manager) != _MATPLOTLIB_MANAGER_SHA:
        log.info("Gradio's get_type_hints / MatplotlibBackendMananger are not the known ones: left as they are")
        return False
    known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get_type_hints(fn):
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", None)
        key = getattr(target, "__func__", target)      # a bound method: its function
        try:
            return dict(known[key])                    # a copy: a caller may change it
        except (KeyError, TypeError):
            pass
        hints = real(fn)
        if hints:                  # {} is also Gradio's answer to a failure: asked again next time
            try:
                known[key] = dict(hints)
            except TypeError:      # not weak-referenceable: not kept
                pass
        return hints

    utils.get_type_hints = get_type_hints
    if importlib.util.find_spec("matplotlib") is None:
        # no matplotlib: nothing to switch to "agg" and back (Gradio would look for it on every call)
        manager.__enter__ = lambda self: None
        manager.__exit__ = lambda self, *exc: None
    utils._turbostudio_calls = True
    log.info("Gradio's per-call type hints kept per handler, no matplotlib lookups (ui/gradio_patches.py)")
    return True


_ANALYTICS_SHA = "fce570ad9e7b8daa"     # Gradio 6.31's Queue.compute_analytics_summary
_ANALYTICS_KEPT = 16


def no_queue_analytics() -> bool:
    """Install it (see the module's docstring); False where this Gradio's summary is not the known one."""
    _, cls = _gradio_class("queueing", "Queue")
    if cls is None:
        return False
    if getattr(cls, "_turbostudio_no_analytics", False):
        return True
    real = cls.compute_analytics_summary
    if _source_sha(real) != _ANALYTICS_SHA:
        log.info("Gradio's queue analytics are not the known ones: left as they are")
        return False

    def compute_analytics_summary(self, records):
        blocks = getattr(self, "blocks", None)
        if blocks is None or getattr(blocks, "enable_monitoring", None) is not False:
            return real(self, records)
        self.ANALYTICS_MAX_EVENTS = _ANALYTICS_KEPT       # the per-event copy stays short too
        return self.cached_event_analytics_summary

    cls.compute_analytics_summary = compute_analytics_summary
    cls._turbostudio_no_analytics = True
    log.info("Gradio's per-event monitoring summary skipped while its dashboard is off (ui/gradio_patches.py)")
    return True


def quiet_range_refusals() -> bool:
    """A number or slider value outside its range, sent by a client (the API, or an old page), is
    the user's error, not a fault: Gradio refuses it with ``gr.Error`` from
    ``Number.raise_if_out_of_bounds`` (Number and Slider) but with ``print_exception`` on, so each
    one put a full traceback in the server log (issue #16: one line per ordinary user error; the log
    keeps tracebacks for faults). Same check, same message, no traceback; the refusal is logged as
    one line. False where Gradio no longer has that check (then nothing is changed)."""
    number, real = _gradio_class("components.number", "Number")
    check = getattr(real, "raise_if_out_of_bounds", None) if real is not None else None
    if check is None:
        return False
    if getattr(check, "_turbostudio_quiet", False):
        return True
    from gradio.exceptions import Error

    def raise_if_out_of_bounds(num, minimum, maximum):
        try:
            check(num, minimum, maximum)
        except Error as e:
            log.info("refused: %s", e.message if hasattr(e, "message") else e)
            raise Error(str(getattr(e, "message", e)), title="Out of range", print_exception=False) from None

    raise_if_out_of_bounds._turbostudio_quiet = True
    real.raise_if_out_of_bounds = staticmethod(raise_if_out_of_bounds)
    return True


def http_stack(fast: bool = False) -> str:
    """Which event loop and HTTP parser uvicorn serves the app on; returns it in words.

    Gradio builds its ``uvicorn.Config`` without ``loop`` or ``http``, so uvicorn takes uvloop and
    httptools whenever they happen to be installed (``uvicorn[standard]``, vLLM's API server), else
    asyncio and h11. Under many users at once the event loop thread is the web process's one serial
    path (every request's parsing, routing and SSE writes), so the C pair looked like a gain, and it
    does spend less of that thread: 64 simultaneous 1-token requests, loop thread CPU per request
    ``/chat`` 1.23 -> 0.95 ms, ``/v1`` 1.28 -> 1.12 ms. But what users see did not improve:
    ``bench_web`` 64 users (engine process on, 2-core CPU, 2026-12-03, side by side, clients at nice
    10 so the server has the cores first; ``bench/results/2026-12-03-cpu-web-uvloop-*``) first token
    p50 / p99 ``/chat`` 98 / 112 ms with uvloop vs 96 / 102 without, ``/v1`` 72 / 118 vs 66 / 84,
    tokens/s equal within noise. So the default (``fast=False``) pins the measured pair, asyncio and
    h11, whatever is installed; ``TURBOSTUDIO_FAST_HTTP=1`` takes uvloop and httptools where they are
    installed, for an A/B run on a machine of many cores. Only uvicorn's defaults change, never a
    value a caller set."""
    import importlib.util

    import uvicorn

    cfg = uvicorn.Config
    real = getattr(cfg.__init__, "_turbostudio_real", cfg.__init__)
    if fast:
        cfg.__init__ = real
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
        return f"{loop} + {http}"

    def __init__(self, *args, loop="asyncio", http="h11", **kwargs):
        real(self, *args, loop=loop, http=http, **kwargs)

    __init__._turbostudio_real = real
    cfg.__init__ = __init__
    return "asyncio + h11"


class UploadGuard:
    """ASGI middleware: a malformed multipart body on Gradio's ``/upload`` is a 400, not a 500 (see
    the module's doc). Every other request passes through untouched."""

    MESSAGE = ("Malformed upload: send multipart/form-data whose parts named 'files' are files, each "
               "with a file name (e.g. curl -F files=@photo.png).")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                not scope.get("path", "").rstrip("/").endswith("/gradio_api/upload"):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            if started:
                raise
            log.info("refused a malformed upload: %s", e)
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": self.MESSAGE}, status_code=400)(scope, receive, send)
