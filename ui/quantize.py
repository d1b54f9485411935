"""Quantize page: AWQ W4A16 (and dtype casts) as queued jobs with progress, log, cancel, and a
one-click load of the result. The runner (``engines.quantize.JobRunner``) does the work in
subprocesses and keeps the job list on disk."""
from __future__ import annotations

import os
import re
import time

import gradio as gr

from engines.quantize import JobRunner

from .common import Context, require_admin, user_error

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def _size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


class _Borrowed:
    """An engine lent to ``loadtest.compare_engines`` without giving it the right to close it."""

    def __init__(self, eng):
        self._eng = eng
        self.info = eng.info

    def stream(self, *a, **k):
        return self._eng.stream(*a, **k)

    def close(self):
        pass


def table(runner: JobRunner) -> list[list]:
    rows = []
    for j in reversed(runner.jobs()):
        eta = j.eta_seconds()
        state = j.state
        if state == "queued":
            state = f"queued (#{runner.queue_position(j.id)})"
        elif state == "running":
            state = f"running {100 * j.fraction:.0f}% {j.stage}" + (f", ~{eta:.0f} s left" if eta else "")
        size = ""
        if j.state == "done" and os.path.isdir(j.output):
            size = f"{_size(j.source) / 2**30:.2f} -> {_size(j.output) / 2**30:.2f} GiB"
        rows.append([j.id, j.kind, os.path.basename(j.source), os.path.basename(j.output), state, size,
                     j.error])
    return rows or [["", "", "", "", "no jobs yet", "", ""]]


