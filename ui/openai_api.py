"""The app's own OpenAI-compatible endpoint (opt-in with ``--api``): ``/v1/models`` and
``/v1/chat/completions`` (streaming and not) for whatever engine is loaded.

It is a FastAPI application of its own, mounted at ``/v1`` in the Gradio server (same port), so that
its error handlers answer in OpenAI's error shape (``{"error": {"message", "type", "param",
"code"}}``) without touching Gradio's routes, and its OpenAPI schema (``/v1/openapi.json``) describes
exactly these routes, which is what the API fuzzer (schemathesis) reads. Bodies are parsed by the
pydantic models of :mod:`ui.openai_protocol`; a malformed body gets a 400, never a 500.

Requests take the one road (``EngineManager.submit``): the same limits, admission and abort as the
Chat page. Credentials are the UI's: with ``--auth user:password``, clients send
``Authorization: Bearer user:password`` (or just the password). A client that disconnects, mid-stream
or while waiting for a non-streamed reply, aborts its request and frees its place at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from engines.base import Busy, ContextTooLong, EngineError, EngineUnavailable, InvalidRequest
from engines.manager import EngineManager
from settings import Settings

from .openai_protocol import ChatCompletionRequest, to_chat_request

log = logging.getLogger(__name__)
FINISH = {"stop": "stop", "length": "length", "abort": "stop", "error": "error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, typ: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.typ, self.code, self.param = status, message, typ, code, param


def error_body(message: str, typ: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": typ, "param": param, "code": code}}


def _error(status: int, message: str, typ: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, typ, code, param), status_code=status)


STREAM_PACE = 0.025     # seconds between a stream's chunks per 16 streams beyond the first 4


def stream_pace(running: int) -> float:
    """Least seconds between two chunks of a streamed reply while ``running`` requests run: 0 (a
    chunk per token, as OpenAI's and LMDeploy's servers send) up to 4 streams, then growing with
    the load (19 ms at 16 streams, 94 ms at 64), so that a busy server writes fewer, larger chunks
    instead of falling behind on every stream (no text is dropped; measured with bench/bench_web.py
    --path v1)."""
    return max(0.0, STREAM_PACE * (running - 4) / 16)


def from_engine_error(e: EngineError) -> APIError:
    """The HTTP answer for an engine-side refusal."""
    if isinstance(e, InvalidRequest):
        return APIError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, ContextTooLong):
        return APIError(400, e.message, code="context_length_exceeded", param="messages")
    if isinstance(e, Busy):
        return APIError(429, e.message, "rate_limit_error", "busy")
    if isinstance(e, EngineUnavailable):
        return APIError(503, e.message, "server_error", e.code)
    return APIError(500, e.message, "server_error", e.code)


def _loc(loc) -> str:
    """pydantic's error location as a parameter path: ("body", "messages", 0, "content") ->
    "messages[0].content"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]", "function-after[...]") or "[" in str(part):
            continue      # union branch names, not a place in the body
        else:
            out += ("." if out else "") + str(part)
    return out


def _decode_image(url: str):
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    from engines.images import ImageError, prepare

    if not url.startswith("data:image/") or "," not in url:
        raise ValueError("images must be given as data: URLs (base64); remote URLs are not fetched")
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=True)
        return prepare(Image.open(io.BytesIO(raw))).image
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, ImageError) as e:
        raise ValueError(f"cannot read the image: {e}") from None


