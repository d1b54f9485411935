"""Quantization jobs (LMDeploy AWQ W4A16, blocked FP8, dtype casts) as real subprocesses.

* One GPU job runs at a time; the rest wait in a queue, visible with their position.
* Each job is a JSON file under ``<cache_dir>/jobs`` (state, parameters, progress, log path), so the
  list survives a page reload and an app restart. On start-up a job that was running when the app
  died is marked failed ("interrupted") and its partial output removed; queued jobs go on.
* The worker (``engines.quantize_worker``) writes into ``<output>.partial`` and renames at the end;
  the runner removes the ``.partial`` of a cancelled or failed job, so nothing half-written is left
  and nothing unfinished is ever offered for loading.
* Progress lines ``PROGRESS done total stage`` give a progress bar and an estimate of time left,
  measured from the step's own pace (never from the worker's start-up, which can be most of a
  small job) and shown only once it rests on enough of the step. The log has a line per step with
  the seconds since the job started, and how it ended.
* Requests are checked before they are queued (``validate``): the source must be a model of an
  architecture the job supports, the group size must divide the model's dimensions, the output
  must be new and inside the app's data folder, a GPU must be there (AWQ) with enough free memory.
  The GPU is asked about first: on a machine without one, that is the answer, whatever else is asked.
* ``model_facts`` and ``awq_unavailable`` give the page its defaults before anything is asked: a
  job that can run on this machine, a group size that divides the model's dimensions, and why AWQ
  cannot run here where it cannot. ``engines.quant_advice`` says which format pays on this GPU.
* Quality: the shipped calibration text is split once (``CALIB_SHARE``): calibration reads the first
  part (``calibration_text``), the card's perplexity the rest (``heldout_text``), never both.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from .base import EngineError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CALIB = os.path.join(ROOT, "assets", "calib", "python-docstrings.txt")
# Architectures LMDeploy's AWQ knows (lmdeploy/lite/apis/calibrate.py LAYER_TYPE_MAP, v0.18)
AWQ_ARCHS = {"InternLM2ForCausalLM", "InternLM3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Qwen3MoeForCausalLM", "LlamaForCausalLM", "LlavaLlamaForCausalLM", "Phi3ForCausalLM",
             "ChatGLMForConditionalGeneration", "MixtralForCausalLM", "Qwen2VLForConditionalGeneration",
             "Qwen2_5_VLForConditionalGeneration", "MistralForCausalLM"}
FINAL = ("done", "failed", "cancelled")
KINDS = ("cast", "fp8", "awq")
# The shipped calibration text is split at a line boundary: the first CALIB_SHARE of its characters
# are for calibration (AWQ's samples), the rest is held out for the card's perplexity.
CALIB_SHARE = 0.9
# The hub datasets LMDeploy's calibrate() knows; used only where a hub is reachable
HUB_DATASETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext")


class JobError(EngineError):
    code = "job_refused"


@dataclass
class Job:
    id: str
    kind: str                  # awq | fp8 | cast
    source: str
    output: str
    params: dict
    state: str = "queued"      # queued | running | done | failed | cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    total: int = 0
    stage: str = ""
    error: str = ""
    log: str = ""
    owner: str | None = None   # the user who started it (None in an app without users)
    stage_started: float | None = None   # when the worker reported the current step's first progress
    stage_from: int = 0                  # ``done`` at that moment (the pace is measured from there)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left in the current step, from the pace measured since the step began; None
        until that rests on enough: 5% of the step (at least 3 units) and a second of it. (Measured
        from the job's start instead, the worker's start-up, seconds of imports before the first
        tensor, once gave "~3068 s left" for a 21 s job.)"""
        if self.state != "running" or not self.total or self.stage_started is None:
            return None
        now = time.time() if now is None else now
        moved, spent = self.done - self.stage_from, now - self.stage_started
        if moved < max(3, 0.05 * self.total) or spent < 1.0:
            return None
        return spent / moved * (self.total - self.done)

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds the job has run (so far, or in all once finished)."""
        if not self.started:
            return None
        return (self.finished or (time.time() if now is None else now)) - self.started


def _split_point(text: str) -> int:
    """Where the shipped text is cut: the first line start at or after ``CALIB_SHARE`` of it."""
    cut = int(len(text) * CALIB_SHARE)
    nl = text.find("\n", cut)
    return len(text) if nl < 0 else nl + 1


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_text(path: str | None = None) -> str:
    """The text calibration reads from ``path``: of the shipped file only the calibration part
    (the rest is held out for perplexity); a user's own file whole."""
    path = path or DEFAULT_CALIB
    text = _read(path)
    if os.path.realpath(path) == os.path.realpath(DEFAULT_CALIB):
        return text[:_split_point(text)]
    return text


