"""Monitor page: live GPU (or CPU) memory and speed, refreshed once a second while the tab is open
and not at all otherwise; rolling plots of recent replies; the reply history as CSV."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import gradio as gr

from engines import telemetry

from .common import Context, may_manage, redact_paths, sees_own, user_of

WINDOW_S = 600   # plots show the last ten minutes


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def own_replies(ctx: Context, request: gr.Request | None) -> list[telemetry.ReplyMetrics]:
    """The reply metrics the caller may see: their own (an administrator's: everyone's). An
    anonymous visitor of a public app (no --auth) sees their own browser session's."""
    s = ctx.settings
    everyone = s.oversees(user_of(request))
    return [m for m in ctx.manager.metrics.items(user_of(request), everyone=everyone)
            if everyone or sees_own(s, request, m.owner, m.session)]


def panel(ctx: Context, request: gr.Request | None = None) -> str:
    """The live panel; paths on the server only for those who may see them (``redact_paths``)."""
    return redact_paths(ctx.settings, request, _panel(ctx))


def _panel(ctx: Context) -> str:
    gpus, why = telemetry.gpu_status()
    lines = []
    info = ctx.manager.info()
    if info:
        lines.append(f"**Model:** {info.model} on {info.backend} ({info.device}, {info.dtype})")
    if gpus:
        procs = telemetry.gpu_processes()
        mine = telemetry.own_pids() if procs else set()
        for g in gpus:
            extra = ", ".join(x for x in (f"{g['util']}% busy" if g.get("util") is not None else "",
                                          f"{g['temp']} °C" if g.get("temp") is not None else "",
                                          f"{g['power_w']:.0f} W" if g.get("power_w") is not None else "") if x)
            lines.append(f"**GPU {g['index']}** {g['name']}: {_gib(g['used'])} of {_gib(g['total'])} used"
                         + (f" · {extra}" if extra else ""))
            lines.append(memory_breakdown(g, (procs or {}).get(g["index"]) if procs is not None else None,
                                          mine, info, len(gpus)))
    else:
        c = telemetry.cpu_status()
        lines.append(f"*{why}: showing CPU and RAM.*")
        lines.append(f"**CPU** {c['cores']} cores, {c['cpu_percent'] if c['cpu_percent'] is not None else '?'}% busy · "
                     f"**RAM** {_gib(c['ram_used'])} of {_gib(c['ram_total'])} · this process {_gib(c['rss'])}")
    # the server's load, all users together (counts only; the per-reply figures are per user)
    items = [m for m in ctx.manager.metrics.items() if m.time > time.time() - 60]
    rate = sum(m.tokens for m in items) / 60 if items else 0
    lines.append(f"**Now:** {ctx.manager.running} streams running · last minute {len(items)} replies, "
                 f"{rate:.1f} tokens/s on average")
    return "\n\n".join(lines)


def memory_breakdown(g: dict, procs: list[dict] | None, mine: set[int], info, n_gpus: int) -> str:
    """What the GPU's used memory is: this app's weights, its KV cache and workspace (the rest of
    what this app holds), other processes, and what is left to the driver. Per-process figures come
    from NVML; where it shows none (some containers), the split is given as unknown."""
    weights = (info.extra.get("weights_bytes") if info and info.device.startswith("cuda") else None)
    tp = int((info.extra.get("tp") or 1) if info else 1)
    if weights:
        weights = weights / max(1, min(tp, n_gpus))
    if procs is None or not procs:
        w = f"model weights ~{_gib(weights)} · " if weights else ""
        return f"&nbsp;&nbsp;{w}per-process memory not visible here (NVML lists no processes)"
    app = sum(p["used"] for p in procs if p["pid"] in mine)
    others = sum(p["used"] for p in procs if p["pid"] not in mine)
    parts = [f"this app {_gib(app)}"]
    if weights and app:
        parts.append(f"of which weights ~{_gib(min(weights, app))}, KV cache and workspace "
                     f"~{_gib(max(0, app - weights))}")
    parts.append(f"other processes {_gib(others)}")
    parts.append(f"driver and unattributed {_gib(max(0, g['used'] - app - others))}")
    return "&nbsp;&nbsp;" + " · ".join(parts)


def load_frame(ctx: Context):
    """Running and queued requests over the last minutes (from the app's 1 Hz load sampler)."""
    import pandas as pd

    now = time.time()
    samples = ctx.load.window(WINDOW_S) if ctx.load is not None else []
    rows = [r for t, running, queued in samples
            for r in ({"seconds ago": round(t - now, 1), "requests": running, "series": "running"},
                      {"seconds ago": round(t - now, 1), "requests": queued, "series": "queued"})]
    return pd.DataFrame(rows or [{"seconds ago": 0.0, "requests": 0, "series": "running"}])


