"""Put the pages together into one Blocks app, with the public API endpoints."""
from __future__ import annotations

from typing import AsyncIterator

import gradio as gr

from . import chat, compare, engines, monitor, quantize, vision
from .common import Context, SamplingControls, session_id



# The page's own styles (Gradio 6 takes them at launch): the Vision examples as cards of one width
# (each sized to its text before, so they were uneven), the caption text in one line.
CSS = """
#vision-examples .gallery { display: grid; grid-template-columns: 1fr; gap: 8px; }
#vision-examples .gallery-item { width: 100%; }
#vision-examples .gallery-item .container { width: 100%; display: flex; align-items: center;
                                             justify-content: space-between; gap: 12px; }
#vision-examples .gallery-item img { max-height: 56px; width: auto; }
#vision-examples .gallery-item p { text-align: left; }
"""


CHAT_INPUTS = ("messages", "params", "conversation_id")     # /chat's inputs, in order


def chat_endpoint(ctx: Context):
    """The ``/chat`` endpoint's function: Gradio's ``gr.api`` and the app's own REST routes
    (``ui.rest_chat``) call this one."""
    settings, manager = ctx.settings, ctx.manager

    async def api_chat(messages: list, params: dict | None = None, conversation_id: str | None = None,
                       request: gr.Request = None) -> AsyncIterator[str]:
        async for text in chat.api_chat(manager, settings, messages, params or {}, request, ctx.store,
                                        conversation_id):
            yield text

    return api_chat


def build_app(ctx: Context) -> gr.Blocks:
    settings, manager = ctx.settings, ctx.manager
    with gr.Blocks(title="TurboStudio") as demo:
        header = gr.Markdown(_header(ctx), elem_id="header")
        # the browser's own id (conversations without --auth); made outside the Tabs: a component
        # created inside gr.Tabs but in no Tab took a tab's place (the Quantize tab read "Chat")
        who = chat.identity(ctx, demo)
        with gr.Tabs():
            timers = {}   # tab -> its refresh timer: a timer runs only while its tab is open
            with gr.Tab("Chat", id="chat") as chat_tab:
                if ctx.compare is None:
                    sampling = chat.build(ctx, demo, who)
                else:       # Compare: the same prompt to model A and model B, side by side
                    with gr.Tabs(elem_id="chat-modes"):
                        with gr.Tab("Conversation", id="chat-conversation"):
                            sampling = chat.build(ctx, demo, who)
                        with gr.Tab("Compare A | B", id="chat-compare") as compare_tab:
                            compare_refresh, compare_outputs = compare.build(ctx, who)
                    # the list of comparisons follows what is loaded and the Quantize results
                    compare_tab.select(compare_refresh, None, compare_outputs, api_visibility="private",
                                       queue=False, show_progress="hidden")
            timers[chat_tab] = None
            if ctx.vision is not None:
                with gr.Tab("Vision", id="vision") as vision_tab:
                    vstatus, vcontrols = vision.build(ctx, ctx.vision, who)
                timers[vision_tab] = None
            if ctx.jobs is not None:
                with gr.Tab("Quantize", id="quantize") as quantize_tab:
                    timers[quantize_tab] = quantize.build(ctx, ctx.jobs, quantize_tab, header)
            with gr.Tab("Monitor", id="monitor") as monitor_tab:
                timers[monitor_tab] = monitor.build(ctx, monitor_tab)
            with gr.Tab("Engines", id="engines") as engines_tab:
                status = engines.build(ctx, header)     # the header follows a load, unload, connect
            timers[engines_tab] = None
        for tab in timers:
            others = [t for other, t in timers.items() if other is not tab and t is not None]
            if others:
                tab.select(_stop_timers(len(others)), None, others, api_visibility="private", queue=False)

        api_chat = chat_endpoint(ctx)

        def engine_info(request: gr.Request = None) -> dict:
            return engines.engine_info(ctx, request)

        gr.api(api_chat, api_name="chat", concurrency_id="generate", concurrency_limit="default",
               api_description="Stream a reply: messages [{role, content}], params {max_new_tokens, "
                               "temperature, top_p, top_k, repetition_penalty, seed}. Each update is "
                               "the reply so far. conversation_id (optional, one of /conversations): the "
                               "last (user) message and the reply are appended to it.")

        def conversations(query: str = "", request: gr.Request = None) -> list:
            return chat.api_conversations(ctx.store, request, query)

        def conversation_get(conversation_id: str, request: gr.Request = None) -> dict:
            return chat.api_conversation_get(ctx.store, conversation_id, request)

        def conversation_delete(conversation_id: str, request: gr.Request = None) -> str:
            return chat.api_conversation_delete(ctx.store, conversation_id, request)

        gr.api(conversations, api_name="conversations",
               api_description="The caller's conversations, newest first: id, title, kind, updated, messages "
                               "(query: text to search for).")
        gr.api(conversation_get, api_name="conversation_get",
               api_description="One of the caller's conversations: every message (a tree: parent, images, "
                               "metadata) and path, the branch shown.")
        gr.api(conversation_delete, api_name="conversation_delete",
               api_description="Delete one of the caller's conversations.")
        gr.api(engine_info, api_name="engine_info", api_description="What engine and model are loaded.")

        def monitor_panel(request: gr.Request = None) -> str:
            return monitor.panel(ctx, request)

        gr.api(monitor_panel, api_name="monitor_panel", api_description="The Monitor page's live panel.")

        def engine_info_vision() -> str:
            return ctx.vision.describe() if ctx.vision is not None else "Vision page off"

        gr.api(engine_info_vision, api_name="engine_info_vision",
               api_description="The Vision page's model: loading, offline, failed, or what runs.")
        # a tab that closes aborts whatever it was generating
        def on_leave(request: gr.Request):
            manager.abort_session(session_id(request))
            if ctx.compare is not None:
                ctx.compare.abort_session(session_id(request))
            if ctx.vision is not None:
                ctx.vision.manager.abort_session(session_id(request))

        demo.unload(on_leave)
        # the sampling controls start at the model's own defaults: the model loaded now (a switch)
        demo.load(lambda: SamplingControls.refresh(manager.info()), None, sampling.defaults_outputs,
                  api_visibility="private", queue=False, show_progress="hidden")
        def on_page_load(request: gr.Request):
            return _header(ctx), engines.describe(ctx, request)   # the caller's view (paths for admins)

        demo.load(on_page_load, None, [header, status], api_visibility="private")
        if ctx.vision is not None:
            # the vision model loads in the background: its status line is refreshed at every page
            # load (the page's copy dates from when the app was built) and every 2 s while loading
            timer = gr.Timer(2.0, active=ctx.vision.loading or ctx.vision.manager.info() is None)

            def vision_tick():
                loading = ctx.vision.loading
                ready = ctx.vision.manager.info() is not None
                return ctx.vision.describe(), gr.Timer(active=loading), *vcontrols.updates(ready)

            for event in (demo.load, timer.tick):
                event(vision_tick, None, [vstatus, timer, *vcontrols.components], api_visibility="private", queue=False,
                      show_progress="hidden")
    return demo


def _stop_timers(n: int):
    def stop():
        return [gr.Timer(active=False)] * n if n > 1 else gr.Timer(active=False)
    return stop


def _header(ctx: Context) -> str:
    return engines.header(ctx)       # the model's name, never a folder