def heldout_text() -> str:
    """The part of the shipped calibration text that calibration never reads (the card's perplexity)."""
    text = _read(DEFAULT_CALIB)
    return text[_split_point(text):]


def _model_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise JobError(f"{path!r} is not a model folder (no config.json).")
    try:
        return json.load(open(cfg))
    except ValueError as e:
        raise JobError(f"{path!r} has an unreadable config.json: {e}") from e


def awq_memory_estimate(cfg: dict, samples: int, seqlen: int, batch_size: int = 1) -> int:
    """Bytes of GPU memory AWQ needs: LMDeploy moves one decoder layer at a time to the GPU in
    fp16, with the embeddings and head, and runs the calibration batch through it; we count the
    largest layer twice (weights and its quantized copy), the embeddings, the activations of a
    calibration batch (hidden and MLP widths), and 1 GiB of workspace."""
    text = cfg.get("text_config", cfg)
    h, inter = text.get("hidden_size", 4096), text.get("intermediate_size", 4 * text.get("hidden_size", 4096))
    vocab = text.get("vocab_size", 32000)
    layer = (4 * h * h + 3 * h * inter) * 2
    embed = 2 * vocab * h * 2
    acts = batch_size * seqlen * (h + inter) * 2 * 4 + samples * seqlen * h * 2
    return 2 * layer + embed + acts + 2**30


CAST_DTYPES = ("bfloat16", "float16", "float32")
GROUP_SIZES = (128, 64, 32, 16)     # offered AWQ group sizes, the usual first; TurboMind loads 128 only


def awq_unavailable(free_gpu_bytes: int | None, *, lmdeploy: bool = True) -> str | None:
    """Why an AWQ job cannot run on this machine (None when it can): it needs a CUDA GPU
    (``free_gpu_bytes`` None: none visible) and, with ``lmdeploy``, LMDeploy installed (its
    ``auto_awq`` does the work)."""
    if free_gpu_bytes is None:
        return ("AWQ needs a CUDA GPU; none is visible on this machine. A dtype cast runs here "
                "(e.g. float32 -> bfloat16 halves the size).")
    if lmdeploy and importlib.util.find_spec("lmdeploy") is None:
        return "AWQ runs LMDeploy's auto_awq, and LMDeploy is not installed (pip install lmdeploy)."
    return None


def kv_quant_unavailable(gpu: bool) -> str | None:
    """Why KV-cache quantization (LMDeploy's ``quant_policy``: 8 int8 and 4 int4 on both engines, 16
    FP8 on its PyTorch engine only) cannot be measured here."""
    if not gpu:
        return ("KV cache int8/int4 (and FP8 on LMDeploy's PyTorch engine) is LMDeploy's and needs a CUDA GPU; "
                "none is visible on this machine.")
    if importlib.util.find_spec("lmdeploy") is None:
        return "KV cache int8/int4/FP8 is LMDeploy's, and LMDeploy is not installed."
    return None


