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

from engines import bandwidth, telemetry

from .chat import DOWNLOAD_JS
from .common import Context, Refusal, may_manage, model_label, redact_paths, sees_own, user_of

WINDOW_S = 600   # plots show the last ten minutes
_gib = telemetry.human_bytes     # every size on the page in the unit a person reads


def own_replies(ctx: Context, request: gr.Request | None) -> list[telemetry.ReplyMetrics]:
    """The reply metrics the caller may see: their own (an administrator's: everyone's). An
    anonymous visitor of a public app (no --auth) sees their own browser session's."""
    return [m for m in ctx.manager.metrics.items() if sees_own(ctx.settings, request, m.owner, m.session)]


def panel(ctx: Context, request: gr.Request | None = None) -> str:
    """The live panel; paths on the server only for those who may see them (``redact_paths``)."""
    return redact_paths(ctx.settings, request, _panel(ctx))


def _panel(ctx: Context) -> str:
    gpus, why = telemetry.gpu_status()
    lines = []
    info = ctx.manager.info()
    # every model this app holds, with its weights' memory (the Compare view's model B included)
    b = ctx.compare.info() if getattr(ctx, "compare", None) is not None else None
    for label, i in (("Model" if b is None else "Model A", info), ("Model B (Compare)", b)):
        if i:
            w = i.extra.get("weights_bytes")
            lines.append(f"**{label}:** {model_label(i)} on {i.backend} ({i.device}, {i.dtype})"
                         + (f" · weights {_gib(w)} in {'GPU memory' if i.device.startswith('cuda') else 'RAM'}"
                            if w else ""))
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
        lines.append(f"*{why}: showing CPU and RAM.*")     # "No NVIDIA GPU: showing CPU and RAM."
        lines.append(f"**CPU** {c['cores']} cores, {c['cpu_percent'] if c['cpu_percent'] is not None else '?'}% busy · "
                     f"**RAM** {_gib(c['ram_used'])} of {_gib(c['ram_total'])} · this process {_gib(c['rss'])}")
    # the memory-bandwidth meter: the server's, from every user's replies (engines/bandwidth.py)
    lines.append(bandwidth.meter_text(info, ctx.manager.metrics.items(), ctx.manager.live(),
                                      gpu_name=gpus[0]["name"] if gpus else ""))
    # the server's load, all users together (counts only; the per-reply figures are per user)
    items = [m for m in ctx.manager.metrics.items() if m.time > time.time() - 60]
    rate = sum(m.tokens for m in items) / 60 if items else 0
    n = ctx.manager.running
    lines.append(f"**Now:** {n} stream{'' if n == 1 else 's'} running · last minute {len(items)} "
                 f"repl{'y' if len(items) == 1 else 'ies'}, {rate:.1f} tokens/s on average")
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
    # both series even before the first sample: the chart's legend and colours are fixed from the
    # frame it is first drawn with (the app's start), and a later update's "queued" went unnamed
    return pd.DataFrame(rows or [{"seconds ago": 0.0, "requests": 0, "series": "running"},
                                 {"seconds ago": 0.0, "requests": 0, "series": "queued"}])


def load_plot(ctx: Context, **kw):
    """The running-and-queued plot, its y axis from 0 to at least 4 (an idle server's flat zero
    line would otherwise get an axis labelled "0.000000")."""
    df = load_frame(ctx)
    return gr.LinePlot(df, y_lim=[0, max(4, int(df["requests"].max()) + 1)], **kw)


def recent_frame(items: list[telemetry.ReplyMetrics]):
    """Speed and first-token latency of ``items`` (the caller's replies, ``own_replies``)."""
    import pandas as pd

    now = time.time()
    rows = [{"seconds ago": round(m.time - now, 1), "tokens/s": round(m.tokens_per_s, 2),
             "first token (s)": round(m.ttft, 3) if m.ttft is not None else None}
            for m in items if m.time > now - WINDOW_S]
    cols = ["seconds ago", "tokens/s", "first token (s)"]
    if not rows:        # none yet: an empty plot, its columns numbers (not categories) from the start
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    return pd.DataFrame(rows, columns=cols)


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
            raise Refusal(f"The {kinds} running now was started by another user; only they or an "
                          "administrator may cancel it.", title="Not allowed")
        for r in mine:
            r.cancel.set()
        return mine


