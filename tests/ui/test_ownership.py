"""Who may do what on the operator pages (issue #15, "Ownership"): load tests and quantization jobs
belong to the user who started them and only they or an admin cancel them; reply metrics are per
user; paths on the server are for admins once the app has users or is public; and a public app (a
hosted Space, a share link) without --auth has no operator controls at all."""
from __future__ import annotations

import csv
import os
import shutil
import time
import uuid
from types import SimpleNamespace

import pytest

LOAD_ARGS = ("auto", "auto", "auto", "hf", 0, 0.8, None, 1)


def _req(user=None, session="s1"):
    """What the pages read of a gr.Request: the logged-in user and the browser session."""
    return SimpleNamespace(username=user, session_hash=session)


def _users():
    from settings import Settings

    return Settings(auth="ann:pw1", admin="ann")


# ---------------------------------------------------------------- the rules, without an app
def test_a_run_is_cancelled_by_its_owner_or_an_admin_only():
    import gradio as gr

    from ui.monitor import Runs

    runs, users = Runs(), _users()
    with runs.start("load test", "carl") as run:
        with pytest.raises(gr.Error, match="started by another user"):
            runs.cancel(users, _req("bob"))
        assert not run.cancel.is_set(), "a refused cancel leaves the run going"
        assert runs.cancel(users, _req("carl")) == [run] and run.cancel.is_set()
    with runs.start("KV sweep", "carl") as run:
        runs.cancel(users, _req("ann"))          # the admin
        assert run.cancel.is_set()
    assert runs.now() == [] and runs.cancel(users, _req("bob")) == [], "nothing to cancel is no error"


def test_anonymous_visitors_of_a_public_app_manage_nothing():
    from settings import Settings
    from ui.common import may_manage

    assert not may_manage(Settings(hosted=True), _req(None), None)
    assert not may_manage(Settings(share=True, share_without_auth=True), _req(None), None)
    assert may_manage(Settings(), _req(None), None), "a private app without users: everyone operates"


def test_paths_are_cut_to_their_last_component_where_the_caller_may_not_see_them():
    from settings import Settings
    from ui.common import hide_paths, redact_paths

    info = {"model": "/srv/models/my-w4a16", "model_path": "/srv/models/my-w4a16",
            "reason": "'/etc' is a folder but not a model", "server": "http://127.0.0.1:23333/v1",
            "hub": "org/model", "rows": [["a", "~/.cache/x/y.log"]], "n": 3}
    assert hide_paths(info) == {"model": "my-w4a16", "model_path": "my-w4a16",
                                "reason": "'etc' is a folder but not a model",
                                "server": "http://127.0.0.1:23333/v1", "hub": "org/model",
                                "rows": [["a", "y.log"]], "n": 3}
    assert hide_paths("12 tokens/s · <sub>x</sub> · a / b") == "12 tokens/s · <sub>x</sub> · a / b"
    users = _users()
    assert redact_paths(Settings(), None, "/srv/m") == "/srv/m", "a private app without users"
    assert redact_paths(users, _req("ann"), "/srv/m") == "/srv/m"
    assert redact_paths(users, _req("bob"), "/srv/m") == "m"
    assert redact_paths(users, None, "/srv/m") == "m", "built into the page: every visitor's"
    assert redact_paths(Settings(hosted=True), _req(None), "/srv/m") == "m"


def test_replies_are_per_user_and_per_session_for_anonymous_visitors():
    from engines import telemetry
    from settings import Settings
    from ui.monitor import own_replies

    log = telemetry.MetricsLog()
    for owner, session in (("ann", "a"), ("bob", "b"), (None, "x"), (None, "y")):
        log.add(telemetry.ReplyMetrics(time.time(), session, "transformers", "m", 3, 5, 0.1, 0.5, "stop",
                                       owner=owner, source="chat"))
    ctx = SimpleNamespace(settings=_users(), manager=SimpleNamespace(metrics=log))
    assert {m.owner for m in own_replies(ctx, _req("bob", "b"))} == {"bob"}
    assert len(own_replies(ctx, _req("ann", "a"))) == 4, "an admin sees every reply"
    ctx.settings = Settings(hosted=True)
    assert [m.session for m in own_replies(ctx, _req(None, "y"))] == ["y"]


