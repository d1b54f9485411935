"""Memory snapshots (NVML or torch for GPUs; /proc for the process) and per-reply speed metrics."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class ReplyMetrics:
    """One reply's speed, as the user saw it (measured where the deltas are consumed)."""

    time: float
    session: str
    backend: str
    model: str
    prompt_tokens: int
    tokens: int
    ttft: float | None        # seconds to the first text
    seconds: float            # whole reply
    finish_reason: str
    owner: str | None = None  # the user who asked (None in an app without users)
    source: str = ""          # the entry point: chat, vision, api, v1, loadtest, compare, ...

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first token."""
        if self.ttft is None or self.tokens < 2 or self.seconds <= self.ttft:
            return self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (self.tokens - 1) / (self.seconds - self.ttft)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        return d


class MetricsLog:
    """A bounded, thread-safe history of reply metrics."""

    def __init__(self, maxlen: int = 2000):
        self._items: deque[ReplyMetrics] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, m: ReplyMetrics) -> None:
        with self._lock:
            self._items.append(m)

    def items(self) -> list[ReplyMetrics]:
        """Every reply kept; who may see which is the UI's rule (``ui.common.sees_own``)."""
        with self._lock:
            return list(self._items)


def gpu_memory() -> list[dict]:
    """Per-GPU memory (bytes) from NVML, else torch; [] without a GPU."""
    gpus, _ = gpu_status()
    if gpus:
        return [{**g, "free": g["total"] - g["used"]} for g in gpus]
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"index": i, "name": torch.cuda.get_device_name(i), "used": total - free,
                        "total": total, "free": free})
        return out
    except Exception:  # noqa: BLE001
        return []


def process_rss() -> int:
    """Resident memory of this process in bytes (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def snapshot() -> dict:
    gpus = gpu_memory()
    return {"time": time.time(), "gpus": gpus, "gpu_used": sum(g["used"] for g in gpus),
            "rss": process_rss()}


NO_GPU = "No NVIDIA GPU"


def gpu_status() -> tuple[list[dict], str]:
    """Per-GPU name, memory, utilisation, temperature and power from NVML; ([], why) without, ``why``
    in words for the page: "No NVIDIA GPU" where there is none (no NVML library, no driver, no
    device), else what keeps the figures from being read."""
    try:
        import pynvml
    except ImportError:
        return [], NO_GPU if not _torch_cuda() else "GPU figures need the nvidia-ml-py package"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver, no library, no GPU
        name = type(e).__name__
        if any(k in name for k in ("LibraryNotFound", "DriverNotLoaded", "NotFound", "NotSupported")):
            return [], NO_GPU
        if "NoPermission" in name:
            return [], "The NVIDIA driver does not let this app read the GPU"
        return [], f"GPU figures cannot be read ({name.removeprefix('NVMLError_').replace('_', ' ')})"
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            try:    # v2 reports the driver's reserved memory apart, as nvidia-smi does
                mem = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            except Exception:  # noqa: BLE001 - older drivers and bindings: v1 counts it as used
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            row = {"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                   "used": int(mem.used), "total": int(mem.total)}
            for key, fn in (("util", lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                            ("temp", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                            ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000)):
                try:
                    row[key] = fn()
                except Exception:  # noqa: BLE001 - not every field exists on every board
                    row[key] = None
            out.append(row)
    except Exception as e:  # noqa: BLE001
        return [], f"GPU figures cannot be read ({e})"
    return out, "" if out else NO_GPU


def _torch_cuda() -> bool:
    """Whether torch sees a CUDA device (only asked when NVML's library is missing)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def human_bytes(n: int | float | None) -> str:
    """Bytes in the unit a person reads: ``538060032`` -> "513 MiB", ``3 * 2**30`` -> "3.0 GiB";
    "?" where unknown."""
    if n is None:
        return "?"
    n = float(n)
    if abs(n) >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.0f} KiB"
    return f"{n:.0f} B"


def cpu_status() -> dict:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"cpu_percent": psutil.cpu_percent(interval=None), "cores": psutil.cpu_count(),
                "ram_used": int(vm.total - vm.available), "ram_total": int(vm.total), "rss": process_rss()}
    except ImportError:
        return {"cpu_percent": None, "cores": os.cpu_count(), "ram_used": None, "ram_total": None,
                "rss": process_rss()}


def metrics_csv(items: list[ReplyMetrics]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = ["time", "session", "owner", "source", "backend", "model", "prompt_tokens", "tokens", "ttft",
            "seconds", "tokens_per_s", "finish_reason"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for m in items:
        w.writerow({k: v for k, v in m.to_dict().items() if k in cols})
    return buf.getvalue()


def gpu_processes() -> dict[int, list[dict]] | None:
    """Per GPU index, the compute processes NVML sees with their memory: [{"pid", "used"}]; None
    where NVML gives no per-process view (no GPU; some containers hide other PIDs)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            out[i] = [{"pid": int(p.pid), "used": int(p.usedGpuMemory or 0)} for p in procs]
        return out
    except Exception:  # noqa: BLE001
        return None


def own_pids() -> set[int]:
    """This process and its descendants (LMDeploy's PyTorch engine runs its model in workers)."""
    pids, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            kids = []
        for k in kids:
            if k not in pids:
                pids.add(k)
                frontier.append(k)
    return pids


class LoadSampler:
    """Running and queued requests, sampled once a second into a bounded history (for the Monitor
    page's rolling plot). Reading two counters a second costs nothing measurable, so it samples even
    when nobody looks; that is what lets the plot show the minutes before the page was opened."""

    def __init__(self, read: "callable", period: float = 1.0, keep_s: float = 600):
        self._read, self.period = read, period
        self.history: deque = deque(maxlen=int(keep_s / period))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="load-sampler")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                running, queued = self._read()
            except Exception:  # noqa: BLE001 - a sample missed is a gap in the plot, no more
                continue
            self.history.append((time.time(), int(running), int(queued)))

    def window(self, seconds: float) -> list[tuple[float, int, int]]:
        cut = time.time() - seconds
        return [s for s in list(self.history) if s[0] >= cut]

    def close(self) -> None:
        self._stop.set()