def _fmt_ms(v) -> str:
    """Seconds as a person reads a latency: "85 ms", "2.47 s"."""
    if v is None:
        return "–"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def spread_text(res: dict, key: str, what: str) -> str:
    """A percentile with the samples it rests on: "p50 120 ms, p99 300 ms (1,234 gaps)", or below
    ``loadtest.P99_MIN_SAMPLES`` "p50 120 ms, max 300 ms (3 replies: too few for a p99)"."""
    n = res.get(f"{key}_samples") or 0
    if not n:
        return f"no {what}"
    if n == 1:
        what = {"replies": "reply", "gaps": "gap"}.get(what, what)
    if res.get(f"{key}_p99") is not None:
        return f"p50 {_fmt_ms(res[f'{key}_p50'])}, p99 {_fmt_ms(res[f'{key}_p99'])} ({n:,} {what})"
    return (f"p50 {_fmt_ms(res[f'{key}_p50'])}, max {_fmt_ms(res[f'{key}_max'])} "
            f"({n:,} {what}: too few for a p99)")


def load_test_text(res: dict) -> str:
    """A load test's summary in words."""
    first = f"; first error: {res['first_error']}" if res.get("first_error") else ""
    return (f"**{res['requests']} replies** from {res['users']} users in {res['seconds']:.1f} s"
            f"{' (cancelled)' if res['cancelled'] else ''}: **{res['tokens_per_s']:.1f} tokens/s** "
            f"aggregate ({res['tokens']:,} tokens), {res['words_per_s']:.1f} words/s · errors {res['errors']}"
            f"{first}\n\nFirst token: {spread_text(res, 'ttft', 'replies')} · "
            f"between tokens: {spread_text(res, 'itl', 'gaps')}")


def results_frame(rows: list[dict], first: str = "engine"):
    """Comparison or sweep rows as the page shows them: named columns, human units, no raw keys
    (the JSON and CSV files keep every raw figure)."""
    import pandas as pd

    out = []
    for r in rows:
        row = {first: r.get(first), "batch": r.get("batch")}
        if "requests" in r:
            row.update({"replies": r["requests"], "errors": r["errors"],
                        "tokens/s": round(r["tokens_per_s"], 1), "words/s": round(r["words_per_s"], 1),
                        "first token": spread_text(r, "ttft", "replies"),
                        "GPU memory": "–" if r.get("gpu_mem_gib") is None else
                        telemetry.human_bytes(r["gpu_mem_gib"] * 2**30)})
        row["error"] = r.get("error") or r.get("first_error") or ""
        out.append(row)
    df = pd.DataFrame(out)
    if "error" in df and not df["error"].astype(bool).any():
        df = df.drop(columns="error")
    if not any((r.get("gpu_mem_gib") or 0) > 0 for r in rows) and "GPU memory" in df:
        df = df.drop(columns="GPU memory")           # no GPU memory taken (a CPU machine): no column of zeros
    return df


def _plot_frame(rows: list[dict], x: str, key: str, label: str, where=lambda r: True):
    """The points of a result plot: ``x`` and the rows' ``key`` figure, named ``label``."""
    import pandas as pd

    pts = [{x: r.get(x), label: r[key]} for r in rows if r.get(key) is not None and where(r)]
    return pd.DataFrame(pts, columns=[x, label])


