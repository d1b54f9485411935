"""The job runner with real worker subprocesses: progress, cancel, failure cleanup, restart."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from engines.quantize import (Job, JobError, JobRunner, awq_memory_estimate, group_size_problem, model_facts,
                              result_load_options, validate)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.mark.slow
def test_cast_job_runs_with_progress_and_the_result_loads(smollm2, data_dir):
    runner = JobRunner(data_dir)
    try:
        out = os.path.join(data_dir, "models", "smol-bf16")
        job = runner.submit("cast", smollm2.path, out, {"dtype": "bfloat16"})
        seen = []
        while True:
            j = runner.get(job.id)
            if j.state == "running" and j.total:
                seen.append(j.fraction)
            if j.state in ("done", "failed", "cancelled"):
                break
            time.sleep(0.05)
        assert j.state == "done", runner.read_log(job.id)
        assert j.total == 272 and j.done == 272 and j.stage == "casting tensors"
        log = runner.read_log(job.id)
        for step in ("worker process", "reading 1 file", "casting tensors: 272 steps", "wrote model.safetensors",
                     "config.json: dtype float32 -> bfloat16", "done in"):
            assert step in log, (step, log)
        assert all(line.startswith("[") for line in log.splitlines()[1:]), "every step has its time"
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))
        assert not os.path.exists(out + ".partial")
        size = lambda p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors"))
        assert size(out) < 0.55 * size(smollm2.path), "bfloat16 halves the weights"
        # the Quantize card's measurement of the result, through the engine manager (the one road)
        from engines.manager import EngineManager
        from engines.quantize import measure_model

        app = EngineManager(data_dir)
        row = measure_model(out, label="bf16", cache_dir=data_dir, prompt="What is the capital of France?",
                            batches=(1, 2), new_tokens=12, device="cpu", engine="transformers", manager=app,
                            owner="ann")
        assert "Paris" in row["answer"] and row["backend"] == "transformers", row
        # loaded in its own dtype (the engine's "auto" is float32 on a CPU), its weights counted by the engine
        assert row["dtype"] == "bfloat16" and row["weights in memory (GiB)"] < 0.26, row
        assert "memory at load (GiB)" not in row, "no GPU: no GPU memory figure (nor an RSS delta in its place)"
        assert row["tok/s batch 1"] > 0 and row["tok/s batch 2"] > 0 and "error" not in row
        assert app.info() is None, "the measurement loads beside the app's model, not into it"
    finally:
        runner.close()


@pytest.mark.slow
def test_cancel_kills_the_worker_and_leaves_nothing(smollm2, data_dir):
    runner = JobRunner(data_dir)
    try:
        out = os.path.join(data_dir, "models", "cancelled")
        job = runner.submit("cast", smollm2.path, out, {"dtype": "float16"})
        second = runner.submit("cast", smollm2.path, out + "-2", {"dtype": "float16"})
        assert runner.queue_position(second.id) in (1, 2), "the second job waits its turn"
        while runner.get(job.id).state != "running":   # the worker is starting (imports take seconds)
            time.sleep(0.01)
        runner.cancel(job.id)
        j = runner.wait(job.id, 60)
        assert j.state == "cancelled"
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")
        runner.cancel(second.id)
        assert runner.wait(second.id, 120).state in ("cancelled", "done")
    finally:
        runner.close()


@pytest.mark.slow      # a job's worker process (it imports torch): 5 s of the fast tier
def test_a_failing_job_reports_why_and_cleans_up(tmp_path, data_dir):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    runner = JobRunner(data_dir)
    try:
        out = os.path.join(data_dir, "models", "broken-out")
        job = runner.wait(runner.submit("cast", str(src), out, {}).id, 60)
        assert job.state == "failed" and job.error
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    finally:
        runner.close()


@pytest.mark.slow
def test_jobs_survive_a_restart(smollm2, data_dir):
    runner = JobRunner(data_dir)
    job = runner.submit("cast", smollm2.path, os.path.join(data_dir, "models", "a"), {})
    runner.wait(job.id, 120)
    runner.close()
    # a job that was running when the app died, with its partial output on disk
    jobs = os.path.join(data_dir, "jobs")
    crashed = dict(json.load(open(os.path.join(jobs, f"{job.id}.json"))), id="crashed", state="running",
                   output=os.path.join(data_dir, "models", "b"), created=time.time())
    os.makedirs(crashed["output"] + ".partial")
    json.dump(crashed, open(os.path.join(jobs, "crashed.json"), "w"))
    queued = dict(crashed, id="queued", state="queued", output=os.path.join(data_dir, "models", "c"),
                  created=time.time() + 1)
    json.dump(queued, open(os.path.join(jobs, "queued.json"), "w"))
    runner = JobRunner(data_dir)
    try:
        assert runner.get(job.id).state == "done"
        c = runner.get("crashed")
        assert c.state == "failed" and "interrupted" in c.error
        assert not os.path.exists(crashed["output"] + ".partial")
        assert runner.wait("queued", 120).state == "done", "queued jobs go on after a restart"
    finally:
        runner.close()


@pytest.mark.parametrize("case, fragment", [
    ("not_model", "not a model folder"),
    ("arch", "does not support the architecture"),
    ("group", "must divide"),
    ("exists", "already exists"),
    ("outside", "inside the app's data folder"),
    ("no_gpu", "needs a CUDA GPU"),
    ("too_big", "Not enough GPU memory"),
    ("hub_offline", "not reachable from here"),
    ("bad_dataset", "unknown calibration dataset"),
])
def test_bad_requests_are_refused_before_start(tmp_path, data_dir, tiny_llama, case, fragment, monkeypatch):
    src, out = tiny_llama.path, os.path.join(data_dir, "models", "x")
    params = {"samples": 128, "seqlen": 512, "group_size": 16, "bits": 4}   # 16 divides 256 and 688
    free = 80 * 2**30
    hub = {}
    if case == "not_model":
        src = str(tmp_path)
    elif case == "arch":
        d = tmp_path / "gpt2"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "hidden_size": 768}))
        src = str(d)
    elif case == "group":
        params["group_size"] = 96      # 256 % 96 != 0
    elif case == "exists":
        os.makedirs(out)
    elif case == "outside":
        out = str(tmp_path / "elsewhere")
    elif case == "no_gpu":
        free = None
    elif case == "too_big":
        free = 2**20
    elif case == "hub_offline":
        hub = {"hub_offline": True}            # Settings.hub_offline (HF_HUB_OFFLINE=1)
        params["dataset"] = "wikitext2"
    elif case == "bad_dataset":
        params["dataset"] = "my-secret-set"
    with pytest.raises(JobError, match=fragment):
        validate("awq", src, out, params, data_dir, free_gpu_bytes=free, **hub)


def test_group_size_refusal_is_words_with_the_sizes_that_work(smollm2):
    msg = group_size_problem(smollm2.config, 128)
    assert "{" not in msg and "hidden size 576" in msg and "64, 32, 16" in msg, msg
    facts = model_facts(smollm2.path)
    assert facts["group_size"] == 64 and facts["dtype"] == "float32" and facts["awq_supported"], facts


def test_a_cast_to_the_dtype_the_source_has_is_refused(smollm2, data_dir):
    with pytest.raises(JobError, match="already stored in float32"):
        validate("cast", smollm2.path, os.path.join(data_dir, "models", "y"), {"dtype": "float32"}, data_dir,
                 free_gpu_bytes=None)


def test_awq_without_a_gpu_is_refused_first(tmp_path, data_dir):
    """On a machine without a GPU that is the answer, before the folder or group size is looked at."""
    with pytest.raises(JobError, match="needs a CUDA GPU"):
        validate("awq", str(tmp_path), os.path.join(data_dir, "models", "z"), {"group_size": 7}, data_dir,
                 free_gpu_bytes=None)


def test_the_estimate_waits_for_the_steps_own_pace():
    """The first estimate once said "~3068 s left" for a 21 s job: measured from the job's start,
    the worker's seconds of imports were charged to its first tensor."""
    now = 1000.0
    job = Job(id="j", kind="cast", source="s", output="o", params={}, state="running", started=now - 11.3,
              done=1, total=272, stage="casting tensors", stage_started=now - 0.01, stage_from=0)
    assert job.eta_seconds(now) is None, "one tensor in: too little to go on"
    job.done, now = 60, now + 1.0          # 60 tensors in the step's first second
    assert job.eta_seconds(now) == pytest.approx(212 / 60 * 1.01, rel=0.01)


