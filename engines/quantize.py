"""Quantization jobs (LMDeploy AWQ W4A16, dtype casts) as real subprocesses.

* One GPU job runs at a time; the rest wait in a queue, visible with their position.
* Each job is a JSON file under ``<cache_dir>/jobs`` (state, parameters, progress, log path), so the
  list survives a page reload and an app restart. On start-up a job that was running when the app
  died is marked failed ("interrupted") and its partial output removed; queued jobs go on.
* The worker (``engines.quantize_worker``) writes into ``<output>.partial`` and renames at the end;
  the runner removes the ``.partial`` of a cancelled or failed job, so nothing half-written is left
  and nothing unfinished is ever offered for loading.
* Progress lines ``PROGRESS done total stage`` give a progress bar and an estimate of time left.
* Requests are checked before they are queued (``validate``): the source must be a model of an
  architecture the job supports, the group size must divide the model's dimensions, the output
  must be new and inside the app's data folder, a GPU must be there (AWQ) with enough free memory.
"""
from __future__ import annotations

import json
import os
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
# The hub datasets LMDeploy's calibrate() knows; used only where a hub is reachable
HUB_DATASETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext")


class JobError(EngineError):
    code = "job_refused"


@dataclass
class Job:
    id: str
    kind: str                  # awq | cast
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

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def eta_seconds(self) -> float | None:
        if self.state != "running" or not self.started or not self.done or not self.total:
            return None
        spent = time.time() - self.started
        return spent / self.done * (self.total - self.done)


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


def validate(kind: str, source: str, output: str, params: dict, data_dir: str, *,
             free_gpu_bytes: int | None, hub_offline: bool = False,
             hub_endpoint: str = "https://huggingface.co") -> dict:
    """Refuse a bad request before anything starts; returns the model config. ``hub_offline`` and
    ``hub_endpoint`` (``Settings.hub_offline``/``hub_endpoint``) say whether a hub dataset can be had."""
    if kind not in ("awq", "cast"):
        raise JobError(f"unknown job kind {kind!r}")
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
        if params.get("dtype", "bfloat16") not in ("float16", "bfloat16", "float32"):
            raise JobError("dtype must be float16, bfloat16 or float32")
        return cfg
    if arch not in AWQ_ARCHS:
        raise JobError(f"AWQ does not support the architecture {arch} (LMDeploy supports: "
                       f"{', '.join(sorted(AWQ_ARCHS))}).")
    g = params.get("group_size", 128)
    text = cfg.get("text_config", cfg)
    dims = {"hidden_size": text.get("hidden_size"), "intermediate_size": text.get("intermediate_size")}
    if not isinstance(g, int) or g < 1 or any(d and d % g for d in dims.values()):
        raise JobError(f"group_size {g} must divide the model's dimensions ({dims}).")
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
    if free_gpu_bytes is None:
        raise JobError("AWQ needs a CUDA GPU; none is visible on this machine.")
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
        tmp = self._path(job.id) + ".tmp"
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
        validate(kind, source, output, params, self.data_dir, free_gpu_bytes=free, **self.hub)
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
        self._save(job)
        spec = os.path.join(self.folder, f"{job.id}.spec.json")
        json.dump(asdict(job), open(spec, "w"))
        with open(job.log, "a") as log:
            proc = subprocess.Popen([self.python, "-u", "-m", "engines.quantize_worker", spec], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            with self._lock:
                self._proc = proc
                if job.id in self._cancel:      # a cancel that came while the worker was starting
                    _kill(proc)
            last_save = 0.0
            for line in proc.stdout:
                if line.startswith("PROGRESS "):
                    parts = line.split(maxsplit=3)
                    try:
                        job.done, job.total = int(parts[1]), int(parts[2])
                        job.stage = parts[3].strip() if len(parts) > 3 else ""
                    except (IndexError, ValueError):
                        log.write(line)
                    if time.time() - last_save > 0.5:
                        self._save(job)
                        last_save = time.time()
                else:
                    log.write(line)
                    log.flush()
            rc = proc.wait()
        with self._lock:
            cancelled = job.id in self._cancel
            self._cancel.discard(job.id)
            self._proc, self._current = None, None
        job.finished = time.time()
        if rc == 0 and not cancelled and os.path.isdir(job.output):
            job.state = "done"
        else:
            shutil.rmtree(job.output + ".partial", ignore_errors=True)
            if cancelled:
                job.state, job.error = "cancelled", "cancelled by the user"
            else:
                job.state = "failed"
                job.error = _last_error(job.log) or f"the worker exited with code {rc}"
        os.remove(spec)
        self._save(job)
        if job.state == "done" and self.on_done:
            try:
                self.on_done(job)
            except Exception:  # noqa: BLE001
                pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_error(log_path: str) -> str:
    try:
        lines = [ln.strip() for ln in open(log_path, errors="replace") if ln.strip()]
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
                  engine: str = "auto", manager=None, owner: str | None = None) -> dict:
    """Load one model the way the app would (TurboMind where it can) and measure what the Quantize
    page's card shows: size on disk, the GPU memory the load took (NVML, the load's increase; the
    process's resident memory on a CPU), tokens/s at each batch size (concurrent streams, greedy,
    ``new_tokens`` each), the greedy answer to ``prompt``, and, with ``kv_capacity``, the tokens the
    KV cache holds (TurboMind's own count, see ``lmdeploy.measure_kv_capacity``).

    The model loads through the engine manager (``manager.scratch``: the app's manager where one is
    given, so its options and limits apply; else a fresh one on ``cache_dir``) and every request
    takes its road (``submit``, source "quantize", ``owner``)."""
    from . import loadtest, models, registry, telemetry
    from .base import ChatMessage, ChatRequest, GenParams
    from .manager import EngineManager

    base_gpu, base_rss = telemetry.snapshot()["gpu_used"], telemetry.process_rss()
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
    opts = ({"device": device} if backend == "transformers" else
            {"cache_max_entry_count": cache_max_entry_count, "session_len": 4096, "model_format": model_format,
             "quant_policy": quant_policy})
    base = manager if manager is not None else EngineManager(cache_dir)
    t0 = time.perf_counter()
    mgr = base.scratch(resolved.path, backend, **opts)
    row = {"model": label, "backend": backend, "quant_policy": quant_policy,
           "cache_max_entry_count": cache_max_entry_count if backend != "transformers" else None,
           "size on disk (GiB)": round(folder_size(path) / 2**30, 3), "load (s)": round(time.perf_counter() - t0, 1)}
    try:
        snap = telemetry.snapshot()
        mem = snap["gpu_used"] - base_gpu if snap["gpus"] else telemetry.process_rss() - base_rss
        row["memory at load (GiB)"] = round(mem / 2**30, 3)
        if kv_capacity and backend in ("turbomind", "pytorch"):
            from .lmdeploy import measure_kv_capacity

            cap = measure_kv_capacity(mgr)
            row["KV cache tokens"] = cap["tokens"] if cap else None
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
