"""``/chat`` through Gradio's REST protocol, served by two routes of the app's own instead of
Gradio's queue: the same URLs, bodies and server-sent events, the same credentials, a third of the
server's work per request.

Why: ``/chat`` is the endpoint scripts and load tests call (``POST /gradio_api/call/chat``, then
``GET /gradio_api/call/chat/{event_id}`` for its events). Through Gradio 6.31 each call costs the
web process ~4.5 ms of CPU on its one event loop before the first token can go out (CPU, 2-core
Xeon, 2026-12-03, py-spy): two requests through Gradio's middleware and router, a new session state,
the queue's bookkeeping, ``process_api``'s pre- and post-processing, a ``request.is_disconnected()``
poll (an anyio cancel scope) before every message. With 16 or 64 users arriving together those
starts queue behind each other on the loop: every user's first token waited for all of them
(16 users: 51 ms here, 93 ms p99 on the H200 host; ``/v1``, one plain route, 18 and 46 ms). These two
routes do what the endpoint needs and nothing else: ~1.5 ms a call.

What is kept from Gradio, not re-implemented:
* **credentials**: Gradio's own ``get_current_user`` and ``login_check`` (its ``/user`` and
  ``/login_check`` routes' functions) are called, so ``--auth``'s cookie, an ``auth_dependency``
  and whatever Gradio adds later decide exactly as they do for Gradio's routes;
* the **body** model (``gradio.data_classes.SimplePredictBody``) and FastAPI's 422 answer shape;
* **error payloads** (``gradio.utils.error_payload``: a ``gr.Error``'s message, title and duration,
  anything else hidden unless the app shows errors);
* the **event format** (``event: generating|complete|error|heartbeat``, ``data:`` JSON lists);
* an event id this module did not make (one Gradio's queue holds: any other endpoint's) goes to
  Gradio's own route.

The routes guard Gradio's REST protocol for *every* endpoint, since its own routes failed on
malformed requests (schemathesis on Gradio's own schema, ``/gradio_api/openapi.json``, 2026-12-03:
37 of 75 operations answered a 500, 35-37 more broke their stream off in two runs): ``POST
/call/v2/{api_name}`` (inputs by name, the form that schema documents) gets a 422 naming a missing,
unknown or mistyped field, a 404 for an unknown endpoint, then Gradio's route; ``POST
/call/{api_name}`` gets its left-out inputs' defaults or a 422 naming the missing or surplus ones
(Gradio: ``{"error": null}``); ``GET /call/{api_name}/{event_id}`` gets a 404 for an id nobody holds.
Each value's *type* is checked against the type Gradio's api info declares for that input (a 422
naming the input: Gradio ran a number box given ``"x"`` and answered ``{"error": null}``); choices and
ranges are left to the components, whose refusals name them (some of Gradio's declared choices
cannot be met: a string type with integer choices). After the guard the same schemathesis run found
only Gradio's 503 "Queue is full" (right under that load) and its multipart ``/upload`` (a 500 for a
``files`` part that is not a file: a 400 now, ``ui/gradio_patches.UploadGuard``).

What differs, on purpose (tests/ui/test_rest_chat.py checks each against Gradio's own path):
* each update is the whole reply so far, so a reader that falls behind gets the newest one (never a
  backlog of stale ones; the end is never dropped);
* a body with fewer inputs than ``/chat`` has gets their defaults (Gradio answered ``{"error": null}``)
  and one with more is refused by name (Gradio ignored them silently); an unknown event id gets a 404
  (Gradio's stream broke off mid-chunk);
* a posted request whose events nobody reads within ``UNCLAIMED_S`` is aborted (Gradio kept
  generating for nobody), and at most ``UNREAD_MAX`` may wait to be read (a 503 past it, as Gradio's
  full queue answers); a reader that leaves aborts it at once, like ``/v1``;
* ``/chat`` no longer waits in Gradio's queue: admission is the engine manager's, the same places and
  limits as ``/v1`` and the pages (``EngineManager.submit``), so a full server says so in the error
  event instead of queueing behind the page's events.

``TURBOSTUDIO_REST_CHAT=0`` leaves ``/chat`` to Gradio (A/B runs: ``bench/bench_web.py --variant``).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

UNCLAIMED_S = 60.0      # seconds a posted request may wait for its reader before it is aborted
UNREAD_MAX = 1024       # posted requests not yet read, at most: past it a POST gets 503 (Gradio's full queue)
HEARTBEAT_S = 15.0      # Gradio's heartbeat rate (utils.get_heartbeat_rate), for proxies that cut idle streams

Handler = Callable[..., AsyncIterator]


class _Event:
    """One posted request: its task and what its reader has not seen yet."""

    __slots__ = ("task", "latest", "end", "changed", "claimed", "timer")

    def __init__(self):
        self.task: asyncio.Task | None = None
        self.latest: list | None = None     # the newest update (a cumulative reply: newer replaces older)
        self.end: tuple[str, object] | None = None      # ("complete", data) or ("error", payload)
        self.changed = asyncio.Event()
        self.claimed = False
        self.timer: asyncio.TimerHandle | None = None


def _json_invalid(e: ValueError) -> JSONResponse:
    """FastAPI's own answer to a body that is not JSON (or not UTF-8: a UnicodeDecodeError)."""
    pos, msg = getattr(e, "pos", getattr(e, "start", 0)), getattr(e, "msg", None) or getattr(e, "reason", str(e))
    return JSONResponse({"detail": [{"type": "json_invalid", "loc": ["body", pos], "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": msg}}]}, status_code=422)


