"""ui/gradio_patches.py: a new Gradio session no longer builds every component's config up front,
and what it reads back is the same as Gradio's own (measured effect: bench/bench_web.py)."""
from __future__ import annotations

import os
import time

import pytest

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import settings as sm
    from engines.manager import EngineManager
    from engines.quantize import JobRunner
    from engines.servers import ServerManager
    from ui.app import build_app
    from ui.common import Context
    from ui.vision import VisionSlot

    d = str(tmp_path_factory.mktemp("cache"))
    s = sm.from_args(["--no-load", "--cache-dir", d], env={})
    ctx = Context(settings=s, manager=EngineManager(d))
    ctx.vision = VisionSlot(ctx)
    ctx.jobs = JobRunner(d)
    ctx.servers = ServerManager(os.path.join(d, "servers"))
    yield build_app(ctx)
    ctx.jobs.close()


def test_sessions_are_cheap_and_read_back_the_same_configs(demo):
    from gradio.state_holder import SessionState

    from ui.gradio_patches import lazy_session_config

    eager = [SessionState(demo) for _ in range(3)]
    t0 = time.perf_counter()
    for _ in range(3):
        SessionState(demo)
    eager_s = (time.perf_counter() - t0) / 3
    assert lazy_session_config() and lazy_session_config(), "installs once, idempotent"
    t0 = time.perf_counter()
    lazy = [SessionState(demo) for _ in range(3)]
    lazy_s = (time.perf_counter() - t0) / 3
    assert lazy_s < eager_s / 5, (eager_s, lazy_s)
    assert list(lazy[0].components) == list(eager[0].components)
    assert len(list(lazy[1].components)) == len(demo.blocks) > 100


def test_a_value_set_before_any_read_lands_in_the_config(demo):
    from gradio.state_holder import SessionState

    from ui.gradio_patches import lazy_session_config

    lazy_session_config()
    key = next(k for k, b in demo.blocks.items() if isinstance(b, gr.Textbox))
    a, b = SessionState(demo), SessionState(demo)
    a._update_value_in_config(key, "hello")
    assert a.config_values[key]["props"]["value"] == "hello"
    assert b.config_values[key]["props"].get("value") != "hello", "sessions do not share configs"
    assert key in a.config_values and a.config_values.get(key) is a.config_values[key]
