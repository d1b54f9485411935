"""Launch and stop OpenAI-compatible servers from the app: ``lmdeploy serve api_server`` for a model
(with the same options as the in-process engines), ``lmdeploy serve proxy`` in front of several,
or any command that serves ``/v1/models``. Each server is a subprocess in its own process group
with its log in a file; ``start`` waits until ``/v1/models`` answers (or the process dies, or the
timeout passes) and reports which.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .base import EngineError


def api_server_command(model: str, port: int, *, backend: str = "turbomind", tp: int = 1,
                       cache_max_entry_count: float = 0.8, quant_policy: int = 0, model_format: str = "hf",
                       session_len: int | None = None, proxy_url: str | None = None,
                       server_name: str = "127.0.0.1") -> list[str]:
    """The `lmdeploy serve api_server` command line for these options (LMDeploy's own flag names)."""
    exe = shutil.which("lmdeploy")
    cmd = [exe] if exe else [sys.executable, "-m", "lmdeploy"]
    cmd += ["serve", "api_server", model, "--server-name", server_name, "--server-port", str(port),
            "--backend", backend, "--tp", str(tp), "--cache-max-entry-count", str(cache_max_entry_count),
            "--quant-policy", str(quant_policy)]
    if model_format != "hf":
        cmd += ["--model-format", model_format]
    if session_len:
        cmd += ["--session-len", str(session_len)]
    if proxy_url:
        cmd += ["--proxy-url", proxy_url]
    return cmd


def proxy_command(port: int, server_name: str = "127.0.0.1") -> list[str]:
    exe = shutil.which("lmdeploy")
    cmd = [exe] if exe else [sys.executable, "-m", "lmdeploy"]
    return cmd + ["serve", "proxy", "--server-name", server_name, "--server-port", str(port)]


@dataclass
class Server:
    name: str
    command: list
    url: str
    log_path: str
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    state: str = "starting"     # starting | ready | failed | stopped

    def log_tail(self, n: int = 8000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


class ServerManager:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.servers: dict[str, Server] = {}
        self._lock = threading.Lock()

    def start(self, name: str, command: list, url: str, *, timeout: float = 600, env: dict | None = None) -> Server:
        with self._lock:
            if name in self.servers and self.servers[name].state in ("starting", "ready"):
                raise EngineError(f"A server named {name!r} is already running.", code="server_exists")
            log_path = os.path.join(self.log_dir, f"{name}.log")
            log = open(log_path, "w")
            try:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **(env or {})})
            except OSError as e:
                log.close()
                raise EngineError(f"Cannot start {command[0]}: {e}", code="server_failed") from e
            srv = Server(name, list(command), url.rstrip("/"), log_path, proc)
            self.servers[name] = srv
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                srv.state = "failed"
                raise EngineError(f"The server {name!r} exited with code {proc.returncode}:\n"
                                  f"{srv.log_tail(1500)}", code="server_failed")
            if self.healthy(srv):
                srv.state = "ready"
                return srv
            time.sleep(0.5)
        self.stop(name)
        srv.state = "failed"
        raise EngineError(f"The server {name!r} did not answer at {srv.url}/v1/models within {timeout:.0f} s.",
                          code="server_timeout")

    @staticmethod
    def healthy(srv: Server) -> bool:
        try:
            urllib.request.urlopen(srv.url + "/v1/models", timeout=2).read()
            return True
        except urllib.error.HTTPError as e:
            return e.code == 401      # up, but wants a key
        except OSError:
            return False

    def stop(self, name: str) -> None:
        srv = self.servers.get(name)
        if srv is None or srv.proc is None:
            return
        if srv.proc.poll() is None:
            try:
                os.killpg(srv.proc.pid, signal.SIGTERM)
                srv.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(10)
            except ProcessLookupError:
                pass
        srv.state = "stopped"

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)

    def status(self) -> list[dict]:
        out = []
        for s in self.servers.values():
            if s.state == "ready" and s.proc is not None and s.proc.poll() is not None:
                s.state = "failed"
            out.append({"name": s.name, "url": s.url, "state": s.state, "pid": s.proc.pid if s.proc else None,
                        "command": " ".join(s.command)})
        return out
