"""Quantize page: AWQ W4A16, blocked FP8 and dtype casts as queued jobs with a progress bar, a log
with times, cancel, and a one-click load of the result as what it is. The runner
(``engines.quantize.JobRunner``) does the work in subprocesses and keeps the job list on disk.

At the top, the advice for this machine (``engines.quant_advice``: the format and engine measured
to pay on this GPU, with the figures and their date; what runs on a CPU), and the form preselects
that job where it runs here. The comparison card adds the held-out perplexity of each model.

The form opens on what this machine can do: on one without a CUDA GPU a cast (AWQ needs a GPU,
said at the top of the page and next to the disabled Start button when AWQ is chosen), with the
group size and dtype following the model (``engines.quantize.model_facts``). The buttons' own
events refuse with a warning toast and leave the page as it was; the named API endpoints
(``/quantize_start``, ``/quantize_load``, ``/quantize_compare``, ``/quantize_cancel``) raise, so a
client gets the reason as an error."""
from __future__ import annotations

import html
import os
import re
import time

import gradio as gr

from engines.quant_advice import advise, available_backends, engine_for, local_gpus
from engines.quantize import (CAST_DTYPES, HUB_DATASETS, JobRunner, awq_unavailable, describe, folder_size,
                              kv_quant_unavailable, measure_model, model_facts, result_engine, result_load_options)

from .common import Context, may_manage, redact_paths, refuse, require_admin, user_error, user_of

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
HEADERS = ["id", "kind", "source", "output", "state", "size", "error", "time"]
# the card's columns as the page names them (measure_model's keys are the benches' too)
CARD_NAMES = {"memory at load (GiB)": "GPU memory at load (GiB)"}
# held-out tokens the card's perplexity rests on: 1024 on a CPU (two 512-token windows, seconds per model
# for the built-in one), 4096 on a GPU
PPL_TOKENS = {False: 1024, True: 4096}


_SIZES: dict = {}


def _size(path: str) -> int:
    """A folder's size on disk, remembered while the folder is unchanged (the list is redrawn every
    second while the page is open; finished models do not change)."""
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return 0
    if key not in _SIZES:
        if len(_SIZES) > 1000:
            _SIZES.clear()
        _SIZES[key] = folder_size(path)
    return _SIZES[key]


def _secs(t: float | None) -> str:
    if t is None:
        return ""
    return f"{t:.1f} s" if t < 60 else f"{int(t // 60)} min {int(t % 60):02d} s"


def _eta(t: float) -> str:
    return f"~{max(1, round(t))} s left" if t < 90 else f"~{round(t / 60)} min left"


def table(runner: JobRunner, owner: str | None = None, *, everyone: bool = True) -> list[list]:
    """The job list, newest first: every job (``everyone``) or only those ``owner`` started."""
    rows = []
    for j in reversed(runner.jobs(owner, everyone=everyone)):
        eta = j.eta_seconds()
        state = j.state
        if state == "queued":
            state = f"queued (#{runner.queue_position(j.id)})"
        elif state == "running":
            state = f"running {100 * j.fraction:.0f}% {j.stage}" + (f", {_eta(eta)}" if eta else "")
        size = ""
        if j.state == "done" and os.path.isdir(j.output):
            size = f"{_size(j.source) / 2**30:.2f} -> {_size(j.output) / 2**30:.2f} GiB"
        elif j.state == "done":
            state = "done (result since removed)"
        error = j.error if len(j.error) <= 90 else j.error[:88] + "…"     # whole in the bar and the log
        rows.append([j.id, j.kind, os.path.basename(j.source), os.path.basename(j.output), state, size,
                     error, _secs(j.elapsed())])
    return rows or [["", "", "", "", "no jobs yet", "", "", ""]]