def build_benchmarks(ctx: Context):
    """The load test, the engine comparison and the KV-cache sweep. Starting one is an operator
    control (``require_admin``); each run belongs to the user who started it (its requests carry
    that owner) and only they or an administrator may cancel it (``Runs``). What this machine cannot
    run is offered disabled, with the reason (``ui.engines.machine``). In the page a refusal is a
    warning and a line in the result; the named API endpoints raise it."""
    from engines import loadtest
    from engines.base import GenParams

    from .common import require_admin, user_error
    from .engines import machine, wire

    m = machine()
    runs = Runs()
    with gr.Accordion("Load test: N simulated users against the loaded engine", open=False):
        gr.Markdown("Runs for the time you set (then lets running replies finish); chat users share the "
                    "engine meanwhile and are batched with the simulated ones.")
        with gr.Row():
            users = gr.Slider(1, 64, value=4, step=1, label="users", elem_id="loadtest-users")
            seconds = gr.Slider(2, 300, value=10, step=1, label="seconds", elem_id="loadtest-seconds")
            lt_tokens = gr.Slider(1, 1024, value=64, step=1, label="max_new_tokens", elem_id="loadtest-tokens")
        with gr.Row():
            run_lt = gr.Button("Run load test", variant="primary", elem_id="loadtest-run")
            stop_lt = gr.Button("Cancel", elem_id="loadtest-cancel")
        # the progress (replies done of replies expected) is drawn here only, not over the files
        lt_out = gr.Markdown("*No load test run yet.*", elem_id="loadtest-result", min_height=72)
        with gr.Row():
            lt_json = gr.File(label="results (JSON)", visible=False, height=80, elem_id="loadtest-json")
            lt_csv = gr.File(label="results (CSV)", visible=False, height=80, elem_id="loadtest-csv")
    gpu_names = {"turbomind": "TurboMind", "pytorch": "LMDeploy-PyTorch"}
    offered = ["transformers"] + ([*gpu_names] if m.gpu_engines else [])
    with gr.Accordion("Engine comparison (TurboMind vs LMDeploy-PyTorch vs Transformers)", open=False):
        gr.Markdown("Loads each chosen engine beside the serving model (GPU memory permitting), warms it "
                    "up, and runs the same prompts; reports tokens/s, the tutorial's words/s, first-token "
                    "latency and GPU memory.")
        if not m.gpu_engines:
            gr.Markdown(f"*TurboMind and LMDeploy-PyTorch are not offered on this machine: {m.no_gpu_engines}.*",
                        elem_id="compare-gpu-note")
        with gr.Row():
            # the engines this machine runs (the API takes the others and answers with the reason)
            choices = gr.Dropdown(offered, value=["transformers"], multiselect=True, allow_custom_value=True,
                                  label="engines", elem_id="compare-engines",
                                  info=None if m.gpu_engines else "TurboMind, LMDeploy-PyTorch: need a CUDA GPU")
            cmp_model = gr.Textbox(label="model (empty: the loaded one)")
            cmp_tokens = gr.Slider(1, 1024, value=64, step=1, label="max_new_tokens")
            repeats = gr.Slider(1, 10, value=2, step=1, label="repeats")
            batch = gr.Slider(1, 64, value=1, step=1, label="concurrent streams")
        with gr.Row():
            run_cmp = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
            stop_cmp = gr.Button("Cancel")
        cmp_note = gr.Markdown("*No comparison run yet.*", elem_id="compare-note", min_height=48)
        # tables and plots appear with their first results (an empty one would show made-up headers)
        cmp_table = gr.Dataframe(interactive=False, elem_id="compare-table", visible=False)
        cmp_plot = gr.BarPlot(x="engine", y="tokens/s", title="tokens/s", height=240, visible=False,
                              y_lim=[0, None])
        with gr.Row():
            cmp_json = gr.File(label="results (JSON)", visible=False, height=80)
            cmp_csv = gr.File(label="results (CSV)", visible=False, height=80)
    with gr.Accordion("KV-cache sweep (TurboMind): cache_max_entry_count 0.8 / 0.5 / 0.01", open=False):
        gr.Markdown("The tutorial's experiment: the same model on TurboMind with each cache size, the GPU "
                    "memory it takes and the speed at batch 1 and 16.")
        if not m.gpu_engines:
            gr.Markdown(f"*Needs TurboMind, which cannot run on this machine: {m.no_gpu_engines}.*",
                        elem_id="sweep-gpu-note")
        with gr.Row():
            sweep_qp = gr.Dropdown([0, 8, 4], value=0, label="quant_policy (KV int8 = 8, int4 = 4)",
                                   interactive=m.gpu_engines)
            sweep_tokens = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens", interactive=m.gpu_engines)
            run_sweep = gr.Button("Run sweep" if m.gpu_engines else "Run sweep (needs a CUDA GPU and LMDeploy)",
                                  variant="primary", interactive=m.gpu_engines, elem_id="sweep-run")
        sweep_note = gr.Markdown("", elem_id="sweep-note", min_height=48)
        sweep_table = gr.Dataframe(interactive=False, elem_id="sweep-table", visible=False)
        sweep_plot = gr.BarPlot(x="setting", y="GPU memory (GiB)", title="GPU memory (GiB)", height=240,
                                visible=False, y_lim=[0, None])

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
        j, c = _write(rows, res, "loadtest")
        return load_test_text(res), j, c

    def do_compare(picked, model, max_tokens, reps, n, request: gr.Request = None, progress=gr.Progress()):
        require_admin(ctx.settings, request, "run engine comparisons")
        if not picked:
            raise Refusal("Choose at least one engine.", title="Nothing to compare")
        info = ctx.manager.info()
        spec = (model or "").strip() or (info.model_path if info else None)
        try:
            ctx.settings.load_policy().check((model or "").strip() or None)
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
        j, c = _write(rows, None, "engine-comparison")
        return results_frame(rows), _plot_frame(rows, "engine", "tokens_per_s", "tokens/s"), j, c

    def do_sweep(qp, max_tokens, request: gr.Request = None, progress=gr.Progress()):
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
        return (results_frame(rows, first="setting"),
                _plot_frame(rows, "setting", "gpu_mem_gib", "GPU memory (GiB)", where=lambda r: r.get("batch") == 1))

    def do_cancel(request: gr.Request = None):
        """Cancel the benchmarks the caller may cancel: their own, or any for an administrator;
        refused (gr.Error) when what runs is someone else's, and it goes on."""
        runs.cancel(ctx.settings, request)

    def finished(_result=None):
        return [f"Finished at {time.strftime('%H:%M:%S')}."]

    # what the page shows of a result: its boxes appear with it (a plot only with points to draw)
    def files(j, c):
        return gr.File(j, visible=True), gr.File(c, visible=True)

    def table_and_plot(df, plot):
        return gr.Dataframe(df, visible=True), gr.BarPlot(plot, visible=not plot.empty)

    bench = dict(concurrency_id="bench", concurrency_limit=1)
    # progress is drawn on the run's own line (lt_out, cmp_note, sweep_note), never over the results
    wire(run_sweep, do_sweep, [sweep_qp, sweep_tokens], [sweep_table, sweep_plot], api_name="kv_sweep",
         shape=lambda r: table_and_plot(*r), after=finished, after_outputs=sweep_note, notice=sweep_note, show_progress_on=[sweep_note], **bench)
    wire(run_lt, do_load_test, [users, seconds, lt_tokens], [lt_out, lt_json, lt_csv], api_name="load_test",
         shape=lambda r: (r[0], *files(*r[1:])), notice=lt_out, show_progress_on=[lt_out], **bench)
    wire(stop_lt, do_cancel, None, None, api_name="cancel_benchmark", notice=lt_out, queue=False)
    wire(run_cmp, do_compare, [choices, cmp_model, cmp_tokens, repeats, batch], [cmp_table, cmp_plot, cmp_json, cmp_csv],
         api_name="compare_engines", shape=lambda r: (*table_and_plot(*r[:2]), *files(*r[2:])), after=finished, after_outputs=cmp_note, notice=cmp_note,
         show_progress_on=[cmp_note], **bench)
    wire(stop_cmp, do_cancel, None, None, api_name=None, notice=cmp_note, queue=False)