def recent_frame(items: list[telemetry.ReplyMetrics]):
    """Speed and first-token latency of ``items`` (the caller's replies, ``own_replies``)."""
    import pandas as pd

    now = time.time()
    rows = [{"seconds ago": round(m.time - now, 1), "tokens/s": round(m.tokens_per_s, 2),
             "first token (s)": round(m.ttft, 3) if m.ttft is not None else None}
            for m in items if m.time > now - WINDOW_S]
    return pd.DataFrame(rows or [{"seconds ago": 0.0, "tokens/s": 0.0, "first token (s)": 0.0}])


def _write(rows: list[dict], summary: dict | None, stem: str) -> tuple[str, str]:
    import csv
    import json

    d = tempfile.mkdtemp(prefix="turbostudio-")
    jpath, cpath = os.path.join(d, stem + ".json"), os.path.join(d, stem + ".csv")
    with open(jpath, "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1, default=str)
    with open(cpath, "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}) if rows else ["empty"]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return jpath, cpath


@dataclass
class Run:
    """A benchmark running now: what it is, who started it, and its own cancel switch."""

    kind: str                      # "load test", "engine comparison", "KV sweep"
    owner: str | None              # the user who started it (None in an app without users)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)


class Runs:
    """The benchmarks of the Monitor page that run now. Each belongs to the user who started it:
    only they or an administrator may cancel it (``cancel``); a cancel from anyone else is refused
    and the run goes on."""

    def __init__(self):
        self._lock = threading.Lock()
        self._runs: list[Run] = []

    @contextmanager
    def start(self, kind: str, owner: str | None):
        run = Run(kind, owner)
        with self._lock:
            self._runs.append(run)
        try:
            yield run
        finally:
            with self._lock:
                self._runs.remove(run)

    def now(self) -> list[Run]:
        with self._lock:
            return list(self._runs)

    def cancel(self, settings, request: gr.Request | None) -> list[Run]:
        """Cancel the runs the caller may cancel; gr.Error when every run now is someone else's."""
        runs = self.now()
        mine = [r for r in runs if may_manage(settings, request, r.owner)]
        if runs and not mine:
            kinds = " and ".join(sorted({r.kind for r in runs}))
            raise gr.Error(f"The {kinds} running now was started by another user; only they or an "
                           "administrator may cancel it.", title="Not allowed")
        for r in mine:
            r.cancel.set()
        return mine


def _fmt_ms(v) -> str:
    return "–" if v is None else f"{v * 1000:.0f} ms"


def build_benchmarks(ctx: Context):
    """The load test and the engine comparison (the tutorial's speed script, made real). Starting
    one is an operator control (``require_admin``); each run belongs to the user who started it
    (its requests carry that owner) and only they or an administrator may cancel it (``Runs``)."""
    from engines import loadtest
    from engines.base import GenParams

    from .common import require_admin, user_error

    runs = Runs()
    with gr.Accordion("Load test: N simulated users against the loaded engine", open=False):
        gr.Markdown("Runs for the time you set (then lets running replies finish); chat users share the "
                    "engine meanwhile and are batched with the simulated ones.")
        with gr.Row():
            users = gr.Slider(1, 64, value=4, step=1, label="users")
            seconds = gr.Slider(2, 300, value=10, step=1, label="seconds")
            lt_tokens = gr.Slider(1, 1024, value=64, step=1, label="max_new_tokens")
        with gr.Row():
            run_lt = gr.Button("Run load test", variant="primary")
            stop_lt = gr.Button("Cancel")
        lt_out = gr.Markdown(elem_id="loadtest-result")
        with gr.Row():
            lt_json = gr.File(label="results (JSON)")
            lt_csv = gr.File(label="results (CSV)")
    with gr.Accordion("Engine comparison (TurboMind vs LMDeploy-PyTorch vs Transformers)", open=False):
        gr.Markdown("Loads each chosen engine beside the serving model (GPU memory permitting), warms it "
                    "up, and runs the same prompts; reports tokens/s, the tutorial's words/s, first-token "
                    "latency and GPU memory.")
        with gr.Row():
            choices = gr.CheckboxGroup(["turbomind", "pytorch", "transformers"], value=["transformers"],
                                       label="engines")
            cmp_model = gr.Textbox(label="model (empty: the loaded one)")
            cmp_tokens = gr.Slider(1, 1024, value=64, step=1, label="max_new_tokens")
            repeats = gr.Slider(1, 10, value=2, step=1, label="repeats")
            batch = gr.Slider(1, 64, value=1, step=1, label="concurrent streams")
        with gr.Row():
            run_cmp = gr.Button("Run comparison", variant="primary")
            stop_cmp = gr.Button("Cancel")
        cmp_table = gr.Dataframe(interactive=False, elem_id="compare-table")
        cmp_plot = gr.BarPlot(x="engine", y="tokens_per_s", title="tokens/s", height=240)
        with gr.Row():
            cmp_json = gr.File(label="results (JSON)")
            cmp_csv = gr.File(label="results (CSV)")
    with gr.Accordion("KV-cache sweep (TurboMind): cache_max_entry_count 0.8 / 0.5 / 0.01", open=False):
        gr.Markdown("The tutorial's experiment: the same model on TurboMind with each cache size, the GPU "
                    "memory it takes and the speed at batch 1 and 16.")
        with gr.Row():
            sweep_qp = gr.Dropdown([0, 8, 4], value=0, label="quant_policy (KV int8 = 8, int4 = 4)")
            sweep_tokens = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens")
            run_sweep = gr.Button("Run sweep", variant="primary")
        sweep_table = gr.Dataframe(interactive=False, elem_id="sweep-table")
        sweep_plot = gr.BarPlot(x="setting", y="gpu_mem_gib", title="GPU memory (GiB)", height=240)

    def do_load_test(n, secs, max_tokens, request: gr.Request = None, progress=gr.Progress()):
        require_admin(ctx.settings, request, "run load tests")
        try:
            ctx.manager.require()
            params = GenParams(temperature=0.7, max_new_tokens=int(max_tokens), seed=0)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        owner = user_of(request)
        with runs.start("load test", owner) as run:
            res = loadtest.load_test(ctx.manager.submit, users=int(n), seconds=float(secs), params=params,
                                     owner=owner, cancel=run.cancel, progress=lambda f, m: progress(f, desc=m))
        rows = res.pop("rows")
        text = (f"**{res['requests']} replies** from {res['users']} users in {res['seconds']:.1f} s"
                f"{' (cancelled)' if res['cancelled'] else ''}: **{res['tokens_per_s']:.1f} tokens/s** "
                f"aggregate ({res['tokens']} tokens), {res['words_per_s']:.1f} words/s · first token p50 "
                f"{_fmt_ms(res['ttft_p50'])}, p99 {_fmt_ms(res['ttft_p99'])} · inter-token p50 "
                f"{_fmt_ms(res['itl_p50'])}, p99 {_fmt_ms(res['itl_p99'])} · errors {res['errors']}")
        j, c = _write(rows, res, "loadtest")
        return text, j, c

    def do_compare(picked, model, max_tokens, reps, n, request: gr.Request = None, progress=gr.Progress()):
        import pandas as pd

        require_admin(ctx.settings, request, "run engine comparisons")
        if not picked:
            raise gr.Error("Choose at least one engine.", title="Nothing to compare")
        info = ctx.manager.info()
        spec = model.strip() or (info.model_path if info else None)
        try:
            ctx.settings.load_policy().check(model.strip() or None)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        opts = ctx.settings.engine_options()

        def make(choice):
            """Each engine loads through the manager (a scratch one beside the serving model)."""
            o = {"device": opts["device"], "dtype": opts["dtype"]} if choice == "transformers" else \
                {"cache_max_entry_count": min(0.3, opts["cache_max_entry_count"]), "session_len": 4096}
            return ctx.manager.scratch(spec, choice, **o)

        owner = user_of(request)
        with runs.start("engine comparison", owner) as run:
            rows = loadtest.compare_engines(make, list(picked),
                                            params=GenParams(temperature=0, max_new_tokens=int(max_tokens)),
                                            repeats=int(reps), batch=int(n), owner=owner, cancel=run.cancel,
                                            progress=lambda f, m: progress(f, desc=m))
        df = pd.DataFrame(rows)
        j, c = _write(rows, None, "engine-comparison")
        plot = df[["engine", "tokens_per_s"]] if "tokens_per_s" in df else pd.DataFrame({"engine": [], "tokens_per_s": []})
        return df, plot, j, c

    def do_sweep(qp, max_tokens, request: gr.Request = None, progress=gr.Progress()):
        import pandas as pd

        require_admin(ctx.settings, request, "run the KV-cache sweep")
        info = ctx.manager.info()
        spec = info.model_path if info else None
        p = GenParams(temperature=0, max_new_tokens=int(max_tokens))
        rows = []
        owner = user_of(request)
        with runs.start("KV sweep", owner) as run:
            for share in (0.8, 0.5, 0.01):
                if run.cancel.is_set():
                    break
                label = f"cache {share}"

                def make(_c, share=share):
                    """TurboMind with this cache share, loaded through the manager."""
                    return ctx.manager.scratch(spec, "turbomind", cache_max_entry_count=share,
                                               session_len=4096, quant_policy=int(qp),
                                               model_format=ctx.settings.model_format)
                for r in loadtest.compare_engines(make, [label], params=p, repeats=1, batch=[1, 16], owner=owner,
                                                  cancel=run.cancel,
                                                  progress=lambda f, m, label=label: progress(f, desc=f"{label}: {m}")):
                    rows.append({"setting": label, **r})
        df = pd.DataFrame(rows)
        plot = df[df["batch"] == 1][["setting", "gpu_mem_gib"]] if "gpu_mem_gib" in df else \
            pd.DataFrame({"setting": [], "gpu_mem_gib": []})
        return df, plot

    def do_cancel(request: gr.Request = None):
        """Cancel the benchmarks the caller may cancel: their own, or any for an administrator;
        refused (gr.Error) when what runs is someone else's, and it goes on."""
        runs.cancel(ctx.settings, request)

    run_sweep.click(do_sweep, [sweep_qp, sweep_tokens], [sweep_table, sweep_plot], api_name="kv_sweep",
                    concurrency_id="bench", concurrency_limit=1)
    run_lt.click(do_load_test, [users, seconds, lt_tokens], [lt_out, lt_json, lt_csv], api_name="load_test",
                 concurrency_id="bench", concurrency_limit=1)
    stop_lt.click(do_cancel, None, None, api_name="cancel_benchmark", queue=False)
    run_cmp.click(do_compare, [choices, cmp_model, cmp_tokens, repeats, batch], [cmp_table, cmp_plot, cmp_json, cmp_csv],
                  api_name="compare_engines", concurrency_id="bench", concurrency_limit=1)
    stop_cmp.click(do_cancel, None, None, api_visibility="private", queue=False)


def build(ctx: Context, tab: gr.Tab):
    # the page's own copies are every visitor's (request None): the timer fills in each one's view
    status = gr.Markdown(panel(ctx), elem_id="monitor-panel")
    with gr.Row():
        first = recent_frame(own_replies(ctx, None))
        speed = gr.LinePlot(first, x="seconds ago", y="tokens/s", title="Tokens/s per reply (yours)",
                            height=220)
        ttft = gr.LinePlot(first, x="seconds ago", y="first token (s)", title="First token (yours)",
                           height=220)
    load = gr.LinePlot(load_frame(ctx), x="seconds ago", y="requests", color="series",
                       title="Running and queued requests", height=220)
    download = gr.DownloadButton("Download reply metrics (CSV)", size="sm")
    timer = gr.Timer(1.0, active=False)

    sent = gr.State({})

    def tick(last: dict, request: gr.Request = None):
        """The panel text every second; a plot only when its data changed (the reply plots at a
        reply's end, the load plot every 5 s at most): re-drawing unchanged charts each second is
        what a browser pays for most (bench/bench_panel.py). The reply plots are the caller's own
        replies (an administrator's: everyone's)."""
        last = dict(last or {})
        items = own_replies(ctx, request)
        mark = (len(items), items[-1].time if items else 0, int(time.time() // 30))
        outs = [panel(ctx, request)]
        if mark != last.get("replies"):
            df = recent_frame(items)
            outs += [df, df]
            last["replies"] = mark
        else:
            outs += [gr.skip(), gr.skip()]
        if time.time() - last.get("load", 0) >= 5:
            outs.append(load_frame(ctx))
            last["load"] = time.time()
        else:
            outs.append(gr.skip())
        return *outs, last

    # no progress overlay flickering on the outputs each second
    timer.tick(tick, sent, [status, speed, ttft, load, sent], api_visibility="private", queue=False,
               show_progress="hidden")

    def monitor_load() -> list:
        """[seconds ago, running, queued] samples of the last minutes."""
        now = time.time()
        return [[round(t - now, 1), r, q] for t, r, q in (ctx.load.window(WINDOW_S) if ctx.load else [])]

    gr.api(monitor_load, api_name="monitor_load", api_visibility="undocumented")
    # refresh only while someone looks at this tab
    tab.select(lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False)

    def export(request: gr.Request = None):
        """The caller's reply metrics as CSV (an administrator's: everyone's)."""
        fd, path = tempfile.mkstemp(prefix="turbostudio-metrics-", suffix=".csv")
        with os.fdopen(fd, "w") as f:
            f.write(telemetry.metrics_csv(own_replies(ctx, request)))
        return path

    download.click(export, None, download, api_name="metrics_csv", api_visibility="undocumented")
    build_benchmarks(ctx)
    return timer
