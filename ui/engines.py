"""Engines page: load, switch and unload a model at runtime, and see what is running and why."""
from __future__ import annotations

import gradio as gr

from engines import telemetry
from engines.registry import ENGINE_NAMES

from .common import Context, redact_paths, require_admin, sees_own, user_error


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe(ctx: Context, request: gr.Request | None = None) -> str:
    """The status line; paths on the server only for those who may see them (``redact_paths``;
    without a request, as every visitor may see it)."""
    return redact_paths(ctx.settings, request, _describe(ctx))


def _describe(ctx: Context) -> str:
    info = ctx.manager.info()
    if info is None:
        return "**No model loaded.** Load one below."
    lines = [f"**{info.model}** on **{info.backend}** ({info.device}, {info.dtype}), "
             f"context {info.context_length} tokens" + (", takes images" if info.vision else "")]
    if info.reason:
        lines.append(f"Why this backend: {info.reason}.")
    dead = _figure(ctx.manager.health)
    if dead:
        lines.append(f"**The engine stopped ({dead}).** Press Load to load the model again.")
    if info.extra:
        lines.append("Details: " + ", ".join(f"{k} {v}" for k, v in info.extra.items()))
    sw = ctx.manager.last_switch
    if sw.get("gpu_used_before") or sw.get("gpu_used_after_load"):
        lines.append(f"Last switch: GPU memory used {_gib(sw['gpu_used_before'])} before, "
                     f"{_gib(sw['gpu_used_after_unload'])} after unloading the old model, "
                     f"{_gib(sw.get('gpu_used_after_load', 0))} after loading.")
    return "\n\n".join(lines)


