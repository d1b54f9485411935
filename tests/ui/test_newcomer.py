"""What the pages say in words, fast (no app, no browser): issue #16's 'the page shows which
defaults are in force and where from'. The browser tests of the same issue are in test_browser*.py."""
from __future__ import annotations

import json

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