def build_api(manager: EngineManager, settings: Settings) -> FastAPI:
    """The /v1 application (mount it with :func:`mount`)."""
    api = FastAPI(title="TurboStudio OpenAI-compatible API", version="1", docs_url=None, redoc_url=None)
    pairs = settings.auth_pairs() or []
    users = {f"{u}:{p}": u for u, p in pairs}
    users.update({p: u for u, p in pairs})
    bearer = HTTPBearer(auto_error=False)

    @api.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return _error(e.status, e.message, e.typ, e.code, e.param)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = _loc(first.get("loc", ()))
        kind = first.get("type", "")
        if kind == "json_invalid":
            msg = "The body is not valid JSON."
            where = ""      # pydantic's loc here is a byte offset into the body, not a parameter
        elif not where and kind in ("model_attributes_type", "dict_type", "missing"):
            msg = "The body must be a JSON object (a chat completion request)."
            ctype = _req.headers.get("content-type", "")
            if "json" not in ctype:
                msg += f" Send it with Content-Type: application/json (got {ctype or 'none'!r})."
        elif kind == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {where}"
        else:
            msg = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem(s))"
        return _error(400, msg, param=where or None, code=kind or None)

    @api.exception_handler(HTTPException)
    async def _http(_req, e: HTTPException):
        typ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), typ)

    @api.exception_handler(Exception)
    async def _crash(_req, e: Exception):   # a fault of ours: logged with its traceback, answered in shape
        log.exception("unexpected error in /v1")
        return _error(500, f"Internal error ({type(e).__name__}).", "server_error", "internal_error")

    if users:
        def caller(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:
            """The user the key belongs to."""
            user = users.get(creds.credentials.strip()) if creds is not None else None
            if user is None:
                raise APIError(401, "Invalid API key.", "authentication_error", "invalid_api_key")
            return user
    else:
        def caller() -> str | None:      # no --auth: no key is asked for (and the schema says so)
            return None

    @api.get("/models")
    async def models(_user: str | None = Depends(caller)):
        info = manager.info()
        data = [] if info is None else [{"id": info.model, "object": "model", "created": 0,
                                         "owned_by": "turbostudio", "backend": info.backend,
                                         "max_model_len": info.context_length, "vision": info.vision}]
        return {"object": "list", "data": data}

    @api.post("/chat/completions", responses={400: {"description": "invalid request (OpenAI error shape)"},
                                               401: {"description": "invalid API key"},
                                               404: {"description": "unknown model"},
                                               429: {"description": "busy"},
                                               503: {"description": "no model loaded"}})
    async def completions(body: ChatCompletionRequest, request: Request, user: str | None = Depends(caller)):
        info = manager.info()
        if info is None:
            raise APIError(503, "No model is loaded.", "server_error", "no_model")
        if body.model not in (None, "", "default", info.model):
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {info.model!r}.",
                           "invalid_request_error", "model_not_found", "model")
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        try:
            req = to_chat_request(body, max_new_tokens_limit=settings.max_new_tokens_limit, owner=user,
                                  request_id=rid, decode_image=_decode_image, defaults=info.defaults)
            sub = await manager.submit_async(req)
        except EngineError as e:
            raise from_engine_error(e) from None
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def prompt_tokens() -> int:
            if sub.fit.prompt_tokens:
                return sub.fit.prompt_tokens
            try:
                return await asyncio.to_thread(manager.token_cost, list(sub.request.messages))
            except Exception:  # noqa: BLE001 - a usage figure is not worth failing a reply for
                return 0

        def usage(prompt: int, tokens: int) -> dict:
            return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}

        def chunk(delta: dict, finish=None) -> str:
            d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": info.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(d)}\n\n"

        # a content chunk is this request's fixed text around the JSON of its piece: the same bytes
        # as chunk({"content": piece}) without building and encoding the whole dict per token
        head, _, tail = chunk({"content": ""}).rpartition('{"content": ""}')
        head += '{"content": '
        tail = "}" + tail

        def content(piece: str) -> str:
            return head + json.dumps(piece) + tail

        if body.stream:
            async def sse():
                tokens = 0
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    # the one relay (a vanished client cancels it: abort); under load it reads
                    # at a pace, so several tokens go in one chunk (see stream_pace)
                    try:
                        async for d in sub.updates(lambda: stream_pace(manager.running)):
                            tokens = d.tokens
                            if d.finish_reason == "error":
                                err = error_body(d.error or "generation failed", "server_error", "engine_error")
                                yield f"data: {json.dumps(err)}\n\n"
                                break
                            if d.text:
                                yield content(d.text)
                            if d.finish_reason:
                                yield chunk({}, FINISH[d.finish_reason])
                    except EngineError as e:      # the engine's stream raised (its process died): said in
                        err = error_body(e.message, "server_error", e.code or "engine_error")   # the stream
                        yield f"data: {json.dumps(err)}\n\n"
                    if include_usage:
                        u = {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": info.model, "choices": [], "usage": usage(await prompt_tokens(), tokens)}
                        yield f"data: {json.dumps(u)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    sub.close()     # no-op when it ended; an unread or cut stream is aborted here

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # not streamed: the client may still leave while it waits; a watcher aborts the request then
        async def watch_disconnect():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    sub.abort()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        text, last = [], None
        try:
            async for d in sub:
                text.append(d.text)
                last = d
        except EngineError as e:
            raise from_engine_error(e) from None
        finally:
            watcher.cancel()
            sub.close()
        if last is not None and last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed", "server_error", "engine_error")
        tokens = last.tokens if last else 0
        return {"id": rid, "object": "chat.completion", "created": created, "model": info.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None,
                             "finish_reason": FINISH.get(last.finish_reason if last else "abort", "stop")}],
                "usage": usage(await prompt_tokens(), tokens)}

    return api


def routes(manager: EngineManager, settings: Settings) -> list:
    """The /v1 application as a route list for the FastAPI app Gradio builds
    (``launch(app_kwargs={"routes": ...})``): there its routes come before Gradio's catch-alls and
    exist from the server's first request."""
    from starlette.routing import Mount

    return [Mount("/v1", app=build_api(manager, settings))]