def checkpoint_dtype(cfg: dict) -> str | None:
    """The dtype the checkpoint's config says its weights are stored in (``torch_dtype``, or
    ``dtype`` as Transformers 5 writes it), if it is one we know."""
    text = cfg.get("text_config") or {}
    for d in (cfg.get("torch_dtype"), cfg.get("dtype"), text.get("torch_dtype"), text.get("dtype")):
        if isinstance(d, str) and d.replace("torch.", "") in CAST_DTYPES:
            return d.replace("torch.", "")
    return None


def _dims(cfg: dict) -> dict:
    """The widths an AWQ group must divide: the linears' input sizes (hidden and MLP widths)."""
    text = cfg.get("text_config", cfg)
    names = {"hidden_size": "hidden size", "intermediate_size": "intermediate (MLP) size"}
    return {label: int(text[k]) for k, label in names.items() if isinstance(text.get(k), int) and text[k] > 0}


def group_sizes(cfg: dict) -> list[int]:
    """The offered group sizes that divide every width of the model, largest first."""
    return [g for g in GROUP_SIZES if all(d % g == 0 for d in _dims(cfg).values())]


def group_size_problem(cfg: dict, g) -> str:
    """Why group size ``g`` does not suit the model, in words, with the sizes that would."""
    dims = _dims(cfg)
    if not isinstance(g, int) or g < 1:
        return f"The group size must be a whole number of at least 1; got {g!r}."
    bad = [f"its {k} {d}" for k, d in dims.items() if d % g]
    ok = group_sizes(cfg)
    shape = " and ".join(f"{k} {d}" for k, d in dims.items())
    return (f"The group size must divide the model's widths; {g} does not divide {' or '.join(bad)}. "
            + (f"Group sizes that divide its {shape}: {', '.join(map(str, ok))}." if ok else
               f"None of {', '.join(map(str, GROUP_SIZES))} divides its {shape}."))


def model_facts(path: str) -> dict:
    """What the Quantize page needs to know of a model folder to offer defaults that work: its
    architecture, whether AWQ supports it, the dtype it is stored in, the group sizes that divide
    its widths. ``error`` says why not where ``path`` is no model folder."""
    try:
        cfg = _model_config(path)
    except JobError as e:
        return {"error": e.message}
    arch = (cfg.get("architectures") or ["?"])[0]
    sizes = group_sizes(cfg)
    return {"architecture": arch, "awq_supported": arch in AWQ_ARCHS, "dtype": checkpoint_dtype(cfg),
            "dims": _dims(cfg), "group_sizes": sizes,
            "group_size": 128 if 128 in sizes else (sizes[0] if sizes else 128)}


def result_load_options(job: "Job", gpu: bool) -> dict:
    """The engine options that load a finished job's result as what it is: an AWQ folder as AWQ,
    an FP8 folder as FP8 on a GPU (LMDeploy; on a CPU Transformers dequantizes it to bfloat16, its
    stored dtype), a cast in the dtype it was cast to (the engines' "auto" means float32 on a CPU,
    which would load a bfloat16 cast at twice its size). On a GPU a float32 result is left to
    "auto": the GPU engines run 16-bit."""
    if job.kind == "awq":
        return {"model_format": "awq"}
    if job.kind == "fp8":
        return {"model_format": "fp8"} if gpu else {"dtype": "bfloat16"}
    dtype = job.params.get("dtype", "bfloat16")
    return {} if gpu and dtype == "float32" else {"dtype": dtype}


def result_engine(job: "Job", gpus=None, backends=None) -> str:
    """The engine a finished job's result loads on: for FP8 the one measured faster on this GPU
    (``engines.quant_advice``; LMDeploy's PyTorch engine on Hopper), else "auto" (TurboMind where
    it can). ``gpus`` (``engines.gpus.local_gpus()``) and ``backends`` (the engines installed) are
    asked here when not given."""
    if job.kind != "fp8":
        return "auto"
    from . import quant_advice

    gpus = quant_advice.local_gpus() if gpus is None else gpus
    if not gpus:
        return "auto"
    backends = quant_advice.available_backends() if backends is None else backends
    return quant_advice.engine_for("fp8", gpus, backends) or "auto"


