"""The Python heap of a serving process, kept out of the garbage collector's full collections.

Why: CPython's cyclic collector walks every tracked object of the process on a full (oldest
generation) collection, and it runs one whenever enough objects have survived the younger ones:
during a burst of requests, that is, while users wait. A process that has imported Gradio, torch
and Transformers holds some 370 000 such objects, and a full collection stops every thread of it
for as long as the walk takes. Measured in the web process (``bench_web``'s server, engine
process on, 2-core CPU, 2026-12-03, ``gc.callbacks``): full collections of 146-189 ms during
bursts of 64 simultaneous requests, and the bursts that met one had their first tokens 150-200 ms
late (p50 ~80 ms -> 230-280 ms): that was the 64-user first-token p99 of issue #19 on this machine.
LMDeploy's process (torch, the model's Python objects) pays the same, mid-decode.

:func:`freeze`, once the process has built what it serves with (the app after launch, the engine
process after its load, the manager after each load), collects and then moves every object alive
into the permanent generation (``gc.freeze``), which collections skip: what is allocated later is
collected as before, and a full collection walks only that. vLLM (``freeze_gc_heap`` after its
warm-up) and SGLang (``freeze_gc``) do the same. A frozen object that becomes cyclic garbage later
is kept until the next :func:`freeze` or :func:`collect`, which first unfreeze: the engines free
a model through :func:`collect` (not ``gc.collect()``, which skips the frozen heap), so a model
unloaded gives its memory back before the next one loads.

:func:`watch` logs a collection that took longer than it should (the log says so when this
defence is not enough). What a server keeps for long after its freeze (replies' metrics, sessions,
conversations) goes back into the full walks: 3.4 -> 5.5 ms over the first 4 000 requests of the
measurement above. :func:`keep_frozen` freezes again once a full collection has taken over
``REFREEZE_S``, at a moment when nothing is being served (its own collection is the one pause
left, and nobody waits on it)."""
from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)
_lock = threading.Lock()
# False (TURBOSTUDIO_GC_FREEZE=0, set by app.py; the engine process gets the web process's value)
# leaves the heap as Python keeps it, for A/B runs
enabled = True


def freeze(where: str) -> int:
    """Collect what is garbage now, then freeze the rest (see the module). Returns how many objects
    are frozen. Safe to call again: it unfreezes first, so garbage made since is collected. With
    ``enabled`` False it does nothing (returns 0)."""
    if not enabled:
        return 0
    with _lock:
        t0 = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        n = gc.get_freeze_count()
    log.info("%s: %d objects frozen out of the garbage collector's full collections (%.0f ms)",
             where, n, (time.perf_counter() - t0) * 1000)
    return n


def collect() -> None:
    """``gc.collect()`` for a caller that is freeing memory (an engine's close before
    ``torch.cuda.empty_cache()``, an out-of-memory recovery): a collection skips the frozen heap, so
    an engine whose objects were frozen at its load, and hold each other in cycles, would keep its
    GPU memory through ``gc.collect()`` and the next model's load could run out of it. This unfreezes,
    collects everything, and freezes again what is left if the heap was frozen."""
    with _lock:
        frozen = gc.get_freeze_count() > 0
        gc.unfreeze()
        gc.collect()
        if frozen and enabled:
            gc.freeze()


REFREEZE_S = 0.02     # a full collection longer than this: the heap grew since the last freeze
SLOW_LOG = "a garbage collection (generation"    # how a slow one's warning starts (benchmarks count them)


class _Watch:
    def __init__(self, threshold_s: float):
        self.threshold_s = threshold_s
        self.refreeze_s = REFREEZE_S
        self.longest = 0.0          # the longest collection seen, in seconds
        self.slow = 0               # collections over the threshold
        self.grown = False          # a full collection took over refreeze_s since the last freeze
        self._t0 = 0.0

    def reset(self) -> None:
        """Start counting ``longest`` and ``slow`` again (a benchmark's run)."""
        self.longest, self.slow = 0.0, 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        took = time.perf_counter() - self._t0
        if took > self.longest:
            self.longest = took
        if info.get("generation") == 2 and took >= self.refreeze_s and gc.get_freeze_count() > 0:
            self.grown = True
        if took >= self.threshold_s:
            self.slow += 1
            log.warning(SLOW_LOG + " %d) stopped this process for %.0f ms", info.get("generation", -1),
                        took * 1000)


_watch: _Watch | None = None


def watch(threshold_s: float = 0.1) -> _Watch:
    """Time every collection of this process; one over ``threshold_s`` is logged as a warning.
    Installed once per process; returns the watcher (``longest``, ``slow``)."""
    global _watch
    with _lock:
        if _watch is None:
            _watch = _Watch(threshold_s)
            gc.callbacks.append(_watch)
        return _watch


def keep_frozen(is_idle: Callable[[], bool], every_s: float = 5.0,
                stop: threading.Event | None = None) -> threading.Thread:
    """A daemon thread (``heap-keeper``) that freezes the heap again when a full collection has
    taken over ``REFREEZE_S`` since the last freeze (the heap grew), at the first check, every
    ``every_s``, when ``is_idle()`` says nothing is being served. Needs :func:`watch` (installed
    here if it is not). Does nothing while the heap is not frozen (``enabled`` False). ``stop`` ends
    the thread when set (a test's)."""
    w = watch()
    stop = stop or threading.Event()

    def loop():
        while not stop.wait(every_s):
            if not (enabled and w.grown and gc.get_freeze_count() > 0):
                continue
            try:
                idle = bool(is_idle())
            except Exception:  # noqa: BLE001 - a process shutting down; try again later
                idle = False
            if idle:
                w.grown = False
                freeze("the heap grew; frozen again while idle")

    t = threading.Thread(target=loop, daemon=True, name="heap-keeper")
    t.start()
    return t
