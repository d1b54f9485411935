"""Monitor page: live GPU (or CPU) memory and speed, refreshed once a second while the tab is open
and not at all otherwise; rolling plots of recent replies; the reply history as CSV."""
from __future__ import annotations

import os
import tempfile
import time

import gradio as gr

from engines import telemetry

from .common import Context

WINDOW_S = 600   # plots show the last ten minutes


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def panel(ctx: Context) -> str:
    gpus, why = telemetry.gpu_status()
    lines = []
    info = ctx.manager.info()
    if info:
        lines.append(f"**Model:** {info.model} on {info.backend} ({info.device}, {info.dtype})")
    if gpus:
        for g in gpus:
            extra = ", ".join(x for x in (f"{g['util']}% busy" if g.get("util") is not None else "",
                                          f"{g['temp']} °C" if g.get("temp") is not None else "",
                                          f"{g['power_w']:.0f} W" if g.get("power_w") is not None else "") if x)
            lines.append(f"**GPU {g['index']}** {g['name']}: {_gib(g['used'])} of {_gib(g['total'])} used"
                         + (f" · {extra}" if extra else ""))
    else:
        c = telemetry.cpu_status()
        lines.append(f"*{why}: showing CPU and RAM.*")
        lines.append(f"**CPU** {c['cores']} cores, {c['cpu_percent'] if c['cpu_percent'] is not None else '?'}% busy · "
                     f"**RAM** {_gib(c['ram_used'])} of {_gib(c['ram_total'])} · this process {_gib(c['rss'])}")
    items = [m for m in ctx.manager.metrics.items() if m.time > time.time() - 60]
    rate = sum(m.tokens for m in items) / 60 if items else 0
    lines.append(f"**Now:** {ctx.manager.running} streams running · last minute {len(items)} replies, "
                 f"{rate:.1f} tokens/s on average")
    return "\n\n".join(lines)


def recent_frame(ctx: Context):
    import pandas as pd

    now = time.time()
    rows = [{"seconds ago": round(m.time - now, 1), "tokens/s": round(m.tokens_per_s, 2),
             "first token (s)": round(m.ttft, 3) if m.ttft is not None else None}
            for m in ctx.manager.metrics.items() if m.time > now - WINDOW_S]
    return pd.DataFrame(rows or [{"seconds ago": 0.0, "tokens/s": 0.0, "first token (s)": 0.0}])


def build(ctx: Context, tab: gr.Tab):
    status = gr.Markdown(panel(ctx), elem_id="monitor-panel")
    with gr.Row():
        speed = gr.LinePlot(recent_frame(ctx), x="seconds ago", y="tokens/s", title="Tokens/s per reply",
                            height=220)
        ttft = gr.LinePlot(recent_frame(ctx), x="seconds ago", y="first token (s)", title="First token",
                           height=220)
    download = gr.DownloadButton("Download reply metrics (CSV)", size="sm")
    timer = gr.Timer(1.0, active=False)

    def tick():
        df = recent_frame(ctx)
        return panel(ctx), df, df

    timer.tick(tick, None, [status, speed, ttft], api_visibility="private", queue=False)
    # refresh only while someone looks at this tab
    tab.select(lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False)

    def export():
        fd, path = tempfile.mkstemp(prefix="turbostudio-metrics-", suffix=".csv")
        with os.fdopen(fd, "w") as f:
            f.write(telemetry.metrics_csv(ctx.manager.metrics.items()))
        return path

    download.click(export, None, download, api_name="metrics_csv", api_visibility="undocumented")
    return timer
