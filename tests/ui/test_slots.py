"""One generation slot (``--concurrency 1``): a user who presses stop, or whose connection drops,
frees it at once for the user waiting behind them (issue #6; the engine aborts the request)."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow          # a launched app serves every test here
pytest.importorskip("gradio_client")

from tests.clients import first_output, streaming_clients  # noqa: E402
from tests.conftest import AppProcess  # noqa: E402

LONG = [{"role": "user", "content": "Write a very long story about the sea."}]
FOREVER = {"temperature": 0.8, "max_new_tokens": 3000}
SHORT = ([{"role": "user", "content": "Hi"}], {"temperature": 0, "max_new_tokens": 8})


@pytest.fixture(scope="module")
def one_slot(cache_dir, smollm2):
    app = AppProcess(["--cache-dir", cache_dir, "--concurrency", "1"])
    yield app
    app.stop()


def _waiter_starts_after(one_slot, release) -> float:
    """A second user queues behind a long reply; ``release()`` frees the slot; returns the seconds
    from the release to the waiting user's first text."""
    c = one_slot.client()
    waiter = c.submit(*SHORT, api_name="/chat")
    time.sleep(2.0)
    assert not any(waiter.outputs()), "the slot is taken: the second user must wait"
    assert c.predict(api_name="/engine_info")["running"] == 1
    t0 = time.perf_counter()
    release()
    first = first_output(waiter)
    waiter.result(timeout=60)
    return first - t0


def test_stop_hands_the_slot_to_the_waiting_user(one_slot):
    c = one_slot.client()
    job = c.submit(LONG, FOREVER, api_name="/chat")
    first_output(job)
    waited = _waiter_starts_after(one_slot, job.cancel)
    assert waited < 5, f"the waiting user started {waited:.1f} s after stop"


def test_a_dropped_connection_hands_the_slot_to_the_waiting_user(one_slot):
    gone = streaming_clients(one_slot.url, 1, LONG, FOREVER)
    try:
        waited = _waiter_starts_after(one_slot, gone.kill)
    finally:
        gone.kill()
    assert waited < 5, f"the waiting user started {waited:.1f} s after the first one's connection dropped"
    assert one_slot.client().predict(api_name="/engine_info")["running"] == 0