def build(ctx: Context):
    s = ctx.settings
    status = gr.Markdown(describe(ctx), elem_id="engine-status")
    with gr.Row():
        # the page's own copy is every visitor's: the folder given with --model is filled in at
        # page load for those who may see paths (see fill_model below)
        model = gr.Textbox(label="Model (folder or hub id; empty = built-in SmolLM2-135M-Instruct)",
                           value=redact_paths(s, None, s.model or ""), scale=3, elem_id="engine-model")
        engine = gr.Dropdown(list(ENGINE_NAMES), value=s.engine, label="Engine", scale=1)
    with gr.Accordion("Engine options", open=False):
        with gr.Row():
            device = gr.Dropdown(["auto", "cpu", "cuda"], value=s.device, label="device (transformers)")
            dtype = gr.Dropdown(["auto", "float32", "float16", "bfloat16"], value=s.dtype, label="dtype")
            model_format = gr.Dropdown(["hf", "awq"], value=s.model_format, label="model_format (TurboMind)")
            quant_policy = gr.Dropdown([0, 4, 8], value=s.quant_policy, label="quant_policy (KV cache)")
        with gr.Row():
            cache = gr.Slider(0.01, 1.0, value=s.cache_max_entry_count, step=0.01,
                              label="cache_max_entry_count")
            session_len = gr.Number(value=s.session_len, precision=0, label="session_len (empty = model's)")
            tp = gr.Number(value=s.tp, precision=0, label="tp (GPUs)")
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="engine-load")
        unload = gr.Button("Unload", elem_id="engine-unload")

    def do_load(model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp,
                request: gr.Request = None, progress=gr.Progress()):
        require_admin(s, request)
        try:
            ctx.manager.load(model.strip() or None, engine, progress=lambda f, m: progress(f, desc=m),
                             policy=s.load_policy(),
                             device=device, dtype=dtype, model_format=model_format,
                             quant_policy=int(quant_policy), cache_max_entry_count=float(cache),
                             session_len=int(session_len) if session_len else None,
                             tp=int(tp or 1))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return describe(ctx, request)

    def do_unload(request: gr.Request = None):
        require_admin(s, request)
        ctx.manager.unload()
        return describe(ctx, request)

    def fill_model(request: gr.Request = None):
        return redact_paths(s, request, s.model or "")

    if redact_paths(s, None, s.model or "") != (s.model or ""):
        gr.on(None, fill_model, None, model, api_visibility="private", queue=False, show_progress="hidden")

    with gr.Accordion("Servers: lmdeploy api_server / proxy (operator)", open=False):
        gr.Markdown("Start `lmdeploy serve api_server` for a model with the options above, several of them "
                    "behind `lmdeploy serve proxy`, then connect this app to one (the remote engine).")
        with gr.Row():
            srv_model = gr.Textbox(label="Model for api_server", scale=3)
            srv_port = gr.Number(23333, precision=0, label="port", scale=1)
            srv_backend = gr.Dropdown(["turbomind", "pytorch"], value="turbomind", label="backend", scale=1)
            srv_proxy = gr.Textbox(label="register with proxy URL (optional)", scale=2)
        with gr.Row():
            start_srv = gr.Button("Start api_server")
            start_proxy = gr.Button("Start proxy on this port")
            connect = gr.Button("Connect to this port")
            stop_srv = gr.Button("Stop server on this port")
        servers_md = gr.Markdown("", elem_id="servers-status")
        server_log = gr.Textbox(label="Server log", lines=8, max_lines=16)

    def servers_status():     # for operators only (every caller passed require_admin)
        rows = ctx.servers.status() if ctx.servers else []
        return "\n".join(f"- **{r['name']}** {r['url']} — {r['state']}" for r in rows) or "No servers started."

    def do_start_server(model, port, backend, proxy, tp, cache, quant_policy, model_format, session_len,
                        request: gr.Request = None):
        require_admin(s, request, "start servers")
        from engines.servers import api_server_command

        if not model.strip():
            raise gr.Error("Give the model the server should serve.", title="No model")
        try:
            s.load_policy().check(model.strip())
            port = int(port)
            cmd = api_server_command(model.strip(), port, backend=backend, tp=int(tp or 1),
                                     cache_max_entry_count=float(cache), quant_policy=int(quant_policy),
                                     model_format=model_format, session_len=int(session_len) if session_len else None,
                                     proxy_url=proxy.strip() or None)
            srv = ctx.servers.start(f"api_server-{port}", cmd, f"http://127.0.0.1:{port}")
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return servers_status(), srv.log_tail()

    def do_start_proxy(port, request: gr.Request = None):
        require_admin(s, request, "start servers")
        from engines.servers import proxy_command

        try:
            srv = ctx.servers.start(f"proxy-{int(port)}", proxy_command(int(port)), f"http://127.0.0.1:{int(port)}",
                                    timeout=120)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return servers_status(), srv.log_tail()

    def do_connect(port, request: gr.Request = None):
        require_admin(s, request, "connect to servers")
        try:
            ctx.manager.load(f"http://127.0.0.1:{int(port)}", "remote")
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return describe(ctx, request)

    def do_stop_server(port, request: gr.Request = None):
        require_admin(s, request, "stop servers")
        for name in (f"api_server-{int(port)}", f"proxy-{int(port)}"):
            ctx.servers.stop(name)
        return servers_status()

    start_srv.click(do_start_server, [srv_model, srv_port, srv_backend, srv_proxy, tp, cache, quant_policy,
                                      model_format, session_len], [servers_md, server_log],
                    api_name="start_api_server", concurrency_id="admin", concurrency_limit=1)
    start_proxy.click(do_start_proxy, srv_port, [servers_md, server_log], api_name="start_proxy",
                      concurrency_id="admin", concurrency_limit=1)
    connect.click(do_connect, srv_port, status, api_name="connect_server", concurrency_id="admin",
                  concurrency_limit=1)
    stop_srv.click(do_stop_server, srv_port, servers_md, api_name="stop_server")

    load.click(do_load, [model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp],
               status, api_name="load_model", concurrency_limit=1, concurrency_id="admin")
    unload.click(do_unload, None, status, api_name="unload_model", concurrency_limit=1,
                 concurrency_id="admin")
    return status


def engine_info(ctx: Context, request: gr.Request | None = None) -> dict:
    """What runs: the engine and model, requests in flight (``running``: all of them; ``requests``:
    the caller's own, everyone's for an administrator), the engine's health and memory. Paths on
    the server (``model_path``, the folder a model was loaded from) only for those who may see
    them (``redact_paths``): a non-admin of an app with users or a public one gets the names."""
    m = ctx.manager
    info = m.info()
    mine = [r for r in m.live() if sees_own(ctx.settings, request, r.owner, r.session)]
    out = {"loaded": info is not None, **(info.to_dict() if info else {}),
           "running": m.running, "requests": [r.to_dict() for r in mine],
           "dead": _figure(m.health), "engine_requests": _figure(m.engine_live_requests),
           "last_switch": m.last_switch, "memory": telemetry.snapshot()}
    return redact_paths(ctx.settings, request, out)


def _figure(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a figure for the page, never a reason to fail it
        return None


__all__ = ["build", "describe", "engine_info"]
