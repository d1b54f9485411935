"""What the pages say in words, fast (no app, no browser): issue #16's 'the page shows which
defaults are in force and where from'. The browser tests of the same issue are in test_browser*.py."""
from __future__ import annotations

import json
import time

import pytest

from engines.base import EngineInfo, GenParams
from ui.common import defaults_line


def _info(folder: str, defaults: GenParams | None) -> EngineInfo:
    return EngineInfo(backend="transformers", model=folder, model_path=folder, device="cpu", dtype="float32",
                      context_length=8192, vision=False, reason="", max_batch=1, capabilities=None,
                      defaults=defaults)


def test_the_defaults_line_names_what_the_model_sets_and_what_is_the_apps(tmp_path):
    # SmolLM2's recommended settings as the built-in model ships them: temperature and top_p only
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.2, "top_p": 0.9}))
    line = defaults_line(_info(str(folder), GenParams().replace(temperature=0.2, top_p=0.9)))
    assert "temperature 0.2 · top_p 0.9 from SmolLM2-135M-Instruct's generation_config.json" in line, line
    assert "top_k 40 · repetition_penalty 1 the app's own" in line, line   # not said to come from the file
    none = defaults_line(_info(str(tmp_path / "other"), None))
    assert "the app's own, since other sets none" in none and "temperature 0.7" in none, none
    assert "no model is loaded" in defaults_line(None)


def test_help_is_grouped_names_the_variables_and_hides_benchmark_knobs():
    """`python app.py --help` (settings.build_parser, what app.py prints): options in groups, the
    TURBOSTUDIO_* variables named, --dtype with its choices, the benchmarking knob not offered."""
    import settings

    text = settings.build_parser().format_help()
    for group in ("model and engine:", "serving and security:", "limits:"):
        assert f"\n{group}\n" in text, group
    assert "TURBOSTUDIO_<OPTION>" in text or "TURBOSTUDIO_MODEL" in text
    assert "--dtype {auto,float32,float16,bfloat16}" in text
    assert "--switch-interval" not in text


@pytest.mark.slow
def test_the_server_log_of_ordinary_user_errors(app_server):
    """What the operator reads in the server log after a reply and two ordinary user errors: at most
    one line for each refusal (no traceback), no Gradio 'share=True' hint that contradicts --share, no
    transformers FutureWarning per reply, no torchao 'Could not load this library' at start."""
    import gradio_client

    c = app_server.client()
    text = ""
    for text in c.submit([{"role": "user", "content": "Say hi"}], {"max_new_tokens": 4}, api_name="/chat"):
        pass
    assert text, "a reply"
    with pytest.raises(gradio_client.exceptions.AppError, match="the limit is"):
        c.predict([{"role": "user", "content": "x" * 200_000}], {}, api_name="/chat")
    with pytest.raises(gradio_client.exceptions.AppError, match="session_len must be a whole number"):
        c.predict("", "auto", "auto", "auto", "hf", 0, 0.8, "abc", 1, api_name="/load_model")
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum"):
        c.predict("hi", "", 10**6, 0, 0.9, 40, 1.0, "", api_name="/send")    # past the slider: Gradio's own check
    time.sleep(1)
    with open(app_server.log_path) as f:
        log = f.read()
    assert "Traceback" not in log, log[-3000:]
    assert "share=True" not in log and "FutureWarning" not in log and "Could not load this library" not in log
    # an API caller's refusal is its own answer (raised above), not the operator's business: at most
    # one line each in the log (a page's refusal writes "refused: <reason>", ui.common.refuse)
    assert sum("session_len must be" in line for line in log.splitlines()) <= 1
    # the web process's heap was frozen out of the garbage collector's full walks once it was built
    # (engines/heap.py: a full collection of 150 ms held a burst of first tokens back)
    assert "web process: " in log and "objects frozen out of the garbage collector" in log, log[-3000:]
