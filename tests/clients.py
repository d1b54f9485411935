"""Clients that go away: a separate process streams replies through gradio_client and is killed
mid-way (what a closed laptop or a dropped connection looks like to the server)."""
from __future__ import annotations

import json
import subprocess
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
