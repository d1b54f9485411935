"""Remote engine: any OpenAI-compatible server, such as ``lmdeploy serve api_server`` (port 23333),
``lmdeploy serve proxy`` in front of several of them, or another TurboStudio started with ``--api``.

``--engine remote --model http://host:23333`` (``/v1`` is added when missing). The model name comes
from ``--remote-model`` or the first one the server lists. Streams with server-sent events; images
go as ``image_url`` data URLs; ``abort`` closes the HTTP stream, which makes the server stop (LMDeploy
and TurboStudio both abort a request whose client went away). Time to first token and tokens/s are
measured on this side, by the manager, like any engine.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from typing import Iterator, Sequence

from .base import ChatMessage, ContextTooLong, Delta, EngineError, EngineInfo, EngineUnavailable, GenParams, ModelLoadError


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _data_url(img) -> str:
    from PIL import Image

    if isinstance(img, str):
        img = Image.open(img)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _server_error(resp_status: int, body: str) -> EngineError:
    try:
        err = json.loads(body)
        err = err.get("error", err) if isinstance(err, dict) else {}
        msg = err.get("message") or err.get("detail") or body
        code = err.get("code") or ""
    except ValueError:
        msg, code = body, ""
    msg = str(msg)[:500]
    if resp_status == 401:
        return EngineError(f"The server refused the API key (401): {msg}", code="unauthorized")
    if resp_status == 404 or code == "model_not_found":
        return ModelLoadError(f"The server does not serve that model: {msg}")
    if code == "context_length_exceeded" or "context" in msg.lower() and "long" in msg.lower():
        return ContextTooLong(f"The server says the prompt is too long: {msg}")
    if resp_status == 429:
        return EngineError(f"The server is busy (429): {msg}", code="busy")
    return EngineError(f"The server answered {resp_status}: {msg}", code="server_error")


class RemoteEngine:
    def __init__(self, resolved, *, remote_model: str | None = None, api_key: str | None = None,
                 session_len: int | None = None, timeout: float = 10.0, **_ignored):
        import httpx

        self.url = base_url(resolved.path)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, read=600.0))
        self._open: dict[str, list] = {}
        self._lock = threading.Lock()
        self._closed = False
        try:
            r = self._http.get(self.url + "/models")
        except httpx.HTTPError as e:
            self._http.close()
            raise EngineUnavailable(f"Cannot reach the server at {self.url}: {e}") from e
        if r.status_code != 200:
            self._http.close()
            raise _server_error(r.status_code, r.text)
        models = [m for m in r.json().get("data", []) if isinstance(m, dict)]
        names = [m.get("id") for m in models]
        if remote_model and remote_model not in names:
            self._http.close()
            raise ModelLoadError(f"The server at {self.url} does not serve {remote_model!r}; it serves "
                                 f"{', '.join(map(str, names)) or 'nothing'}.")
        if not names:
            self._http.close()
            raise ModelLoadError(f"The server at {self.url} lists no models.")
        self.model = remote_model or names[0]
        meta = next(m for m in models if m.get("id") == self.model)
        ctx = session_len or meta.get("max_model_len") or meta.get("context_length") or 4096
        self.info = EngineInfo(backend="remote", model=self.model, model_path=self.url, device="remote",
                               dtype="", context_length=int(ctx), vision=bool(meta.get("vision")),
                               max_batch=64, extra={"server": self.url, "models": names})

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An upper-bound estimate (the tokenizer lives on the server): one token per UTF-8 byte
        would be too pessimistic, so a conservative 1 token per 2 bytes plus template overhead."""
        return sum(len(m.content.encode()) // 2 + 8 for m in messages) + 16

    def _payload(self, messages, p: GenParams, stream: bool) -> dict:
        msgs = []
        for m in messages:
            if m.images:
                parts = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in m.images]
                msgs.append({"role": m.role, "content": parts + [{"type": "text", "text": m.content}]})
            else:
                msgs.append({"role": m.role, "content": m.content})
        body = {"model": self.model, "messages": msgs, "max_tokens": p.max_new_tokens, "stream": stream,
                "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                "repetition_penalty": p.repetition_penalty}
        if p.seed is not None:
            body["seed"] = p.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def stream(self, messages: Sequence[ChatMessage], params: GenParams, *, session_id: str) -> Iterator[Delta]:
        import httpx

        if self._closed:
            raise EngineError("This remote engine was closed.", code="engine_unavailable")
        req = self._http.build_request("POST", self.url + "/chat/completions",
                                       json=self._payload(messages, params, True))
        try:
            resp = self._http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise EngineUnavailable(f"Cannot reach the server at {self.url}: {e}") from e
        if resp.status_code != 200:
            body = resp.read().decode(errors="replace")
            resp.close()
            raise _server_error(resp.status_code, body)
        state = {"aborted": False}
        with self._lock:
            self._open.setdefault(session_id, []).append((resp, state))
        return self._read(resp, state, session_id)

    def _read(self, resp, state, session_id) -> Iterator[Delta]:
        import httpx

        tokens, finish = 0, None
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    yield Delta("", tokens, "error", err.get("message") if isinstance(err, dict) else str(err))
                    return
                if obj.get("usage"):
                    tokens = obj["usage"].get("completion_tokens", tokens)
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") or ""
                    if text and not obj.get("usage"):
                        tokens += 1   # one chunk a token where the server sends no usage per chunk
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                    if text:
                        yield Delta(text, tokens)
            yield Delta("", tokens, "length" if finish == "length" else "stop")
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            if state["aborted"]:
                yield Delta("", tokens, "abort")
            else:
                yield Delta("", tokens, "error", f"The connection to the server broke: {e}")
        finally:
            resp.close()
            with self._lock:
                lst = self._open.get(session_id, [])
                if (resp, state) in lst:
                    lst.remove((resp, state))
                if not lst:
                    self._open.pop(session_id, None)

    def abort(self, session_id: str) -> None:
        with self._lock:
            items = list(self._open.get(session_id, []))
        for resp, state in items:
            state["aborted"] = True
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            sids = list(self._open)
        for sid in sids:
            self.abort(sid)
        self._http.close()
