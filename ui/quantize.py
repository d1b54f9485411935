"""Quantize page: AWQ W4A16 (and dtype casts) as queued jobs with progress, log, cancel, and a
one-click load of the result. The runner (``engines.quantize.JobRunner``) does the work in
subprocesses and keeps the job list on disk."""
from __future__ import annotations

import os
import re
import time

import gradio as gr

from engines.quantize import HUB_DATASETS, JobRunner, folder_size as _size, measure_model

from .common import Context, may_manage, redact_paths, require_admin, user_error, user_of

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def table(runner: JobRunner, owner: str | None = None, *, everyone: bool = True) -> list[list]:
    """The job list, newest first: every job (``everyone``) or only those ``owner`` started."""
    rows = []
    for j in reversed(runner.jobs(owner, everyone=everyone)):
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

    def visible(request: gr.Request | None) -> list[list]:
        """The caller's own jobs (an administrator's: all), paths as the caller may see them."""
        return redact_paths(s, request, table(runner, user_of(request), everyone=s.oversees(user_of(request))))

    def loaded_path() -> str:
        info = ctx.manager.info()
        return info.model_path if info else ""

    # What is built into the page is every visitor's: paths on the server only where everyone may
    # see them (``redact_paths`` without a request); those who may get them when they open the tab.
    gr.Markdown("AWQ W4A16 runs LMDeploy's `auto_awq` in a separate process (a crash cannot take the "
                "app down), calibrated offline on shipped text unless you give your own. One GPU job "
                "at a time; the list survives reloads and restarts. Results appear under "
                f"`{redact_paths(s, None, models_dir)}` (the app's model folder) and load with one click.")
    source_default = redact_paths(s, None, loaded_path())
    with gr.Row():
        source = gr.Textbox(label="Source model folder", value=source_default, scale=3)
        name = gr.Textbox(label="Output name", placeholder="e.g. my-model-w4a16", scale=2)
        kind = gr.Dropdown(["awq", "cast"], value="awq", label="Job", scale=1)
    with gr.Row():
        samples = gr.Number(128, precision=0, label="calibration samples")
        seqlen = gr.Number(512, precision=0, label="sequence length")
        group = gr.Number(128, precision=0, label="group size")
        dtype = gr.Dropdown(["bfloat16", "float16", "float32"], value="bfloat16", label="dtype (cast)")
        calib = gr.File(label="Calibration text (optional .txt)", file_types=[".txt"], type="filepath")
        dataset = gr.Dropdown([("shipped text / your file (offline)", "")] + [(d, d) for d in HUB_DATASETS],
                              value="", label="calibration data (hub datasets need the hub)")
    start = gr.Button("Start job", variant="primary")
    jobs = gr.Dataframe(visible(None), headers=["id", "kind", "source", "output", "state", "size", "error"],
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
        cmp_kv = gr.Checkbox(True, label="also KV cache int8 and int4 (quant_policy 8 and 4): tokens the cache "
                                   "holds and batch-16 speed")
        compare = gr.Button("Compare source and result")
        card = gr.Dataframe(interactive=False, elem_id="quantize-card")
        answers = gr.Markdown()
    timer = gr.Timer(1.0, active=False)

    def do_start(source, name, kind, samples, seqlen, group, dtype, calib, dataset="", request: gr.Request = None):
        require_admin(s, request, "start quantization jobs")
        if not name or not NAME.match(name):
            raise gr.Error("The output name may use letters, digits, '.', '_' and '-' only.", title="Bad name")
        params = ({"samples": int(samples or 0), "seqlen": int(seqlen or 0), "group_size": int(group or 0),
                   "bits": 4, "calib_file": calib, "dataset": dataset or ""} if kind == "awq" else {"dtype": dtype})
        try:
            s.load_policy().check(source)
            job = runner.submit(kind, source.strip(), os.path.join(models_dir, name), params,
                                owner=user_of(request))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        gr.Info(f"Job {job.id} queued.")
        return visible(request), job.id

    def own_log(jid, request) -> str:
        job = runner.get((jid or "").strip()) if jid else None
        if job is None or not may_manage(s, request, job.owner):
            return ""
        return redact_paths(s, request, runner.read_log(job.id))

    def refresh(jid, request: gr.Request = None):
        return visible(request), own_log(jid, request)

    def do_cancel(jid, request: gr.Request = None):
        """A job is cancelled by the user who started it or by an administrator."""
        job = runner.get((jid or "").strip())
        if job is None:
            raise gr.Error(f"There is no job {jid!r}.", title="No such job")
        if not may_manage(s, request, job.owner):
            raise gr.Error(f"Job {job.id} was started by another user; only they or an administrator "
                           "may cancel it.", title="Not allowed")
        runner.cancel(job.id)
        time.sleep(0.2)
        return visible(request)

    def do_load(jid, request: gr.Request = None):
        require_admin(s, request, "load models")
        job = runner.get(jid.strip())
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job.", title="Not ready")
        opts = {"model_format": "awq"} if job.kind == "awq" else {}
        try:
            info = ctx.manager.load(job.output, "auto", **opts)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return f"Loaded {info.model} on {info.backend}."

    def do_compare(jid, prompt, kv, request: gr.Request = None, progress=gr.Progress()):
        require_admin(s, request, "run quantization comparisons")
        import pandas as pd

        from engines import telemetry

        job = runner.get((jid or "").strip())
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job.", title="Not ready")
        if not (prompt or "").strip():
            raise gr.Error("Give a prompt to compare the answers on.", title="No prompt")
        rows = []
        steps = [("source", job.source, "hf", 0), ("result", job.output, "awq" if job.kind == "awq" else "hf", 0)]
        steps += [(f"result, KV int{qp}", job.output, steps[1][2], qp) for qp in (8, 4)
                  if kv and telemetry.gpu_memory()]      # KV quantization is TurboMind's, on a GPU
        for i, (label, path, fmt, qp) in enumerate(steps):
            progress(i / len(steps), desc=f"measuring the {label}")
            try:
                rows.append(measure_model(path, label=label, cache_dir=s.cache_dir, model_format=fmt,
                                          quant_policy=qp, cache_max_entry_count=0.01, prompt=prompt,
                                          batches=(1, 16) if qp == 0 else (16,), new_tokens=64,
                                          kv_capacity=True, device=s.device, manager=ctx.manager,
                                          owner=user_of(request)))
            except Exception as e:  # noqa: BLE001
                raise user_error(e) from e
        answers = {r["model"]: r.pop("answer", "") for r in rows}
        md = "\n\n".join(f"**{k}:** {v}" for k, v in answers.items())
        return pd.DataFrame(rows), md

    compare.click(do_compare, [job_id, cmp_prompt, cmp_kv], [card, answers], api_name="quantize_compare",
                  concurrency_id="bench", concurrency_limit=1)
    start.click(do_start, [source, name, kind, samples, seqlen, group, dtype, calib, dataset], [jobs, job_id],
                api_name="quantize_start", concurrency_id="admin", concurrency_limit=1)
    cancel.click(do_cancel, job_id, jobs, api_name="quantize_cancel")
    load.click(do_load, job_id, log, api_name="quantize_load", concurrency_id="admin", concurrency_limit=1)
    timer.tick(refresh, job_id, [jobs, log], api_visibility="private", queue=False,
               show_progress="hidden")   # no progress animation each second
    def on_open(src, request: gr.Request = None):
        """The refresh timer runs while the tab is open; the serving model's folder is offered as
        the source to those who may see paths (the page's own copy has it only where all may)."""
        fill = loaded_path() if src == source_default and source_default != loaded_path() else None
        if fill and redact_paths(s, request, fill) == fill:
            return gr.Timer(active=True), fill
        return gr.Timer(active=True), gr.skip()

    tab.select(on_open, source, [timer, source], api_visibility="private", queue=False)

    def quantize_jobs(request: gr.Request) -> list:
        """The job list: the caller's own jobs, an administrator's all."""
        return visible(request)

    gr.api(quantize_jobs, api_name="quantize_jobs", api_visibility="undocumented")
    return timer
