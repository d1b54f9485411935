"""Real LMDeploy servers (marker ``gpu``; LMDeploy from ../shared/gpu-kit): ``lmdeploy serve
api_server`` on TurboMind started by the app's server launcher and used by the remote engine; two of
them behind ``lmdeploy serve proxy`` (one per GPU where there are several)."""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

from engines import models, registry, servers  # noqa: E402
from engines.base import ChatMessage, ChatRequest, EngineError, GenParams  # noqa: E402
from engines.configs import RemoteConfig  # noqa: E402

from tests.conftest import free_port  # noqa: E402

ASK = (ChatMessage("user", "Tell me a story about a lighthouse keeper."),)


def remote(url, **kw):
    return registry.create(models.resolve(url, "/tmp"), RemoteConfig(**kw))


@pytest.fixture
def launcher(tmp_path):
    m = servers.ServerManager(str(tmp_path / "logs"))
    yield m
    m.stop_all()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _api_server(launcher, model, name, proxy=None, gpu=0):
    port = free_port()
    cmd = servers.api_server_command(model, port, backend="turbomind", cache_max_entry_count=0.1,
                                     session_len=4096, proxy_url=proxy)
    return launcher.start(name, cmd, f"http://127.0.0.1:{port}", timeout=300,
                          env={"CUDA_VISIBLE_DEVICES": str(gpu % max(1, _gpus()))})


def test_api_server_on_turbomind_driven_by_the_remote_engine(launcher, tiny_llama):
    srv = _api_server(launcher, tiny_llama.path, "tm")
    eng = remote(srv.url)
    try:
        assert eng.info.backend == "remote"
        p = GenParams(temperature=0, max_new_tokens=48)
        a = "".join(d.text for d in eng.stream(ChatRequest(ASK, p)))
        b = "".join(d.text for d in eng.stream(ChatRequest(ASK, p)))
        # random weights make near-ties everywhere: TurboMind's kernels may break one differently
        assert a and b and a[:16] == b[:16], "greedy answers start alike"
        # abort mid-stream, then the server keeps serving
        req = ChatRequest(ASK, p.replace(max_new_tokens=2000, temperature=0.8))
        it = eng.stream(req)
        next(it)
        eng.abort(req.request_id)
        rest = list(it)
        assert rest[-1].finish_reason == "abort" and sum(1 for _ in rest) < 1500
        assert "".join(d.text for d in eng.stream(ChatRequest(ASK, p)))[:16] == a[:16]
        with pytest.raises(EngineError, match="does not serve"):
            remote(srv.url, remote_model="nope")
        assert "api_server" in " ".join(srv.command) and srv.log_tail()
    finally:
        eng.close()


def test_two_api_servers_behind_the_proxy(launcher, tiny_llama):
    port = free_port()
    proxy = launcher.start("proxy", servers.proxy_command(port), f"http://127.0.0.1:{port}", timeout=120)
    for i in range(2):
        _api_server(launcher, tiny_llama.path, f"node{i}", proxy=proxy.url, gpu=i)
    nodes = json.loads(urllib.request.urlopen(proxy.url + "/nodes/status", timeout=10).read())
    print("proxy nodes:", nodes)
    assert len(nodes) == 2
    eng = remote(proxy.url)
    outs = {}

    def run(i):
        outs[i] = "".join(d.text for d in eng.stream(ChatRequest(ASK, GenParams(temperature=0.7, max_new_tokens=64,
                                                                                seed=i))))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert len(outs) == 16 and all(outs.values())
    finally:
        eng.close()
    logs = [launcher.servers[f"node{i}"].log_tail(200000) for i in range(2)]
    served = [log.count("/v1/chat/completions") for log in logs]
    print("requests per node:", served)
    assert all(n > 0 for n in served), "the proxy spread the users over both servers"