def test_a_result_loads_as_what_it_is():
    cast = Job(id="c", kind="cast", source="s", output="o", params={"dtype": "bfloat16"})
    assert result_load_options(cast, gpu=False) == {"dtype": "bfloat16"}
    assert result_load_options(Job(id="a", kind="awq", source="s", output="o", params={}), gpu=True) == \
        {"model_format": "awq"}


def test_memory_estimate_grows_with_the_model_and_the_calibration():
    small = {"hidden_size": 2048, "intermediate_size": 8192, "vocab_size": 92544}
    big = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000}
    assert awq_memory_estimate(big, 128, 512) > awq_memory_estimate(small, 128, 512)
    assert awq_memory_estimate(big, 128, 2048) > awq_memory_estimate(big, 128, 512)
    assert 2 * 2**30 < awq_memory_estimate(big, 128, 2048) < 40 * 2**30


@pytest.mark.slow
def test_quantize_page_through_the_app(app_server, smollm2, cache_dir):
    """The page's API: a refused AWQ request (no GPU here) says why; a cast job runs and loads."""
    import uuid

    from gradio_client.exceptions import AppError

    c = app_server.client()
    name = "ui-cast-" + uuid.uuid4().hex[:6]
    with pytest.raises(AppError, match="needs a CUDA GPU"):
        c.predict(smollm2.path, name, "awq", 128, 512, 64, "bfloat16", None, "", api_name="/quantize_start")
    with pytest.raises(AppError, match="letters, digits"):
        c.predict(smollm2.path, "../escape", "cast", 0, 0, 0, "bfloat16", None, "", api_name="/quantize_start")
    rows, job_id = c.predict(smollm2.path, name, "cast", 0, 0, 0, "bfloat16", None, "", api_name="/quantize_start")
    deadline = time.time() + 120
    while time.time() < deadline:
        row = next(r for r in c.predict(api_name="/quantize_jobs") if r[0] == job_id)
        if row[4] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert row[4] == "done", row
    assert "GiB" in row[5]
    card, answers = c.predict(job_id, "What is the capital of France?", True, api_name="/quantize_compare")
    rows = {r[0]: r for r in card["data"]}
    headers = card["headers"]
    size = headers.index("size on disk (GiB)")
    assert rows["result"][size] < 0.55 * rows["source"][size]
    for col in ("tok/s batch 1", "tok/s batch 16"):
        assert all(r[headers.index(col)] > 0 for r in rows.values())
    assert answers.count("Paris") == 2, answers
    # issue #17: each model's perplexity on the held-out text, on the same number of tokens
    ppl, n = headers.index("perplexity (held-out)"), headers.index("perplexity tokens")
    assert rows["source"][n] == rows["result"][n] == 1024
    assert 1 < rows["source"][ppl] < 60 and abs(rows["result"][ppl] / rows["source"][ppl] - 1) < 0.05, rows
    msg = c.predict(job_id, api_name="/quantize_load")
    assert "Loaded" in msg and name in msg and "bfloat16" in msg
    info = c.predict(api_name="/engine_info")
    assert info["model"].endswith(name) and info["dtype"] == "bfloat16", info
    c.predict("", "auto", "auto", "auto", "hf", 0, 0.8, None, 1, api_name="/load_model")   # back to the default
    shutil.rmtree(os.path.join(cache_dir, "models", name), ignore_errors=True)


def test_one_job_saved_by_many_threads_at_once_stays_whole(data_dir):
    """The runner's thread and a page's thread can save the same job together: each write goes
    through a temporary file of its own (a shared name made one rename fail, seen in CI), and the
    job's file is whole JSON after."""
    import threading

    runner = JobRunner(data_dir)
    try:
        job = Job(id="race", kind="cast", source="/x", output="/y", params={})
        errors = []

        def save(i):
            try:
                for k in range(50):
                    runner._save(Job(**{**job.__dict__, "done": i * 100 + k}))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
        with open(runner._path("race")) as f:
            assert json.load(f)["id"] == "race"
        assert not [n for n in os.listdir(runner.folder) if n.endswith(".tmp")]
    finally:
        runner.close()
