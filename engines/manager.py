"""The loaded engine: load, switch and unload at runtime; per-session streams with metrics.

Pages hold an :class:`EngineManager` and never the engine itself, so a model switch is seen by
every page at once. Streams are not serialized here: the engine batches them.

Switching models:
1. resolve and pre-check the new model (path exists, is a model, the backend can run it); a bad
   request fails here and the current model keeps serving;
2. on a GPU the old model is closed first so its memory is free for the new one (free GPU memory is
   measured before and after and kept in ``last_switch``); on CPU the new model loads beside the
   old one, which serves until the swap;
3. if loading the new model fails after the old one was closed, the old one is loaded again.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from . import models, registry, telemetry
from .base import (ChatMessage, ContextTooLong, Delta, Engine, EngineInfo, EngineUnavailable, GenParams,
                   token_upper_bound)

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]


@dataclass
class LoadRequest:
    model: str | None
    engine: str = "auto"
    options: dict = field(default_factory=dict)


@dataclass
class FitResult:
    messages: list[ChatMessage]
    dropped: int            # user/assistant turns dropped from the front
    prompt_tokens: int


class EngineManager:
    def __init__(self, cache_dir: str, options: dict | None = None):
        self.cache_dir = cache_dir
        self.options = dict(options or {})
        self._engine: Engine | None = None
        self._request: LoadRequest | None = None
        self._switch_lock = threading.Lock()
        self.metrics = telemetry.MetricsLog()
        self.last_switch: dict = {}
        self.running = 0                 # streams in flight, for the monitor and queue sizing
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------ state
    @property
    def engine(self) -> Engine | None:
        return self._engine

    def info(self) -> EngineInfo | None:
        return self._engine.info if self._engine else None

    def require(self) -> Engine:
        eng = self._engine
        if eng is None:
            raise EngineUnavailable("No model is loaded. Load one on the Engines page.")
        return eng

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
            backend, reason = registry.choose(resolved, engine, device=opts.get("device", "auto"),
                                              trust_remote_code=opts.get("trust_remote_code", False))
            registry.precheck(resolved, backend, opts.get("trust_remote_code", False))
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
                new = registry.create(resolved, backend, **self._backend_options(backend, opts))
            except Exception:
                if old is not None and on_gpu and old_req is not None:
                    log.warning("loading %s failed; reloading %s", resolved.spec, old_req.model)
                    try:
                        self._engine = self._build(old_req)
                    except Exception:  # noqa: BLE001
                        log.exception("could not reload the previous model")
                raise
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
            progress and progress(1.0, f"Loaded {resolved.spec} on {backend}")
            return new.info

    def _backend_options(self, backend: str, opts: dict) -> dict:
        if backend == "transformers":
            keys = ("device", "dtype", "session_len", "trust_remote_code", "max_batch")
        elif backend == "remote":
            keys = ("remote_model", "api_key", "session_len")
        else:
            keys = ("model_format", "quant_policy", "cache_max_entry_count", "session_len", "tp",
                    "dtype", "trust_remote_code", "max_batch")
        return {k: opts[k] for k in keys if k in opts and opts[k] is not None}

    def _build(self, req: LoadRequest) -> Engine:
        resolved = models.resolve(req.model, self.cache_dir)
        backend, reason = registry.choose(resolved, req.engine, device=req.options.get("device", "auto"))
        eng = registry.create(resolved, backend, **self._backend_options(backend, req.options))
        eng.info.reason = reason
        return eng

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

    # ------------------------------------------------------------------ chat
    def fit(self, messages: Sequence[ChatMessage], params: GenParams, engine: Engine | None = None) -> FitResult:
        """Drop the oldest user/assistant turns until the prompt leaves room for at least
        ``min(max_new_tokens, context/4)`` new tokens. The system prompt and the last user turn are
        always kept; if they alone do not fit, ContextTooLong says so."""
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
        dropped = 0
        while True:
            n = eng.count_tokens(system + turns)
            if n + want <= ctx:
                return FitResult(system + turns, dropped, n)
            if len(turns) <= 1:
                raise ContextTooLong(
                    f"This message takes {n} tokens with the system prompt; the model's context is {ctx} "
                    f"tokens and {want} are kept for the reply. Shorten the message or the system prompt.")
            # drop one exchange (a user turn and the replies after it)
            turns = turns[1:]
            dropped += 1
            while len(turns) > 1 and turns[0].role != "user":
                turns = turns[1:]
                dropped += 1

    def stream(self, messages: Sequence[ChatMessage], params: GenParams, *, session_id: str,
               prompt_tokens: int = 0) -> Iterator[Delta]:
        """The engine's stream, with this reply's metrics recorded when it ends."""
        eng = self.require()
        t0 = time.perf_counter()
        it = eng.stream(messages, params, session_id=session_id)
        return self._measure(it, eng, t0, session_id, prompt_tokens)

    def _measure(self, it, eng, t0, session_id, prompt_tokens) -> Iterator[Delta]:
        ttft = None
        tokens = 0
        reason = "abort"
        with self._count_lock:
            self.running += 1
        try:
            for d in it:
                if ttft is None and (d.text or d.tokens):
                    ttft = time.perf_counter() - t0
                tokens = d.tokens
                if d.finish_reason:
                    reason = d.finish_reason
                yield d
        finally:
            with self._count_lock:
                self.running -= 1
            close = getattr(it, "close", None)
            if close:
                close()
            self.metrics.add(telemetry.ReplyMetrics(
                time=time.time(), session=session_id, backend=eng.info.backend, model=eng.info.model,
                prompt_tokens=prompt_tokens, tokens=tokens, ttft=ttft, seconds=time.perf_counter() - t0,
                finish_reason=reason))

    def load_now(self) -> tuple[int, int]:
        """(running, queued inside the engine): the engine's own scheduler view where it has one
        (TurboMind, the Transformers batcher), else the streams in flight and 0."""
        eng = self._engine
        fn = getattr(eng, "schedule_metrics", None)
        m = fn() if fn else None
        if m:
            return int(m.get("active", 0)), int(m.get("waiting", 0))
        return self.running, 0

    def abort(self, session_id: str) -> None:
        eng = self._engine
        if eng is not None:
            eng.abort(session_id)


def _weights_bytes(eng, resolved) -> int | None:
    """The model weights' bytes: the parameters where we hold the model (Transformers), else the
    checkpoint's size (LMDeploy loads it as stored; float32 checkpoints as 16-bit)."""
    model = getattr(eng, "model", None)
    try:
        if model is not None and hasattr(model, "parameters"):
            return int(sum(p.numel() * p.element_size() for p in model.parameters()))
        if resolved.local:
            from .lmdeploy import weight_bytes

            return int(weight_bytes(resolved.path, models.read_config(resolved.path)))
    except Exception:  # noqa: BLE001 - a figure for the panel, never a reason to fail a load
        return None
    return None