def build(ctx: Context, runner: JobRunner, tab: gr.Tab):
    s = ctx.settings
    models_dir = os.path.join(s.cache_dir, "models")
    gr.Markdown("AWQ W4A16 runs LMDeploy's `auto_awq` in a separate process (a crash cannot take the "
                "app down), calibrated offline on shipped text unless you give your own. One GPU job "
                "at a time; the list survives reloads and restarts. Results appear under "
                f"`{models_dir}` and load with one click.")
    with gr.Row():
        source = gr.Textbox(label="Source model folder", value=ctx.manager.info().model_path
                            if ctx.manager.info() else "", scale=3)
        name = gr.Textbox(label="Output name", placeholder="e.g. my-model-w4a16", scale=2)
        kind = gr.Dropdown(["awq", "cast"], value="awq", label="Job", scale=1)
    with gr.Row():
        samples = gr.Number(128, precision=0, label="calibration samples")
        seqlen = gr.Number(512, precision=0, label="sequence length")
        group = gr.Number(128, precision=0, label="group size")
        dtype = gr.Dropdown(["bfloat16", "float16", "float32"], value="bfloat16", label="dtype (cast)")
        calib = gr.File(label="Calibration text (optional .txt)", file_types=[".txt"], type="filepath")
    start = gr.Button("Start job", variant="primary")
    jobs = gr.Dataframe(table(runner), headers=["id", "kind", "source", "output", "state", "size", "error"],
                        interactive=False, wrap=True, elem_id="jobs-table")
    with gr.Row():
        job_id = gr.Textbox(label="Job id (for log, cancel, load)", scale=3)
        cancel = gr.Button("Cancel job", scale=1)
        load = gr.Button("Load result", scale=1)
    log = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True)
    with gr.Accordion("What it bought: the source against the result", open=False):
        gr.Markdown("Loads both beside the serving model (on a GPU with cache_max_entry_count 0.01, the "
                    "tutorial's experiment) and measures size on disk, the memory each load takes, tokens/s "
                    "at batch 1 and 16, and their greedy answers to the same prompt.")
        cmp_prompt = gr.Textbox(value="Explain in two sentences why the sky is blue.", label="prompt")
        compare = gr.Button("Compare source and result")
        card = gr.Dataframe(interactive=False, elem_id="quantize-card")
        answers = gr.Markdown()
    timer = gr.Timer(1.0, active=False)

    def do_start(source, name, kind, samples, seqlen, group, dtype, calib, request: gr.Request = None):
        require_admin(s, request)
        if not name or not NAME.match(name):
            raise gr.Error("The output name may use letters, digits, '.', '_' and '-' only.", title="Bad name")
        params = ({"samples": int(samples or 0), "seqlen": int(seqlen or 0), "group_size": int(group or 0),
                   "bits": 4, "calib_file": calib} if kind == "awq" else {"dtype": dtype})
        try:
            s.load_policy().check(source)
            job = runner.submit(kind, source.strip(), os.path.join(models_dir, name), params)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        gr.Info(f"Job {job.id} queued.")
        return table(runner), job.id

    def refresh(jid):
        return table(runner), runner.read_log(jid) if jid else ""

    def do_cancel(jid, request: gr.Request = None):
        require_admin(s, request)
        runner.cancel(jid.strip())
        time.sleep(0.2)
        return table(runner)

    def do_load(jid, request: gr.Request = None):
        require_admin(s, request)
        job = runner.get(jid.strip())
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job.", title="Not ready")
        opts = {"model_format": "awq"} if job.kind == "awq" else {}
        try:
            info = ctx.manager.load(job.output, "auto", **opts)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return f"Loaded {info.model} on {info.backend}."

    def do_compare(jid, prompt, request: gr.Request = None, progress=gr.Progress()):
        require_admin(s, request)
        import pandas as pd

        from engines import loadtest, models, registry, telemetry
        from engines.base import ChatMessage, GenParams

        job = runner.get((jid or "").strip())
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job.", title="Not ready")
        if not (prompt or "").strip():
            raise gr.Error("Give a prompt to compare the answers on.", title="No prompt")
        rows, texts = [], {}
        for i, (label, path, fmt) in enumerate((("source", job.source, "hf"),
                                                 ("result", job.output, "awq" if job.kind == "awq" else "hf"))):
            progress(i / 2, desc=f"loading the {label}")
            base_gpu, base_rss = telemetry.snapshot()["gpu_used"], telemetry.process_rss()
            try:
                resolved = models.resolve(path, s.cache_dir)
                backend, _ = registry.choose(resolved, "auto", device=s.device)
                opts = ({"device": s.device} if backend == "transformers" else
                        {"cache_max_entry_count": 0.01, "session_len": 4096, "model_format": fmt})
                eng = registry.create(resolved, backend, **opts)
            except Exception as e:  # noqa: BLE001
                raise user_error(e) from e
            try:
                snap = telemetry.snapshot()
                mem = snap["gpu_used"] - base_gpu if snap["gpus"] else telemetry.process_rss() - base_rss
                p = GenParams(temperature=0, max_new_tokens=48)
                r = loadtest.one_request(eng.stream, [ChatMessage("user", prompt)], p, f"card-{label}")
                texts[label] = "".join(d.text for d in eng.stream([ChatMessage("user", prompt)], p,
                                                                  session_id=f"card-{label}-t"))
                row = {"model": label, "backend": backend, "size on disk (GiB)": round(_size(path) / 2**30, 3),
                       "memory at load (GiB)": round(mem / 2**30, 3),
                       "tok/s batch 1": round(r.tokens / r.seconds, 1) if r.seconds else 0}
                progress(i / 2 + 0.25, desc=f"{label}: batch 16")
                res = loadtest.compare_engines(lambda _c, e=eng: _Borrowed(e), [label], params=p, repeats=1, batch=16)
                row["tok/s batch 16"] = res[0].get("tokens_per_s")
                rows.append(row)
            finally:
                eng.close()
        md = "\n\n".join(f"**{k}:** {v}" for k, v in texts.items())
        return pd.DataFrame(rows), md

    compare.click(do_compare, [job_id, cmp_prompt], [card, answers], api_name="quantize_compare",
                  concurrency_id="bench", concurrency_limit=1)
    start.click(do_start, [source, name, kind, samples, seqlen, group, dtype, calib], [jobs, job_id],
                api_name="quantize_start", concurrency_id="admin", concurrency_limit=1)
    cancel.click(do_cancel, job_id, jobs, api_name="quantize_cancel")
    load.click(do_load, job_id, log, api_name="quantize_load", concurrency_id="admin", concurrency_limit=1)
    timer.tick(refresh, job_id, [jobs, log], api_visibility="private", queue=False)
    tab.select(lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False)
    def quantize_jobs() -> list:
        return table(runner)

    gr.api(quantize_jobs, api_name="quantize_jobs", api_visibility="undocumented")
    return timer