def build(ctx: Context, tab: gr.Tab):
    # the page's own copies are every visitor's (request None): the timer fills in each one's view
    status = gr.Markdown(panel(ctx), elem_id="monitor-panel")
    with gr.Row():
        first = recent_frame(own_replies(ctx, None))
        window = [-WINDOW_S, 0]          # the last ten minutes, also while there is no reply yet
        speed = gr.LinePlot(first, x="seconds ago", y="tokens/s", title="Tokens/s per reply (yours)",
                            height=220, x_lim=window, y_lim=[0, None])
        ttft = gr.LinePlot(first, x="seconds ago", y="first token (s)", title="First token (yours)",
                           height=220, x_lim=window, y_lim=[0, None])
    load = load_plot(ctx, x="seconds ago", y="requests", color="series", title="Running and queued requests",
                     height=220)
    # a plain button whose file the browser then downloads (DOWNLOAD_JS, as the Chat page's Export):
    # a DownloadButton downloads the file it held *before* its click ran, so its first click gave
    # nothing and each later one the metrics as they were at the click before
    download = gr.Button("Download reply metrics (CSV)", size="sm", elem_id="metrics-csv")
    downloaded = gr.File(visible="hidden", elem_id="metrics-csv-file")
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
            outs.append(load_plot(ctx))
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

    download.click(export, None, downloaded, api_name="metrics_csv", api_visibility="undocumented").then(
        None, downloaded, None, js=DOWNLOAD_JS, api_visibility="private", queue=False, show_progress="hidden")
    build_benchmarks(ctx)
    return timer