async def _parse(request: Request, model=None) -> tuple[object, Response | None]:
    """(the body as ``model``, or its JSON value without one, None) or (None, FastAPI's own 422
    answer: a body that is not JSON, or one the model refuses, each error's ``loc`` under ``body``)."""
    from fastapi.encoders import jsonable_encoder
    from pydantic import ValidationError

    try:
        data = json.loads(await request.body())
    except ValueError as e:       # JSONDecodeError, UnicodeDecodeError
        return None, _json_invalid(e)
    if model is None:
        return data, None
    try:
        return model.model_validate(data), None
    except ValidationError as e:
        errors = [{**err, "loc": ["body", *err["loc"]]} for err in e.errors(include_url=False)]
        return None, JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


# JSON Schema's basic types, as Python values (bool is not a number here, though it is an int)
_KINDS = {"string": (str,), "number": (int, float), "integer": (int, float), "boolean": (bool,),
          "array": (list,), "object": (dict,), "null": (type(None),)}


def _accepts(schema, value) -> bool | None:
    """Whether ``value`` has a type ``schema`` (one of Gradio's api-info types) allows: True, False,
    or None where the schema is not one of the basic types checked here (a file's FileData model,
    a free ``{}``). Only the type is checked: not Gradio's choices (a dropdown's can change while the
    app runs, and some are listed with the wrong type: a string type with integer choices, whose
    values' own types are accepted too) nor ranges (the component's own refusal names them)."""
    if not isinstance(schema, dict):
        return None
    alts = schema.get("oneOf") or schema.get("anyOf")
    if alts:
        answers = [_accepts(a, value) for a in alts]
        return None if None in answers else any(answers)
    kind = schema.get("type")
    if kind not in _KINDS or "properties" in schema or "$defs" in schema:
        return None
    if isinstance(value, bool) and kind != "boolean":
        return False
    if kind == "integer" and isinstance(value, float) and not value.is_integer():
        return False
    return isinstance(value, _KINDS[kind]) or any(type(c) is type(value) for c in schema.get("enum") or ())


