"""The one relay from a blocking engine stream to an asyncio event loop.

Every async consumer (the Chat and Vision pages' Gradio handlers, ``/chat``, ``/v1``) reads an
engine stream through :func:`relay`; there is no second pump anywhere.

Why a relay: an engine stream is a blocking iterator (it waits for the next token). Gradio would run
a sync generator's every item through ``anyio.to_thread`` (one thread-pool hop and limiter token per
update per user, on the loop that writes every user's SSE), and the OpenAI endpoint had its own pump
thread and queue. Here each stream gets one pump thread for its whole life; the pump reads the
blocking iterator and leaves its items for the event loop, which takes *everything that arrived
since it last looked* at once, merged by ``merge``. For :class:`~engines.base.Delta` streams that is
concatenated text with the latest token count, so when the loop falls behind under load, updates
coalesce into fewer, larger ones and no text is ever dropped: the load on the loop adapts to what
it can take.

Cancellation: if the consumer stops early (Stop, a closed tab, a vanished HTTP client: the task is
cancelled or the async generator closed), ``on_cancel`` is called at once (the manager's abort of
that request id, so the pump is not left waiting for a token that will never come) and the pump
closes the blocking iterator in its own thread after its current item.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, Sequence, TypeVar

from .base import Delta

T = TypeVar("T")


def merge_deltas(items: Sequence[Delta]) -> Delta:
    """Deltas that arrived together, as one: all their text, the last count and finish reason."""
    if len(items) == 1:
        return items[0]
    last = items[-1]
    return Delta("".join(d.text for d in items), last.tokens, last.finish_reason, last.error)


def newest(items: Sequence[T]) -> T:
    """For streams of cumulative items (each one the whole result so far)."""
    return items[-1]


def _seconds(interval: float | Callable[[], float]) -> float:
    return interval() if callable(interval) else interval


async def relay(gen: Iterator[T], on_cancel: Callable[[], None] | None = None,
                merge: Callable[[Sequence[T]], T] = merge_deltas,
                interval: float | Callable[[], float] = 0.0,
                nap: Callable[[float], None] | None = None) -> AsyncIterator[T]:
    """Yield ``gen``'s items on the running event loop, the ones that arrived together merged.

    ``gen`` runs in its own thread and is closed there. Nothing is lost: a merge covers every item
    that arrived, and an error raised by ``gen`` is raised here after the items before it.

    ``interval`` (seconds, or a function giving them, read after each yield): the least time between
    two of the consumer's reads. 0 reads as soon as anything arrived. A consumer that coalesces
    anyway (the Chat page sends the reply at most every 50-200 ms) passes its pace here, so the
    event loop is not woken for every token only to wait for more: the first item is yielded at
    once, later ones at that pace, and the end (``gen`` finished or failed) at once.

    How the pump hands items over (measured with ``bench/bench_web.py``, server CPU per token): it
    appends under a lock and wakes the loop only when the consumer waits and no wake-up is already
    on its way, one ``call_soon_threadsafe`` (a handle and a self-pipe write) per read instead of
    one per token. With 64 streams the per-token wake-ups of 64 pump threads were what the event
    loop spent its time on, behind the GIL.

    ``nap`` (optional, from the stream's source: ``engines.core``'s streams have one): called by the
    pump after it handed an item over while the consumer paces, with that pace; it returns when the
    pace has passed, when the stream's end has arrived, or at once when more is already there. The
    pump then reads on and hands over everything that came meanwhile as one item per read of the
    source, which wakes nobody (the consumer is pacing). Without it the pump woke for every frame
    of the engine process (every 4 ms per stream at 64 streams) though the consumer read every
    94-200 ms: at 64 users those wake-ups of 64 pump threads were ~30% of the web process's GIL time
    (py-spy --gil, bench_web, 2026-12-03). The end is never held back (the nap ends when it comes)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    lock = threading.Lock()
    # items: arrived, not yet read; waiting: the consumer sleeps until ``ready``, so the next
    # arrival wakes it (False while it runs or paces itself); wake: a wake-up is scheduled
    box: dict = {"items": [], "done": False, "error": None, "waiting": False, "wake": False}
    stop = threading.Event()

    def wake():
        with lock:
            box["wake"] = False
        ready.set()

    def post(item=None, *, done=False, error=None) -> bool:
        with lock:
            if error is not None:
                box["error"] = error
            elif done:
                box["done"] = True
            else:
                box["items"].append(item)
            # the end wakes a pacing consumer too (done or error: nothing more will come)
            need = (box["waiting"] or done or error is not None) and not box["wake"]
            if need:
                box["wake"] = True
        if need:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:      # the loop is closed (shutting down): nobody is listening
                stop.set()
                return False
        return True

    def pump():
        try:
            for item in gen:
                if not post(item) or stop.is_set():
                    break
                if nap is not None:
                    pause = _seconds(interval)
                    if pause > 0:
                        nap(pause)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            post(error=e)
        finally:
            try:
                gen.close()
            except Exception:  # noqa: BLE001
                pass
            post(done=True)

    threading.Thread(target=pump, daemon=True, name="relay").start()
    finished = False
    try:
        while True:
            with lock:
                items, box["items"] = box["items"], []
                error, done = box["error"], box["done"]
                box["waiting"] = not items and error is None and not done
                if box["waiting"]:
                    ready.clear()     # under the lock: a post after this sees waiting and wakes us
            if items:
                yield merge(items)
                pause = _seconds(interval)
                if pause > 0:         # paced: sleep, but the end (done/error) wakes us at once
                    with lock:
                        ended = box["done"] or box["error"] is not None
                        if not ended:
                            ready.clear()
                    if not ended:     # a timer handle, cheaper than wait_for's task per read
                        timer = loop.call_later(pause, ready.set)
                        try:
                            await ready.wait()
                        finally:
                            timer.cancel()
                continue              # items that came meanwhile go out before done/error
            if error is not None:
                finished = True
                raise error
            if done:
                finished = True
                return
            await ready.wait()
    finally:
        if not finished:
            stop.set()
            if on_cancel is not None:
                on_cancel()
