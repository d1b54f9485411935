"""Remote engine: any OpenAI-compatible server, such as ``lmdeploy serve api_server`` (port 23333),
``lmdeploy serve proxy`` in front of several of them, or another TurboStudio started with ``--api``.

``--engine remote --model http://host:23333`` (``/v1`` is added when missing). The model name comes
from ``--remote-model`` or the first one the server lists. Streams with server-sent events; images
go as ``image_url`` data URLs; presence/frequency penalties and stop strings are passed on (the
server decides). ``abort(request_id)`` closes the HTTP stream, which makes the server stop (LMDeploy
and TurboStudio both abort a request whose client went away). Time to first token and tokens/s are
measured on this side, by the manager, like any engine.
"""
from __future__ import annotations

import base64
import io
import json
import queue
import threading
from typing import Iterator, Sequence

from .base import (Capabilities, ChatMessage, ChatRequest, ContextTooLong, Delta, EngineError, EngineInfo,
                   EngineUnavailable, GenParams, ModelLoadError, SchedulerView)
from .configs import RemoteConfig


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


class _Call:
    """One request: its HTTP exchange runs in its own thread (``_exchange``), which hands deltas to
    the stream through ``out``; ``abort`` can therefore end the stream at any point, also while the
    thread still waits for the server's response headers."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.out: queue.Queue = queue.Queue()
        self.started = threading.Event()     # headers arrived, the request failed, or it was aborted
        self.error: Exception | None = None  # the server refused it (raised from stream())
        self.aborted = False
        self.resp = None
        self.lock = threading.Lock()


_END = object()      # the exchange thread is done
_ABORT = object()    # abort() was called


class RemoteEngine:
    """An OpenAI-compatible server as an engine. ``stream`` returns once the server has answered
    with its headers (its refusals are raised from there, as EngineErrors); ``abort(request_id)``
    ends the stream at once in any state, closing the HTTP stream (the server stops), or, while the
    headers are still awaited, as soon as they come."""

    def __init__(self, resolved, config: RemoteConfig):
        import httpx

        self.url = base_url(resolved.path)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(config.timeout, read=600.0))
        self._calls: dict[str, _Call] = {}
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
        try:
            listed = r.json().get("data", [])
        except (ValueError, AttributeError):
            listed = []
        models = [m for m in listed if isinstance(m, dict)]
        names = [m.get("id") for m in models]
        remote_model = config.remote_model
        if remote_model and remote_model not in names:
            self._http.close()
            raise ModelLoadError(f"The server at {self.url} does not serve {remote_model!r}; it serves "
                                 f"{', '.join(map(str, names)) or 'nothing'}.")
        if not names:
            self._http.close()
            raise ModelLoadError(f"The server at {self.url} lists no models.")
        self.model = remote_model or names[0]
        meta = next(m for m in models if m.get("id") == self.model)
        ctx = config.session_len or meta.get("max_model_len") or meta.get("context_length") or 4096
        vision = bool(meta.get("vision"))
        self.info = EngineInfo(backend="remote", model=self.model, model_path=self.url, device="remote",
                               dtype="", context_length=int(ctx), vision=vision, max_batch=64,
                               # passed through; the server decides (an OpenAI server honours them)
                               capabilities=Capabilities(penalties=True, vision=vision, seed=True),
                               extra={"server": self.url, "models": names})

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An upper-bound estimate (the tokenizer lives on the server): one token per UTF-8 byte
        would be too pessimistic, so a conservative 1 token per 2 bytes plus template overhead."""
        return sum(self.message_tokens(messages)) + 8 * len(messages) + 16

    def message_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Each message's own tokens, estimated the same way (1 token per 2 bytes of text)."""
        return [len(m.content.encode()) // 2 for m in messages]

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
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        if self._closed:
            raise EngineUnavailable("This remote engine was closed.")
        call = _Call(request.request_id)
        with self._lock:
            if call.request_id in self._calls:
                raise EngineError(f"A request with id {call.request_id!r} is still running.",
                                  code="invalid_request")
            self._calls[call.request_id] = call
        try:
            body = self._payload(request.messages, request.params, True)
            threading.Thread(target=self._exchange, args=(call, body), daemon=True,
                             name=f"remote-{call.request_id[:24]}").start()
        except BaseException:
            self._forget(call)
            raise
        call.started.wait()         # headers, a refusal, or abort() (which sets it)
        if call.error is not None:
            raise call.error
        return self._drain(call)

    def _exchange(self, call: _Call, body: dict) -> None:
        """(The request's own thread.) Send, wait for the headers, read the server-sent events."""
        import httpx

        tokens, finish = 0, None
        try:
            req = self._http.build_request("POST", self.url + "/chat/completions", json=body)
            try:
                resp = self._http.send(req, stream=True)
            except httpx.HTTPError as e:
                call.error = EngineUnavailable(f"Cannot reach the server at {self.url}: {e}")
                return
            with call.lock:
                call.resp = resp
                aborted = call.aborted
            if aborted:                     # aborted while the headers were awaited
                return
            if resp.status_code != 200:
                body_text = resp.read().decode(errors="replace")
                call.error = _server_error(resp.status_code, body_text)
                return
            call.started.set()
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    call.out.put(Delta("", tokens, "error", err.get("message") if isinstance(err, dict) else str(err)))
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
                        call.out.put(Delta(text, tokens))
            call.out.put(Delta("", tokens, "length" if finish == "length" else "stop"))
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            if not call.aborted:
                call.out.put(Delta("", tokens, "error", f"The connection to the server broke: {e}"))
        except Exception as e:  # noqa: BLE001 - whatever it was, the stream must end
            call.out.put(Delta("", tokens, "error", f"The remote request failed: {e}"))
        finally:
            with call.lock:
                resp = call.resp
            if resp is not None:
                try:
                    resp.close()
                except Exception:  # noqa: BLE001
                    pass
            call.started.set()
            call.out.put(_END)
            self._forget(call)

    def _drain(self, call: _Call) -> Iterator[Delta]:
        finished = False
        tokens = 0
        try:
            while True:
                item = call.out.get()
                if item is _ABORT:
                    finished = True
                    yield Delta("", tokens, "abort")
                    return
                if item is _END:
                    if not finished:
                        finished = True
                        yield Delta("", tokens, "abort" if call.aborted else "stop")
                    return
                tokens = item.tokens
                if item.finish_reason:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(call.request_id)

    def abort(self, request_id: str) -> None:
        """End ``request_id``'s stream now (finish reason "abort"); the HTTP stream is closed, which
        makes the server stop (at once, or when its headers come if they have not yet)."""
        with self._lock:
            call = self._calls.get(request_id)
        if call is None:
            return
        with call.lock:
            if call.aborted:
                return
            call.aborted = True
            resp = call.resp
        call.out.put(_ABORT)        # ends the stream before anything the thread sends after it
        call.started.set()
        if resp is not None:
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass

    def _forget(self, call: _Call) -> None:
        with self._lock:
            if self._calls.get(call.request_id) is call:
                del self._calls[call.request_id]

    def health(self) -> str | None:
        return None

    def scheduler(self) -> SchedulerView | None:
        return None                 # the server's scheduler is its own

    def live_requests(self) -> int:
        with self._lock:
            return len(self._calls)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            ids = list(self._calls)
        for rid in ids:
            self.abort(rid)
        self._http.close()