def _type_errors(params: list[dict], values, loc) -> list[dict]:
    """FastAPI-shaped errors for the inputs whose value has a type the endpoint's api info does not
    allow, e.g. a float for a text box. Gradio ran them anyway: a number box given ``"x"`` failed
    inside the component and its client got ``{"error": null}`` (52 of 94 such calls, one per typed
    input of every endpoint of this app, CPU, 2026-12-03; one more an "Internal error", 10 ran as if
    valid). An input's own default always passes (Gradio's schema may not cover it). ``values``:
    (key, value, param)."""
    errors = []
    for key, value, p in values:
        if p.get("parameter_has_default") and value == p.get("parameter_default"):
            continue
        if _accepts(p.get("type"), value) is False:
            schema = p["type"]
            kinds = [a.get("type") for a in (schema.get("oneOf") or schema.get("anyOf") or [schema])]
            kind = next((k for k in kinds if k != "null"), None) or "value"
            allowed = " or ".join(f"a valid {k}" if k != "null" else "null" for k in kinds if k) or "a valid value"
            errors.append({"type": f"{kind}_type", "loc": ["body", *loc, key],
                           "msg": f"Input should be {allowed} ({p['parameter_name']}; got "
                                  f"{type(value).__name__})",
                           "input": value})
    return errors


def _as_response(out) -> Response:
    """What one of Gradio's endpoint functions returned, as FastAPI would have sent it."""
    return out if isinstance(out, Response) else JSONResponse(out)


def _endpoints(routes, depth: int = 0):
    """(path, endpoint) of every route, those of included routers too (Gradio 6.31 keeps its
    ``/gradio_api`` routes in an ``_IncludedRouter`` whose ``original_router`` has them unprefixed)."""
    for route in routes:
        if getattr(route, "endpoint", None) is not None and getattr(route, "path", None):
            yield route.path, route.endpoint
        inner = getattr(getattr(route, "original_router", None), "routes", None) or getattr(route, "routes", None)
        if inner and depth < 4:
            yield from _endpoints(inner, depth + 1)


