"""``/chat`` through Gradio's REST protocol on the app's own routes (ui/rest_chat.py).

The fast tests launch a real Gradio server in this process with a test endpoint registered twice:
as ``chat`` (served by :class:`ui.rest_chat.RestChat`) and as ``chat_gradio`` (Gradio's own queue),
so every answer of the new routes is compared with Gradio's own answer to the same request. The
slow tests drive the real app (SmolLM2) with plain HTTP."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import AsyncIterator

import pytest

gr = pytest.importorskip("gradio")

from ui import rest_chat  # noqa: E402
from ui.rest_chat import RestChat  # noqa: E402

USERS = [("ann", "pw1")]


class _Log:
    def __init__(self):
        self.started, self.cancelled, self.requests = [], [], []


LOG = _Log()


async def endpoint(messages: list, params: dict | None = None, conversation_id: str | None = None,
                   request: gr.Request = None) -> AsyncIterator[str]:
    """A test endpoint with /chat's inputs: cumulative text, and failures on demand."""
    params = params or {}
    LOG.requests.append({"user": getattr(request, "username", None),
                         "session": getattr(request, "session_hash", None), "conversation": conversation_id})
    if messages == ["refuse"]:
        raise gr.Error("Refused on purpose.", title="Invalid input", print_exception=False)
    if messages == ["crash"]:
        raise RuntimeError("an internal detail the client must not see")
    tag = params.get("tag", "")
    LOG.started.append(tag)
    text = ""
    try:
        await asyncio.sleep(params.get("first_delay", 0))
        for i in range(int(params.get("n", 3))):
            text += f" t{i}"
            yield text
            await asyncio.sleep(params.get("delay", 0))
    except (asyncio.CancelledError, GeneratorExit):
        LOG.cancelled.append(tag)
        raise


@pytest.fixture(scope="module")
def server():
    from tests.conftest import free_port

    with gr.Blocks() as demo:
        gr.api(endpoint, api_name="chat")
        gr.api(endpoint, api_name="chat_gradio")
    demo.queue()
    port = free_port()
    global REST
    REST = RestChat(endpoint, ("messages", "params", "conversation_id"))
    routes = REST.routes()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, auth=USERS,
                app_kwargs={"routes": routes})
    url = f"http://127.0.0.1:{port}/"
    # log in as ann: Gradio's own /login sets the access-token cookie
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(urllib.request.Request(url + "login", data=b"username=ann&password=pw1", method="POST"))
    assert any(c.name.startswith("access-token") for c in jar), "login failed"
    yield url, opener
    demo.close()


