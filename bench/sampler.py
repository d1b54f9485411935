"""A wall-clock stack sampler for the app process (``TURBOSTUDIO_PROFILE=path python app.py``):
where the server's threads spend their time under load, on machines without py-spy (the GPU host).

Every ``interval`` seconds it reads every thread's stack (``sys._current_frames``) and counts, per
thread name, the innermost project-or-library frames; every 10 s (and at SIGTERM) it rewrites ``path`` with
the top entries, so a process ended by a signal still leaves its figures. Off unless the variable is set;
its own cost at 100 samples/s is a few per cent of one core."""
from __future__ import annotations

import collections
import os
import sys
import threading
import time


def _where(frame, depth: int = 3) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


def start(path: str, interval: float = 0.01, depth: int | None = None) -> None:
    depth = depth or int(os.environ.get("TURBOSTUDIO_PROFILE_DEPTH", "3"))
    counts: collections.Counter = collections.Counter()
    names: dict[int, str] = {}
    state = {"samples": 0, "t0": time.time()}

    def dump():
        total = max(1, state["samples"])
        with open(path + ".tmp", "w") as f:
            f.write(f"{state['samples']} samples over {time.time() - state['t0']:.1f} s\n")
            for (thread, where), n in counts.most_common(60):
                f.write(f"{100 * n / total:6.1f}%  {thread:24.24s} {where}\n")
        os.replace(path + ".tmp", path)

    def run():
        me = threading.get_ident()
        last = time.time()
        while True:
            time.sleep(interval)
            for t in threading.enumerate():
                names[t.ident] = t.name
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                counts[(names.get(ident, str(ident)).split(" (")[0], _where(frame, depth))] += 1
            state["samples"] += 1
            if time.time() - last > 10:
                dump()
                last = time.time()

    threading.Thread(target=run, name="turbostudio-sampler", daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        import signal

        def on_term(signum, frame):      # a benchmark ends the app with SIGTERM: keep the last figures
            dump()
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, on_term)
