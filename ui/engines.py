"""Engines page: load, switch and unload a model at runtime, and see what is running and why.

What this machine cannot run (TurboMind and LMDeploy-PyTorch without a CUDA GPU or LMDeploy, an
api_server without LMDeploy) is shown disabled with the reason next to it. A refusal in the page
(no model given, not an administrator) is a warning toast that leaves the page as it was; the named
API endpoints (``load_model``, ``start_api_server``, ...) raise it as an error."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import gradio as gr

from engines import telemetry
from engines.registry import ENGINE_NAMES

from .common import (Context, Refusal, model_label, redact_paths, refuse, require_admin, sees_own, sees_paths,
                     user_error)


# ---------------------------------------------------------------- what this machine can run
@dataclass(frozen=True)
class Machine:
    """What this machine can run, asked once (``machine()``): a CUDA GPU (``engines.registry._cuda``)
    and a usable LMDeploy (``engines.lmdeploy.lmdeploy_available``)."""

    cuda: bool
    lmdeploy: bool
    lmdeploy_why: str = ""

    @property
    def gpu_engines(self) -> bool:
        """TurboMind and LMDeploy-PyTorch can run here."""
        return self.cuda and self.lmdeploy

    @property
    def no_lmdeploy(self) -> str:
        """Why LMDeploy cannot be used ('' when it can), in a few words."""
        if self.lmdeploy:
            return ""
        if self.lmdeploy_why.startswith("LMDeploy is not installed"):
            return "LMDeploy is not installed"
        return self.lmdeploy_why.split(";")[0]

    @property
    def no_gpu_engines(self) -> str:
        """Why TurboMind and LMDeploy-PyTorch cannot run here ('' when they can)."""
        parts = (["no CUDA GPU is visible"] if not self.cuda else []) + \
            ([self.no_lmdeploy] if not self.lmdeploy else [])
        return "; ".join(parts)


@functools.cache
def machine() -> Machine:
    from engines.lmdeploy import lmdeploy_available
    from engines.registry import _cuda

    ok, why = lmdeploy_available()
    return Machine(cuda=_cuda(), lmdeploy=ok, lmdeploy_why="" if ok else why)


# ---------------------------------------------------------------- page events and API endpoints
def page_event(fn, outputs: list, after=None, after_outputs: list = (), notice=None, shape=None):
    """``fn`` as the page's own event, writing ``outputs``: a refusal (gr.Error) is a warning
    toast, its reason goes into ``notice`` (one of the page's outputs: the toast fades) and the
    other outputs stay as they were (an error would draw Gradio's red Error overlay over them); a
    fault (a gr.Error that asks for its traceback: ``user_error``'s "Internal error") stays an error. Once ``fn`` succeeded, ``after(result)``
    fills ``after_outputs`` (the page's follow-ups: the header, the action line), and ``shape(result)``
    is what the page shows of the result (component updates, e.g. a result box made visible; the
    API endpoint returns the plain values). Returns the event function and the full list of
    components it writes."""
    outs, extra = list(outputs), list(after_outputs)
    every = outs + extra + ([notice] if notice is not None and notice not in outs + extra else [])

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            got = fn(*args, **kwargs)
        except gr.Error as e:
            if getattr(e, "print_exception", True):
                raise                   # a fault (user_error logs its traceback): an error it stays
            line = refuse(e)
            values = [line if c is notice else gr.skip() for c in every]
        else:
            shown = shape(got) if shape is not None else got
            values = [] if not outs else [shown] if len(outs) == 1 else list(shown)
            values += list(after(got)) if after is not None else []
            values += [gr.skip()] * (len(every) - len(values))
        return None if not values else values[0] if len(values) == 1 else tuple(values)
    return run, every


def _list(outputs) -> list:
    return [] if outputs is None else list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def wire(trigger: gr.Button, fn, inputs, outputs, *, api_name: str | None, after=None, after_outputs=(),
         notice=None, shape=None, **kw):
    """The page's event for ``trigger`` (``page_event``: refusals are warnings, their reason in
    ``notice``; ``after(result)`` fills ``after_outputs`` once ``fn`` succeeded) and, on a hidden
    twin with the same inputs and outputs, the API endpoint ``api_name`` (refusals raise, as an
    API client expects; none when ``api_name`` is None). ``shape``: see ``page_event``."""
    run, every = page_event(fn, _list(outputs), after, _list(after_outputs), notice, shape)
    event = trigger.click(run, inputs, every or None, api_visibility="private", **kw)
    if api_name is not None:
        twin = gr.Button(visible=False, elem_classes=["api-twin"])
        kw.pop("show_progress_on", None)
        twin.click(fn, inputs, outputs, api_name=api_name, **kw)
    return event


# ---------------------------------------------------------------- what runs, in words
def header(ctx: Context) -> str:
    """The app's header: the model's name (never a folder), backend and device."""
    info = ctx.manager.info()
    running = f"{model_label(info)} · {info.backend} · {info.device}" if info else "no model loaded"
    return f"## TurboStudio\n<sub>{running}</sub>"


_DETAILS = {
    "weights_bytes": lambda v: f"weights {telemetry.human_bytes(v)}",
    "load_seconds": lambda v: f"loaded in {float(v):.1f} s",
    "architecture": str,
    "batching": lambda v: f"{v} batching",
    "tp": lambda v: f"on {int(v)} GPU{'s' if int(v) != 1 else ''} (tensor parallel)",
    "quant_policy": lambda v: {0: "KV cache 16-bit", 8: "KV cache int8", 4: "KV cache int4",
                               16: "KV cache fp8"}.get(int(v), f"KV {v}"),
    "model_format": lambda v: {"hf": "weights as stored", "awq": "4-bit AWQ weights",
                               "fp8": "FP8 weights (128x128 blocks)"}.get(v, f"format {v}"),
    "cache_max_entry_count": lambda v: f"KV cache takes {float(v):.0%} of free GPU memory",
    "cache_block_seq_len": lambda v: f"cache blocks of {int(v)} tokens",
    "server": lambda v: f"server {v}",
    "models": lambda v: "serves " + ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else f"serves {v}",
    "weight_quant": lambda v: f"{v} weights at load (torchao)",
    "kv_bytes_per_token": lambda v: f"KV cache {telemetry.human_bytes(float(v))} per token",
    "moe_experts": lambda v: f"mixture of {int(v)} experts" if int(v) > 1 else "",
    "gpu_name": str,
    "engine_process": lambda v: f"engine in a process of its own (pid {int(v)}, --engine-process)",
}
# the bandwidth meter's inputs (engines/bandwidth.py), read by the Monitor page, not facts a person
# reading the status needs ("weights unread bytes 0" was jargon there): left out of the line
_METER_ONLY = {"kv_format", "weights_unread_bytes", "weights_unread_what", "weights_format", "gpu_capability"}


def details(extra: dict) -> str:
    """An engine's ``info.extra`` in words and human units (``weights_bytes 538060032`` ->
    "weights 513 MiB")."""
    parts = []
    for k, v in extra.items():
        if v is None or v == "" or k in _METER_ONLY:
            continue
        try:
            parts.append(_DETAILS[k](v) if k in _DETAILS else f"{k.replace('_', ' ')} {v}")
        except (TypeError, ValueError):
            parts.append(f"{k.replace('_', ' ')} {v}")
    return " · ".join(p for p in parts if p)


def describe(ctx: Context, request: gr.Request | None = None) -> str:
    """The status line; paths on the server only for those who may see them (``redact_paths``;
    without a request, as every visitor may see it)."""
    return redact_paths(ctx.settings, request, _describe(ctx, sees_paths(ctx.settings, request)))


def _describe(ctx: Context, paths: bool = False) -> str:
    info = ctx.manager.info()
    if info is None:
        return "**No model loaded.** Load one below."
    lines = [f"**{model_label(info)}** on **{info.backend}** · {info.device} · {info.dtype} · "
             f"context {info.context_length:,} tokens" + (" · takes images" if info.vision else "")]
    if paths and info.model_path and info.model_path != info.model and info.model_path.startswith("/"):
        lines.append(f"Folder: `{info.model_path}`")
    elif paths and info.model != model_label(info):
        lines.append(f"Folder: `{info.model}`")
    if info.reason:
        lines.append(f"Why this backend: {info.reason}.")
    dead = _figure(ctx.manager.health)
    if dead:
        lines.append(f"**The engine stopped ({dead}).** Press Load to load the model again.")
    if info.extra:
        text = details(info.extra)
        lines.append(text[:1].upper() + text[1:])
    sw = ctx.manager.last_switch
    if sw.get("gpu_used_before") or sw.get("gpu_used_after_load"):
        hb = telemetry.human_bytes
        lines.append(f"Last switch: GPU memory used {hb(sw['gpu_used_before'])} before, "
                     f"{hb(sw['gpu_used_after_unload'])} after unloading the old model, "
                     f"{hb(sw.get('gpu_used_after_load', 0))} after loading.")
    return "\n\n".join(lines)


def context_tokens(value) -> int | None:
    """session_len from the page's box (text) or the API (a number or None): None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = float(value)
        if n != int(n):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"session_len must be a whole number of tokens, or empty for the model's own; "
                         f"got {value!r}") from None
    if int(n) == 0:
        return None
    if n < 16:
        raise ValueError(f"session_len must be at least 16 tokens (or empty for the model's own), got {int(n)}")
    return int(n)


def build(ctx: Context, header_md: gr.Markdown | None = None):
    """The Engines page. ``header_md`` (the app's header) follows every load, unload and connect."""
    s = ctx.settings
    m = machine()
    no_gpu = m.no_gpu_engines
    status = gr.Markdown(describe(ctx), elem_id="engine-status")
    engines = [e for e in ENGINE_NAMES if m.gpu_engines or e not in ("turbomind", "pytorch")]
    with gr.Row():
        # the page's own copy is every visitor's: the folder given with --model is filled in at
        # page load for those who may see paths (see fill_model below)
        model = gr.Textbox(label="Model (folder or hub id; empty = built-in SmolLM2-135M-Instruct)",
                           value=redact_paths(s, None, s.model or ""), scale=3, elem_id="engine-model")
        # engines this machine cannot run are not offered (the API still answers them with the reason)
        engine = gr.Dropdown(engines, value=s.engine if s.engine in engines else "auto", label="Engine", scale=1,
                             allow_custom_value=True, elem_id="engine-choice",
                             info=None if m.gpu_engines else f"turbomind and pytorch: {no_gpu}")
    with gr.Accordion("Engine options", open=False):
        if no_gpu:
            gr.Markdown(f"*TurboMind and LMDeploy-PyTorch options are off on this machine: {no_gpu}.*",
                        elem_id="engine-gpu-note")
        gpu = dict(interactive=bool(m.gpu_engines), info=None if m.gpu_engines else "TurboMind / LMDeploy only: off here")
        devices = ["auto", "cpu"] + (["cuda"] if m.cuda or s.device == "cuda" else [])
        with gr.Row():
            device = gr.Dropdown(devices, value=s.device, label="device (transformers)", allow_custom_value=True,
                                 info=None if m.cuda else "no CUDA GPU: runs on the CPU")
            dtype = gr.Dropdown(["auto", "float32", "float16", "bfloat16"], value=s.dtype, label="dtype")
            # fp8: a blocked-FP8 folder (the Quantize page's FP8 job), as LMDeploy 0.18 loads it
            model_format = gr.Dropdown(["hf", "awq", "fp8"], value=s.model_format,
                                       label="model_format (LMDeploy: hf, awq, fp8)",
                                       elem_id="engine-model-format", **gpu)
            quant_policy = gr.Dropdown([0, 4, 8, 16], value=s.quant_policy,
                                       label="quant_policy (KV cache; 16 = fp8, PyTorch engine)",
                                       elem_id="engine-quant-policy", **gpu)
        with gr.Row():
            cache = gr.Slider(0.01, 1.0, value=s.cache_max_entry_count, step=0.01,
                              label="cache_max_entry_count (GPU share for the KV cache)",
                              elem_id="engine-cache", **gpu)
            # a text box: a Number field shows 0 when empty, which reads as a context of 0 tokens
            session_len = gr.Textbox(value=str(s.session_len or ""), label="session_len (context tokens)",
                                     placeholder="empty: the model's own", max_lines=1, elem_id="engine-session-len")
            tp = gr.Number(value=s.tp, precision=0, label="tp (GPUs)", minimum=1, elem_id="engine-tp", **gpu)
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="engine-load")
        unload = gr.Button("Unload", elem_id="engine-unload")
        # the Chat page's Compare view: a second model beside this one (its memory checked first)
        load_b = gr.Button("Load as model B (Compare)", elem_id="engine-load-b",
                           visible=ctx.compare is not None)
    # what the last load, unload or connect did; only those write it (nothing refreshes it away)
    action = gr.Markdown("", elem_id="engine-action")

    def loaded_line(verb: str) -> str:
        info = ctx.manager.info()
        return (f"✓ {verb} **{model_label(info)}** on {info.backend} <sub>at {time.strftime('%H:%M:%S')}</sub>"
                if info else "No model is loaded.")

    def do_load(model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp,
                request: gr.Request = None, progress=gr.Progress()):
        require_admin(s, request)
        try:
            ctx.manager.load(model.strip() or None, engine, progress=lambda f, m: progress(f, desc=m),
                             policy=s.load_policy(),
                             device=device, dtype=dtype, model_format=model_format,
                             quant_policy=int(quant_policy), cache_max_entry_count=float(cache),
                             session_len=context_tokens(session_len), tp=int(tp or 1))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return describe(ctx, request)

    def do_unload(request: gr.Request = None):
        require_admin(s, request)
        ctx.manager.unload()
        return describe(ctx, request)

    def do_load_b(model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp,
                  request: gr.Request = None, progress=gr.Progress()):
        from .compare import load_b as compare_load

        compare_load(ctx, model.strip() or None, engine,
                     dict(device=device, dtype=dtype, model_format=model_format, quant_policy=int(quant_policy),
                          cache_max_entry_count=float(cache), session_len=context_tokens(session_len),
                          tp=int(tp or 1)), request, progress=lambda f, m: progress(f, desc=m))
        return describe(ctx, request)

    def fill_model(request: gr.Request = None):
        return redact_paths(s, request, s.model or "")

    if redact_paths(s, None, s.model or "") != (s.model or ""):
        gr.on(None, fill_model, None, model, api_visibility="private", queue=False, show_progress="hidden")

    can_serve = m.gpu_engines            # lmdeploy serve api_server: LMDeploy and a CUDA GPU
    with gr.Accordion("Servers: lmdeploy api_server / proxy (operator)", open=False):
        gr.Markdown("Start `lmdeploy serve api_server` for a model with the options above, several of them "
                    "behind `lmdeploy serve proxy`, then connect this app to one (the remote engine). "
                    "*Connect* works with any OpenAI-compatible server.")
        if not can_serve:
            off = [f"api_server needs a CUDA GPU and LMDeploy ({no_gpu})"]
            if not m.lmdeploy:
                off.append(f"the proxy needs LMDeploy ({m.no_lmdeploy})")
            gr.Markdown("*Off on this machine: " + "; ".join(off) + ".*", elem_id="servers-note")
        with gr.Row():
            srv_model = gr.Textbox(label="Model for api_server", scale=3, interactive=can_serve)
            srv_port = gr.Number(23333, precision=0, label="port", scale=1)
            srv_backend = gr.Dropdown(["turbomind", "pytorch"], value="turbomind", label="backend", scale=1,
                                      interactive=can_serve, allow_custom_value=True)
            srv_proxy = gr.Textbox(label="register with proxy URL (optional)", scale=2, interactive=can_serve)
        with gr.Row():
            start_srv = gr.Button("Start api_server" if can_serve else "Start api_server (needs a GPU)",
                                  interactive=can_serve, elem_id="start-api-server")
            start_proxy = gr.Button("Start proxy on this port" if m.lmdeploy else "Start proxy (needs LMDeploy)",
                                    interactive=m.lmdeploy, elem_id="start-proxy")
            connect = gr.Button("Connect to this port")
            stop_srv = gr.Button("Stop server on this port")
        servers_md = gr.Markdown("", elem_id="servers-status")
        server_log = gr.Textbox(label="Server log", lines=6, max_lines=16, placeholder="No server started.",
                                elem_id="server-log")

    def servers_status():     # for operators only (every caller passed require_admin)
        rows = ctx.servers.status() if ctx.servers else []
        return "\n".join(f"- **{r['name']}** {r['url']} — {r['state']}" for r in rows) or "No servers started."

    def do_start_server(model, port, backend, proxy, tp, cache, quant_policy, model_format, session_len,
                        request: gr.Request = None):
        require_admin(s, request, "start servers")
        from engines.servers import api_server_command

        if not (model or "").strip():
            raise Refusal("Give the model the server should serve.", title="No model")
        try:
            s.load_policy().check(model.strip())
            port = int(port)
            cmd = api_server_command(model.strip(), port, backend=backend, tp=int(tp or 1),
                                     cache_max_entry_count=float(cache), quant_policy=int(quant_policy),
                                     model_format=model_format, session_len=context_tokens(session_len),
                                     proxy_url=(proxy or "").strip() or None)
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

    admin = dict(concurrency_id="admin", concurrency_limit=1)
    # after a load, unload or connect: the header follows the model, the action line says what happened
    shell = ([header_md] if header_md is not None else []) + [action]

    def after(verb):
        def lines(_result=None):
            line = loaded_line(verb) if verb else "Unloaded: no model is loaded."
            return ([header(ctx)] if header_md is not None else []) + [line]
        return lines

    wire(start_srv, do_start_server, [srv_model, srv_port, srv_backend, srv_proxy, tp, cache, quant_policy,
                                      model_format, session_len], [servers_md, server_log],
         api_name="start_api_server", notice=servers_md, **admin)
    wire(start_proxy, do_start_proxy, srv_port, [servers_md, server_log], api_name="start_proxy", notice=servers_md,
         **admin)
    wire(connect, do_connect, srv_port, status, api_name="connect_server", after=after("Connected to"),
         after_outputs=shell, notice=servers_md, show_progress_on=[status], **admin)
    wire(stop_srv, do_stop_server, srv_port, servers_md, api_name="stop_server", notice=servers_md)
    wire(load, do_load, [model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp],
         status, api_name="load_model", after=after("Loaded"), after_outputs=shell, notice=action,
         show_progress_on=[status], **admin)
    wire(unload, do_unload, None, status, api_name="unload_model", after=after(None), after_outputs=shell,
         notice=action, **admin)
    if ctx.compare is not None:
        wire(load_b, do_load_b, [model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp],
             status, api_name="load_model_b", after=lambda _r=None: [_b_line(ctx)], after_outputs=[action],
             notice=action, show_progress_on=[status], **admin)
    return status


def _b_line(ctx: Context) -> str:
    info = ctx.compare.info() if ctx.compare is not None else None
    return (f"✓ Loaded **{model_label(info)}** on {info.backend} as model B: Chat → Compare A | B "
            f"<sub>at {time.strftime('%H:%M:%S')}</sub>" if info else "Model B is not loaded.")


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
           # seconds from each recent abort to its place being free, oldest first
           "abort_release_s": [round(x, 3) for x in m.abort_release],
           "last_switch": m.last_switch, "memory": telemetry.snapshot()}
    return redact_paths(ctx.settings, request, out)


def _figure(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a figure for the page, never a reason to fail it
        return None


__all__ = ["build", "describe", "engine_info"]
