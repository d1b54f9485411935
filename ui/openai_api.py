"""The app's own OpenAI-compatible endpoint (opt-in with ``--api``): ``/v1/models`` and
``/v1/chat/completions`` (streaming and not) for whatever engine is loaded.

It is mounted on the Gradio server's FastAPI app, so it shares the port, and it takes the same
credentials as the UI: with ``--auth user:password``, clients send ``Authorization: Bearer
user:password`` (or just the password). The same limits apply (input characters, max tokens), and
a request beyond the configured queue gets HTTP 429. A client that disconnects mid-stream aborts its
generation in the engine.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
import weakref

from fastapi import Request  # at module level: FastAPI resolves the string annotations here

from engines.base import ChatMessage, ContextTooLong, EngineError, EngineUnavailable, GenParams
from engines.manager import EngineManager
from settings import Settings


def _err(status: int, message: str, typ: str = "invalid_request_error", code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": typ, "code": code, "param": None}},
                        status_code=status)


def _content_text(content) -> tuple[str, list]:
    """OpenAI message content -> (text, images as data/URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of parts")
    text, images = [], []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError("content parts must be objects")
        if part.get("type") == "text":
            text.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        else:
            raise ValueError(f"unsupported content part type {part.get('type')!r}")
    return "".join(text), images


def _decode_image(url: str):
    import base64
    import io

    from PIL import Image

    from engines.images import prepare

    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise ValueError("images must be given as data: URLs (base64); remote URLs are not fetched")
    try:
        raw = base64.b64decode(url.split(",", 1)[1])
        return prepare(Image.open(io.BytesIO(raw))).image
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read the image: {e}") from e


def parse_request(body: dict, settings: Settings, vision: bool) -> tuple[list[ChatMessage], GenParams, bool]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError("each message needs a role of system, user or assistant")
        text, images = _content_text(m.get("content", ""))
        if images and not vision:
            raise ValueError("this model does not take images")
        if len(text) > settings.max_input_chars:
            raise ValueError(f"a message has {len(text)} characters; the limit is {settings.max_input_chars}")
        out.append(ChatMessage(m["role"], text, tuple(_decode_image(u) for u in images)))
    if out[-1].role != "user":
        raise ValueError("the last message must come from the user")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 512
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= settings.max_new_tokens_limit:
        raise ValueError(f"max_tokens must be in [1, {settings.max_new_tokens_limit}]")
    kw = {"max_new_tokens": max_tokens}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if body.get(key) is not None:
            kw[key] = body[key]
    if body.get("n", 1) != 1:
        raise ValueError("only n=1 is supported")
    return out, GenParams(**kw), bool(body.get("stream"))


def mount(app, manager: EngineManager, settings: Settings) -> None:
    """Add the /v1 routes to the Gradio server's FastAPI ``app`` (ahead of Gradio's own routes)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    pairs = settings.auth_pairs() or []
    keys = {f"{u}:{p}" for u, p in pairs} | {p for _, p in pairs}
    waiting = {"n": 0}
    lock = threading.Lock()

    def authorized(request: Request) -> bool:
        if not keys:
            return True
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and header[7:].strip() in keys

    async def models(request: Request):
        if not authorized(request):
            return _err(401, "Invalid API key.", "authentication_error", "invalid_api_key")
        info = manager.info()
        data = [] if info is None else [{"id": info.model, "object": "model", "created": 0,
                                         "owned_by": "turbostudio", "backend": info.backend,
                                         "max_model_len": info.context_length, "vision": info.vision}]
        return {"object": "list", "data": data}

    async def completions(request: Request):
        if not authorized(request):
            return _err(401, "Invalid API key.", "authentication_error", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _err(400, "The body must be JSON.")
        info = manager.info()
        if info is None:
            return _err(503, "No model is loaded.", "server_error", "no_model")
        asked = body.get("model")
        if asked not in (None, "", "default", info.model):
            return _err(404, f"The model {asked!r} does not exist; this server serves {info.model!r}.",
                        "invalid_request_error", "model_not_found")
        try:
            messages, params, stream = parse_request(body, settings, info.vision)
        except ValueError as e:
            return _err(400, str(e))
        with lock:
            if waiting["n"] >= settings.max_queue + (settings.concurrency or info.max_batch):
                return _err(429, f"Busy: {waiting['n']} requests ahead of you. Try again shortly.",
                            "rate_limit_error", "busy")
            waiting["n"] += 1
        released = []

        def release():      # exactly once, whichever way the request ends
            with lock:
                if not released:
                    released.append(True)
                    waiting["n"] -= 1
        sid = "api-" + uuid.uuid4().hex
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            fit = await asyncio.to_thread(manager.fit, messages, params)
            it = manager.stream(fit.messages, params, session_id=sid, prompt_tokens=fit.prompt_tokens)
        except ContextTooLong as e:
            release()
            return _err(400, e.message, "invalid_request_error", "context_length_exceeded")
        except EngineError as e:
            release()
            return _err(503 if isinstance(e, EngineUnavailable) else 500, e.message, "server_error", e.code)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def pump():   # the engine's iterator is blocking: read it in a thread, hand deltas to the loop
            try:
                for d in it:
                    loop.call_soon_threadsafe(q.put_nowait, d)
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, None)

        def chunk(delta: dict, finish=None, usage=None) -> str:
            d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": info.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        async def deltas():
            # the engine starts when the response is read, so a response never sent costs no generation
            threading.Thread(target=pump, daemon=True, name=f"api-{sid[-6:]}").start()
            try:
                while True:
                    d = await q.get()
                    if d is None:
                        return
                    if isinstance(d, Exception):
                        raise d
                    yield d
            finally:
                release()

        try:
            prompt_tokens = fit.prompt_tokens or await asyncio.to_thread(manager.require().count_tokens,
                                                                         fit.messages)
        except Exception:
            release()
            it.close()
            raise

        def usage(tokens):
            return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                    "total_tokens": prompt_tokens + tokens}

        finish_map = {"stop": "stop", "length": "length", "abort": "stop", "error": "error"}
        if stream:
            async def sse():
                tokens = 0
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for d in deltas():
                        tokens = d.tokens
                        if d.finish_reason == "error":
                            yield f"data: {json.dumps({'error': {'message': d.error, 'type': 'server_error'}})}\n\n"
                            break
                        if d.text:
                            yield chunk({"content": d.text})
                        if d.finish_reason:
                            yield chunk({}, finish_map[d.finish_reason], usage(tokens))
                    yield "data: [DONE]\n\n"
                finally:
                    manager.abort(sid)   # no-op when finished; a disconnect lands here

            body_iter = sse()
            # a client gone before the body is first read leaves sse() unstarted, so no finally of
            # its own runs: free the place (and the engine request) when the generator is collected
            weakref.finalize(body_iter, release)
            weakref.finalize(body_iter, manager.abort, sid)
            return StreamingResponse(body_iter, media_type="text/event-stream")
        text, last = [], None
        try:
            async for d in deltas():
                text.append(d.text)
                last = d
                if await request.is_disconnected():
                    manager.abort(sid)
        finally:
            manager.abort(sid)
        if last is not None and last.finish_reason == "error":
            return _err(500, last.error or "generation failed", "server_error")
        tokens = last.tokens if last else 0
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": info.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": finish_map.get(last.finish_reason if last else "stop", "stop")}],
            "usage": usage(tokens)})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", completions, methods=["POST"])
    # Gradio's app ends with catch-all routes: put ours first so they are matched.
    routes = app.router.routes
    ours = [r for r in routes if getattr(r, "path", "").startswith("/v1/")]
    for r in ours:
        routes.remove(r)
    routes[0:0] = ours
