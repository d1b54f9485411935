"""In-app measurements for the Monitor page: a load test of the loaded engine (N simulated users for
a set time) and the tutorial's engine comparison (the same prompts on each chosen engine).

Both take the one road: every request is a :class:`~engines.base.ChatRequest` (``source`` "loadtest"
or "compare", ``owner`` the user who started the run) given to a ``submit`` callable, the engine
manager's :meth:`~engines.manager.EngineManager.submit`, so admission, limits, cancellation and
metrics are the same as for a chat user. Both are bounded in time and cancellable (``cancel``
event; a cancel aborts the requests in flight), and report through ``progress``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from .base import ChatMessage, ChatRequest, GenParams

if TYPE_CHECKING:
    from .manager import EngineManager, Submission

SubmitFn = Callable[[ChatRequest], "Submission"]

PROMPTS = ["Explain how a rainbow forms.", "Write a short poem about the sea.",
           "List five uses of a paperclip.", "Describe the water cycle in simple words."]


P99_MIN_SAMPLES = 100
"""A 99th percentile rests on at least this many samples; from fewer it would only be the maximum
under another name, so it is None and the maximum is reported as such."""


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def _spread(values: list[float], key: str) -> dict:
    """``{key}_p50``, ``{key}_p99`` (None below ``P99_MIN_SAMPLES`` samples), ``{key}_max`` and
    ``{key}_samples``: a percentile always says how many samples it rests on."""
    return {f"{key}_p50": _pct(values, 50),
            f"{key}_p99": _pct(values, 99) if len(values) >= P99_MIN_SAMPLES else None,
            f"{key}_max": max(values) if values else None, f"{key}_samples": len(values)}


@dataclass
class RequestResult:
    ttft: float | None
    seconds: float
    tokens: int
    words: int
    gaps: list = field(default_factory=list)     # seconds between deltas, per token
    error: str | None = None


def one_request(submit: SubmitFn, messages: Sequence[ChatMessage], params: GenParams, *,
                source: str = "loadtest", owner: str | None = None, session: str = "",
                cancel: threading.Event | None = None) -> RequestResult:
    """One request through ``submit``, timed: first token, per-token gaps, tokens and words. A
    refusal (busy, a limit) or a failed reply is a result with ``error``; ``cancel`` aborts it."""
    t0 = time.perf_counter()
    ttft, last_t, last_tokens, tokens, text, gaps = None, None, 0, 0, "", []
    try:
        sub = submit(ChatRequest(tuple(messages), params, owner=owner, session=session, source=source))
    except Exception as e:  # noqa: BLE001
        return RequestResult(None, time.perf_counter() - t0, 0, 0, [], getattr(e, "message", None) or str(e))
    watcher = None
    if cancel is not None:      # a cancel mid-reply aborts it (the stream then ends with "abort")
        done = threading.Event()

        def watch():
            while not done.wait(0.1):
                if cancel.is_set():
                    sub.abort()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        for d in sub:
            now = time.perf_counter()
            if d.finish_reason == "error":
                return RequestResult(ttft, now - t0, tokens, len(text.split()), gaps, d.error)
            if ttft is None and (d.text or d.tokens):
                ttft = now - t0
            elif last_t is not None and d.tokens > last_tokens:
                gaps += [(now - last_t) / (d.tokens - last_tokens)] * (d.tokens - last_tokens)
            if d.tokens > last_tokens:
                last_t, last_tokens = now, d.tokens
            tokens = d.tokens
            text += d.text
    except Exception as e:  # noqa: BLE001
        return RequestResult(ttft, time.perf_counter() - t0, tokens, len(text.split()), gaps, str(e))
    finally:
        if watcher is not None:
            done.set()
    return RequestResult(ttft, time.perf_counter() - t0, tokens, len(text.split()), gaps)


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in results)
    return {"requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "words_per_s": round(sum(r.words for r in results) / wall, 2) if wall > 0 else 0.0,
            **_spread(ttfts, "ttft"), **_spread(gaps, "itl"),
            "first_error": next((r.error for r in results if r.error), None)}


def expected_replies(done: int, in_flight: int, users: int, elapsed: float, seconds: float) -> int | None:
    """How many replies a load test will have in all, from where it stands: once its time is up,
    exactly the replies done and those still running (no new one starts); before, those plus what
    each user will still start at the pace seen so far (a user's replies take ``elapsed * users /
    done`` seconds on average). None while no reply has ended (no pace to go by)."""
    if elapsed >= seconds:
        return done + in_flight
    if done == 0:
        return None
    per_reply = elapsed * users / done
    return max(done + in_flight, done + in_flight + round(users * (seconds - elapsed) / per_reply))


def progress_line(done: int, expected: int | None, in_flight: int, elapsed: float,
                  seconds: float) -> tuple[float, str]:
    """The load test's progress as (fraction, words): replies done of replies expected (of about
    as many while the test's time runs; exactly, once it is up)."""
    if elapsed >= seconds:
        total = expected if expected is not None else done + in_flight
        tail = f": time is up, the last {total - done} finishing" if total > done else ""
        return (done / total if total else 1.0), f"{done} of {total} replies{tail}"
    clock = f" · {elapsed:.0f} of {seconds:.0f} s"
    if expected is None:
        return 0.0, f"0 replies done, {in_flight} under way{clock}"
    return done / max(1, expected), f"{done} of ~{expected} replies{clock}"


