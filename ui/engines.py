"""Engines page: load, switch and unload a model at runtime, and see what is running and why."""
from __future__ import annotations

import gradio as gr

from engines import telemetry
from engines.registry import ENGINE_NAMES

from .common import Context, require_admin, user_error


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe(ctx: Context) -> str:
    info = ctx.manager.info()
    if info is None:
        return "**No model loaded.** Load one below."
    lines = [f"**{info.model}** on **{info.backend}** ({info.device}, {info.dtype}), "
             f"context {info.context_length} tokens" + (", takes images" if info.vision else "")]
    if info.reason:
        lines.append(f"Why this backend: {info.reason}.")
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
        model = gr.Textbox(label="Model (folder or hub id; empty = built-in SmolLM2-135M-Instruct)",
                           value=s.model or "", scale=3, elem_id="engine-model")
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
        return describe(ctx)

    def do_unload(request: gr.Request = None):
        require_admin(s, request)
        ctx.manager.unload()
        return describe(ctx)

    load.click(do_load, [model, engine, device, dtype, model_format, quant_policy, cache, session_len, tp],
               status, api_name="load_model", concurrency_limit=1, concurrency_id="admin")
    unload.click(do_unload, None, status, api_name="unload_model", concurrency_limit=1,
                 concurrency_id="admin")
    return status


def engine_info(ctx: Context) -> dict:
    info = ctx.manager.info()
    return {"loaded": info is not None, **(info.to_dict() if info else {}),
            "running": ctx.manager.running, "last_switch": ctx.manager.last_switch,
            "memory": telemetry.snapshot()}


__all__ = ["build", "describe", "engine_info"]
