"""Clients for the app tests: ones that go away (a separate process streams replies through
gradio_client and is killed mid-way: what a closed laptop or a dropped connection looks like to the
server), and the waits they share (a job's first text, every stream released)."""
from __future__ import annotations

import json
import subprocess
import threading
import sys
import time

_CHILD = r"""
import json, sys, time
from gradio_client import Client
url, n, messages, params = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
c = Client(url, verbose=False)
jobs = [c.submit(messages, dict(params, seed=i), api_name="/chat") for i in range(n)]
while not all(any(j.outputs()) for j in jobs):
    time.sleep(0.05)
print("streaming", flush=True)
time.sleep(3600)
"""


def streaming_clients(url: str, n: int, messages: list, params: dict, timeout: float = 120) -> subprocess.Popen:
    """A process with ``n`` replies streaming (each has sent its first text) when this returns;
    ``kill()`` it to disconnect them all at once."""
    p = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(n), json.dumps(messages), json.dumps(params)],
                         stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    line = p.stdout.readline()
    if line.strip() != "streaming":
        p.kill()
        raise AssertionError(f"the client process did not start streaming within {time.time() - t0:.0f} s")
    return p


def first_output(job, timeout: float = 60) -> float:
    """Wait until a gradio_client job has streamed its first text; returns when (perf_counter)."""
    t0 = time.perf_counter()
    while not any(job.outputs()):
        assert not job.done(), job.status()
        assert time.perf_counter() - t0 < timeout, "no first output"
        time.sleep(0.02)
    return time.perf_counter()


def wait_released(client, timeout: float) -> float:
    """Poll ``/engine_info`` until no stream runs (or ``timeout``); returns the seconds waited. The
    caller asserts what it expects of ``running`` afterwards."""
    t0 = time.time()
    while client.predict(api_name="/engine_info")["running"] and time.time() - t0 < timeout:
        time.sleep(0.2)
    return time.time() - t0


class Reader:
    """Reads a stream in its own thread; ``ended`` is set at its end, ``last`` is its last delta."""

    def __init__(self, it):
        self.deltas, self.first, self.ended = [], threading.Event(), threading.Event()
        threading.Thread(target=self._run, args=(it,), daemon=True).start()

    def _run(self, it):
        for d in it:
            self.deltas.append(d)
            self.first.set()
        self.ended.set()

    @property
    def last(self):
        return self.deltas[-1] if self.deltas else None


def wait_until(cond, timeout=2.0):
    """Whether ``cond()`` became true within ``timeout`` seconds (polled every 10 ms)."""
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()
