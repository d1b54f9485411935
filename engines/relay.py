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


async def relay(gen: Iterator[T], on_cancel: Callable[[], None] | None = None,
                merge: Callable[[Sequence[T]], T] = merge_deltas) -> AsyncIterator[T]:
    """Yield ``gen``'s items on the running event loop, the ones that arrived together merged.

    ``gen`` runs in its own thread and is closed there. Nothing is lost: a merge covers every item
    that arrived, and an error raised by ``gen`` is raised here after the items before it."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    box: dict = {"items": [], "done": False, "error": None}
    stop = threading.Event()

    def post(item=None, *, done=False, error=None):
        if error is not None:
            box["error"] = error
        elif done:
            box["done"] = True
        else:
            box["items"].append(item)
        ready.set()

    def send(*args, **kw) -> bool:
        try:
            loop.call_soon_threadsafe(lambda: post(*args, **kw))
            return True
        except RuntimeError:          # the loop is closed (shutting down): nobody is listening
            stop.set()
            return False

    def pump():
        try:
            for item in gen:
                if not send(item) or stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            send(error=e)
        finally:
            try:
                gen.close()
            except Exception:  # noqa: BLE001
                pass
            send(done=True)

    threading.Thread(target=pump, daemon=True, name="relay").start()
    finished = False
    try:
        while True:     # posts run on this loop too: nothing lands between a check and the wait
            if box["items"]:
                items, box["items"] = box["items"], []
                yield merge(items)
                continue              # items that came meanwhile go out before done/error
            if box["error"] is not None:
                finished = True
                raise box["error"]
            if box["done"]:
                finished = True
                return
            ready.clear()
            await ready.wait()
    finally:
        if not finished:
            stop.set()
            if on_cancel is not None:
                on_cancel()
