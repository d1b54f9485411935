"""The engine manager: the only door to an engine.

Every entry point (Chat, Vision, ``/chat``, ``/v1``, the load test, the engine comparison, the
Quantize card) builds a :class:`~engines.base.ChatRequest` and calls :meth:`EngineManager.submit`;
no page holds an engine object. ``submit`` is the one road:

1. **checks** that cost nothing: the request's limits (messages, characters, max_new_tokens) and
   what the loaded engine can honour (:class:`~engines.base.Capabilities`); a refusal takes no place;
2. **admission**: a place among ``limits.max_pending`` (running plus waiting) is taken, and from
   here on everything runs inside one ``try`` whose failure path gives it back, whatever is raised
   (a lone surrogate in a message once leaked a place per request until every call was "busy");
3. **fit**: the history is trimmed to the context in time linear in its length;
4. the request is **registered** under its id (owner, session, source) and handed to the engine.

The :class:`Submission` returned is iterated synchronously (load test, comparisons) or with
``async for`` through the one relay (:mod:`engines.relay`); however it ends (finished, aborted,
consumer gone, never iterated), its place is given back exactly once and its metrics recorded.
``abort(request_id)`` stops a request in any state; ``abort_session`` stops every request of a
browser session (Stop button, closed tab).

Switching models:
1. resolve and pre-check the new model (path exists, is a model, the backend can run it); a bad
   request fails here and the current model keeps serving;
2. on a GPU the old model is closed first so its memory is free for the new one (free GPU memory is
   measured before and after and kept in ``last_switch``); on CPU the new model loads beside the
   old one, which serves until the swap;
3. if loading the new model fails after the old one was closed, the old one is loaded again.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Sequence

from . import configs, models, registry, telemetry
from .base import (Busy, ChatMessage, ChatRequest, ContextTooLong, Delta, Engine, EngineInfo,
                   EngineUnavailable, GenParams, InvalidRequest, SchedulerView, token_upper_bound)
from .relay import relay

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]

# Template tokens a message costs beyond its own text (role markers, separators): an estimate for
# choosing which turns to keep; the chosen prompt is then counted exactly once.
MESSAGE_OVERHEAD = 8


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, the same on every entry point (``settings.limits()``)."""

    max_pending: int = 80            # requests admitted at once (running + waiting); beyond: Busy
    max_messages: int = 1024         # messages in one request, system and assistant ones included
    max_input_chars: int = 131072    # characters of all messages of one request together
    max_new_tokens: int = 4096       # the largest max_new_tokens a request may ask for


@dataclass
class LoadRequest:
    model: str | None
    engine: str = "auto"
    options: dict = field(default_factory=dict)


@dataclass
class FitResult:
    messages: list[ChatMessage]
    dropped: int            # user/assistant turns dropped from the front
    prompt_tokens: int      # exact count when the tokenizer ran, else 0


@dataclass
class LiveRequest:
    """A request from admission to its end, as the Monitor and ``/engine_info`` see it."""

    request_id: str
    owner: str | None
    session: str
    source: str
    started: float
    tokens: int = 0
    aborted: bool = False
    aborted_at: float | None = None     # perf_counter() of the first abort
    prompt_tokens: int = 0              # as the engine counted them (Delta.prompt_tokens), once it says

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "owner": self.owner, "source": self.source,
                "seconds": round(time.time() - self.started, 2), "tokens": self.tokens}


class _Place:
    """One admission place; ``release`` gives it back exactly once, from any thread."""

    def __init__(self, manager: "EngineManager"):
        self._manager = manager
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._manager._give_back_place()


