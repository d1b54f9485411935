"""API fuzzing of /v1 with schemathesis (it reads the endpoint's own OpenAPI schema,
``/v1/openapi.json``): valid and invalid bodies alike get no 5xx, every 4xx is in OpenAI's error
shape, schema-invalid bodies are refused, and the app still answers afterwards. Then ``/chat`` as
Gradio's own schema (``/gradio_api/openapi.json``) documents it: ``POST /call/v2/chat`` and
``GET /call/chat/{event_id}``, and two other endpoints the same way (ui/rest_chat.py checks every
v2 body and unknown event id first: Gradio's own routes answered a missing or unknown field with a
500 and broke the stream of an unknown id off mid-chunk)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_app(cache_dir, smollm2):
    from tests.conftest import AppProcess

    # short replies: every valid body the fuzzer sends is a real generation on this CPU
    app = AppProcess(["--cache-dir", cache_dir, "--api", "--max-new-tokens-limit", "4"])
    yield app
    app.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_url(fuzz_app.url + "v1/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict = {}     # (method, path, status) -> requests sent


def openai_error_shape(ctx, response, case):
    """Every 4xx answers {"error": {"message", "type", "param", "code"}} with a message."""
    if 400 <= response.status_code < 500:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and err["message"]


@schema.parametrize()
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_v1(case):
    from schemathesis.checks import negative_data_rejection, not_a_server_error

    response = case.call_and_validate(checks=[not_a_server_error, negative_data_rejection, openai_error_shape],
                                      timeout=60)
    SEEN[(case.method, case.path, response.status_code)] = SEEN.get((case.method, case.path, response.status_code), 0) + 1


@pytest.fixture(scope="module")
def gradio_schema(fuzz_app):
    return schemathesis.openapi.from_url(fuzz_app.url + "gradio_api/openapi.json")


# /chat's two operations, and two endpoints that only read (the others load models, start jobs and
# servers: fuzzing them would fill the queue, whose 503 "Queue is full" is the right answer there)
chat_ops = schemathesis.pytest.from_fixture("gradio_schema").include(
    path_regex=r"^/gradio_api/call/(v2/)?(chat|engine_info|conversations)(/\{event_id\})?$")


@chat_ops.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_chat_as_gradios_schema_documents_it(case):
    from schemathesis.checks import not_a_server_error

    response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
    SEEN[(case.method, case.path, response.status_code)] = SEEN.get((case.method, case.path, response.status_code), 0) + 1


def test_the_app_still_answers_after_the_fuzzing(fuzz_app):
    import httpx

    print("fuzzed:", SEEN)
    chat = {status: n for (method, path, status), n in SEEN.items() if path == "/chat/completions"}
    assert sum(chat.values()) >= 50 and chat.get(200, 0) > 0 and sum(n for st, n in chat.items() if st == 400) > 0, chat
    posted = {status: n for (method, path, status), n in SEEN.items() if path == "/gradio_api/call/v2/chat"}
    read = {status: n for (method, path, status), n in SEEN.items() if path == "/gradio_api/call/chat/{event_id}"}
    assert posted.get(200, 0) > 0 and posted.get(422, 0) > 0 and read.get(404, 0) > 0, (posted, read)
    r = httpx.post(fuzz_app.url + "v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert fuzz_app.client().predict(api_name="/engine_info")["running"] == 0