def validate(kind: str, source: str, output: str, params: dict, data_dir: str, *,
             free_gpu_bytes: int | None, hub_offline: bool = False,
             hub_endpoint: str = "https://huggingface.co") -> dict:
    """Refuse a bad request before anything starts; returns the model config. ``hub_offline`` and
    ``hub_endpoint`` (``Settings.hub_offline``/``hub_endpoint``) say whether a hub dataset can be had."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
    if kind == "awq":
        why = awq_unavailable(free_gpu_bytes, lmdeploy=False)    # the runner asks about LMDeploy
        if why:
            raise JobError(why)
    cfg = _model_config(source)
    arch = (cfg.get("architectures") or ["?"])[0]
    out = os.path.realpath(output)
    root = os.path.realpath(data_dir)
    if not (out + os.sep).startswith(root + os.sep) or out == root:
        raise JobError(f"The output must be inside the app's data folder {root}; got {output!r}.")
    if os.path.exists(out) or os.path.exists(out + ".partial"):
        raise JobError(f"The output {output!r} already exists; choose another name.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise JobError(f"Cannot write to {parent!r}.")
    if kind == "cast":
        dtype = params.get("dtype", "bfloat16")
        if dtype not in CAST_DTYPES:
            raise JobError(f"dtype must be one of {', '.join(CAST_DTYPES)}; got {dtype!r}")
        if checkpoint_dtype(cfg) == dtype:
            raise JobError(f"The source is already stored in {dtype}: choose another dtype.")
        return cfg
    if kind == "fp8":
        quant = (cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {})
        if quant:
            raise JobError(f"The source is already quantized ({quant.get('quant_method', '?')}); FP8 needs a "
                           "bfloat16, float16 or float32 model.")
        if not any(f.endswith(".safetensors") for f in os.listdir(source)):
            raise JobError(f"{source!r} has no .safetensors weights; the FP8 job reads safetensors.")
        return cfg
    if arch not in AWQ_ARCHS:
        raise JobError(f"AWQ does not support the architecture {arch} (LMDeploy supports: "
                       f"{', '.join(sorted(AWQ_ARCHS))}).")
    g = params.get("group_size", 128)
    if not isinstance(g, int) or g < 1 or any(d % g for d in _dims(cfg).values()):
        raise JobError(group_size_problem(cfg, g))
    if params.get("bits", 4) != 4:
        raise JobError("W4A16 only: bits must be 4")
    for k, lo, hi in (("samples", 1, 4096), ("seqlen", 16, 32768)):
        v = params.get(k)
        if not isinstance(v, int) or not lo <= v <= hi:
            raise JobError(f"{k} must be a whole number in [{lo}, {hi}]")
    dataset = params.get("dataset") or ""
    if dataset:
        if dataset not in HUB_DATASETS:
            raise JobError(f"unknown calibration dataset {dataset!r}; one of {', '.join(HUB_DATASETS)}")
        from .models import hub_reachable

        if not hub_reachable(hub_offline, hub_endpoint):
            raise JobError(f"The calibration dataset {dataset!r} comes from the model hub, which is not "
                           "reachable from here: use the shipped calibration text or your own .txt file.")
    else:
        calib = params.get("calib_file") or DEFAULT_CALIB
        if not os.path.isfile(calib):
            raise JobError(f"calibration file {calib!r} not found")
    need = awq_memory_estimate(cfg, params["samples"], params["seqlen"], params.get("batch_size", 1))
    if need > free_gpu_bytes:
        raise JobError(f"Not enough GPU memory: this job needs about {need / 2**30:.1f} GiB, "
                       f"{free_gpu_bytes / 2**30:.1f} GiB are free. Lower samples/seqlen or unload a model.")
    return cfg


class JobRunner:
    """Queue and run jobs one at a time, each in a subprocess; state lives on disk."""

    def __init__(self, data_dir: str, *, gpu_free=None, python: str = sys.executable, hub_offline: bool = False,
                 hub_endpoint: str = "https://huggingface.co"):
        self.data_dir = data_dir
        self.hub = {"hub_offline": hub_offline, "hub_endpoint": hub_endpoint}   # Settings' hub fields
        self.folder = os.path.join(data_dir, "jobs")
        os.makedirs(self.folder, exist_ok=True)
        self.python = python
        self.gpu_free = gpu_free or _gpu_free
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._current: Job | None = None
        self._cancel = set()
        self._wake = threading.Event()
        self._stop = False
        self.on_done = None           # callback(job) when a job finishes well
        self._recover()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-runner")
        self._thread.start()

    # ---------------------------------------------------------------- persistence
    def _path(self, job_id: str) -> str:
        return os.path.join(self.folder, f"{job_id}.json")

    def _save(self, job: Job) -> None:
        # a temporary file per writer: the runner's thread and a page's (cancel, progress) can save
        # one job at once, and a shared name made one writer's rename fail (FileNotFoundError, seen
        # in CI); each rename is atomic, the last one wins
        tmp = f"{self._path(job.id)}.{os.getpid()}-{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(job), f, indent=1)
        os.replace(tmp, self._path(job.id))

    def jobs(self, owner: str | None = None, *, everyone: bool = True) -> list[Job]:
        """Every job (``everyone``), or only those ``owner`` started, oldest first."""
        out = []
        for name in os.listdir(self.folder):
            if name.endswith(".json") and not name.endswith(".spec.json"):   # not a worker's spec
                try:
                    out.append(Job(**json.load(open(os.path.join(self.folder, name)))))
                except (ValueError, TypeError, OSError):
                    continue
        if not everyone:
            out = [j for j in out if j.owner == owner]
        return sorted(out, key=lambda j: j.created)

    def get(self, job_id: str) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def _recover(self) -> None:
        for job in self.jobs():
            if job.state == "running":
                job.state, job.error, job.finished = "failed", "interrupted: the app stopped during the job", time.time()
                shutil.rmtree(job.output + ".partial", ignore_errors=True)
                self._save(job)

    # ---------------------------------------------------------------- API
    def submit(self, kind: str, source: str, output: str, params: dict, owner: str | None = None) -> Job:
        """Check and queue a job; ``owner`` (the user who asked) may later cancel it (see the
        Quantize page: its owner or an administrator)."""
        if kind == "awq":
            params = {"samples": 128, "seqlen": 512, "group_size": 128, "bits": 4, **params}
            params["calib_file"] = params.get("calib_file") or DEFAULT_CALIB
        free = self.gpu_free() if kind == "awq" else None
        if kind == "awq" and awq_unavailable(free):
            raise JobError(awq_unavailable(free))
        validate(kind, source, output, params, self.data_dir, free_gpu_bytes=free, **self.hub)
        out = os.path.realpath(output)
        if any(j.output == out for j in self.jobs() if j.state in ("queued", "running")):
            raise JobError(f"A job that writes {output!r} is already queued or running; choose another name.")
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], kind=kind,
                  source=os.path.realpath(source), output=os.path.realpath(output), params=params,
                  owner=owner)
        job.log = os.path.join(self.folder, f"{job.id}.log")
        self._save(job)
        self._wake.set()
        return job

    def queue_position(self, job_id: str) -> int | None:
        queued = [j.id for j in self.jobs() if j.state == "queued"]
        return queued.index(job_id) + 1 if job_id in queued else None

    def cancel(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None or job.state in FINAL:
            return
        with self._lock:
            # remembered even if the runner is just starting this job: _run checks it after Popen
            self._cancel.add(job_id)
            if self._current is not None and self._current.id == job_id:
                if self._proc is not None:
                    _kill(self._proc)
                return
            if job.state == "queued":
                job.state, job.finished, job.error = "cancelled", time.time(), "cancelled by the user"
                self._save(job)

    def wait(self, job_id: str, timeout: float = 600) -> Job:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.get(job_id)
            if job and job.state in FINAL:
                return job
            time.sleep(0.1)
        raise TimeoutError(job_id)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        with self._lock:
            if self._proc is not None:
                _kill(self._proc)
        self._thread.join(timeout=30)

    def read_log(self, job_id: str, tail: int = 20000) -> str:
        job = self.get(job_id)
        if job is None or not os.path.exists(job.log):
            return ""
        with open(job.log, errors="replace") as f:
            return f.read()[-tail:]

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stop:
            nxt = next((j for j in self.jobs() if j.state == "queued"), None)
            if nxt is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run(nxt)

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.id in self._cancel:          # cancelled between the queue read and now
                self._cancel.discard(job.id)
                job.state, job.finished, job.error = "cancelled", time.time(), "cancelled by the user"
                self._save(job)
                return
            self._current = job
        job.state, job.started = "running", time.time()
        job.stage, job.done, job.total, job.stage_started, job.stage_from = "starting the worker", 0, 0, None, 0
        self._save(job)
        spec = os.path.join(self.folder, f"{job.id}.spec.json")
        json.dump(asdict(job), open(spec, "w"))
        with open(job.log, "a") as log:
            def note(text: str) -> None:
                """A log line with the seconds since the job started."""
                log.write(f"[{time.time() - job.started:6.1f} s] {text.rstrip()}\n")
                log.flush()

            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job.id}"
                      + (f", started by {job.owner}" if job.owner else "") + "\n")
            note(f"{describe(job)}")
            proc = subprocess.Popen([self.python, "-u", "-m", "engines.quantize_worker", spec], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            with self._lock:
                self._proc = proc
                if job.id in self._cancel:      # a cancel that came while the worker was starting
                    _kill(proc)
            note(f"worker process {proc.pid} started (it loads torch first: a few seconds)")
            last_save = 0.0
            for line in proc.stdout:
                if line.startswith("PROGRESS "):
                    parts = line.split(maxsplit=3)
                    try:
                        done, total = int(parts[1]), int(parts[2])
                        stage = parts[3].strip() if len(parts) > 3 else ""
                    except (IndexError, ValueError):
                        note(line)
                        continue
                    now = time.time()
                    if stage != job.stage or total != job.total or job.stage_started is None:
                        # a new step: its pace is measured from here (the ETA's base)
                        job.stage_started, job.stage_from = now, done
                        note(f"{stage}: {total} step{'s' if total != 1 else ''}")
                    job.done, job.total, job.stage = done, total, stage
                    if now - last_save > 0.5 or done == total:
                        self._save(job)
                        last_save = now
                else:
                    note(line)
            rc = proc.wait()
            with self._lock:
                cancelled = job.id in self._cancel
                self._cancel.discard(job.id)
                self._proc, self._current = None, None
            job.finished = time.time()
            if rc == 0 and not cancelled and os.path.isdir(job.output):
                job.state = "done"
                note(f"done in {job.finished - job.started:.1f} s: {job.output} "
                     f"({folder_size(job.source) / 2**30:.2f} GiB -> {folder_size(job.output) / 2**30:.2f} GiB)"
                     ", ready to load")
            else:
                shutil.rmtree(job.output + ".partial", ignore_errors=True)
                if cancelled:
                    job.state, job.error = "cancelled", "cancelled by the user"
                    note("cancelled by the user; the partial output was removed")
                else:
                    job.state = "failed"
                    log.flush()
                    job.error = _last_error(job.log) or f"the worker exited with code {rc}"
                    note(f"failed (exit code {rc}): {job.error}; the partial output was removed")
        os.remove(spec)
        self._save(job)
        if job.state == "done" and self.on_done:
            try:
                self.on_done(job)
            except Exception:  # noqa: BLE001
                pass


def describe(job: Job) -> str:
    """What a job does, in a line: kind, source, output and the parameters that matter."""
    p = job.params
    if job.kind == "cast":
        what = f"cast to {p.get('dtype', 'bfloat16')}"
    elif job.kind == "fp8":
        what = "FP8 e4m3 weights, a scale per 128x128 block, no calibration"
    else:
        calib = p.get("dataset") or ("the shipped text" if p.get("calib_file") in (None, "", DEFAULT_CALIB)
                                     else os.path.basename(p["calib_file"]))
        what = (f"AWQ W{p.get('bits', 4)}A16, group size {p.get('group_size')}, calibrated on "
                f"{p.get('samples')} samples of {p.get('seqlen')} tokens from {calib}")
    return f"{what}: {job.source} -> {job.output}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_STAMP = re.compile(r"^\[\s*[0-9.]+ s\] ")


def _last_error(log_path: str) -> str:
    try:
        lines = [_STAMP.sub("", ln.strip()) for ln in open(log_path, errors="replace") if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or ln.startswith(("SystemExit", "Killed")):
            return ln[:500]
    return lines[-1][:500] if lines else ""


def _gpu_free() -> int | None:
    from . import telemetry

    gpus = telemetry.gpu_memory()
    return max((g["free"] for g in gpus), default=None) if gpus else None


# --- what a quantization bought -----------------------------------------------------------------

def folder_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


class _Borrowed:
    """A manager lent to ``loadtest.compare_engines`` without giving it the right to close it."""

    def __init__(self, manager):
        self._manager = manager
        self.submit = manager.submit
        self.info = manager.info

    def close(self):
        pass


def measure_model(path: str, *, label: str, cache_dir: str, model_format: str = "hf", quant_policy: int = 0,
                  cache_max_entry_count: float = 0.01, prompt: str | None = None, batches=(1, 16),
                  new_tokens: int = 128, kv_capacity: bool = False, device: str = "auto",
                  engine: str = "auto", manager=None, owner: str | None = None, dtype: str | None = None,
                  perplexity_tokens: int = 0, weight_quant: str | None = None) -> dict:
    """Load one model the way the app would (TurboMind where it can) and measure what the Quantize
    page's card shows: size on disk; the dtype it runs in and its weights' bytes in memory (the
    engine's own count: the parameters Transformers holds, the checkpoint TurboMind loads); on a GPU
    the GPU memory the load took (NVML's increase: weights, the KV cache at
    ``cache_max_entry_count`` and workspace); tokens/s at each batch size (concurrent streams,
    greedy, ``new_tokens`` each); the greedy answer to ``prompt``; and, with ``kv_capacity``, the
    tokens the KV cache holds (TurboMind's own count, see ``lmdeploy.measure_kv_capacity``); with
    ``perplexity_tokens`` > 0, the perplexity of the held-out part of the shipped calibration text
    (``heldout_text``, never used by calibration) over that many tokens, computed by the engine that
    serves the model (LMDeploy's ``get_ppl``, or Transformers' forward pass), in windows of 512
    tokens, and the number of tokens it rests on. ``weight_quant`` ("int8") loads a Transformers
    model with int8 weight-only quantization at load (``TransformersConfig.weight_quant``).

    Transformers loads the model in ``dtype``, by default the dtype its checkpoint is stored in
    (the engine's "auto" would make a bfloat16 result float32 on a CPU, the size of its source).
    On a CPU there is no "memory at load": the process's resident-memory increase that stood for it
    measured whether the load copied the weights or mapped the file, and what the allocator kept
    from the previous load (seen: 0.485 GiB for a float32 model, 0.054 for its bfloat16 cast loaded
    as float32 right after it), not the model.

    The model loads through the engine manager (``manager.scratch``: the app's manager where one is
    given, so its options and limits apply; else a fresh one on ``cache_dir``) and every request
    takes its road (``submit``, source "quantize", ``owner``)."""
    from . import loadtest, models, registry, telemetry
    from .base import ChatMessage, ChatRequest, GenParams
    from .manager import EngineManager

    base_gpu = telemetry.snapshot()["gpu_used"]
    resolved = models.resolve(path, cache_dir)
    backend, _ = registry.choose(resolved, engine, device=device)
    if backend == "turbomind" and resolved.local:
        # the tutorial's 0.01 can leave a large model less than one session of cache, which
        # TurboMind 0.18 does not survive: take the smallest share that holds one (and say so)
        import torch

        from .lmdeploy import min_cache_ratio, suggested_cache_ratio

        need = min_cache_ratio(resolved.path, resolved.config, 4096, quant_policy, 1, torch.cuda.mem_get_info()[0])
        if need:
            cache_max_entry_count = max(cache_max_entry_count, suggested_cache_ratio(need))
    if backend == "transformers":
        dtype = dtype or checkpoint_dtype(resolved.config or {}) or "auto"
    opts = ({"device": device, "dtype": dtype, "weight_quant": weight_quant} if backend == "transformers" else
            {"cache_max_entry_count": cache_max_entry_count, "session_len": 4096, "model_format": model_format,
             "quant_policy": quant_policy})
    base = manager if manager is not None else EngineManager(cache_dir)
    t0 = time.perf_counter()
    mgr = base.scratch(resolved.path, backend, **opts)
    info = mgr.info()
    weights = info.extra.get("weights_bytes")
    row = {"model": label, "backend": backend, "dtype": info.dtype, "quant_policy": quant_policy,
           "cache_max_entry_count": cache_max_entry_count if backend != "transformers" else None,
           "size on disk (GiB)": round(folder_size(path) / 2**30, 3),
           "weights in memory (GiB)": round(weights / 2**30, 3) if weights else None,
           "load (s)": round(time.perf_counter() - t0, 1)}
    try:
        snap = telemetry.snapshot()
        if snap["gpus"]:
            row["memory at load (GiB)"] = round((snap["gpu_used"] - base_gpu) / 2**30, 3)   # GPU memory
        if kv_capacity and backend in ("turbomind", "pytorch"):
            from .lmdeploy import measure_kv_capacity

            cap = measure_kv_capacity(mgr)
            row["KV cache tokens"] = cap["tokens"] if cap else None
        if perplexity_tokens:
            ppl = getattr(mgr.require(), "perplexity", None)
            if ppl is not None:
                try:
                    r = ppl(heldout_text(), max_tokens=perplexity_tokens)
                    row["perplexity (held-out)"], row["perplexity tokens"] = round(r["perplexity"], 3), r["tokens"]
                except Exception as e:  # noqa: BLE001 - the card shows what it could not measure, and why
                    row["perplexity (held-out)"], row["perplexity error"] = None, str(e).splitlines()[0][:200]
        p = GenParams(temperature=0, max_new_tokens=new_tokens)
        if prompt:
            sub = mgr.submit(ChatRequest((ChatMessage("user", prompt),), p.replace(max_new_tokens=min(new_tokens, 64)),
                                         owner=owner, session=f"card-{label}", source="quantize"))
            row["answer"] = sub.text()[0]
        if batches:
            res = loadtest.compare_engines(lambda _c: _Borrowed(mgr), [label], params=p, repeats=1,
                                           batch=list(batches), owner=owner)
            for r in res:
                row[f"tok/s batch {r['batch']}"] = r.get("tokens_per_s")
                if r.get("error") or r.get("first_error"):
                    row["error"] = r.get("error") or r.get("first_error")
    finally:
        mgr.close()
    return row
