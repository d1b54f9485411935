"""In-app measurements for the Monitor page: a load test of the loaded engine (N simulated users for
a set time) and the tutorial's engine comparison (the same prompts on each chosen engine).

Both are bounded in time and cancellable (``cancel`` event), and report through ``progress``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .base import ChatMessage, GenParams

PROMPTS = ["Explain how a rainbow forms.", "Write a short poem about the sea.",
           "List five uses of a paperclip.", "Describe the water cycle in simple words."]


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


@dataclass
class RequestResult:
    ttft: float | None
    seconds: float
    tokens: int
    words: int
    gaps: list = field(default_factory=list)     # seconds between deltas, per token
    error: str | None = None


def one_request(stream_fn, messages, params, sid, cancel: threading.Event | None = None) -> RequestResult:
    t0 = time.perf_counter()
    ttft, last_t, last_tokens, tokens, text, gaps = None, None, 0, 0, "", []
    try:
        for d in stream_fn(messages, params, session_id=sid):
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
            if cancel is not None and cancel.is_set():
                break
    except Exception as e:  # noqa: BLE001
        return RequestResult(ttft, time.perf_counter() - t0, tokens, len(text.split()), gaps, str(e))
    return RequestResult(ttft, time.perf_counter() - t0, tokens, len(text.split()), gaps)


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in results)
    return {"requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "words_per_s": round(sum(r.words for r in results) / wall, 2) if wall > 0 else 0.0,
            "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
            "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99),
            "first_error": next((r.error for r in results if r.error), None)}


def load_test(stream_fn, *, users: int, seconds: float, params: GenParams,
              cancel: threading.Event | None = None, progress: Callable[[float, str], None] | None = None) -> dict:
    """``users`` simulated users send requests back to back for ``seconds`` (no new request starts
    after that; running ones finish). Returns the summary and the per-request rows."""
    cancel = cancel or threading.Event()
    results: list[RequestResult] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    end = t0 + seconds

    def user(i):
        n = 0
        while time.perf_counter() < end and not cancel.is_set():
            msgs = [ChatMessage("user", PROMPTS[(i + n) % len(PROMPTS)])]
            r = one_request(stream_fn, msgs, params, f"loadtest-{i}-{n}", cancel)
            with lock:
                results.append(r)
            n += 1

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    [t.start() for t in threads]
    while any(t.is_alive() for t in threads):
        if progress:
            progress(min(1.0, (time.perf_counter() - t0) / seconds), f"{len(results)} replies so far")
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    out = summarize(results, wall)
    out.update(users=users, cancelled=cancel.is_set(),
               rows=[{k: v for k, v in asdict(r).items() if k != "gaps"} for r in results])
    return out


def compare_engines(make_engine, choices: list[str], *, params: GenParams, repeats: int = 2,
                    batch: int | list[int] = 1, cancel: threading.Event | None = None,
                    progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """The tutorial's comparison done properly: for each engine, load it once, warm up, then run the
    same prompts ``repeats`` times with each ``batch`` size of concurrent streams (one row per engine
    and batch size); GPU memory from NVML (the load's increase)."""
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
            eng = make_engine(choice)
        except Exception as e:  # noqa: BLE001
            rows += [{"engine": choice, "batch": b, "error": getattr(e, "message", str(e))} for b in batches]
            continue
        try:
            mem = round((telemetry.snapshot()["gpu_used"] - base) / 2**30, 2)
            one_request(eng.stream, [ChatMessage("user", PROMPTS[0])], params.replace(max_new_tokens=8), "warm")
            for b in batches:
                results, t0 = [], time.perf_counter()
                for rep in range(repeats):
                    if cancel.is_set():
                        break
                    progress and progress((k + (rep + 0.5) / repeats) / len(choices), f"measuring {choice}, batch {b}")
                    batch_res = [None] * b
                    threads = [threading.Thread(target=lambda i=i: batch_res.__setitem__(i, one_request(
                        eng.stream, [ChatMessage("user", PROMPTS[(rep + i) % len(PROMPTS)])], params,
                        f"bench-{rep}-{i}", cancel))) for i in range(b)]
                    [t.start() for t in threads]
                    [t.join() for t in threads]
                    results += batch_res
                wall = time.perf_counter() - t0
                rows.append({"engine": choice, "backend": eng.info.backend, "model": eng.info.model, "batch": b,
                             **summarize(results, wall), "gpu_mem_gib": mem})
        finally:
            eng.close()
    progress and progress(1.0, "done")
    return rows
