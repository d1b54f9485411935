"""The engine in a process of its own (issue #19): the web side and the engine no longer share a GIL.

Why: in one process, every web thing the app does (Gradio's queue and its server-sent events, the
``/v1`` SSE encoding, the relay's pump threads, the Monitor's polls) competes for one GIL with the
engine's own Python: LMDeploy's PyTorch engine schedules every decode step in Python, and TurboMind's
side detokenizes every token of every stream in Python on LMDeploy's event loop. Under many users each
side slows the other. vLLM's V1 answered the same problem by splitting its API server from its
"engine core" (a socket between them); this module does that for any :class:`~engines.base.Engine`:

* :class:`CoreEngine` (this process) *is* an Engine: the manager, its admission, limits, history
  fitting, metrics and abort work as before, and every entry point still takes the one road
  (``EngineManager.submit``); only the object behind it is a proxy.
* The engine core (a child process: a fresh interpreter started with ``subprocess``, not
  ``multiprocessing``'s spawn, which would import the parent's ``__main__`` again: a script or
  notebook without a main guard would start itself) builds the real engine from a factory
  (``"module:function"`` and its arguments: ``engines.registry:create`` for a model,
  ``bench.bench_web:SyntheticEngine`` for the web benchmark) and serves it over one Unix socket
  pair (pickled, length-prefixed frames: ``multiprocessing.connection.Connection``, the standard
  library's own, rather than a framing of ours).

The protocol (frames are tuples; the child merges what it sends while the parent reads):

====================  ===========================================================================
parent -> child        ``("s", rid, request)`` start a stream; ``("a", rid)`` abort it;
                       ``("c", cid, method, args, kwargs)`` call a method (count_tokens, scheduler, ...);
                       ``("q",)`` close the engine and exit.
                       (first, once: the parent's ``sys.path``, then ``("init", factory, args,
                       log level, options)``.)
child -> parent        ``("ready", info, methods)`` once loaded, or ``("failed", error)``;
                       ``("e", [(rid, events), ...], [(cid, ok, value), ...])`` everything that
                       happened since the last frame. A stream's events: ``("ok",)`` it started
                       (``stream()`` returned), ``("x", error)`` it raised, ``("d", text, tokens,
                       finish_reason, error, prompt_tokens)`` a delta, ``("end",)`` it ended.
====================  ===========================================================================

In the child, an engine that can push (``start(request, sink)``: LMDeploy's adapter hands each Delta
over from LMDeploy's own event loop) puts its Deltas straight into the outbox, so nothing of ours is
woken per token there but the sender, once a frame; any other engine gets a pump thread per stream
that iterates ``stream()``. Measured on the H200 (2026-12-03, ``bench_raw``): the same throughput
and CPU per token as the pump threads within noise (TurboMind 16 users 0.359 vs 0.405 ms of CPU a
token, elsewhere equal), and no thread per stream (1 024 streams no longer mean 1 024 threads in the
engine's process). Frames that arrive together are handled in one go.

Deltas of one stream that wait together in the child's outbox are merged into one (text
concatenated, the last count and finish reason): while the parent keeps up, every token goes on its
own; when it falls behind, frames carry more, never less. Nothing is dropped. Under load the child
also paces its frames (:func:`frame_pace`: none up to 4 streams, 4 ms apart at 64), since each
frame wakes threads in the web side's process.

Failure: if the child dies (TurboMind aborts its process on some CUDA errors, an out-of-memory
kills it), the parent's reader sees the pipe close; every running stream ends with an error delta
naming the exit code, calls raise :class:`EngineUnavailable`, ``health()`` says the engine process
exited, and the app keeps serving its pages (the Engines page offers a reload). The child exits
when the parent does (its pipe closes), so no GPU memory is left held by an orphan.

Exceptions cross the pipe as (class path, message, attributes) and are rebuilt as the same
:class:`~engines.base.EngineError` subclass (``InvalidRequest.param`` kept) or built-in type; anything
else becomes an :class:`EngineError` naming its type. pickle alone would lose keyword-only
attributes (``InvalidRequest(message, *, param)`` is rebuilt from ``args`` only).
"""
from __future__ import annotations