def post(server, body, api="chat", raw: bytes | None = None, login=True):
    url, opener = server
    req = urllib.request.Request(f"{url}gradio_api/call/{api}", data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        r = (opener.open if login else urllib.request.urlopen)(req, timeout=30)
        return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:       # Gradio's own 500 is plain text
            return e.code, raw.decode(errors="replace")


def events(server, event_id, api="chat", login=True) -> list[tuple[str, object]]:
    url, opener = server
    req = urllib.request.Request(f"{url}gradio_api/call/{api}/{event_id}")
    out, kind = [], None
    with (opener.open if login else urllib.request.urlopen)(req, timeout=30) as resp:
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                out.append((kind, json.loads(line[5:])))
    return out


def both(server, body):
    """The end event of the same request through the new routes and through Gradio's queue."""
    ends = []
    for api in ("chat", "chat_gradio"):
        status, got = post(server, body, api)
        assert status == 200, got
        evs = events(server, got["event_id"], api)
        ends.append((evs[-1], evs))
    return ends


M = [{"role": "user", "content": "hi"}]


def test_a_gradio_without_its_routes_is_refused_at_launch():
    """If a Gradio release moves the functions these routes rely on (its credential check among
    them), the app must not serve without them: ``check`` (called by app.py at launch) says so."""
    from fastapi import FastAPI

    rest = RestChat(endpoint, ("messages", "params", "conversation_id"))
    with pytest.raises(RuntimeError, match="TURBOSTUDIO_REST_CHAT=0"):
        rest.check(FastAPI())


def test_streams_like_gradio_queue(server):
    (ours, our_events), (theirs, _) = both(server, {"data": [M, {"n": 4, "delay": 0.02}, None]})
    assert ours == theirs == ("complete", [" t0 t1 t2 t3"])
    # every update is the reply so far, growing, and the last one is the complete text
    texts = [d[0] for k, d in our_events if k == "generating"]
    assert texts and texts[-1] == " t0 t1 t2 t3" and all(b.startswith(a) for a, b in zip(texts, texts[1:]))


@pytest.mark.parametrize("messages", ["refuse", "crash"])
def test_errors_are_gradios_payloads(server, messages):
    (ours, _), (theirs, _) = both(server, {"data": [[messages], {}, None]})
    assert ours == theirs and ours[0] == "error"
    if messages == "refuse":
        assert ours[1]["error"] == "Refused on purpose." and ours[1]["title"] == "Invalid input"
    else:          # an internal failure stays hidden, as Gradio hides it
        assert ours[1] == {"error": None}


@pytest.mark.parametrize("raw", [b'{"x": 1}', b"{not json", b'{"data": "not a list"}'])
def test_malformed_bodies_get_fastapis_422(server, raw):
    ours, theirs = post(server, None, "chat", raw=raw), post(server, None, "chat_gradio", raw=raw)
    assert ours[0] == theirs[0] == 422
    assert [e["loc"] for e in ours[1]["detail"]] == [e["loc"] for e in theirs[1]["detail"]]


def test_missing_inputs_take_their_defaults_and_extra_ones_are_named(server):
    status, got = post(server, {"data": [M]})
    assert events(server, got["event_id"])[-1] == ("complete", [" t0 t1 t2"])
    status, got = post(server, {"data": []})
    kind, payload = events(server, got["event_id"])[-1]
    assert kind == "error" and payload["error"].startswith("/chat needs messages")
    status, got = post(server, {"data": [M, {}, None, "extra"]})
    kind, payload = events(server, got["event_id"])[-1]
    assert kind == "error" and "at most 3 inputs" in payload["error"] and "sent 4" in payload["error"]


def test_v2_inputs_by_name_as_gradios_openapi_schema_documents(server):
    """``POST /call/v2/chat`` (the form in /gradio_api/openapi.json): the same answer as Gradio's own
    for a good body; a missing, unknown or mistyped field is a 422 naming it (Gradio's own: a 500)."""
    good = {"messages": M, "params": {"n": 2}}
    ours, theirs = post(server, good, "v2/chat"), post(server, good, "v2/chat_gradio")
    assert ours[0] == theirs[0] == 200
    assert events(server, ours[1]["event_id"], "v2/chat")[-1] == ("complete", [" t0 t1"])
    assert events(server, theirs[1]["event_id"], "chat_gradio")[-1] == ("complete", [" t0 t1"])
    _, got = post(server, {"messages": M, "session_hash": "named"}, "v2/chat")
    assert events(server, got["event_id"])[-1] == ("complete", [" t0 t1 t2"])
    assert LOG.requests[-1]["session"] == "named"
    for body, loc, typ in [({"params": {}}, ["body", "messages"], "missing"),
                           ({"messages": M, "bogus": 1}, ["body", "bogus"], "extra_forbidden"),
                           ({"messages": M, "session_hash": 5}, ["body", "session_hash"], "string_type"),
                           ([M], ["body"], "model_type")]:
        status, detail = post(server, body, "v2/chat")
        assert status == 422 and detail["detail"][0]["loc"] == loc and detail["detail"][0]["type"] == typ, detail
        # another endpoint's v2 body is checked the same way before Gradio's route has it (Gradio's
        # own route answered these with a 500)
        other = post(server, body, "v2/chat_gradio")
        assert other[0] == 422 and other[1]["detail"][0]["loc"] == loc, other
    assert post(server, b"\xff\xfe not utf-8", "v2/chat_gradio", raw=b"\xff\xfe not utf-8")[0] == 422
    assert post(server, b"\xff\xfe", "v2/chat", raw=b"\xff\xfe")[0] == 422
    status, detail = post(server, {}, "v2/no_such_endpoint")
    assert status == 404 and "no_such_endpoint" in detail["detail"]


def test_other_endpoints_values_of_the_wrong_type_are_422s_naming_the_input(server):
    """A value whose type the endpoint's api info does not allow is refused before Gradio runs it
    (Gradio's own answer for a number box given "x": ``{"error": null}``), by position and by name;
    each input's own default passes, and so does a value of the right type."""
    status, detail = post(server, {"data": ["not a list", {}, None]}, "chat_gradio")
    assert status == 422 and detail["detail"][0]["loc"] == ["body", "data", 0]
    assert detail["detail"][0]["msg"] == "Input should be a valid array (messages; got str)"
    status, detail = post(server, {"data": [M, 3, None]}, "chat_gradio")
    assert status == 422 and "(params; got int)" in detail["detail"][0]["msg"]
    status, detail = post(server, {"messages": M, "conversation_id": True}, "v2/chat_gradio")
    assert status == 422 and detail["detail"][0]["loc"] == ["body", "conversation_id"]
    assert detail["detail"][0]["type"] == "string_type"
    status, got = post(server, {"data": [M, None, None]}, "chat_gradio")
    assert status == 200 and events(server, got["event_id"], "chat_gradio")[-1][0] == "complete"


def test_the_type_check_reads_gradios_schemas():
    from ui.rest_chat import _accepts

    assert _accepts({"type": "string"}, "a") and _accepts({"type": "string"}, 1) is False
    assert _accepts({"type": "number"}, 1.5) and _accepts({"type": "number"}, True) is False
    assert _accepts({"type": "integer"}, 2.0) and _accepts({"type": "integer"}, 2.5) is False
    assert _accepts({"type": "string", "enum": [0, 4, 8]}, 8)          # Gradio lists integer choices as strings
    assert _accepts({"oneOf": [{"type": "null"}, {"type": "string"}]}, None)
    assert _accepts({"oneOf": [{"type": "null"}, {"type": "string"}]}, 3) is False
    assert _accepts({"$defs": {}, "properties": {}}, 3) is None          # a file's model: not judged here
    assert _accepts({}, 3) is None


def test_other_endpoints_rest_bodies_are_counted_then_gradios(server):
    """Another endpoint's ``POST /call/{name}``: left-out inputs with a default are filled in, a
    missing required one or a surplus is a 422 naming it (Gradio's own answer: ``{"error": null}``),
    and a well-formed call is Gradio's own."""
    status, got = post(server, {"data": [M]}, "chat_gradio")       # params, conversation_id: defaults
    assert status == 200 and events(server, got["event_id"], "chat_gradio")[-1] == ("complete", [" t0 t1 t2"])
    status, detail = post(server, {"data": []}, "chat_gradio")
    assert status == 422 and detail["detail"][0]["msg"] == "Field required: messages"
    status, detail = post(server, {"data": [M, {}, None, 1]}, "chat_gradio")
    assert status == 422 and "takes 3 inputs (messages, params, conversation_id)" in detail["detail"][0]["msg"]
    assert post(server, {"data": []}, "no_such_endpoint")[0] == 404


def test_unknown_event_ids_of_any_endpoint_are_404s(server):
    """Gradio's own GET broke its stream off mid-chunk for an id its queue does not hold."""
    for path in ("chat_gradio/" + "0" * 32, "v2/chat_gradio/abc", "v2/chat"):
        with pytest.raises(urllib.error.HTTPError) as e:
            events(server, path.rsplit("/", 1)[1], path.rsplit("/", 1)[0])
        assert e.value.code == 404 and "waiting to be read" in e.value.read().decode()


def test_credentials_are_gradios(server):
    ours = post(server, {"data": [M]}, "chat", login=False)
    theirs = post(server, {"data": [M]}, "chat_gradio", login=False)
    assert ours == theirs and ours[0] == 401
    status, got = post(server, {"data": [M]})     # logged in: the handler sees the user
    events(server, got["event_id"])
    assert LOG.requests[-1]["user"] == "ann"
    with pytest.raises(urllib.error.HTTPError) as e:      # reading someone's events needs a login too
        events(server, got["event_id"], login=False)
    assert e.value.code == 401


def test_session_hash_is_the_clients_or_the_event_id(server):
    _, got = post(server, {"data": [M], "session_hash": "my-session"})
    events(server, got["event_id"])
    assert LOG.requests[-1]["session"] == "my-session"
    _, got = post(server, {"data": [M]})
    events(server, got["event_id"])
    assert LOG.requests[-1]["session"] == got["event_id"]


def test_unknown_read_and_reread_ids(server):
    url, opener = server
    with pytest.raises(urllib.error.HTTPError) as e:
        events(server, "0" * 32)
    assert e.value.code == 404 and "is waiting to be read" in e.value.read().decode()
    _, got = post(server, {"data": [M, {"n": 3, "delay": 0.3}]})
    first = threading.Thread(target=events, args=(server, got["event_id"]))
    first.start()
    time.sleep(0.2)
    with pytest.raises(urllib.error.HTTPError) as e:      # a second reader of the same request
        events(server, got["event_id"])
    assert e.value.code == 409
    first.join(10)
    with pytest.raises(urllib.error.HTTPError) as e:      # read to its end: gone
        events(server, got["event_id"])
    assert e.value.code == 404


def test_gradios_own_event_ids_are_still_read(server):
    """An event posted to Gradio's queue, read on the /chat URL: Gradio's own route answers."""
    _, got = post(server, {"data": [M, {}, None]}, "chat_gradio")
    assert events(server, got["event_id"], "chat")[-1] == ("complete", [" t0 t1 t2"])


def test_a_reader_that_leaves_aborts_the_request(server):
    url, opener = server
    _, got = post(server, {"data": [M, {"n": 200, "delay": 0.05, "tag": "leaver"}]})
    resp = opener.open(f"{url}gradio_api/call/chat/{got['event_id']}", timeout=30)
    resp.readline()
    resp.close()              # the client vanishes mid-stream
    deadline = time.time() + 5
    while "leaver" not in LOG.cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert "leaver" in LOG.cancelled


def test_a_request_nobody_reads_is_aborted(server, monkeypatch):
    monkeypatch.setattr(rest_chat, "UNCLAIMED_S", 0.5)
    _, got = post(server, {"data": [M, {"n": 200, "delay": 0.05, "tag": "unread"}]})
    deadline = time.time() + 5
    while "unread" not in LOG.cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert "unread" in LOG.cancelled
    with pytest.raises(urllib.error.HTTPError) as e:
        events(server, got["event_id"])
    assert e.value.code == 404


def test_posting_without_reading_is_bounded(server, monkeypatch):
    monkeypatch.setattr(rest_chat, "UNREAD_MAX", 2)
    ids = [post(server, {"data": [M, {"n": 1}]}) for _ in range(3)]
    assert [s for s, _ in ids] == [200, 200, 503] and "waiting to be read" in ids[2][1]["detail"]
    for _, got in ids[:2]:        # reading them makes room again
        events(server, got["event_id"])
    assert post(server, {"data": [M, {"n": 1}]})[0] == 200


def test_requests_aborted_unread_give_their_room_back(server, monkeypatch):
    """The unread count (kept as a counter, not recounted per POST) drops when a request nobody read
    is aborted, as when one is read: a leak here would end in every POST refused."""
    monkeypatch.setattr(rest_chat, "UNREAD_MAX", REST.unread + 1)   # (earlier tests' unread requests)
    monkeypatch.setattr(rest_chat, "UNCLAIMED_S", 0.3)
    assert post(server, {"data": [M, {"n": 1}]})[0] == 200
    assert post(server, {"data": [M, {"n": 1}]})[0] == 503
    time.sleep(0.8)
    status, got = post(server, {"data": [M, {"n": 1}]})
    assert status == 200
    events(server, got["event_id"])
    assert post(server, {"data": [M, {"n": 1}]})[0] == 200


def test_a_slow_first_token_gets_heartbeats(server, monkeypatch):
    monkeypatch.setattr(rest_chat, "HEARTBEAT_S", 0.2)
    _, got = post(server, {"data": [M, {"first_delay": 0.7, "n": 1}]})
    evs = events(server, got["event_id"])
    assert [k for k, _ in evs].count("heartbeat") >= 2 and evs[-1] == ("complete", [" t0"])


# ---------------------------------------------------------------------- the real app
def _call_chat(url, messages, params, conversation_id=None):
    body = json.dumps({"data": [messages, params, conversation_id]}).encode()
    req = urllib.request.Request(url + "gradio_api/call/chat", data=body, headers={"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(req, timeout=60))["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/chat/{event_id}", timeout=120)


@pytest.mark.slow
def test_real_app_rest_chat_streams_and_a_vanished_client_frees_its_place(app_server):
    from tests.clients import wait_released

    with _call_chat(app_server.url, [{"role": "user", "content": "Name three colors."}],
                    {"max_new_tokens": 12, "temperature": 0}) as resp:
        body = resp.read().decode()
    assert "event: complete" in body
    final = json.loads(body.rsplit("event: complete\ndata:", 1)[1])[0]
    assert final.strip()
    # the same request through gradio_client (Gradio's queue) gives the same greedy text
    same = app_server.client().predict([{"role": "user", "content": "Name three colors."}],
                                       {"max_new_tokens": 12, "temperature": 0}, None, api_name="/chat")
    assert same == final
    # eight clients leave mid-stream: nothing keeps running
    for _ in range(8):
        resp = _call_chat(app_server.url, [{"role": "user", "content": "Count to one hundred."}],
                          {"max_new_tokens": 400})
        resp.readline()
        resp.close()
    client = app_server.client()
    wait_released(client, 30)
    assert client.predict(api_name="/engine_info")["running"] == 0


@pytest.mark.slow
def test_real_app_rest_chat_fuzzed_bodies_get_answers_not_crashes(app_server):
    """Random bodies (hypothesis) at the real app's ``/chat``: every POST is taken (200) or refused
    with FastAPI's 422, every request ends with ``complete`` or an error event *that says what was
    wrong* (an internal failure shows as ``{"error": null}``), and the app keeps serving."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20)
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                               max_leaves=8)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | scalars,
                                     "content": st.text(max_size=40) | json_values})
    valid = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=40)}),
                     min_size=1, max_size=2)
    messages = valid | st.lists(message, max_size=3) | json_values
    param = st.sampled_from(["temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "max_new_tokens", "x"])
    params = st.dictionaries(param, json_values, max_size=4) | st.just({}) | json_values
    conversation = st.none() | st.text(max_size=12) | st.integers()
    bodies = st.tuples(messages, params, conversation, st.integers(0, 4)).map(
        lambda t: {"data": list(t[:3])[:t[3]] if t[3] < 3 else list(t[:3])})

    seen = {"complete": 0, "error": 0, "422": 0}

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies)
    def one(body):
        data = body["data"]
        if len(data) > 1 and isinstance(data[1], dict):        # keep replies short: CPU time
            n = data[1].get("max_new_tokens")
            if not isinstance(n, int) or n > 4:
                data[1]["max_new_tokens"] = 2
        elif len(data) > 1 or len(data) == 1:
            data[1:2] = [{"max_new_tokens": 2}]
        req = urllib.request.Request(app_server.url + "gradio_api/call/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            event_id = json.load(urllib.request.urlopen(req, timeout=30))["event_id"]
        except urllib.error.HTTPError as e:
            assert e.code == 422, (body, e.code)
            seen["422"] += 1
            return
        with urllib.request.urlopen(f"{app_server.url}gradio_api/call/chat/{event_id}", timeout=120) as resp:
            text = resp.read().decode()
        last = text.strip().rsplit("event:", 1)[1]
        kind, _, data_line = last.partition("\n")
        kind = kind.strip()
        assert kind in ("complete", "error"), (body, text[-300:])
        if kind == "error":
            payload = json.loads(data_line[5:])
            assert payload.get("error"), f"an internal failure for {body}: {text[-300:]}"
        seen[kind] += 1

    one()
    print("fuzzed /chat:", seen)
    assert seen["complete"] and seen["error"]
    assert "/chat failed" not in app_server.output()      # ui/rest_chat.py logs an internal failure so
    assert app_server.client().predict(api_name="/engine_info")["running"] == 0


@pytest.mark.slow
def test_real_app_every_typed_input_refuses_a_value_of_the_wrong_type_by_name(app_server):
    """Every typed input of every endpoint of the real app, given a value of the wrong type over
    Gradio's REST protocol: a 422 that names that input, before anything runs (Gradio's own routes
    ran 94 such calls: 52 answered ``{"error": null}``, one an internal error, 10 as if valid;
    ``bench/probe_rest_types.py``). The app keeps serving."""
    from bench.probe_rest_types import WRONG, probe

    port = int(app_server.url.rstrip("/").rsplit(":", 1)[1])
    res = probe(port)
    assert len(res) >= 50 and set(res.values()) == {"HTTP 422"}, res
    info = json.load(urllib.request.urlopen(app_server.url + "gradio_api/info"))["named_endpoints"]
    p = next(p for p in info["/conversations"]["parameters"] if p["type"].get("type") == "string")
    req = urllib.request.Request(app_server.url + "gradio_api/call/v2/conversations",
                                 data=json.dumps({p["parameter_name"]: WRONG["string"]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    detail = json.loads(e.value.read())["detail"][0]
    assert e.value.code == 422 and detail["loc"] == ["body", p["parameter_name"]]
    assert p["parameter_name"] in detail["msg"]
    assert app_server.client().predict(api_name="/engine_info")["running"] == 0


@pytest.mark.slow
def test_real_app_malformed_uploads_are_400s_and_uploads_still_work(app_server):
    """Gradio's multipart ``/upload`` answered a ``files`` part that is not a file (a plain field, or a
    file part with an empty name) with a 500 and a traceback (``ui/gradio_patches.UploadGuard``):
    now a 400 saying what an upload is; a real upload right after still works."""
    import httpx

    url = app_server.url + "gradio_api/upload"
    app_server.output()                                      # (flushes the log)
    before = os.path.getsize(app_server.log_path)
    for files in ({"files": (None, "not a file")}, {"files": ("", b"no name")}):
        r = httpx.post(url, files=files, timeout=30)
        assert r.status_code == 400, (files, r.status_code, r.text)
        assert "files" in r.json()["detail"] and "file name" in r.json()["detail"]
    r = httpx.post(url, files={"files": ("a.txt", b"hello")}, timeout=30)
    assert r.status_code == 200 and r.json()[0].endswith("a.txt")
    app_server.output()
    with open(app_server.log_path) as f:
        f.seek(before)
        assert "Traceback" not in f.read()                   # one log line, not a traceback
