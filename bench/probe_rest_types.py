"""Every typed input of every endpoint of a running app, given a value of the wrong type through
Gradio's REST protocol (``POST /gradio_api/call/{name}``, the other inputs at their defaults or
examples): what comes back, counted. The README's figure of what Gradio did with such calls:

    TURBOSTUDIO_REST_CHAT=0 python app.py --no-load --api --server-port 7978 &   # Gradio's own routes
    python -m bench.probe_rest_types 7978

(With the app's routes, ``ui/rest_chat.py``, every such call is a 422 naming the input.)
Careful: with Gradio's own routes the calls run; point it at a scratch app (``--no-load``).
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections import Counter

WRONG = {"string": 3.5, "integer": "x", "number": "x", "boolean": "x", "array": 5}


def probe(port: int) -> dict:
    url = f"http://127.0.0.1:{port}/"
    info = json.load(urllib.request.urlopen(url + "gradio_api/info"))["named_endpoints"]
    out = {}
    for name, e in info.items():
        params = e["parameters"]
        base = [p.get("parameter_default") if p.get("parameter_has_default") else p.get("example_input")
                for p in params]
        for i, p in enumerate(params):
            kind = p["type"].get("type") if isinstance(p["type"], dict) else None
            if kind not in WRONG or name == "/chat":       # /chat checks its own inputs (fuzzed in the tests)
                continue
            data = list(base)
            data[i] = WRONG[kind]
            req = urllib.request.Request(url + "gradio_api/call" + name, data=json.dumps({"data": data}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                eid = json.load(urllib.request.urlopen(req, timeout=30))["event_id"]
                text = urllib.request.urlopen(f"{url}gradio_api/call{name}/{eid}", timeout=120).read().decode()
                kinds = [line[6:].strip() for line in text.splitlines() if line.startswith("event:")]
                last = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")][-1]
                if kinds[-1] != "error":
                    out[(name, p["parameter_name"])] = "ran as if valid"
                elif last == '{"error": null}' or last == "null":
                    out[(name, p["parameter_name"])] = "no message"
                elif "Internal error" in last:
                    out[(name, p["parameter_name"])] = "internal error"
                else:
                    out[(name, p["parameter_name"])] = "a handler's message"
            except urllib.error.HTTPError as ex:
                out[(name, p["parameter_name"])] = f"HTTP {ex.code}"
    return out


if __name__ == "__main__":
    res = probe(int(sys.argv[1]) if len(sys.argv) > 1 else 7860)
    print(f"{len(res)} calls:", dict(Counter(res.values())))
