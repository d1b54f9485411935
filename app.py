"""TurboStudio: `python app.py --help` lists every option.

Parse settings, load the model, build the Blocks app, launch; nothing else.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys


def main(argv=None) -> int:
    import settings as settings_mod

    try:
        s = settings_mod.from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s.profile:       # where the server's threads spend their time
        from bench import sampler

        sampler.start(s.profile)
    if s.switch_interval:
        sys.setswitchinterval(s.switch_interval)
    if s.share:
        print("warning: --share makes this app reachable by anyone with the link"
              + ("" if s.auth else " and --share-without-auth lets them in without a password"),
              file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Transformers imports torchao whenever it is installed (the int8-at-load option's library), and
    # torchao then warns, at every start, that its optional CUDA/Triton kernels (mxfp8, cutlass sm90a,
    # triton) and torch's pytree registrations are missing or deprecated: "Failed to load ... Could
    # not load this library" read as a broken install to a newcomer, for kernels this app never uses
    # (LMDeploy serves the GPU). Their errors still show.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from engines.base import EngineError
    from engines.manager import EngineManager
    from ui.app import CSS, build_app
    from ui.common import Context

    manager = EngineManager(s.cache_dir, s.engine_options(), s.limits())
    atexit.register(manager.close)
    if not s.no_load:
        def progress(frac, msg):
            print(f"[{frac * 100:5.1f}%] {msg}", flush=True)
        try:
            info = manager.load(s.model, s.engine, progress=progress)
        except EngineError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1
        print(f"Loaded {info.model} on {info.backend} ({info.device}): {info.reason}", flush=True)
    from ui.vision import VisionSlot

    ctx = Context(settings=s, manager=manager)
    if not s.no_history:     # conversations kept on the server (ui/chat.py); retention at start and daily
        from storage.conversations import ConversationStore

        ctx.store = ConversationStore.open(s.cache_dir)
        atexit.register(ctx.store.close)
        ctx.store.start_retention(s.history_days)
    ctx.compare = EngineManager(s.cache_dir, s.engine_options(), s.limits())   # Compare's model B
    atexit.register(ctx.compare.close)
    ctx.vision = VisionSlot(ctx)
    atexit.register(ctx.vision.manager.close)
    ctx.vision.start()
    from engines.quantize import JobRunner

    ctx.jobs = JobRunner(s.cache_dir, hub_offline=s.hub_offline, hub_endpoint=s.hub_endpoint)
    atexit.register(ctx.jobs.close)
    from engines.servers import ServerManager

    ctx.servers = ServerManager(os.path.join(s.cache_dir, "servers"))
    atexit.register(ctx.servers.stop_all)
    from ui.gradio_patches import (call_overheads, event_driven_queue, http_stack, lazy_session_config,
                                   no_queue_analytics, quiet_range_refusals, UploadGuard)

    from engines import heap

    heap.enabled = s.gc_freeze   # TURBOSTUDIO_GC_FREEZE=0: the heap as Python keeps it (A/B runs)
    call_overheads()             # Gradio's per-call type hints kept, no matplotlib search per call
    logging.getLogger("turbostudio").info("HTTP served on %s", http_stack(s.fast_http))   # uvloop + httptools where installed
    quiet_range_refusals()       # a value past a slider's range: one log line, not a traceback
    if s.queue_shim:
        no_queue_analytics()     # no pandas summary of 10 000 events after every event (monitoring is off)

    if s.session_shim:           # TURBOSTUDIO_SESSION_SHIM=0: Gradio's own (for A/B runs)
        lazy_session_config()    # a new session no longer builds ~190 component configs on the loop
    if s.queue_shim:
        event_driven_queue()     # the queue loop wakes on events, not every 1 ms (the GIL: TurboMind)
    demo = build_app(ctx)
    info = manager.info()
    concurrency = s.concurrency or (info.max_batch if info else 16)
    demo.queue(default_concurrency_limit=concurrency, max_size=s.max_queue)
    # the manager admits as many as Gradio serves at once plus its queue (every entry point, /v1
    # included, shares these places); sized from the engine like Gradio's limit, not a fixed 16
    manager.limits = dataclasses.replace(manager.limits, max_pending=s.max_queue + concurrency)
    ctx.compare.limits = manager.limits
    # A full queue is answered by Gradio itself: the browser says "This application is currently
    # busy. Please try again." and gradio_client raises QueueError; both ignore a server's own text
    # (checked in Gradio 6.31's frontend), while queued users see their place in the queue.
    from ui.common import queued_events

    def load_sample():
        running, waiting = manager.load_now()
        return running, waiting + queued_events(demo)

    from engines.telemetry import LoadSampler

    ctx.load = LoadSampler(load_sample)
    uploads = os.path.join(s.cache_dir, "uploads")   # normalized vision uploads, shown in the history
    os.makedirs(uploads, exist_ok=True)
    # The OpenAI-compatible API is part of the server from its first request: its routes go into
    # the FastAPI app Gradio builds (ahead of Gradio's catch-all routes), not mounted after launch,
    # when a client could already be refused with a 404.
    from starlette.middleware import Middleware

    app_kwargs = {"routes": [], "middleware": [Middleware(UploadGuard)]}   # /upload: 400, not 500
    if s.rest_chat:    # /chat's REST calls on two plain routes, not Gradio's queue (ui/rest_chat.py says why)
        from ui.app import CHAT_INPUTS, chat_endpoint
        from ui.rest_chat import RestChat

        rest = RestChat(chat_endpoint(ctx), CHAT_INPUTS)
        app_kwargs["routes"] += rest.routes()
    if s.api:
        from ui.openai_api import routes

        app_kwargs["routes"] += routes(manager, s)
    # Each streaming event holds a worker thread while it waits for the engine: the pool must be
    # larger than the number of streams served at once, or users wait for a thread, not the GPU.
    demo.launch(server_name=s.server_name, server_port=s.server_port, share=s.share,
                auth=s.auth_pairs(), root_path=s.root_path, allowed_paths=[uploads],
                max_threads=max(40, concurrency + 16), prevent_thread_lock=True,
                max_file_size=f"{s.max_upload_mb}mb", app_kwargs=app_kwargs, css=CSS,
                # Gradio's /monitoring dashboard off: the Monitor page is the app's own (and with it
                # off, Gradio's per-event analytics can be skipped: ui/gradio_patches.no_queue_analytics)
                enable_monitoring=False,
                quiet=True)   # Gradio's own banner says "set share=True in launch()": ours names --share
    if s.rest_chat:
        try:     # Gradio's own functions the REST routes call: found now, or the app says why and stops
            rest.check(demo.app)
        except RuntimeError as e:
            demo.close()
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    heap.freeze("web process")   # the app as built, out of the collector's full walks (engines/heap.py)
    # from now on a collection over 100 ms is logged, and the heap frozen again once it grew (a full
    # collection over 20 ms), while no reply is being made
    heap.keep_frozen(lambda: not (manager.running or ctx.compare.running or ctx.vision.manager.running))
    local = f"http://{'127.0.0.1' if s.server_name == '0.0.0.0' else s.server_name}:{s.server_port}"
    print(f"TurboStudio is running at {local}{s.root_path or ''}/", flush=True)
    if s.share:
        print(f"Public link (anyone with it can reach the app): {demo.share_url}", flush=True)
    elif s.server_name in ("127.0.0.1", "localhost"):
        print("Only this machine can reach it: use an SSH tunnel (see the README) or --share with --auth.",
              flush=True)
    if s.api:
        print(f"OpenAI-compatible API at {local}/v1", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