class EngineManager:
    def __init__(self, cache_dir: str, options: dict | None = None, limits: Limits | None = None):
        self.cache_dir = cache_dir
        self.options = dict(options or {})
        self.limits = limits or Limits()
        self._engine: Engine | None = None
        self._request: LoadRequest | None = None
        self._switch_lock = threading.Lock()
        self.metrics = telemetry.MetricsLog()
        self.last_switch: dict = {}
        self._lock = threading.Lock()            # guards the places and the live requests
        self._taken = 0
        self._live: dict[str, LiveRequest] = {}
        # seconds from each recent abort (Stop, a closed tab, a vanished client) to its place being
        # free: measured here, where it happens, not through a client's polling
        self.abort_release: deque[float] = deque(maxlen=200)

    # ------------------------------------------------------------------ state
    def info(self) -> EngineInfo | None:
        return self._engine.info if self._engine else None

    def require(self) -> Engine:
        eng = self._engine
        if eng is None:
            raise EngineUnavailable("No model is loaded. Load one on the Engines page.")
        return eng

    @property
    def running(self) -> int:
        """Requests admitted and not yet ended (waiting, prefilling or decoding)."""
        with self._lock:
            return len(self._live)

    def live(self) -> list[LiveRequest]:
        """The requests running now; who may see which is the UI's rule (``ui.common.sees_own``)."""
        with self._lock:
            return list(self._live.values())

    def health(self) -> str | None:
        """Why the loaded engine cannot serve (None when it can, or when none is loaded)."""
        eng = self._engine
        return eng.health() if eng is not None else None

    def engine_live_requests(self) -> int | None:
        """Requests the engine itself still holds (compare with ``running``: above it is a leak)."""
        eng = self._engine
        return eng.live_requests() if eng is not None else None

    def token_cost(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens ``messages`` take on the loaded model (images through its own processor)."""
        return self.require().count_tokens(messages)

    # ------------------------------------------------------------------ load / switch / unload
    def load(self, model: str | None, engine: str = "auto", progress: ProgressFn | None = None,
             policy: "models.LoadPolicy | None" = None, **options) -> EngineInfo:
        """Load ``model``; ``policy`` (the UI passes the app's) restricts what may be loaded."""
        opts = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        if policy is not None:
            policy.check(model)
        with self._switch_lock:
            progress and progress(0.0, f"Resolving {model or 'the built-in model'}")
            resolved = models.resolve(model, self.cache_dir, progress)
            backend, reason = registry.choose(resolved, engine, device=opts.get("device") or "auto",
                                              trust_remote_code=bool(opts.get("trust_remote_code")))
            config, unused = configs.config_for(backend, opts)
            registry.precheck(resolved, config)
            old, old_req = self._engine, self._request
            on_gpu = backend in ("turbomind", "pytorch") or opts.get("device") == "cuda" or \
                (old is not None and old.info.device.startswith("cuda"))
            before = telemetry.snapshot()
            if old is not None and on_gpu:
                progress and progress(0.1, f"Unloading {old.info.model}")
                self._engine = None
                old.close()
            after_unload = telemetry.snapshot()
            progress and progress(0.2, f"Loading {resolved.spec} on {backend}")
            t0 = time.perf_counter()
            try:
                new = registry.create(resolved, config)
            except Exception:
                if old is not None and on_gpu and old_req is not None:
                    log.warning("loading %s failed; reloading %s", resolved.spec, old_req.model)
                    try:
                        self._engine = self._build(old_req)
                    except Exception:  # noqa: BLE001
                        log.exception("could not reload the previous model")
                raise
            if unused:
                reason += f" (not used by {backend}: {', '.join(unused)})"
            new.info.reason = reason
            new.info.extra.setdefault("weights_bytes", _weights_bytes(new, resolved))
            self._engine, self._request = new, LoadRequest(model, engine, opts)
            if old is not None and not on_gpu:
                old.close()
            after = telemetry.snapshot()
            self.last_switch = {"model": resolved.spec, "backend": backend,
                                "load_seconds": round(time.perf_counter() - t0, 2),
                                "gpu_used_before": before["gpu_used"],
                                "gpu_used_after_unload": after_unload["gpu_used"],
                                "gpu_used_after_load": after["gpu_used"]}
            from . import heap

            heap.freeze(f"loaded {resolved.spec}")   # what the load built, out of full collections
            progress and progress(1.0, f"Loaded {resolved.spec} on {backend}")
            return new.info

    def _build(self, req: LoadRequest) -> Engine:
        resolved = models.resolve(req.model, self.cache_dir)
        backend, reason = registry.choose(resolved, req.engine, device=req.options.get("device") or "auto",
                                          trust_remote_code=bool(req.options.get("trust_remote_code")))
        eng = registry.create(resolved, configs.config_for(backend, req.options)[0])
        eng.info.reason = reason
        return eng

    def scratch(self, model: str | None, engine: str = "auto", progress: ProgressFn | None = None,
                **options) -> "EngineManager":
        """A second manager with ``model`` loaded beside this one, for a measurement (the engine
        comparison, the KV sweep, the Quantize card): the same resolution, config validation and
        pre-checks as :meth:`load`, and the same road for its requests. Close it when done (it is
        a context manager)."""
        other = EngineManager(self.cache_dir, self.options, self.limits)
        other.metrics = self.metrics      # its replies count in the same per-user metrics
        other.load(model, engine, progress=progress, **options)
        return other

    def __enter__(self) -> "EngineManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unload(self) -> None:
        with self._switch_lock:
            old, self._engine, self._request = self._engine, None, None
            if old is not None:
                before = telemetry.snapshot()
                old.close()
                self.last_switch = {"unloaded": old.info.model, "gpu_used_before": before["gpu_used"],
                                    "gpu_used_after_unload": telemetry.snapshot()["gpu_used"]}

    def close(self) -> None:
        self.unload()

    # ------------------------------------------------------------------ the road
    def check(self, request: ChatRequest, engine: Engine | None = None) -> None:
        """Refuse, before anything is taken, what no engine or no limit allows (InvalidRequest,
        naming the parameter)."""
        lim = self.limits
        msgs, p = request.messages, request.params
        if len(msgs) > lim.max_messages:
            raise InvalidRequest(f"The request has {len(msgs)} messages; the limit is {lim.max_messages}.",
                                 param="messages")
        chars = request.chars
        if chars > lim.max_input_chars:
            raise InvalidRequest(f"The messages have {chars} characters together; the limit is "
                                 f"{lim.max_input_chars}.", param="messages")
        if p.max_new_tokens > lim.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens must be in [1, {lim.max_new_tokens}], got "
                                 f"{p.max_new_tokens}.", param="max_tokens")
        if msgs[-1].role != "user":
            raise InvalidRequest("The last message must come from the user.", param="messages")
        if not msgs[-1].content.strip() and not msgs[-1].images:
            raise InvalidRequest("The last message is empty.", param="messages")
        eng = engine or self._engine
        if eng is None:
            return
        caps = eng.info.capabilities
        if p.penalized and not caps.penalties:
            name = "presence_penalty" if p.presence_penalty else "frequency_penalty"
            raise InvalidRequest(f"{name} is not supported by the {eng.info.backend} engine; leave it at 0.",
                                 param=name)
        if any(m.images for m in msgs) and not eng.info.vision:
            raise InvalidRequest("This model does not take images.", param="messages")

    def submit(self, request: ChatRequest) -> "Submission":
        """Admit ``request`` and start it on the engine (blocking: it may run the tokenizer; async
        callers use :meth:`submit_async`). Raises InvalidRequest, Busy, ContextTooLong or
        EngineError; none of them leaves anything behind."""
        eng = self.require()
        self.check(request, eng)
        place = self._take_place()
        live = None
        try:
            fit = self.fit(request.messages, request.params, eng)
            if fit.dropped:
                request = request.with_messages(fit.messages)
            if fit.prompt_tokens:    # counted while fitting: the engine need not count again
                request = replace(request, prompt_tokens=fit.prompt_tokens)
            live = self._register(request)
            it = eng.stream(request)
            sub = Submission(self, eng, request, fit, it, place, live)
            if live.aborted:        # aborted while it was being admitted: the engine hears it now
                eng.abort(request.request_id)
            return sub
        except BaseException:
            if live is not None:
                self._unregister(live)
            place.release()
            raise

    async def submit_async(self, request: ChatRequest) -> "Submission":
        """:meth:`submit` in a worker thread (it may tokenize a long history). If the caller is
        cancelled meanwhile, the submission is closed as soon as it exists."""
        fut = asyncio.get_running_loop().run_in_executor(None, self.submit, request)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.abort(request.request_id)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            raise

    def _take_place(self) -> _Place:
        with self._lock:
            if self._taken >= self.limits.max_pending:
                raise Busy(f"Busy: {self._taken} requests ahead of you. Try again shortly.")
            self._taken += 1
        return _Place(self)

    def _give_back_place(self) -> None:
        with self._lock:
            self._taken -= 1

    @property
    def places_taken(self) -> int:
        with self._lock:
            return self._taken

    def _register(self, request: ChatRequest) -> LiveRequest:
        live = LiveRequest(request.request_id, request.owner, request.session, request.source, time.time())
        with self._lock:
            if request.request_id in self._live:
                raise InvalidRequest(f"A request with id {request.request_id!r} is already running.")
            self._live[request.request_id] = live
        return live

    def _unregister(self, live: LiveRequest) -> None:
        with self._lock:
            if self._live.get(live.request_id) is live:
                del self._live[live.request_id]
                if live.aborted_at is not None:
                    self.abort_release.append(time.perf_counter() - live.aborted_at)

    def abort(self, request_id: str) -> bool:
        """Stop ``request_id`` wherever it is; False when no such request is running."""
        with self._lock:
            live = self._live.get(request_id)
            if live is not None and not live.aborted:
                live.aborted = True
                live.aborted_at = time.perf_counter()
        if live is None:
            return False
        eng = self._engine
        if eng is not None:
            eng.abort(request_id)
        return True

    def abort_session(self, session: str) -> int:
        """Stop every request of a browser session or connection (Stop button, closed tab)."""
        with self._lock:
            ids = [r.request_id for r in self._live.values() if r.session == session]
        return sum(self.abort(i) for i in ids)

    # ------------------------------------------------------------------ history fitting
    def fit(self, messages: Sequence[ChatMessage], params: GenParams, engine: Engine | None = None) -> FitResult:
        """Keep the newest turns that leave room for at least ``min(max_new_tokens, context/4)``
        new tokens. The system prompt and the last user turn are always kept; if they alone do not
        fit, ContextTooLong says so.

        Linear in the number of messages: each message's tokens are counted once
        (``Engine.message_tokens``), the turns to keep are chosen from the newest back by a running
        sum, and only the chosen prompt (bounded by the context, not the history) is counted
        exactly; an estimate that was short drops a few more turns and counts again."""
        eng = engine or self.require()
        ctx = eng.info.context_length
        want = min(params.max_new_tokens, max(1, ctx // 4))
        msgs = list(messages)
        # Fast path: a short conversation fits without running the tokenizer (it would run again
        # inside the engine; under load this matters).
        upper = token_upper_bound(msgs)
        if upper is not None and upper + want <= ctx:
            return FitResult(msgs, 0, 0)
        system = [m for m in msgs[:1] if m.role == "system"]
        turns = msgs[len(system):]
        budget = ctx - want
        costs = [c + MESSAGE_OVERHEAD for c in eng.message_tokens(turns)]
        fixed = (eng.message_tokens(system)[0] + MESSAGE_OVERHEAD if system else 0) + MESSAGE_OVERHEAD
        # newest first: the smallest start index whose turns fit the budget by estimate
        start, total = len(turns), fixed
        while start > 0 and total + costs[start - 1] <= budget:
            start -= 1
            total += costs[start]
        start = _exchange_start(turns, min(start, len(turns) - 1))
        while True:
            kept = system + turns[start:]
            n = eng.count_tokens(kept)
            if n + want <= ctx:
                return FitResult(kept, start, n)
            if start >= len(turns) - 1:
                raise ContextTooLong(
                    f"This message takes {n} tokens with the system prompt; the model's context is {ctx} "
                    f"tokens and {want} are kept for the reply. Shorten the message or the system prompt.")
            # the estimate was short by (n + want - ctx) tokens: drop turns that cover it
            excess, nxt = n + want - ctx, start
            while nxt < len(turns) - 1 and excess > 0:
                excess -= costs[nxt]
                nxt += 1
            start = _exchange_start(turns, max(nxt, start + 1))

    # ------------------------------------------------------------------ the Monitor's view
    def scheduler(self) -> SchedulerView | None:
        """The loaded engine's own view of its running and waiting requests, where it has one."""
        eng = self._engine
        return eng.scheduler() if eng is not None else None

    def load_now(self) -> tuple[int, int]:
        """(running, queued inside the engine): the engine's own scheduler view where it has one
        (TurboMind, the Transformers batcher), else the requests in flight and 0."""
        view = self.scheduler()
        if view is not None:
            return view.active, view.waiting
        return self.running, 0


def within_limits(messages: Sequence[ChatMessage], limits: Limits) -> tuple[list[ChatMessage], int]:
    """A page's own history cut to the request limits: the oldest turns go first (whole exchanges),
    the system prompt and the newest message stay. Returns the kept messages and how many turns
    were left out. What is left may still be refused by ``check`` (one message over the limit)."""
    msgs = list(messages)
    system = [m for m in msgs[:1] if m.role == "system"]
    turns = msgs[len(system):]
    chars = sum(len(m.content) for m in msgs)
    start = 0
    while start < len(turns) - 1 and (len(system) + len(turns) - start > limits.max_messages
                                      or chars > limits.max_input_chars):
        chars -= len(turns[start].content)
        start += 1
    start = _exchange_start(turns, start)
    return system + turns[start:], start


def _exchange_start(turns: Sequence[ChatMessage], i: int) -> int:
    """The first index at or after ``i`` where an exchange starts (a user turn), so a kept history
    never opens with an assistant reply; the last turn (the user's question) is always kept."""
    while i < len(turns) - 1 and turns[i].role != "user":
        i += 1
    return i


class Submission:
    """An admitted request. Iterate it once, with ``for`` in a worker thread or ``async for`` on the
    event loop (through the relay); ``abort()`` stops it; ``close()`` ends it without reading it.
    The place, the live entry and the metrics are settled exactly once however it ends."""

    def __init__(self, manager: EngineManager, engine: Engine, request: ChatRequest, fit: FitResult,
                 it: Iterator[Delta], place: _Place, live: LiveRequest):
        self.manager = manager
        self.request = request
        self.fit = fit
        self.info = engine.info
        self._engine = engine
        self._it = it
        self._place = place
        self._live = live
        self._started = False
        self._t0 = time.perf_counter()
        # a submission dropped unread (a client gone before its response started) still gives
        # its place back and stops the engine's request
        self._finalizer = weakref.finalize(self, _settle, manager, engine, request.request_id, it, place, live)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens: the engine's own count once its stream said it (Delta.prompt_tokens,
        which the deltas read from here do not carry on), else the fit's (0 where the fit skipped
        its tokenizer for a short conversation and the engine has not said yet)."""
        return self._live.prompt_tokens or self.fit.prompt_tokens

    def abort(self) -> None:
        self.manager.abort(self.request.request_id)

    def close(self) -> None:
        """End it now: abort the engine's request and settle (when not being iterated)."""
        if not self._started:
            self._started = True
            self._finalizer()
        else:
            self.abort()

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise RuntimeError("a submission is read once")
        self._started = True
        self._finalizer.detach()
        return self._measured()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self.updates()

    def updates(self, interval: float | Callable[[], float] = 0.0) -> AsyncIterator[Delta]:
        """Read it on the event loop (the one relay); ``interval``: the least seconds between two
        reads, for a consumer that coalesces updates anyway (see :func:`engines.relay.relay`)."""
        return relay(iter(self), on_cancel=self.abort, interval=interval, nap=getattr(self._it, "nap", None))

    def text(self) -> tuple[str, Delta | None]:
        """Read it to the end (blocking): the whole reply and its last delta."""
        parts, last = [], None
        for d in self:
            parts.append(d.text)
            last = d
        return "".join(parts), last

    def _measured(self) -> Iterator[Delta]:
        """The engine's deltas with the stop strings applied, the live entry's token count kept,
        and the reply's metrics recorded when it ends."""
        req, eng, live = self.request, self._engine, self._live
        stops = StopFilter(req.params.stop)
        ttft, tokens, reason = None, 0, "abort"
        try:
            for d in self._it:
                tokens = live.tokens = d.tokens
                if d.prompt_tokens:
                    live.prompt_tokens = d.prompt_tokens
                if ttft is None and (d.text or d.tokens):
                    ttft = time.perf_counter() - self._t0
                text, hit = stops.push(d.text)
                if hit:
                    eng.abort(req.request_id)
                    reason = "stop"
                    yield Delta(text, d.tokens, "stop")
                    return
                if d.finish_reason:
                    text += stops.flush()
                    reason = d.finish_reason
                    yield Delta(text, d.tokens, d.finish_reason, d.error)
                    return
                if text:
                    yield Delta(text, d.tokens)
            rest = stops.flush()
            if rest:
                yield Delta(rest, tokens)
        except Exception:
            reason = "error"        # the engine's stream raised: recorded as such, then raised on
            raise
        finally:
            _settle(self.manager, eng, req.request_id, self._it, self._place, live, abort=reason == "abort")
            self.manager.metrics.add(telemetry.ReplyMetrics(
                time=time.time(), session=req.session, backend=self.info.backend, model=self.info.model,
                prompt_tokens=self.prompt_tokens, tokens=tokens, ttft=ttft,
                seconds=time.perf_counter() - self._t0, finish_reason=reason, owner=req.owner,
                source=req.source))


def _settle(manager: EngineManager, engine: Engine, request_id: str, it, place: _Place, live: LiveRequest,
            abort: bool = True) -> None:
    """The one place a request's resources go back: the engine's stream closed (aborting it if it
    had not ended), the live entry removed, the admission place released."""
    try:
        if abort:
            engine.abort(request_id)
        close = getattr(it, "close", None)
        if close is not None:
            close()
    except Exception:  # noqa: BLE001 - whatever the engine raised, the place goes back
        log.debug("closing %s failed", request_id, exc_info=True)
    finally:
        manager._unregister(live)
        place.release()


class StopFilter:
    """Stop strings over a text stream: text that could be the start of a stop string is held back
    until it is known not to be one; at the first stop string to be completed, the text before it
    is returned and ``hit`` is True (as vLLM and LMDeploy check stops: token by token).
    Applied here, for every backend alike (the engine is aborted at the match)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        # the stop string completed first (smallest end; at a tie the longer one): the same answer
        # however the text was cut into pieces, since every earlier piece completed none
        ends = [(i + len(s), i) for s in self.stops for i in (buf.find(s),) if i >= 0]
        if ends:
            self.held = ""
            return buf[:min(ends)[1]], True
        keep = 0        # the longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


def held_weights_bytes(eng) -> int | None:
    """The bytes of the parameters of the model ``eng`` holds in this process (Transformers), else None."""
    model = getattr(eng, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def _weights_bytes(eng, resolved) -> int | None:
    """The model weights' bytes: the parameters where we hold the model (Transformers), else the
    checkpoint's size (LMDeploy loads it as stored; float32 checkpoints as 16-bit)."""
    try:
        held = held_weights_bytes(eng)
        if held is not None:
            return held
        if resolved.local:
            from .lmdeploy import weight_bytes

            return int(weight_bytes(resolved.path, resolved.config))
    except Exception:  # noqa: BLE001 - a figure for the panel, never a reason to fail a load
        return None
    return None


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def room_beside(manager: EngineManager, model: str | None, engine: str = "auto", options: dict | None = None,
                beside: Sequence[EngineManager | None] = ()) -> str | None:
    """Why loading ``model`` into ``manager`` would not fit in memory beside the models the
    ``beside`` managers hold (the Compare page's model B), in words with the figures; None when it
    fits or cannot be sized before loading (a hub id, a server). The estimate is the weights in the
    dtype they will run in (quantized checkpoints as stored) plus 20% for the KV cache and
    workspace, against free GPU memory (NVML/torch) for GPU engines, else available RAM (psutil)."""
    opts = {**manager.options, **{k: v for k, v in (options or {}).items() if v is not None}}
    resolved = models.resolve(model, manager.cache_dir)
    if not resolved.local:
        return None
    backend, _ = registry.choose(resolved, engine, device=opts.get("device") or "auto",
                                 trust_remote_code=bool(opts.get("trust_remote_code")))
    if backend == "remote":
        return None
    import os

    stored = sum(os.path.getsize(os.path.join(resolved.path, f)) for f in os.listdir(resolved.path)
                 if f.endswith((".safetensors", ".bin")))
    cfg = resolved.config
    on_gpu = backend in ("turbomind", "pytorch") or opts.get("device") == "cuda" or \
        (opts.get("device") in (None, "auto") and registry._cuda())
    from .quantize import checkpoint_dtype

    have = checkpoint_dtype(cfg) or "float32"
    want = str(opts.get("dtype") or "auto").replace("torch.", "")
    if cfg.get("quantization_config") or have not in _DTYPE_BYTES:
        need = stored                    # quantized (AWQ, FP8, int8): loaded as stored
    else:
        # "auto": float32 on a CPU, 16-bit on a GPU (a float32 checkpoint runs as bfloat16 there)
        run = want if want in _DTYPE_BYTES else ("float32" if not on_gpu else
                                                 ("bfloat16" if have == "float32" else have))
        need = stored * _DTYPE_BYTES[run] / _DTYPE_BYTES[have]
    need = int(need * 1.2)
    # model B's own current weights are given back before it loads again
    mine = manager.info()
    back = int(mine.extra.get("weights_bytes") or 0) if mine is not None else 0
    gib = 1024 ** 3
    if on_gpu:
        gpus = telemetry.gpu_memory()
        if not gpus:
            return None                  # the engine's own pre-check says there is no GPU
        free = gpus[0]["free"] + (back if mine is not None and mine.device.startswith("cuda") else 0)
        where = f"GPU 0 ({gpus[0].get('name', 'GPU')}) has {free / gib:.1f} GiB free"
    else:
        import psutil

        free = psutil.virtual_memory().available + (back if mine is not None and not mine.device.startswith("cuda") else 0)
        where = f"this machine has {free / gib:.1f} GiB of RAM available"
    if need <= free:
        return None
    held = [m.info() for m in beside if m is not None and m.info() is not None]
    loaded = ", ".join(f"{i.model} on {i.backend}" for i in held) or "nothing else"
    return (f"{resolved.name} on {backend} needs about {need / gib:.1f} GiB (weights "
            f"{stored / gib:.1f} GiB as stored, +20% for cache and workspace) and {where} beside "
            f"{loaded}. Unload model B or use a smaller format (a Quantize result).")
