"""/v1 on TurboMind (marker ``gpu``; the gpu-kit's engine and ui parts): the same OpenAI-parity and
disconnect checks as on Transformers (tests/v1_checks.py), with LMDeploy's own capabilities
(penalties refused by name)."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
pytest.importorskip("openai")

from tests.conftest import AppProcess  # noqa: E402
from tests.v1_checks import check_disconnects, check_parity  # noqa: E402


@pytest.fixture(scope="module")
def tm_api(tiny_llama, tmp_path_factory):
    app = AppProcess(["--model", tiny_llama.path, "--engine", "turbomind", "--cache-max-entry-count", "0.2",
                      "--session-len", "8192", "--api", "--cache-dir", str(tmp_path_factory.mktemp("c"))],
                     timeout=300)
    yield app
    app.stop()


def test_v1_parity_on_turbomind(tm_api):
    check_parity(tm_api, tm_api.client().predict(api_name="/engine_info")["model"])


def test_v1_vanished_clients_on_turbomind(tm_api):
    freed = check_disconnects(tm_api)
    print(f"TurboMind /v1: 50 vanished clients, places free {min(freed):.3f}-{max(freed):.3f} s after the abort")
    assert tm_api.alive()
