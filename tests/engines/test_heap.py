"""engines.heap: a serving process's heap frozen out of the garbage collector's full collections
(a full collection of the web process took 146-163 ms and held a burst's first tokens back; frozen,
3-6 ms: engines/heap.py), and slow collections logged."""
from __future__ import annotations

import gc
import logging
import time

import pytest

from engines import heap


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()


def test_freeze_moves_the_live_heap_out_and_later_garbage_is_still_collected(thawed):
    n = heap.freeze("test")
    assert n > 1000 and abs(gc.get_freeze_count() - n) < 100   # frozen objects freed by refcount leave it
    survivors_before = len(gc.get_objects())          # the permanent generation is not listed
    assert survivors_before < n, "most of the heap is out of the collector's walks"
    import weakref

    c = _Cycle()
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None, "cyclic garbage made after the freeze is collected as before"


def test_freezing_again_collects_garbage_that_was_frozen(thawed):
    import weakref

    c = _Cycle()
    ref = weakref.ref(c)
    heap.freeze("first")
    del c                      # garbage now, but frozen: a collection does not see it
    gc.collect()
    assert ref() is not None
    heap.freeze("second")      # a model load's freeze: unfreeze, collect, freeze
    assert ref() is None


def test_the_switch_leaves_the_heap_as_python_keeps_it(monkeypatch, thawed):
    """TURBOSTUDIO_GC_FREEZE=0 reaches the switch through settings (app.py sets heap.enabled)."""
    import settings

    assert settings.from_args([], env={"TURBOSTUDIO_GC_FREEZE": "0"}).gc_freeze is False
    assert settings.from_args([], env={}).gc_freeze is True
    monkeypatch.setattr(heap, "enabled", False)
    assert heap.freeze("off") == 0 and gc.get_freeze_count() == 0


def test_a_slow_collection_is_logged_once_watched(caplog):
    w = heap.watch()
    assert heap.watch() is w and gc.callbacks.count(w) == 1, "installed once"
    old = w.threshold_s
    w.threshold_s = 0.0
    try:
        with caplog.at_level(logging.WARNING, logger="engines.heap"):
            slow = w.slow
            gc.collect()
        assert w.slow > slow and w.longest > 0
        assert "garbage collection (generation 2) stopped this process" in caplog.text
    finally:
        w.threshold_s = old


def test_collect_reaches_the_frozen_heap_and_freezes_again(thawed):
    import weakref

    c = _Cycle()
    ref = weakref.ref(c)
    heap.freeze("loaded")
    del c
    gc.collect()
    assert ref() is not None, "gc.collect() skips the frozen heap"
    heap.collect()
    assert ref() is None and gc.get_freeze_count() > 0, "freed, and what is left frozen again"
    gc.unfreeze()
    heap.collect()
    assert gc.get_freeze_count() == 0, "a heap that was not frozen is not frozen by a collect"


def test_a_model_closed_after_its_frozen_load_is_freed(tiny_llama, tmp_path, thawed):
    """The manager freezes the heap after a load; closing the engine (a model switch) must still
    free the model: the engines collect through heap.collect, which reaches the frozen heap."""
    import weakref

    from engines.manager import EngineManager

    m = EngineManager(str(tmp_path), {"device": "cpu"})
    m.load(tiny_llama.path, "transformers")
    assert gc.get_freeze_count() > 0
    eng = m.require()
    model = weakref.ref(eng.model)
    holder = _Cycle()
    holder.model = eng.model          # the model also held from a cycle, frozen with it
    heap.freeze("held")
    del holder, eng
    m.close()
    assert model() is None, "the model outlived its engine's close"


def test_a_heap_that_grew_is_frozen_again_only_while_idle(thawed):
    """A full collection slower than REFREEZE_S after the freeze marks the heap as grown; the keeper
    freezes again at a check where nothing is served, not before."""
    import threading

    w = heap.watch()
    heap.freeze("start")
    w.grown = False
    kept = [[i] for i in range(200_000)]            # what a server keeps: long-lived, not frozen
    old = w.refreeze_s
    w.refreeze_s = 0.0                              # any full collection counts as slow here
    try:
        gc.collect()
        assert w.grown
        idle, stop = threading.Event(), threading.Event()
        before = gc.get_freeze_count()
        keeper = heap.keep_frozen(idle.is_set, every_s=0.05, stop=stop)
        time.sleep(0.4)
        assert w.grown and gc.get_freeze_count() == before, "not while something is served"
        idle.set()
        deadline = time.time() + 5
        while w.grown and time.time() < deadline:
            time.sleep(0.05)
        refrozen = not w.grown
        w.refreeze_s = old                          # no more "grown" marks from here on
        stop.set()
        keeper.join(5)
        assert refrozen and not keeper.is_alive()
        assert gc.get_freeze_count() >= before + len(kept), "what was kept since is frozen too"
    finally:
        w.refreeze_s = old