def progress_html(runner: JobRunner, job) -> str:
    """A progress bar for ``job`` (the one the page follows): its step, how far, how long, and an
    estimate of what is left once it rests on enough of the step; how it ended once it has."""
    if job is None:
        return ('<div class="ts-job" id="job-progress-none"><span>No job of yours yet: choose one above and '
                'press <b>Start job</b>. Its progress shows here.</span></div>')
    esc = html.escape
    title = f"<b>{esc(job.id)}</b> · {esc(job.kind)} · {esc(os.path.basename(job.source))} → " \
            f"{esc(os.path.basename(job.output))}"
    pct, color, text = 0.0, "var(--color-accent, #f97316)", ""
    if job.state == "queued":
        text = f"queued (#{runner.queue_position(job.id) or '?'} in line): it starts when the job before it ends"
    elif job.state == "running":
        pct = 100 * job.fraction
        step = f"{esc(job.stage or 'starting')}"
        if job.total > 1:
            step += f" {job.done}/{job.total}"
        eta = job.eta_seconds()
        if job.total > 1 and job.done >= job.total:
            left = "finishing: writing the result"
        else:
            left = _eta(eta) if eta is not None else ("estimating the time left…" if job.total > 1 else "")
        text = " · ".join(x for x in (step, f"{_secs(job.elapsed())} elapsed", left) if x)
    elif job.state == "done" and not os.path.isdir(job.output):
        pct, color = 100.0, "var(--neutral-400, #9ca3af)"
        text = f"done in {_secs(job.elapsed())}; its result has since been removed"
    elif job.state == "done":
        pct, color = 100.0, "var(--color-green-500, #22c55e)"
        size = f" · {_size(job.source) / 2**30:.2f} → {_size(job.output) / 2**30:.2f} GiB on disk"
        text = f"done in {_secs(job.elapsed())}{size} · <b>Load result</b> loads it"
        if job.kind == "cast":
            text += f" in {esc(job.params.get('dtype', 'bfloat16'))}"
    else:
        pct, color = 100 * job.fraction, "var(--color-red-500, #ef4444)"
        text = f"{esc(job.state)} after {_secs(job.elapsed())}: {esc(job.error)}"
    return (f'<div class="ts-job" id="job-progress-{esc(job.state)}">'
            f'<div style="display:flex;justify-content:space-between;gap:1em;flex-wrap:wrap;margin-bottom:4px">'
            f'<span>{title}</span><span id="job-progress-text">{text}</span></div>'
            f'<div role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="{pct:.0f}" '
            f'style="height:12px;border-radius:6px;background:var(--neutral-200, #e5e7eb);overflow:hidden">'
            f'<div style="width:{pct:.1f}%;height:100%;background:{color};transition:width .6s"></div></div>'
            f'<div style="font-size:var(--text-sm);opacity:.75;margin-top:2px">{pct:.0f}% · '
            f'{esc(describe(job).split(":")[0])}</div></div>')


