"""The one relay from a blocking engine stream to an asyncio event loop.

Every async consumer (the Chat and Vision pages' Gradio handlers, ``/chat``, ``/v1``) reads an
engine stream through :func:`relay`; there is no second pump anywhere.

Why a relay: an engine stream is a blocking iterator (it waits for the next token). Gradio would run
a sync generator's every item through ``anyio.to_thread`` (one thread-pool hop and limiter token per
update per user, on the loop that writes every user's SSE), and the OpenAI endpoint had its own pump
thread and queue. Here each stream gets one pump thread for its whole life (threads are kept and
reused: :class:`_Pumps`); the pump reads the blocking iterator and leaves its items for the event
loop, which takes *everything that arrived since it last looked* at once, merged by ``merge``. For
:class:`~engines.base.Delta` streams that is concatenated text with the latest token count, so when
the loop falls behind under load, updates coalesce into fewer, larger ones and no text is ever
dropped: the load on the loop adapts to what it can take.

Cancellation: if the consumer stops early (Stop, a closed tab, a vanished HTTP client: the task is
cancelled or the async generator closed), ``on_cancel`` is called at once (the manager's abort of
that request id, so the pump is not left waiting for a token that will never come) and the pump
closes the blocking iterator in its own thread after its current item.
"""
from __future__ import annotations

import asyncio
import queue
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


class _Pumps:
    """The relay's pump threads, kept and reused: a stream's pump runs on an idle one, or on a new
    one when none is idle; one idle for ``idle_s`` ends.

    Why not ``threading.Thread(...).start()`` per stream (what the relay did) or a
    ``ThreadPoolExecutor``: ``Thread.start`` blocks its caller until the new thread has run, and the
    caller is the event loop, which under load then waits for the GIL behind every other thread (up
    to a switch interval, 5 ms, each time). py-spy on ``bench_web`` (64 simultaneous 1-token ``/v1``
    requests, engine process on, 2-core CPU, 2026-12-03): ``Thread.start`` was 23% of the event loop
    thread's samples, blocked on new threads' starts, while 64 requests waited behind it for their
    first tokens. ``ThreadPoolExecutor`` starts its threads the same way when it grows (and keeps them
    for ever). Here the event loop only queues the job; when no thread is idle, a helper thread
    (``relay-spawner``) starts a new one, and waits for it in the loop's place."""

    def __init__(self, idle_s: float = 60.0):
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._spawn: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0          # threads waiting for a job and not yet promised one
        self._spawner: threading.Thread | None = None
        self.threads = 0        # pump threads alive or asked for (for tests and the curious)

    def run(self, fn: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self.threads += 1
            else:
                self._idle -= 1
            start_spawner = spawn and self._spawner is None
            if start_spawner:
                self._spawner = threading.Thread(target=self._spawn_loop, daemon=True, name="relay-spawner")
        self._jobs.put(fn)
        if spawn:
            self._spawn.put(None)
        if start_spawner:
            self._spawner.start()             # once per process

    def _spawn_loop(self) -> None:
        while True:
            self._spawn.get()
            try:
                threading.Thread(target=self._worker, daemon=True, name="relay").start()
            except RuntimeError:              # the interpreter is shutting down
                return

    def _worker(self) -> None:
        while True:
            try:
                fn = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:        # nobody is counting on this thread: it ends
                        self._idle -= 1
                        self.threads -= 1
                        return
                continue                      # a job was promised to an idle thread: wait for it
            try:
                fn()
            except BaseException:  # noqa: BLE001 - a pump hands its errors to its consumer itself
                pass
            with self._lock:
                self._idle += 1


_pumps = _Pumps()


def _seconds(interval: float | Callable[[], float]) -> float:
    return interval() if callable(interval) else interval


async def relay(gen: Iterator[T], on_cancel: Callable[[], None] | None = None,
                merge: Callable[[Sequence[T]], T] = merge_deltas,
                interval: float | Callable[[], float] = 0.0,
                nap: Callable[[float], None] | None = None) -> AsyncIterator[T]:
    """Yield ``gen``'s items on the running event loop, the ones that arrived together merged.

    ``gen`` runs in its own thread (a pump kept and reused: :class:`_Pumps`) and is closed there.
    Nothing is lost: a merge covers every item that arrived, and an error raised by ``gen`` is raised
    here after the items before it.

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

    _pumps.run(pump)
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