import builtins
import concurrent.futures
import importlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

from . import heap
from .base import ChatMessage, ChatRequest, Delta, EngineError, EngineInfo, EngineUnavailable, SchedulerView

log = logging.getLogger(__name__)

# Methods some engines have beyond the contract, forwarded when the engine in the child has them
# (the Quantize card's perplexity, the PyTorch engine's own KV capacity count).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_METHODS = ("perplexity", "kv_capacity", "lmdeploy_sessions")
CLOSE_TIMEOUT = 60.0     # seconds the child may take to free its engine before it is killed
CALL_TIMEOUT = 30.0      # seconds a status call (health, scheduler, live_requests) may take


# ---------------------------------------------------------------------- errors across the pipe
def portable(e: BaseException) -> tuple:
    """An exception as plain data: (module, class name, message, attributes)."""
    cls = type(e)
    msg = getattr(e, "message", None) or (str(e.args[0]) if e.args else str(e))
    attrs = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return cls.__module__, cls.__qualname__, str(msg), attrs


def rebuild(data: tuple) -> BaseException:
    """The exception :func:`portable` described: the same EngineError subclass or built-in type."""
    module, name, message, attrs = data
    cls = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module.startswith("engines."):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, BaseException) and \
            (issubclass(cls, EngineError) or module == "builtins"):
        e = cls.__new__(cls)
        BaseException.__init__(e, message)
        for k, v in attrs.items():
            try:
                setattr(e, k, v)
            except AttributeError:
                pass
        if isinstance(e, EngineError):
            e.message = message
            if not hasattr(e, "code"):
                e.code = None
        return e
    return EngineError(f"{name}: {message}")


# ---------------------------------------------------------------------- the child
class _Outbox:
    """What the child has to say, merged per stream until the sender takes it (see the module)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.streams: dict[str, list] = {}
        self.results: list = []
        self.closed = False

    def event(self, rid: str, ev: tuple) -> None:
        with self.cv:
            evs = self.streams.get(rid)
            if evs is None:
                self.streams[rid] = [ev]
            else:
                last = evs[-1]
                if ev[0] == "d" and last[0] == "d" and last[3] is None:
                    ids = last[6] + ev[6] if last[6] is not None and ev[6] is not None else (last[6] or ev[6])
                    evs[-1] = ("d", last[1] + ev[1], ev[2], ev[3], ev[4], last[5] or ev[5], ids, last[7] or ev[7])
                else:
                    evs.append(ev)
            self.cv.notify()

    def result(self, cid: int, ok: bool, value: Any) -> None:
        with self.cv:
            self.results.append((cid, ok, value))
            self.cv.notify()

    def take(self):
        with self.cv:
            while not (self.streams or self.results or self.closed):
                self.cv.wait()
            streams, results = list(self.streams.items()), self.results
            self.streams, self.results = {}, []
            return streams, results


def main(fd: int) -> None:
    """The child's entry (``python -c "...main(FD)"``): the socket is ``fd``; the first frame is the
    parent's ``sys.path`` (so the factory's module imports as it does there), the second the init."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        sys.path[:] = conn.recv()
        _, factory, args, level, options = conn.recv()
    except (EOFError, OSError):
        os._exit(1)
    _serve(conn, factory, args, level, **options)


FRAME_PACE = 0.004    # seconds between two frames at 64 running streams (0 up to 4)


def frame_pace(running: int) -> float:
    """Least seconds between two frames to the parent while ``running`` streams run: 0 (every token
    at once) up to 4 streams, then growing to ``FRAME_PACE`` at 64. Each frame wakes, in the parent,
    the reader and the relay thread of every stream it carries: fewer, fuller frames under load
    spare the web side's GIL (like ``/v1``'s ``stream_pace``)."""
    return max(0.0, min(FRAME_PACE, FRAME_PACE * (running - 4) / 60))


def _delta_event(d: Delta) -> tuple:
    return ("d", d.text, d.tokens, d.finish_reason, d.error, d.prompt_tokens, d.ids, d.prompt_ids)