def build(ctx: Context, runner: JobRunner, tab: gr.Tab, header: gr.Markdown | None = None):
    """The page; ``header`` (the app's header, where given) follows a result loaded here."""
    s = ctx.settings
    models_dir = os.path.join(s.cache_dir, "models")
    free = runner.gpu_free()
    gpu = free is not None
    awq_why = awq_unavailable(free)           # None where AWQ can run here
    kv_why = kv_quant_unavailable(gpu)
    gpus, backends = local_gpus(), available_backends()
    advice = advise(gpus, backends)
    fp8_engine = engine_for("fp8", gpus, backends) or "auto"     # where an FP8 result loads on this GPU

    def visible(request: gr.Request | None) -> list[list]:
        """The caller's own jobs (an administrator's: all), paths as the caller may see them."""
        return redact_paths(s, request, table(runner, user_of(request), everyone=s.oversees(user_of(request))))

    def own_jobs(request) -> list:
        return runner.jobs(user_of(request), everyone=s.oversees(user_of(request)))

    def loaded_path() -> str:
        info = ctx.manager.info()
        return info.model_path if info else ""

    def focus(jid, request, *, done: bool = False):
        """The job the page follows: the one in the box (if the caller may see it), else the
        caller's running job, else their newest (with ``done``: their newest finished one)."""
        job = runner.get((jid or "").strip()) if (jid or "").strip() else None
        if job is not None and may_manage(s, request, job.owner):
            return job
        if (jid or "").strip():
            return None
        mine = own_jobs(request)
        if done:
            return next((j for j in reversed(mine) if j.state == "done" and os.path.isdir(j.output)), None)
        return next((j for j in mine if j.state == "running"), None) or (mine[-1] if mine else None)

    def suggest(src: str, kind: str, dtype: str, group) -> str:
        """A new output name: the source's name and what the job makes of it."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename((src or "").rstrip("/"))).strip("-.") or "model"
        tail = dtype if kind == "cast" else "fp8" if kind == "fp8" else \
            ("w4a16" if group in (None, 128) else f"w4a16-g{group}")
        name = f"{base[:60]}-{tail}"
        taken = {os.path.basename(j.output) for j in runner.jobs() if j.state in ("queued", "running")}
        n, out = 1, name
        while out in taken or os.path.exists(os.path.join(models_dir, out)) or \
                os.path.exists(os.path.join(models_dir, out + ".partial")):
            n += 1
            out = f"{name}-{n}"
        return out

    def defaults(path: str) -> dict:
        """The form's defaults for the model at ``path``: a job this machine can run, a group size
        that divides the model's widths, a dtype it is not already in."""
        facts = model_facts(path) if path else {"error": "no model is loaded"}
        # the advised job where it runs here: FP8 anywhere (a cast with scales) unless the source is
        # quantized already; AWQ where it runs and its result loads on TurboMind (group size 128);
        # else a cast
        awq_ok = awq_why is None and facts.get("awq_supported") and 128 in facts.get("group_sizes", ())
        kind = {"fp8": "fp8" if "error" not in facts else "cast", "awq": "awq" if awq_ok else "cast"}.get(
            advice.kind, "cast")
        dtype = "float16" if facts.get("dtype") == "bfloat16" else "bfloat16"
        return {"facts": facts, "kind": kind, "dtype": dtype, "group": facts.get("group_size", 128)}

    def model_note(path: str, facts: dict, request=None) -> str:
        if not path:
            return "Give the folder of a model (Transformers layout: config.json and safetensors)."
        if "error" in facts:
            return f"⚠️ {html.escape(redact_paths(s, request, facts['error']))}"
        dims = ", ".join(f"{k} {v}" for k, v in facts["dims"].items())
        sizes = facts["group_sizes"]
        awq = (f"AWQ group sizes that divide its widths: {', '.join(map(str, sizes))}" if sizes else
               "no usual AWQ group size divides its widths") if facts["awq_supported"] else \
            f"AWQ does not support {facts['architecture']}"
        tm = "" if 128 in sizes or not facts["awq_supported"] else \
            " (TurboMind loads AWQ models of group size 128 only)"
        return (f"**{html.escape(os.path.basename(path.rstrip('/')))}**: {facts['architecture']}, stored in "
                f"{facts['dtype'] or 'an unstated dtype'}; {dims}. {awq}{tm}.")

    def start_state(kind):
        """Whether Start can run the chosen job here, and why not."""
        if kind == "awq" and awq_why:
            return gr.update(interactive=False), f"⚠️ Start is off: {awq_why.split(';')[0].split('. ')[0]}."
        return gr.update(interactive=True), ""

    build_path = loaded_path()
    first = defaults(build_path)
    first_name = suggest(build_path, first["kind"], first["dtype"], first["group"]) if build_path else ""

    # ---------------------------------------------------------------- the page
    # What is built into the page is every visitor's: paths on the server only where everyone may
    # see them (``redact_paths`` without a request); those who may get them when they open the tab.
    if gpu:
        machine = (f"**This machine has a CUDA GPU** ({free / 2**30:.0f} GiB free): AWQ W4A16, FP8 and dtype "
                   "casts run here." + (f" ⚠️ {awq_why}" if awq_why else ""))
    else:
        machine = ("**This machine has no CUDA GPU: AWQ W4A16 needs one and cannot run here.** A dtype cast "
                   "runs on the CPU (float32 → bfloat16 halves a model's size), and so does an FP8 job (its result "
                   "loads here dequantized; its speed needs a GPU); the comparison below runs on Transformers; "
                   "KV cache quantization needs a GPU too.")
    gr.Markdown(machine, elem_id="quantize-machine")
    gr.Markdown(advice.markdown(), elem_id="quantize-advice")
    gr.Markdown("Jobs run one at a time in a separate process (a crash cannot take the app down); the list "
                "survives reloads and restarts. AWQ runs LMDeploy's `auto_awq`, calibrated offline on shipped "
                "text unless you give your own. Results appear under "
                f"`{redact_paths(s, None, models_dir)}` (the app's model folder) and load with one click.")
    with gr.Row(equal_height=True):
        source = gr.Textbox(label="Source model folder", value=redact_paths(s, None, build_path), scale=3,
                            elem_id="quantize-source")
        name = gr.Textbox(label="Output name", value=first_name, placeholder="e.g. my-model-w4a16", scale=2,
                          elem_id="quantize-name")
    source_note = gr.Markdown(model_note(redact_paths(s, None, build_path), first["facts"]),
                              elem_id="quantize-model-note")
    awq_label = "AWQ W4A16: 4-bit weights" + (" (needs a CUDA GPU: none here)" if not gpu else "")
    fp8_label = "FP8: 8-bit weights, a scale per 128x128 block, no calibration"
    kind = gr.Radio([("Cast: the weights in another dtype", "cast"), (fp8_label, "fp8"), (awq_label, "awq")],
                    value=first["kind"], label="Job", elem_id="quantize-kind")
    with gr.Group(visible=first["kind"] == "cast", elem_id="quantize-cast") as cast_box:
        with gr.Row(equal_height=True):
            dtype = gr.Dropdown(list(CAST_DTYPES), value=first["dtype"], label="dtype to cast to", scale=1,
                                elem_id="quantize-dtype")
            gr.Markdown("Every floating-point tensor is rewritten in this dtype (integer tensors stay as they "
                        "are) and the config says so. float32 → bfloat16 or float16 halves the size; bfloat16 "
                        "keeps float32's range, float16 more precision. The result loads in its own dtype.",
                        container=True, padding=True)
    with gr.Group(visible=first["kind"] == "fp8", elem_id="quantize-fp8") as fp8_box:
        where = ({"pytorch": "LMDeploy's PyTorch engine (measured faster with FP8 on this GPU)",
                  "turbomind": "TurboMind", "auto": "the engine the app picks"}.get(fp8_engine, fp8_engine)
                 if gpu else "Transformers, dequantized to bfloat16 (FP8 kernels need a GPU)")
        gr.Markdown("The decoder's linear layers (q/k/v/o, gate/up/down) in float8 e4m3 with one scale per "
                    "128x128 block, the rest in 16-bit: about half a 16-bit model's size. The layout LMDeploy "
                    "loads as `model_format fp8` (TurboMind and its PyTorch engine). No calibration data: it runs "
                    f"on a CPU or a GPU in about the time of a cast. Here the result loads on {where}.",
                    container=True, padding=True, elem_id="quantize-fp8-note")
    with gr.Group(visible=first["kind"] == "awq", elem_id="quantize-awq") as awq_box:
        gr.Markdown(f"⚠️ **{awq_why}**" if awq_why else "", visible=bool(awq_why), padding=True,
                               elem_id="quantize-awq-note")
        with gr.Row(equal_height=True):
            samples = gr.Number(128, precision=0, label="calibration samples")
            seqlen = gr.Number(512, precision=0, label="sequence length (tokens)")
            group = gr.Number(first["group"], precision=0, label="group size (must divide the model's widths)",
                              elem_id="quantize-group")
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown([("the shipped text, or your file (offline)", "")] + [(d, d) for d in HUB_DATASETS],
                                  value="", label="calibration data", info="hub datasets need the model hub",
                                  scale=1, elem_id="quantize-dataset")
            calib = gr.File(label="your calibration text (optional .txt)", file_types=[".txt"], type="filepath",
                            height=150, scale=1)
    with gr.Row(equal_height=True):
        start = gr.Button("Start job", variant="primary", scale=1, elem_id="quantize-start",
                          interactive=not (first["kind"] == "awq" and awq_why))
        start_note = gr.Markdown(start_state(first["kind"])[1], elem_id="quantize-start-note")
    suggested = gr.State(first_name)

    gr.Markdown("### Jobs")
    progress = gr.HTML("<div>The progress of your latest job shows here.</div>", elem_id="job-progress",
                       padding=False)
    jobs = gr.Dataframe(visible(None), headers=HEADERS, interactive=False, wrap=True, elem_id="jobs-table",
                        max_height=260, column_widths=["15%", "5%", "13%", "15%", "16%", "9%", "21%", "6%"])
    with gr.Row(equal_height=False):
        job_id = gr.Textbox(label="Job id (click a row; empty: your latest)", scale=3, elem_id="quantize-job-id")
        cancel = gr.Button("Cancel job", scale=1, elem_id="quantize-cancel")
        load = gr.Button("Load result", scale=1, elem_id="quantize-load")
    action = gr.Markdown("", elem_id="quantize-action")
    log = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, elem_id="quantize-log")
    with gr.Accordion("What it bought: the source against the result", open=False, elem_id="quantize-compare"):
        gr.Markdown("Loads both beside the serving model, each in the dtype it is stored in (on a GPU with "
                    "cache_max_entry_count 0.01, the tutorial's experiment), and measures size on disk, the "
                    "weights' bytes in memory (the engine's own count)" + (", the GPU memory each load takes" if gpu
                                                                             else "") +
                    ", tokens/s at batch 1 and 16, their greedy answers to the same prompt, and their "
                    f"perplexity on {PPL_TOKENS[gpu]} tokens of held-out text (the last tenth of the shipped "
                    "calibration text, which calibration never reads; lower is better), computed by the engine "
                    "that serves each model.")
        cmp_prompt = gr.Textbox(value="Explain in two sentences why the sky is blue.", label="prompt")
        cmp_kv = gr.Checkbox(False, label="also KV cache int8 and int4 (quant_policy 8 and 4; and FP8, 16, where "
                                          "the result runs on LMDeploy's PyTorch engine): tokens the cache "
                                          "holds and batch-16 speed",
                             info=f"⚠️ {kv_why}" if kv_why else None, interactive=kv_why is None,
                             elem_id="quantize-kv")
        cmp_int8 = gr.Checkbox(False, visible=not gpu, elem_id="quantize-int8",
                               label="also the source with int8 weights (torchao weight-only, at load, on "
                                     "Transformers): its memory, perplexity and batch-1 speed",
                               info="On this kind of CPU int8 saves memory but decodes slower (the advice above "
                                    "has the figures).")
        compare = gr.Button("Compare source and result", elem_id="quantize-compare-button")
        card = gr.Dataframe(interactive=False, wrap=True, elem_id="quantize-card", visible=False)
        answers = gr.Markdown("*The card and both answers appear here; the comparison loads each model in turn "
                              "(tens of seconds on a CPU).*", min_height=60, elem_id="quantize-answers")
    timer = gr.Timer(1.0, active=False)
    # the named API endpoints: the same work, refusals raised (the buttons' events warn instead)
    with gr.Row(visible=False):
        api_start, api_cancel, api_load, api_compare = (gr.Button(visible=False) for _ in range(4))

    # ---------------------------------------------------------------- the work (refusals raise)
    def start_job(source, name, kind, samples, seqlen, group, dtype, calib, dataset="", request=None):
        require_admin(s, request, "start quantization jobs")
        if not name or not NAME.match(name):
            raise gr.Error("The output name may use letters, digits, '.', '_' and '-' only.", title="Bad name",
                           print_exception=False)
        params = ({"samples": int(samples or 0), "seqlen": int(seqlen or 0), "group_size": int(group or 0),
                   "bits": 4, "calib_file": calib, "dataset": dataset or ""} if kind == "awq" else
                  {} if kind == "fp8" else {"dtype": dtype})
        try:
            s.load_policy().check((source or "").strip())
            job = runner.submit(kind, (source or "").strip(), os.path.join(models_dir, name), params,
                                owner=user_of(request))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return job

    def cancel_job(jid, request=None):
        """A job is cancelled by the user who started it or by an administrator."""
        job = runner.get((jid or "").strip())
        if job is None:
            raise gr.Error(f"There is no job {jid!r}.", title="No such job", print_exception=False)
        if not may_manage(s, request, job.owner):
            raise gr.Error(f"Job {job.id} was started by another user; only they or an administrator "
                           "may cancel it.", title="Not allowed", print_exception=False)
        runner.cancel(job.id)
        time.sleep(0.2)
        return job

    def load_job(jid, request=None) -> str:
        require_admin(s, request, "load models")
        job = focus(jid, request, done=True)
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job (click its row in the list).", title="Not ready",
                           print_exception=False)
        if not os.path.isdir(job.output):
            raise gr.Error(f"The result of job {job.id} has been removed since.", title="No result",
                           print_exception=False)
        try:
            info = ctx.manager.load(job.output, result_engine(job, gpus, backends) if gpu else "auto",
                                    **result_load_options(job, gpu))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        weights = info.extra.get("weights_bytes")
        return (f"Loaded {os.path.basename(info.model.rstrip('/'))} on {info.backend} ({info.device}, {info.dtype}"
                + (f", {weights / 2**30:.2f} GiB of weights" if weights else "") + ").")

    def compare_job(jid, prompt, kv, int8=False, request=None, progress=None):
        require_admin(s, request, "run quantization comparisons")
        import pandas as pd

        job = focus(jid, request, done=True)
        if job is None or job.state != "done":
            raise gr.Error("Choose a finished job (click its row in the list).", title="Not ready",
                           print_exception=False)
        if not (prompt or "").strip():
            raise gr.Error("Give a prompt to compare the answers on.", title="No prompt", print_exception=False)
        rows = []
        fmt = {"awq": "awq", "fp8": "fp8"}.get(job.kind, "hf")
        # FP8 on a GPU: the source and the result on the engine measured faster for FP8 here
        engine = result_engine(job, gpus, backends) if gpu else "auto"
        steps = [("source", job.source, "hf", 0, None), ("result", job.output, fmt, 0, None)]
        kvs = (8, 4) + ((16,) if engine == "pytorch" else ())    # FP8 KV: LMDeploy's PyTorch engine only
        steps += [(f"result, KV {'fp8' if qp == 16 else f'int{qp}'}", job.output, fmt, qp, None) for qp in kvs
                  if kv and kv_why is None]      # KV quantization is LMDeploy's, on a GPU
        if int8 and not gpu:                     # int8 weight-only at load (torchao), Transformers
            steps.append(("source, int8 weights", job.source, "hf", 0, "int8"))
        for i, (label, path, fmt_, qp, wq) in enumerate(steps):
            if progress is not None:
                progress(i / len(steps), desc=f"loading and measuring the {label} ({i + 1} of {len(steps)})")
            try:
                rows.append(measure_model(path, label=label, cache_dir=s.cache_dir, model_format=fmt_,
                                          quant_policy=qp, cache_max_entry_count=0.01, prompt=prompt,
                                          batches=(1,) if wq else (1, 16) if qp == 0 else (16,),
                                          new_tokens=16 if wq else 64, kv_capacity=True, device=s.device,
                                          engine=engine, manager=ctx.manager, owner=user_of(request),
                                          perplexity_tokens=PPL_TOKENS[gpu] if qp == 0 else 0, weight_quant=wq))
            except Exception as e:  # noqa: BLE001
                raise user_error(e) from e
        answers = {r["model"]: r.pop("answer", "") for r in rows}
        md = "\n\n".join(f"**{k}:** {v}" for k, v in answers.items())
        df = pd.DataFrame(rows).rename(columns=CARD_NAMES)
        df = df.dropna(axis=1, how="all")             # what does not apply here (cache share on CPU...)
        if set(df.get("backend", [])) == {"transformers"}:
            df = df.drop(columns=["quant_policy"], errors="ignore")
        return df, md

    def shown(df, md):
        return gr.update(value=df, visible=True), md

    # ---------------------------------------------------------------- the buttons' events (refusals warn)
    def ui_start(source, name, kind, samples, seqlen, group, dtype, calib, dataset, request: gr.Request = None):
        try:
            job = start_job(source, name, kind, samples, seqlen, group, dtype, calib, dataset, request)
        except gr.Error as e:
            return gr.skip(), gr.skip(), gr.skip(), refuse(e)
        gr.Info(f"Job {job.id} queued.")
        return visible(request), job.id, redact_paths(s, request, progress_html(runner, job)), ""

    def ui_cancel(jid, request: gr.Request = None):
        if not (jid or "").strip():        # none chosen: the caller's running (or next queued) job
            mine = [j for j in own_jobs(request) if j.state in ("running", "queued")]
            jid = next((j.id for j in mine if j.state == "running"), mine[0].id if mine else "")
        try:
            job = cancel_job(jid, request)
        except gr.Error as e:
            return gr.skip(), refuse(e)
        return visible(request), f"Job {job.id}: cancel asked."

    def ui_load(jid, request: gr.Request = None):
        try:
            msg = load_job(jid, request)
        except gr.Error as e:
            return refuse(e)
        gr.Info(msg)
        return msg

    def ui_compare(jid, prompt, kv, int8, request: gr.Request = None, progress=gr.Progress()):
        try:
            return shown(*compare_job(jid, prompt, kv, int8, request, progress))
        except gr.Error as e:
            refuse(e)
            return gr.skip(), gr.skip()

    def refresh(jid, request: gr.Request = None):
        job = focus(jid, request)
        text = redact_paths(s, request, runner.read_log(job.id)) if job is not None else ""
        return (visible(request), redact_paths(s, request, progress_html(runner, job)),
                gr.update(value=text, label=f"Log of job {job.id}" if job is not None else "Log"))

    def on_select(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row and row[0] else gr.skip()

    def on_kind(k, src, dt, grp, nm, last):
        box = start_state(k)
        new = suggest(src, k, dt, grp)
        nm_out, last_out = (new, new) if not nm or nm == last else (gr.skip(), last)
        return (gr.update(visible=k == "cast"), gr.update(visible=k == "fp8"), gr.update(visible=k == "awq"),
                box[0], box[1], nm_out, last_out)

    def on_source(src, k, dt, grp, nm, last, request: gr.Request = None):
        path = (src or "").strip()
        d = defaults(path)
        facts = d["facts"]
        grp = d["group"] if "error" not in facts else grp
        dt = d["dtype"] if "error" not in facts else dt
        new = suggest(path, k, dt, grp)
        nm_out, last_out = (new, new) if not nm or nm == last else (gr.skip(), last)
        return model_note(path, facts, request), grp, dt, nm_out, last_out

    def on_details(k, src, dt, grp, nm, last):
        new = suggest(src, k, dt, grp)
        return (new, new) if not nm or nm == last else (gr.skip(), last)

    inputs = [source, name, kind, samples, seqlen, group, dtype, calib, dataset]
    quiet = dict(api_visibility="private", show_progress="hidden")
    start.click(ui_start, inputs, [jobs, job_id, progress, start_note], concurrency_id="admin",
                concurrency_limit=1, **quiet)
    cancel.click(ui_cancel, job_id, [jobs, action], **quiet)
    loaded = load.click(ui_load, job_id, action, concurrency_id="admin", concurrency_limit=1,
                        api_visibility="private", show_progress="minimal")
    if header is not None:
        from .engines import header as header_text

        loaded.then(lambda: header_text(ctx), None, header, api_visibility="private", queue=False,
                    show_progress="hidden")
    compare.click(ui_compare, [job_id, cmp_prompt, cmp_kv, cmp_int8], [card, answers], concurrency_id="bench",
                  concurrency_limit=1, api_visibility="private")
    jobs.select(on_select, None, job_id, queue=False, **quiet)
    kind.change(on_kind, [kind, source, dtype, group, name, suggested],
                [cast_box, fp8_box, awq_box, start, start_note, name, suggested], queue=False, **quiet)
    source.blur(on_source, [source, kind, dtype, group, name, suggested],
                [source_note, group, dtype, name, suggested], queue=False, **quiet)
    source.submit(on_source, [source, kind, dtype, group, name, suggested],
                  [source_note, group, dtype, name, suggested], queue=False, **quiet)
    for comp in (dtype, group):
        comp.change(on_details, [kind, source, dtype, group, name, suggested], [name, suggested], queue=False,
                    **quiet)
    timer.tick(refresh, job_id, [jobs, progress, log], api_visibility="private", queue=False,
               show_progress="hidden")   # no progress animation each second

    # the API: as before, refusals raised
    def api_start_fn(source, name, kind, samples, seqlen, group, dtype, calib, dataset="",
                     request: gr.Request = None):
        job = start_job(source, name, kind, samples, seqlen, group, dtype, calib, dataset, request)
        return visible(request), job.id

    def api_cancel_fn(jid, request: gr.Request = None):
        cancel_job(jid, request)
        return visible(request)

    def api_load_fn(jid, request: gr.Request = None):
        return load_job(jid, request)

    def api_compare_fn(jid, prompt, kv, request: gr.Request = None):
        return compare_job(jid, prompt, kv, False, request)

    api_start.click(api_start_fn, inputs, [jobs, job_id], api_name="quantize_start", concurrency_id="admin",
                    concurrency_limit=1)
    api_cancel.click(api_cancel_fn, job_id, jobs, api_name="quantize_cancel")
    api_load.click(api_load_fn, job_id, action, api_name="quantize_load", concurrency_id="admin",
                   concurrency_limit=1)
    api_compare.click(api_compare_fn, [job_id, cmp_prompt, cmp_kv], [card, answers], api_name="quantize_compare",
                      concurrency_id="bench", concurrency_limit=1)

    def on_open(src, k, dt, grp, nm, last, request: gr.Request = None):
        """The refresh timer runs while the tab is open; the serving model's folder is offered as
        the source to those who may see paths (the page's own copy has it only where all may), with
        the defaults that follow it (group size, dtype, output name); a suggested output name that
        has been taken since the page was built is replaced by a free one."""
        path = loaded_path()
        page_copy = redact_paths(s, None, build_path)
        if path and src == page_copy and (path != build_path or page_copy != path) \
                and redact_paths(s, request, path) == path:
            d = defaults(path)
            new = suggest(path, d["kind"], d["dtype"], d["group"])
            nm_out, last_out = (new, new) if not nm or nm == last else (gr.skip(), last)
            box = start_state(d["kind"])
            return (gr.Timer(active=True), path, model_note(path, d["facts"], request), d["kind"], d["group"],
                    d["dtype"], nm_out, last_out, box[0], box[1])
        if nm and nm == last:
            new = suggest(src, k, dt, grp)
            if new != nm:
                return (gr.Timer(active=True),) + (gr.skip(),) * 5 + (new, new) + (gr.skip(),) * 2
        return (gr.Timer(active=True),) + (gr.skip(),) * 9

    tab.select(refresh, job_id, [jobs, progress, log], api_visibility="private", queue=False,
               show_progress="hidden")      # at once, not a second later with the timer's first tick
    tab.select(on_open, [source, kind, dtype, group, name, suggested],
               [timer, source, source_note, kind, group, dtype, name, suggested, start, start_note],
               api_visibility="private", queue=False)

    def quantize_jobs(request: gr.Request) -> list:
        """The job list: the caller's own jobs, an administrator's all."""
        return visible(request)

    gr.api(quantize_jobs, api_name="quantize_jobs", api_visibility="undocumented")
    return timer