def load_test(submit: SubmitFn, *, users: int, seconds: float, params: GenParams, owner: str | None = None,
              cancel: threading.Event | None = None,
              progress: Callable[[float, str], None] | None = None) -> dict:
    """``users`` simulated users send requests back to back through ``submit`` for ``seconds`` (no
    new request starts after that; running ones finish). Requests have source "loadtest" and
    ``owner``. ``progress(fraction, words)`` counts replies done of replies expected
    (``progress_line``). Returns the
    summary and the per-request rows."""
    cancel = cancel or threading.Event()
    results: list[RequestResult] = []
    lock = threading.Lock()
    running = [0]
    t0 = time.perf_counter()
    end = t0 + seconds

    def user(i):
        n = 0
        while time.perf_counter() < end and not cancel.is_set():
            msgs = [ChatMessage("user", PROMPTS[(i + n) % len(PROMPTS)])]
            with lock:
                running[0] += 1
            r = None
            try:
                r = one_request(submit, msgs, params, source="loadtest", owner=owner, session=f"loadtest-{i}",
                                cancel=cancel)
            finally:
                with lock:          # one step: a reply is never both done and running, nor neither
                    running[0] -= 1
                    if r is not None:
                        results.append(r)
            n += 1

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    [t.start() for t in threads]
    while any(t.is_alive() for t in threads):
        if progress:
            with lock:
                done, in_flight = len(results), running[0]
            elapsed = time.perf_counter() - t0
            if cancel.is_set():
                progress(done / max(1, done + in_flight), f"cancelling: {done} replies done, {in_flight} being stopped")
            else:
                expected = expected_replies(done, in_flight, users, elapsed, seconds)
                progress(*progress_line(done, expected, in_flight, elapsed, seconds))
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    out = summarize(results, wall)
    out.update(users=users, cancelled=cancel.is_set(),
               rows=[{k: v for k, v in asdict(r).items() if k != "gaps"} for r in results])
    return out


def compare_engines(make_manager: Callable[[str], "EngineManager"], choices: list[str], *, params: GenParams,
                    repeats: int = 2, batch: int | list[int] = 1, owner: str | None = None,
                    cancel: threading.Event | None = None,
                    progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """The tutorial's comparison done properly: for each engine, ``make_manager(choice)`` loads it
    (a scratch manager, ``EngineManager.scratch``: the same road as the app's own model), then a
    warm-up, then the same prompts ``repeats`` times with each ``batch`` size of concurrent streams
    (one row per engine and batch size); GPU memory from NVML (the load's increase). Each manager is
    closed after its rows; requests have source "compare" and ``owner``."""
    from . import telemetry

    cancel = cancel or threading.Event()
    batches = [batch] if isinstance(batch, int) else list(batch)
    rows = []
    for k, choice in enumerate(choices):
        if cancel.is_set():
            break
        progress and progress(k / len(choices), f"loading {choice}")
        base = telemetry.snapshot()["gpu_used"]
        try:
            mgr = make_manager(choice)
        except Exception as e:  # noqa: BLE001
            rows += [{"engine": choice, "batch": b, "error": getattr(e, "message", str(e))} for b in batches]
            continue
        try:
            info = mgr.info()
            mem = round((telemetry.snapshot()["gpu_used"] - base) / 2**30, 2)
            one_request(mgr.submit, [ChatMessage("user", PROMPTS[0])], params.replace(max_new_tokens=8),
                        source="compare", owner=owner, session="compare-warm")
            # and once at each larger batch size, untimed: an engine's first step at a new batch size
            # can pay one-off costs (LMDeploy's PyTorch engine captures a CUDA graph per batch size;
            # seen: its batch-16 figure on a 7B was half what the same engine makes warm)
            for b in sorted({b for b in batches if b > 1}):
                warm = [threading.Thread(target=one_request, args=(mgr.submit, [ChatMessage("user", PROMPTS[i % len(PROMPTS)])],
                                                                   params.replace(max_new_tokens=8)),
                                         kwargs={"source": "compare", "owner": owner, "session": f"compare-warm-{i}"})
                        for i in range(b)]
                [t.start() for t in warm]
                [t.join() for t in warm]
            for b in batches:
                results, t0 = [], time.perf_counter()
                for rep in range(repeats):
                    if cancel.is_set():
                        break
                    progress and progress((k + (rep + 0.5) / repeats) / len(choices), f"measuring {choice}, batch {b}")
                    batch_res = [None] * b
                    threads = [threading.Thread(target=lambda i=i: batch_res.__setitem__(i, one_request(
                        mgr.submit, [ChatMessage("user", PROMPTS[(rep + i) % len(PROMPTS)])], params,
                        source="compare", owner=owner, session=f"compare-{rep}-{i}", cancel=cancel)))
                        for i in range(b)]
                    [t.start() for t in threads]
                    [t.join() for t in threads]
                    results += batch_res
                wall = time.perf_counter() - t0
                rows.append({"engine": choice, "backend": info.backend, "model": info.model, "batch": b,
                             **summarize(results, wall), "gpu_mem_gib": mem})
        finally:
            mgr.close()
    progress and progress(1.0, "done")
    return rows