class _PushSink:
    """A stream's sink on the push path (an engine with ``start(request, sink)``): each Delta goes
    into the outbox as the engine hands it over, from whichever thread that is; ``None`` (the engine
    let go) is the stream's end. What comes before ``opened`` (the start returned) waits behind the
    stream's "ok", which the parent reads first."""

    def __init__(self, out: "_Outbox", rid: str, live: list):
        self.out, self.rid, self.live = out, rid, live
        self.lock = threading.Lock()
        self.held: list = []
        self.open = False

    def __call__(self, d: Delta | None) -> None:
        ev = ("end",) if d is None else _delta_event(d)
        with self.lock:
            if not self.open:
                self.held.append(ev)
                return
            self._put(ev)

    def opened(self) -> None:
        with self.lock:
            self.out.event(self.rid, ("ok",))
            with self.out.cv:
                self.live[0] += 1
            for ev in self.held:
                self._put(ev)
            self.held, self.open = [], True

    def _put(self, ev: tuple) -> None:
        if ev[0] == "end":
            with self.out.cv:
                self.live[0] -= 1
        self.out.event(self.rid, ev)


def _serve(conn, factory: str, args: tuple, log_level: int, push: bool = True, detokenize: bool = False,
           gc_freeze: bool = True) -> None:
    """The engine core's main (the child process): build the engine, then serve frames until the
    parent says close or goes away.

    Two ways to run a stream: an engine with ``start(request, sink)`` (LMDeploy's: it hands each
    Delta over from its own event loop) is started here, on this thread, in frame order, and its
    Deltas go straight into the outbox; nothing of ours is woken per token but the sender, once a
    frame. Any other engine (and ``push=False``, for A/B runs) gets a pump thread per stream that
    iterates ``engine.stream(request)``.

    ``detokenize``: an engine with ``detokenize_elsewhere()`` (LMDeploy's adapter) sends token ids
    instead of text, and the parent makes the text (off this process's GIL, see that method)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    for noisy in ("torchao", "torch.utils._pytree"):    # as app.py says: warnings about kernels never used
        logging.getLogger(noisy).setLevel(logging.ERROR)
    module, _, fn = factory.partition(":")
    try:
        engine = getattr(importlib.import_module(module), fn)(*args)
    except BaseException as e:  # noqa: BLE001 - told to the parent, which raises it where load was called
        log.debug("engine factory failed", exc_info=True)
        try:
            conn.send(("failed", portable(e)))
        finally:
            os._exit(1)
    methods = [m for m in EXTRA_METHODS if callable(getattr(engine, m, None))]
    # the weights' bytes as held (the manager counts a Transformers model's parameters, which it
    # cannot reach from the parent: the same count, made here)
    if "weights_bytes" not in engine.info.extra:
        from .manager import held_weights_bytes

        try:
            held = held_weights_bytes(engine)
        except Exception:  # noqa: BLE001 - a figure for the panel, never a reason to fail a load
            held = None
        if held is not None:
            engine.info.extra["weights_bytes"] = held
    text_spec = None
    if detokenize and callable(getattr(engine, "detokenize_elsewhere", None)):
        text_spec = engine.detokenize_elsewhere()
    out = _Outbox()
    send_lock = threading.Lock()
    live = [0]      # streams running here, for the sender's pace
    heap.enabled = gc_freeze
    heap.freeze("engine process")   # the engine's heap out of the collector's full walks (engines/heap.py)
    heap.keep_frozen(lambda: live[0] == 0)     # and again when it grew, while no stream runs
    conn.send(("ready", engine.info, methods, text_spec))

    start = getattr(engine, "start", None) if push else None

    def sender():
        while True:
            streams, results = out.take()
            if not (streams or results):
                return                          # closed and drained
            try:
                with send_lock:
                    conn.send(("e", streams, results))
            except (OSError, ValueError):       # the parent is gone
                return
            pause = frame_pace(live[0])
            if pause:
                time.sleep(pause)               # what arrives meanwhile goes in the next frame

    def pump(rid: str, request: ChatRequest):
        try:
            it = engine.stream(request)
        except BaseException as e:  # noqa: BLE001 - raised in the parent's stream() call
            out.event(rid, ("x", portable(e)))
            return
        out.event(rid, ("ok",))
        with out.cv:
            live[0] += 1
        try:
            for d in it:
                out.event(rid, _delta_event(d))
        except BaseException as e:  # noqa: BLE001 - raised in the parent after the deltas before it
            out.event(rid, ("x", portable(e)))
            return
        finally:
            with out.cv:
                live[0] -= 1
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
        out.event(rid, ("end",))

    calls = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="core-call")

    def call(cid: int, method: str, margs: tuple, kwargs: dict):
        try:
            out.result(cid, True, getattr(engine, method)(*margs, **kwargs))
        except BaseException as e:  # noqa: BLE001
            out.result(cid, False, portable(e))

    threading.Thread(target=sender, daemon=True, name="core-sender").start()

    def handle(msg) -> bool:
        """One frame from the parent; False: close."""
        kind = msg[0]
        if kind == "s" and start is not None:
            sink = _PushSink(out, msg[1], live)
            try:
                start(msg[2], sink)
            except BaseException as e:  # noqa: BLE001 - raised in the parent's stream() call
                out.event(msg[1], ("x", portable(e)))
            else:
                sink.opened()
        elif kind == "s":
            threading.Thread(target=pump, args=(msg[1], msg[2]), daemon=True, name="core-pump").start()
        elif kind == "a":
            try:
                engine.abort(msg[1])
            except Exception:  # noqa: BLE001 - an abort of a finished request
                log.debug("abort failed", exc_info=True)
        elif kind == "c":
            calls.submit(call, msg[1], msg[2], tuple(msg[3]), dict(msg[4]))
        elif kind == "q":
            return False
        return True

    try:
        going = True
        while going:
            try:
                # every frame that has come meanwhile is handled in one go: under load this thread
                # waits for the GIL (the engine's loop holds it), and a burst of starts handled
                # together reaches the engine in one pass of its loop (one prefill, not several)
                batch = [conn.recv()]
                while conn.poll(0):
                    batch.append(conn.recv())
            except (EOFError, OSError):         # the parent died: free the engine, go
                break
            for msg in batch:
                if not handle(msg):
                    going = False
                    break
    finally:
        # an engine whose close hangs must not keep this process (and its GPU memory) alive
        # once the parent has gone or asked it to stop
        threading.Timer(CLOSE_TIMEOUT, lambda: os._exit(1)).start()
        try:
            engine.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the engine failed")
        with out.cv:
            out.closed = True
            out.cv.notify()
        try:
            with send_lock:
                conn.send(("closed",))
        except (OSError, ValueError):
            pass
        # LMDeploy leaves non-daemon threads behind; the engine is closed, the process goes now
        os._exit(0)


# ---------------------------------------------------------------------- the parent
class _Stream:
    """A stream as the parent reads it: what the reader thread handed over, event by event. A class
    rather than a generator so that closing it before its first read still aborts it in the child
    (a generator's ``finally`` does not run if it never started)."""

    def __init__(self, core: "CoreEngine", rid: str):
        import queue

        self.core, self.rid = core, rid
        self.q = queue.SimpleQueue()   # lists of events, as the reader got them
        self.ending = threading.Event()  # the stream's last event has arrived (or it was closed)
        self.buffer: list = []
        self.finished = False
        self.feed = None     # token ids -> text, where the child sends ids (CoreEngine._text)

    def deliver(self, evs: list) -> None:
        """(The reader thread.) Events for this stream, in order."""
        self.q.put(evs)
        for ev in evs:
            if ev[0] in ("x", "end") or (ev[0] == "d" and ev[3]):
                self.ending.set()
                break

    def nap(self, seconds: float) -> None:
        """(The relay's pump, while its consumer paces.) Wait up to ``seconds``, less when the
        stream's end arrives; none when something is already waiting to be read."""
        if self.buffer or not self.q.empty():
            return
        self.ending.wait(seconds)

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        while not self.finished:
            if not self.buffer:
                self.buffer = list(self.q.get())
                continue
            ev = self.buffer.pop(0)
            kind = ev[0]
            if kind == "d":
                _, text, tokens, reason, error, prompt, ids, prompt_ids = ev
                if ids is not None:
                    if prompt_ids is not None:
                        self.feed = self.core._text.stream(prompt_ids)
                    if ids and self.feed is not None:
                        text = text + self.feed(ids)
                if reason:
                    self._end()
                return Delta(text, tokens, reason, error, prompt)
            if kind == "x":
                self._end()
                raise rebuild(ev[1])
            if kind == "end":
                self._end()
        raise StopIteration

    def _end(self) -> None:
        self.finished = True
        self.ending.set()
        with self.core._lock:
            if self.core._streams.get(self.rid) is self:
                del self.core._streams[self.rid]

    def close(self) -> None:
        """Stop reading; a stream that had not ended is aborted in the child."""
        if self.finished:
            return
        self._end()
        if not self.core._dead:
            try:
                self.core._send(("a", self.rid))
            except EngineUnavailable:
                pass


class CoreEngine:
    """An :class:`~engines.base.Engine` whose engine runs in a child process (see the module).

    ``CoreEngine(factory, args)`` starts the child and returns once the engine is loaded there
    (raising what loading raised). ``push=False`` runs every stream through a pump thread even where
    the engine could push (the earlier path, for A/B runs). ``info`` is the child's engine's info, as it was after loading."""

    def __init__(self, factory: str, args: Sequence = (), push: bool = True, detokenize: bool = False):
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        fd = theirs.fileno()
        boot = f"import sys; sys.path.insert(0, {_ROOT!r}); from engines.core import main; main({fd})"
        self._proc = subprocess.Popen([sys.executable, "-c", boot], pass_fds=(fd,), close_fds=True)
        theirs.close()
        parent = self._conn = Connection(mine.detach())
        parent.send(list(sys.path))
        parent.send(("init", factory, tuple(args), logging.getLogger().getEffectiveLevel(),
                     {"push": push, "detokenize": detokenize, "gc_freeze": heap.enabled}))
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._closed = False
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            code = _wait(self._proc, 5)
            raise EngineError(f"The engine process exited while loading (exit code {code}); "
                              "its log above says why.", code="engine_dead") from None
        if msg[0] == "failed":
            _wait(self._proc, 10)
            raise rebuild(msg[1])
        self.info: EngineInfo = msg[1]
        methods = msg[2]
        # the child sends token ids, not text: this side turns them into text (engines/core.py's
        # _serve, LMDeployEngine.detokenize_elsewhere), with what the child named
        self._text = None
        spec = msg[3] if len(msg) > 3 else None
        if spec is not None:
            try:
                module, _, fn = spec[0].partition(":")
                self._text = getattr(importlib.import_module(module), fn)(*spec[1])
            except Exception as e:  # noqa: BLE001 - without it no stream could be read: the load fails
                self.close()          # the child frees its engine and ends (killed if it hangs)
                raise EngineError(f"The engine's streams could not be read here: building {spec[0]} "
                                  f"failed ({type(e).__name__}: {e}).") from e
        self.info.extra["detokenize"] = "web process" if self._text is not None else "engine process"
        self.info.extra["engine_process"] = self._proc.pid
        self._methods = frozenset(methods)
        self._reading = threading.Thread(target=self._reader, daemon=True, name="core-reader")
        self._reading.start()

    # ------------------------------------------------------------------ plumbing
    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise EngineUnavailable(self._dead or f"The engine process is not reachable ({e}).") from None

    def _reader(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "closed":
                break
            _, streams, results = msg
            for rid, evs in streams:
                st = self._streams.get(rid)
                if st is not None:
                    st.deliver(evs)
            for cid, ok, value in results:
                with self._lock:
                    fut = self._calls.pop(cid, None)
                if fut is not None:
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(rebuild(value))
        self._died()

    def _died(self) -> None:
        """The pipe closed: everything waiting on the child hears why, once."""
        code = _wait(self._proc, 2 if not self._closed else CLOSE_TIMEOUT)
        why = ("This model was unloaded." if self._closed else
               f"The engine process exited (exit code {code}); reload the model on the Engines page.")
        with self._lock:
            self._dead = self._dead or why
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        if not self._closed:
            log.error("%s", why)
        err = portable(EngineUnavailable(why, code="engine_dead"))
        for st in streams:
            st.deliver([("x", err)])
        for fut in calls:
            if not fut.done():
                fut.set_exception(EngineUnavailable(why, code="engine_dead"))

    def _call(self, method: str, *args, timeout: float | None = None, **kwargs):
        if self._dead:
            raise EngineUnavailable(self._dead, code="engine_dead")
        cid = next(self._ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._calls[cid] = fut
        self._send(("c", cid, method, args, kwargs))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._calls.pop(cid, None)
            raise EngineUnavailable(f"The engine process did not answer {method} within {timeout:.0f} s.",
                                    code="engine_timeout") from None

    def __getattr__(self, name: str):
        # only called for names the class does not define: the engine's extra methods, where it has them
        if name in EXTRA_METHODS and name in self.__dict__.get("_methods", ()):
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        raise AttributeError(name)

    # ------------------------------------------------------------------ the Engine contract
    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        if self._dead:
            raise EngineUnavailable(self._dead, code="engine_dead")
        rid = request.request_id
        st = _Stream(self, rid)
        with self._lock:
            if rid in self._streams:
                raise EngineError(f"A request with id {rid!r} is still running.", code="invalid_request")
            self._streams[rid] = st
        try:
            self._send(("s", rid, request))
            evs = st.q.get()                   # the child's stream() has returned or raised
            first, st.buffer = evs[0], list(evs[1:])
            if first[0] == "x":
                raise rebuild(first[1])
        except BaseException:
            st._end()
            raise
        return st

    def abort(self, request_id: str) -> None:
        if self._dead:
            return
        try:
            self._send(("a", request_id))
        except EngineUnavailable:
            pass

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self._call("count_tokens", list(messages))

    def message_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._call("message_tokens", list(messages))

    def health(self) -> str | None:
        if self._dead:
            return self._dead
        try:
            return self._call("health", timeout=CALL_TIMEOUT)
        except EngineError as e:
            return e.message

    def scheduler(self) -> SchedulerView | None:
        if self._dead:
            return None
        try:
            return self._call("scheduler", timeout=CALL_TIMEOUT)
        except EngineError:
            return None

    def live_requests(self) -> int:
        if self._dead:
            return 0
        return self._call("live_requests", timeout=CALL_TIMEOUT)

    def close(self) -> None:
        """Close the engine in its process and wait for the process to end (its GPU memory is then
        free); killed after ``CLOSE_TIMEOUT``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        alive = self._dead is None
        self._dead = "This model was unloaded."       # from now on, whatever the reader is doing
        if alive:
            try:
                with self._send_lock:
                    self._conn.send(("q",))
            except (OSError, ValueError):
                pass
        if _wait(self._proc, CLOSE_TIMEOUT) is None:
            log.warning("the engine process did not end in %.0f s; killing it", CLOSE_TIMEOUT)
            self._proc.kill()
            _wait(self._proc, 5)
        # the reader ends at the child's "closed" or the pipe's end; closing the pipe under a recv
        # in progress would fail inside it (a TypeError from a handle already gone), not end it
        reading = getattr(self, "_reading", None)
        if reading is not None and reading is not threading.current_thread():
            reading.join(5)
        try:
            self._conn.close()
        except OSError:
            pass


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code once it ended within ``timeout`` seconds, else None."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def wants_process(config) -> bool:
    """Whether a backend config asks for its own process (``engine_process``: on, off, or auto =
    on for LMDeploy's engines, whose Python work per token competes with the web side's)."""
    mode = getattr(config, "engine_process", "off")
    if os.name != "posix":       # the socket is handed to the child with pass_fds: POSIX only
        if mode == "on":
            raise EngineError("--engine-process on needs a POSIX system (Linux, macOS); use auto or off here.")
        return False
    if mode == "auto":
        return getattr(config, "backend", None) in ("turbomind", "pytorch")
    return mode == "on"
