"""engines.relay.relay: a blocking stream handed to the event loop by one pump thread (the one relay
every async entry point uses); deltas that arrive together are merged, never dropped."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engines.base import Delta
from engines.relay import newest, relay


def _cumulative(n, delay=0.0, fail=False):
    text = ""
    for i in range(n):
        if delay:
            time.sleep(delay)
        text += f"{i} "
        yield text
    if fail:
        raise ValueError("engine failed")


def test_every_item_reaches_a_consumer_that_keeps_up_and_the_last_always():
    async def run():
        return [x async for x in relay(_cumulative(50, delay=0.001), merge=newest)]

    out = asyncio.run(run())
    assert out[-1] == "".join(f"{i} " for i in range(50))
    assert all(b.startswith(a) for a, b in zip(out, out[1:])), "in order, nothing lost"


def test_a_slow_consumer_gets_fewer_larger_updates_and_the_whole_text():
    async def run():
        got = []
        async for x in relay(_cumulative(400, delay=0.0005), merge=newest):
            got.append(x)
            await asyncio.sleep(0.02)      # a busy event loop
        return got

    out = asyncio.run(run())
    assert len(out) < 200, "intermediate updates were coalesced"
    assert out[-1] == "".join(f"{i} " for i in range(400)), "the final text is never skipped"


def test_errors_are_raised_in_the_consumer_after_what_came_before():
    async def run():
        got = []
        with pytest.raises(ValueError, match="engine failed"):
            async for x in relay(_cumulative(3, fail=True), merge=newest):
                got.append(x)
        return got

    assert asyncio.run(run())[-1] == "0 1 2 "


def test_a_consumer_that_leaves_cancels_and_the_generator_is_closed_in_its_thread():
    closed, cancelled = threading.Event(), []

    def endless():
        try:
            while True:
                time.sleep(0.001)
                yield "x"
        finally:
            closed.set()

    async def run():
        agen = relay(endless(), on_cancel=lambda: cancelled.append(True), merge=newest)
        await agen.__anext__()
        await agen.aclose()           # what Gradio does on Stop or a closed tab (task cancelled)

    asyncio.run(run())
    assert cancelled == [True]
    assert closed.wait(5), "the pump stopped and closed the engine stream"


def test_deltas_that_arrive_together_are_merged_and_no_text_is_lost():
    def deltas():
        for i in range(300):
            time.sleep(0.0002)
            yield Delta(f"{i} ", i + 1)
        yield Delta("end", 301, "stop")

    async def run():
        got = []
        async for d in relay(deltas()):
            got.append(d)
            await asyncio.sleep(0.01)      # a busy event loop
        return got

    out = asyncio.run(run())
    assert len(out) < 150, "deltas were merged under load"
    assert "".join(d.text for d in out) == "".join(f"{i} " for i in range(300)) + "end"
    assert out[-1].tokens == 301 and out[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in out[:-1])


def _paced_deltas(n, step):
    for i in range(n):
        time.sleep(step)
        yield Delta("x", i + 1, "length" if i == n - 1 else None)


def test_a_paced_consumer_reads_at_its_pace_gets_all_text_and_the_end_at_once():
    async def run():
        got, times = [], []
        t0 = time.perf_counter()
        async for d in relay(_paced_deltas(200, 0.001), interval=0.05):
            got.append(d)
            times.append(time.perf_counter() - t0)
        return got, times, time.perf_counter() - t0

    got, times, total = asyncio.run(run())
    assert "".join(d.text for d in got) == "x" * 200 and got[-1].finish_reason == "length"
    assert times[0] < 0.04, "the first item is not held back by the pace"
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    assert len(got) <= total / 0.05 + 3, (len(got), total)
    assert all(g >= 0.045 for g in gaps[:-1]), gaps          # the last read may come early: the end
    # the generator ended after ~200 steps; the consumer heard it without waiting out a whole pace
    assert total - times[-1] < 0.03


def test_the_pump_wakes_the_loop_once_per_read_not_once_per_item():
    """300 items while the consumer is busy: the pump appends, and schedules a wake-up only when
    the consumer waits (counted on the real event loop's call_soon_threadsafe)."""
    calls = []

    def items():
        for i in range(300):
            time.sleep(0.0002)
            yield Delta("y", i + 1)

    async def run():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        loop.call_soon_threadsafe = counting
        reads, text = 0, ""
        async for d in relay(items()):
            reads += 1
            text += d.text
            await asyncio.sleep(0.01)      # a busy event loop
        return reads, text

    reads, text = asyncio.run(run())
    assert text == "y" * 300
    assert len(calls) <= reads + 2, (len(calls), reads)
    assert len(calls) < 100, "not one wake-up per item"


def test_a_paced_consumer_cancelled_while_it_waits_out_its_pace_aborts_at_once():
    closed = threading.Event()

    def endless():
        try:
            while True:
                time.sleep(0.001)
                yield Delta("z", 1)
        finally:
            closed.set()

    async def run():
        cancelled, got = [], []

        async def consume():
            async for d in relay(endless(), on_cancel=lambda: cancelled.append(True), interval=5.0):
                got.append(d)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)         # the first read done, now inside its 5 s pace
        t0 = time.perf_counter()
        task.cancel()                    # Stop, a closed tab, a vanished client
        try:
            await task
        except asyncio.CancelledError:
            pass
        return cancelled, got, time.perf_counter() - t0

    cancelled, got, took = asyncio.run(run())
    assert len(got) == 1 and cancelled == [True] and took < 0.5
    assert closed.wait(5), "the pump stopped and closed the engine stream"


def test_pump_threads_are_reused_and_never_started_by_the_event_loop(monkeypatch):
    """Streams one after another run on one kept pump thread; 32 at once get a thread each (none
    waits for another's end); the event loop's thread calls ``Thread.start`` once, for the spawner,
    never for a pump (it blocks until the new thread runs: under load a GIL switch interval a
    request, measured on the loop); idle pumps end."""
    from engines.relay import _Pumps

    pumps = _Pumps(idle_s=0.3)
    monkeypatch.setattr("engines.relay._pumps", pumps)
    starters: list[str] = []
    real_start = threading.Thread.start

    def start(self):
        starters.append((threading.current_thread().name, self.name))
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    used: set[int] = set()

    def gen(n, delay=0.0):
        used.add(threading.get_ident())
        for i in range(n):
            time.sleep(delay)
            yield Delta(f"{i} ", i + 1)

    async def one(n, delay=0.0):
        return "".join([d.text async for d in relay(gen(n, delay))])

    async def run():
        threading.current_thread().name = "event-loop"
        for _ in range(5):
            assert await one(3) == "0 1 2 "
            await asyncio.sleep(0.01)             # its pump is idle again
        assert len(used) == 1 and pumps.threads == 1, (used, pumps.threads)
        used.clear()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[one(5, 0.05) for _ in range(32)])
        return outs, time.perf_counter() - t0

    outs, took = asyncio.run(run())
    assert outs == ["0 1 2 3 4 "] * 32
    assert len(used) == 32 and took < 2.0, (len(used), took)   # one after another would take 8 s
    by_loop = [made for who, made in starters if who == "event-loop"]
    assert by_loop == ["relay-spawner"], starters           # the spawner itself, once per process
    assert {made for who, made in starters if who != "event-loop"} == {"relay"}, starters
    deadline = time.time() + 5
    while pumps.threads > 0 and time.time() < deadline:        # idle ones end after idle_s
        time.sleep(0.05)
    assert pumps.threads == 0