class RestChat:
    """Gradio's REST protocol ahead of Gradio's routes (see the module's docstring): ``/chat`` served
    here, every other endpoint checked and handed on. ``handler(*inputs, request=...)`` is
    ``/chat``'s own async generator (``ui.app``'s ``api_chat``); ``inputs`` its input names, in order."""

    def __init__(self, handler: Handler, inputs: tuple[str, ...], api_name: str = "chat"):
        self.handler, self.inputs, self.api_name = handler, inputs, api_name
        sig = inspect.signature(handler).parameters
        # the inputs a request must send: those without a default in the handler
        self.required = tuple(n for n in inputs if n in sig and sig[n].default is inspect.Parameter.empty)
        self.events: dict[str, _Event] = {}
        self.unread = 0     # events posted and not yet claimed by a reader (kept as a count: O(1) a POST)
        self._gradio: dict[str, Callable] | None = None
        self._v2 = None
        self._api_info: dict | None = None

    def routes(self) -> list[Route]:
        """The routes, ahead of Gradio's. The two with ``{api_name}`` serve every endpoint of Gradio's
        REST protocol, not only ``/chat``: they answer what Gradio's own routes failed on and hand
        the rest to them (see :meth:`get` and :meth:`post_v2`)."""
        from gradio.route_utils import API_PREFIX

        return [Route(f"{API_PREFIX}/call/{{api_name}}", self.post, methods=["POST"]),
                Route(f"{API_PREFIX}/call/{{api_name}}/", self.post, methods=["POST"]),
                # the form Gradio's own OpenAPI schema (/gradio_api/openapi.json) documents: inputs by name
                Route(f"{API_PREFIX}/call/v2/{{api_name}}", self.post_v2, methods=["POST"]),
                Route(f"{API_PREFIX}/call/v2/{{api_name}}/", self.post_v2, methods=["POST"]),
                Route(f"{API_PREFIX}/call/{{api_name}}/{{event_id}}", self.get, methods=["GET"]),
                Route(f"{API_PREFIX}/call/v2/{{api_name}}/{{event_id}}", self.get, methods=["GET"])]

    # ------------------------------------------------------------------ Gradio's own functions
    def _functions(self, app) -> dict[str, Callable]:
        """Gradio's ``get_current_user``, ``login_check`` and its ``/call`` GET and v2 POST endpoints,
        found once among the app's routes by their paths."""
        if self._gradio is None:
            from gradio.route_utils import API_PREFIX

            want = {"user": "/user", "login_check": "/login_check", "get": "/call/{api_name}/{event_id}",
                    "post": "/call/{api_name}", "post_v2": "/call/v2/{api_name}"}
            found = {}
            for path, endpoint in _endpoints(app.router.routes):
                if getattr(endpoint, "__self__", None) is self:
                    continue                     # our own routes share these paths
                for key, rel in want.items():
                    if path in (rel, API_PREFIX + rel) and key not in found:
                        found[key] = endpoint
            missing = sorted(set(want) - set(found))
            if missing:      # a Gradio that moved them: refuse rather than serve without its checks
                raise RuntimeError(f"ui.rest_chat: Gradio's routes for {missing} were not found; "
                                   "set TURBOSTUDIO_REST_CHAT=0 to leave /chat to Gradio")
            self._gradio = found
        return self._gradio

    def check(self, app) -> None:
        """At launch: Gradio's functions these routes call are there (a RuntimeError naming the missing
        ones otherwise), so a Gradio that moved them stops the app at once instead of answering 500."""
        self._functions(app)

    async def _caller(self, request: Request) -> tuple[str | None, Response | None]:
        """(the logged-in user or None, None) or (None, the 401 answer), decided by Gradio's functions."""
        from fastapi import HTTPException

        fns = self._functions(request.app)
        user = await fns["user"](request)
        try:
            fns["login_check"](user)
        except HTTPException as e:
            return None, JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
        return user, None

    # ------------------------------------------------------------------ POST: start the request
    async def post(self, request: Request) -> Response:
        from gradio.data_classes import SimplePredictBody

        user, refused = await self._caller(request)
        if refused is not None:
            return refused
        body, invalid = await _parse(request, SimplePredictBody)
        if invalid is not None:
            return invalid
        api_name = request.path_params["api_name"]
        if api_name == self.api_name:
            return self._start(request, user, body.data, body.session_hash)
        # another endpoint: its inputs counted first (Gradio answered too few with {"error": null}),
        # the ones left out that have a default filled in, then Gradio's own route
        params, refused = self._inputs_of(request, api_name)
        if refused is not None:
            return refused
        names = ", ".join(p["parameter_name"] for p in params) or "none"
        data = list(body.data)
        errors = ([{"type": "too_long", "loc": ["body", "data"],
                    "msg": f"/{api_name} takes {len(params)} inputs ({names}); this request sent {len(data)}"}]
                  if len(data) > len(params) else
                  [{"type": "missing", "loc": ["body", "data", i], "msg": f"Field required: {p['parameter_name']}"}
                   for i, p in enumerate(params) if i >= len(data) and not p.get("parameter_has_default")])
        errors = errors or _type_errors(params, [(i, v, p) for i, (v, p) in enumerate(zip(data, params))], ["data"])
        if errors:
            return JSONResponse({"detail": errors}, status_code=422)
        body.data = data + [p.get("parameter_default") for p in params[len(data):]]
        out = await self._functions(request.app)["post"](api_name=api_name, body=body, request=request,
                                                        username=user)
        return _as_response(out)

    def _inputs_of(self, request: Request, api_name: str) -> tuple[list, Response | None]:
        """(the endpoint's API inputs as Gradio's api info lists them, None) or ([], a 404). The info is
        built once (~5 ms: every endpoint of the app; they do not change once it is launched)."""
        if self._api_info is None:
            self._api_info = request.app.get_blocks().get_api_info()["named_endpoints"]
        endpoint = self._api_info.get("/" + api_name)
        if endpoint is None:
            return [], JSONResponse({"detail": f"No API endpoint named {api_name!r} (see /gradio_api/info)."},
                                    status_code=404)
        return endpoint["parameters"], None

    async def post_v2(self, request: Request) -> Response:
        """``POST /gradio_api/call/v2/{api_name}``: the inputs by name (``{"messages": ..., "params":
        ...}``). ``/chat`` is started here; another endpoint's body is checked against its inputs
        (Gradio's api info) and then handed to Gradio's own route. Gradio's route answered a missing
        input, an unknown one, ``session_hash`` or an unknown endpoint with a 500 (schemathesis, on
        Gradio's own schema: 37 of its 75 operations, 2026-12-03); here each is a 422 naming the field,
        or a 404."""
        user, refused = await self._caller(request)
        if refused is not None:
            return refused
        api_name = request.path_params["api_name"]
        if api_name != self.api_name:
            return await self._other_v2(request, api_name, user)
        body, invalid = await _parse(request, self._v2_model())
        if invalid is not None:
            return invalid
        data = [getattr(body, name) for name in self.inputs]
        while len(data) > len(self.required) and data[-1] is None:     # left out: the handler's default
            data.pop()
        return self._start(request, user, data, body.session_hash)

    async def _other_v2(self, request: Request, api_name: str, user: str | None) -> Response:
        params, refused = self._inputs_of(request, api_name)
        if refused is not None:
            return refused
        body, invalid = await _parse(request)
        if invalid is not None:
            return invalid
        names = {p["parameter_name"] for p in params} | {"oauth_token"}
        errors = [{"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary"}] \
            if not isinstance(body, dict) else (
            [{"type": "extra_forbidden", "loc": ["body", k], "msg": "Extra inputs are not permitted"}
             for k in body if k not in names]
            + [{"type": "missing", "loc": ["body", p["parameter_name"]], "msg": "Field required"}
               for p in params if not p.get("parameter_has_default") and p["parameter_name"] not in body])
        if not errors:
            errors = _type_errors(params, [(p["parameter_name"], body[p["parameter_name"]], p) for p in params
                                           if p["parameter_name"] in body], [])
        if errors:
            return JSONResponse({"detail": errors}, status_code=422)
        out = await self._functions(request.app)["post_v2"](api_name=api_name, body=body, request=request,
                                                           username=user)
        return _as_response(out)

    def _v2_model(self):
        """The v2 body as a pydantic model: each input by name (required ones without a default), the
        client's ``session_hash``, Gradio's ``oauth_token`` (ignored), nothing else."""
        if self._v2 is None:
            from typing import Any

            from pydantic import ConfigDict, create_model

            fields = {name: (Any, ... if name in self.required else None) for name in self.inputs}
            self._v2 = create_model(f"{self.api_name}_v2", __config__=ConfigDict(extra="forbid"),
                                    session_hash=(str | None, None), oauth_token=(Any, None), **fields)
        return self._v2

    def _start(self, request: Request, user: str | None, data: list, session_hash: str | None) -> Response:
        import gradio as gr

        if self.unread >= UNREAD_MAX:
            # a client posting without reading cannot pile up requests (each one a place in the
            # engine's admission until UNCLAIMED_S): refused like Gradio's full queue, before any work
            return JSONResponse({"detail": f"Too many /{self.api_name} requests are waiting to be read "
                                           f"({UNREAD_MAX}); read the events of those posted first."},
                                status_code=503)
        event_id = uuid.uuid4().hex
        ev = _Event()
        self.events[event_id] = ev
        self.unread += 1
        greq = gr.Request(request=request, username=user, session_hash=session_hash or event_id)
        show_error = bool(getattr(request.app.get_blocks(), "show_error", False))
        ev.task = asyncio.create_task(self._run(ev, data, greq, show_error))
        ev.timer = asyncio.get_running_loop().call_later(UNCLAIMED_S, self._unclaimed, event_id)
        return JSONResponse({"event_id": event_id})

    async def _run(self, ev: _Event, data: list, greq, show_error: bool) -> None:
        import gradio as gr
        from gradio.utils import error_payload

        try:
            if len(data) > len(self.inputs):
                raise gr.Error(f"/{self.api_name} takes at most {len(self.inputs)} inputs "
                               f"({', '.join(self.inputs)}); this request sent {len(data)}.",
                               title="Invalid input", print_exception=False)
            if len(data) < len(self.required):
                raise gr.Error(f"/{self.api_name} needs {', '.join(self.required)} (its inputs: "
                               f"{', '.join(self.inputs)}); this request sent {len(data)}.",
                               title="Invalid input", print_exception=False)
            last = None
            async for out in self.handler(*data, request=greq):
                ev.latest = last = [out]
                ev.changed.set()
            ev.end = ("complete", last if last is not None else [None])
        except asyncio.CancelledError:
            ev.end = ("error", {"error": "The request was aborted."})
            raise
        except Exception as e:  # noqa: BLE001 - every failure is the client's error event
            if not isinstance(e, gr.Error):
                log.exception("/%s failed", self.api_name)
            ev.end = ("error", error_payload(e, show_error))
        finally:
            ev.changed.set()

    def _unclaimed(self, event_id: str) -> None:
        ev = self.events.get(event_id)
        if ev is not None and not ev.claimed:
            self.events.pop(event_id, None)
            self.unread -= 1
            if ev.task is not None and not ev.task.done():
                ev.task.cancel()          # the reply's relay aborts the engine request

    # ------------------------------------------------------------------ GET: its events
    async def get(self, request: Request) -> Response:
        user, refused = await self._caller(request)
        if refused is not None:
            return refused
        event_id = request.path_params["event_id"]
        ev = self.events.get(event_id) if request.path_params["api_name"] == self.api_name else None
        if ev is None:
            if self._gradio_knows(request.app, event_id):
                # one of Gradio's queue (posted there: /call/v2, or before this route existed)
                return await self._functions(request.app)["get"](request=request, event_id=event_id)
            # (Gradio's own route broke the stream off mid-chunk for an id it does not hold)
            return JSONResponse({"detail": f"No /{request.path_params['api_name']} request {event_id!r} is "
                                           "waiting to be read (unknown, already read, or not read in time)."},
                                status_code=404)
        if ev.claimed:
            return JSONResponse({"detail": f"/{self.api_name} request {event_id!r} is already being read."},
                                status_code=409)
        ev.claimed = True
        self.unread -= 1
        if ev.timer is not None:
            ev.timer.cancel()
        return StreamingResponse(self._events(event_id, ev), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _gradio_knows(app, event_id: str) -> bool:
        """Whether Gradio's own queue holds this event (running, or finished and not yet read); when
        that cannot be told (a Gradio without these fields), it is left to Gradio to answer."""
        queue = getattr(app.get_blocks(), "_queue", None)
        events = getattr(queue, "event_ids_to_events", None)
        pending = getattr(queue, "pending_event_ids_session", None)
        if events is None or pending is None:
            return True
        return event_id in events or any(event_id in ids for ids in pending.values())

    async def _events(self, event_id: str, ev: _Event):
        loop = asyncio.get_running_loop()
        sent = None
        try:
            while True:
                if ev.latest is not sent:
                    sent = ev.latest
                    yield f"event: generating\ndata: {json.dumps(sent)}\n\n"
                if ev.end is not None:
                    kind, data = ev.end
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    return
                ev.changed.clear()
                # a timer handle for the heartbeat, cheaper than wait_for's task per update
                beat = loop.call_later(HEARTBEAT_S, ev.changed.set)
                try:
                    await ev.changed.wait()
                finally:
                    beat.cancel()
                if ev.latest is sent and ev.end is None:
                    yield "event: heartbeat\ndata: null\n\n"
        finally:
            self.events.pop(event_id, None)
            if ev.task is not None and not ev.task.done():
                ev.task.cancel()          # the reader left: abort (the relay frees the engine's place)


__all__ = ["RestChat", "UNCLAIMED_S"]