def test_jobs_are_listed_per_owner(tmp_path):
    from engines.quantize import Job, JobRunner

    runner = JobRunner(str(tmp_path))
    try:
        for i, owner in enumerate(("ann", "bob", None)):
            runner._save(Job(id=f"j{i}", kind="cast", source="/s", output="/o", params={}, state="done",
                             owner=owner))
        assert [j.id for j in runner.jobs("bob", everyone=False)] == ["j1"]
        assert len(runner.jobs()) == 3
    finally:
        runner.close()


# ---------------------------------------------------------------- through the launched app
def _clients(app):
    from gradio_client import Client

    return (Client(app.url, auth=("ann", "pw1"), verbose=False),
            Client(app.url, auth=("bob", "pw2"), verbose=False))


def _loadtest_requests(client) -> list:
    return [r for r in client.predict(api_name="/engine_info")["requests"] if r["source"] == "loadtest"]


@pytest.mark.slow
def test_a_non_admins_cancel_is_refused_and_the_admins_load_test_goes_on(users_app):
    from gradio_client.exceptions import AppError

    ann, bob = _clients(users_app)
    job = ann.submit(2, 60, 64, api_name="/load_test")
    deadline = time.time() + 60
    while not _loadtest_requests(ann) and time.time() < deadline:
        time.sleep(0.2)
    assert _loadtest_requests(ann), "the load test started"
    assert _loadtest_requests(bob) == [], "bob sees his own requests only"
    with pytest.raises(AppError, match="started by another user"):
        bob.predict(api_name="/cancel_benchmark")
    time.sleep(1.5)
    assert not job.done() and _loadtest_requests(ann), "the load test goes on"
    ann.predict(api_name="/cancel_benchmark")          # its owner (and the admin) may
    text = job.result(timeout=120)[0]
    assert "(cancelled)" in text and "errors 0" in text, text


@pytest.mark.slow
def test_metrics_csv_and_engine_info_are_per_user(users_app, cache_dir):
    ann, bob = _clients(users_app)
    q = [{"role": "user", "content": "Say hi."}]
    for c in (ann, bob):
        c.predict(q, {"temperature": 0, "max_new_tokens": 4}, api_name="/chat")

    def owners(c) -> set:
        with open(c.predict(api_name="/metrics_csv")) as f:
            return {row["owner"] for row in csv.DictReader(f)}

    assert owners(bob) == {"bob"}
    assert {"ann", "bob"} <= owners(ann), "an admin sees every user's replies"

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, list):
            return [s for x in v for s in strings(x)]
        return [v] if isinstance(v, str) else []

    mine = bob.predict(api_name="/engine_info")
    assert mine["loaded"] and mine["model"] == "SmolLM2-135M-Instruct"
    leaks = [s for s in strings(mine) if s.startswith(("/", "~")) or cache_dir in s]
    assert not leaks, f"paths on the server shown to a non-admin: {leaks}"
    assert cache_dir not in bob.predict(api_name="/monitor_panel")
    assert ann.predict(api_name="/engine_info")["model_path"].startswith(cache_dir), "an admin sees paths"


