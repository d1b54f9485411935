"""Relay a blocking stream to Gradio without a thread hop per update.

Gradio runs a *sync* generator handler by calling ``next()`` through ``anyio.to_thread`` for every
item it yields (``gradio.utils.SyncToAsyncIterator``): one thread-pool round trip and one limiter
token per UI update, for every user, on the same event loop that writes every user's SSE stream.
``relay`` instead gives each stream one pump thread for its whole life; the pump reads the blocking
generator and leaves only its newest item for the event loop, which an async generator handler
hands to Gradio. Items are cumulative (the whole reply so far), so when the loop falls behind, the
updates in between are skipped, never the text: the load on the loop adapts to what it can take.
This is the same pattern as the OpenAI endpoint's pump (ui/openai_api.py).
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


async def relay(gen: Iterator[T], on_cancel: Callable[[], None] | None = None) -> AsyncIterator[T]:
    """Yield ``gen``'s items on the event loop, newest first-come (intermediate ones may be skipped;
    the last one never is). ``gen`` runs in its own thread and is closed there. If the consumer
    stops early (Stop, a closed tab: Gradio cancels the task), the pump is told to stop after its
    current item and ``on_cancel`` is called at once (an engine abort, so the pump is not left
    waiting for a token that will not come)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    box: dict = {"item": _END, "fresh": False, "done": False, "error": None}
    stop = threading.Event()

    def post(**kw):
        box.update(kw)
        ready.set()

    def send(**kw) -> bool:
        try:
            loop.call_soon_threadsafe(lambda: post(**kw))
            return True
        except RuntimeError:          # the loop is closed (shutting down): nobody is listening
            stop.set()
            return False

    def pump():
        try:
            for item in gen:
                if not send(item=item, fresh=True) or stop.is_set():
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
            if box["fresh"]:
                box["fresh"] = False
                yield box["item"]
                continue              # an item that came meanwhile goes out before done/error
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