@pytest.mark.slow
def test_a_job_is_cancelled_and_listed_for_its_owner_only(users_app, smollm2, cache_dir):
    from gradio_client.exceptions import AppError

    ann, bob = _clients(users_app)
    name = "own-cast-" + uuid.uuid4().hex[:6]
    try:
        _, job_id = ann.predict(smollm2.path, name, "cast", 0, 0, 0, "bfloat16", None, "",
                                api_name="/quantize_start")
        assert job_id in [r[0] for r in ann.predict(api_name="/quantize_jobs")]
        assert job_id not in [r[0] for r in bob.predict(api_name="/quantize_jobs")]
        with pytest.raises(AppError, match="started by another user"):
            bob.predict(job_id, api_name="/quantize_cancel")
        ann.predict(job_id, api_name="/quantize_cancel")
        state = next(r[4] for r in ann.predict(api_name="/quantize_jobs") if r[0] == job_id)
        assert state in ("cancelled", "done"), state     # a cast may finish before the cancel lands
    finally:
        shutil.rmtree(os.path.join(cache_dir, "models", name), ignore_errors=True)


@pytest.fixture(scope="module")
def hosted_app(cache_dir, smollm2):
    """Started as a Hugging Face Space would start it: SPACE_ID set, no --auth."""
    from tests.conftest import AppProcess

    app = AppProcess(["--cache-dir", cache_dir, "--server-name", "127.0.0.1"], env={"SPACE_ID": "someone/demo"})
    yield app
    app.stop()


# every operator endpoint, with arguments it would otherwise act on
OPERATOR_CALLS = [
    ("/unload_model", ()),
    ("/load_model", ("/etc", *LOAD_ARGS)),
    ("/load_model", ("", *LOAD_ARGS)),
    ("/start_api_server", ("/etc", 23333, "turbomind", "", 1, 0.8, 0, "hf", None)),
    ("/start_proxy", (23334,)),
    ("/connect_server", (23333,)),
    ("/stop_server", (23333,)),
    ("/load_test", (2, 5, 8)),
    ("/compare_engines", (["transformers"], "", 8, 1, 1)),
    ("/kv_sweep", (0, 8)),
    ("/quantize_start", ("/etc", "x", "cast", 0, 0, 0, "bfloat16", None, "")),
    ("/quantize_load", ("x",)),
    ("/quantize_compare", ("x", "hi", False)),
    ("/load_vision_model", ("", "auto")),
    ("/load_model_b", ("/etc",)),        # the Compare view's model B (issue #18) is a model load too
    ("/compare_unload", ()),
]


@pytest.mark.slow
def test_a_hosted_space_without_auth_refuses_every_operator_endpoint(hosted_app):
    from gradio_client.exceptions import AppError

    c = hosted_app.client()
    for api, args in OPERATOR_CALLS:
        with pytest.raises(AppError, match="Only an administrator"):
            c.predict(*args, api_name=api)
    with pytest.raises(AppError, match="no job|There is no job|started by another user"):
        c.predict("x", api_name="/quantize_cancel")
    info = c.predict(api_name="/engine_info")
    assert info["loaded"] and not info["model_path"].startswith("/"), info["model_path"]
    assert "Paris" in c.predict([{"role": "user", "content": "What is the capital of France?"}],
                                {"temperature": 0, "max_new_tokens": 12}, api_name="/chat"), \
        "the model still answers"
    assert hosted_app.alive()


def test_the_page_every_visitor_gets_has_no_paths_once_the_app_has_users(tmp_path):
    """Gradio's config (the components' first values) is the same for every visitor: under --auth
    with an --admin it names no folder on the server (admins get theirs filled in at page load)."""
    import json

    from engines.manager import EngineManager
    from engines.quantize import JobRunner
    from settings import Settings
    from ui.app import build_app
    from ui.common import Context

    secret = str(tmp_path / "secret-folder")
    for settings, shown in ((Settings(auth="ann:pw1", admin="ann"), False), (Settings(), True)):
        settings.cache_dir, settings.model, settings.no_load = secret, secret + "/my-model", True
        ctx = Context(settings=settings, manager=EngineManager(secret))
        ctx.jobs = JobRunner(secret)
        try:
            config = json.dumps(build_app(ctx).get_config_file(), default=str)
        finally:
            ctx.jobs.close()
        assert (secret in config) is shown
        assert "my-model" in config, "the model's name stays"
