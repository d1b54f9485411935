"""Chat page: streaming multi-turn chat through the model's own chat template, with conversations
kept on the server.

The branch shown lives in a per-browser-session ``gr.State`` as plain turns ``{"role", "content"}``
(assistant turns also carry ``stats``: what produced the reply and how fast; with history on each
turn also has its message ``id`` and its ``siblings``); the Chatbot only displays it, with each
reply's details line under it. What the model sees is the turns alone, so stats never leak into
the prompt.

Conversations (issue #18) are kept in ``storage.conversations`` as trees: regenerate and edit add
a sibling instead of overwriting, and "‹ 2/3 ›" under the chat moves between siblings; the
conversation continues from the branch shown. Messages are written as they happen (the user's when
sent, the reply from its first token, throttled). The side list (:class:`ConversationPanel`) is
shared with the Vision page. Each conversation belongs to an owner (:func:`owner_key`): the user
under --auth, else the browser (a random id kept in its localStorage through ``gr.BrowserState``).
The browser also keeps which conversation was open (per owner), and a reload opens it again.
With --no-history (``ctx.store`` None) the page works in the tab only and says so.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time
from typing import AsyncIterator

import gradio as gr

from engines.base import ChatMessage, ChatRequest, EngineError, GenParams, InvalidRequest
from engines.manager import EngineManager, Limits, within_limits
from storage.conversations import ConversationStore, NotFound, ReplyWriter, new_id, to_markdown

from .common import (Context, Refusal, SamplingControls, fmt_stats, make_params, model_label, refuse,
                     session_id, user_error, user_of)

UPDATE_INTERVAL = 0.05   # seconds between UI updates while streaming (text is coalesced, not dropped)
WRITE_INTERVAL = 0.5     # seconds between writes of a streaming reply to the store (and at its end)


def write_pace(manager: EngineManager | None):
    """Seconds between a streaming reply's writes: ``WRITE_INTERVAL`` up to 16 streams, then in
    proportion (2 s at 64), as the page's own updates coalesce: the writes' CPU stays flat under
    load, and a crash still keeps all but the last couple of seconds of a reply."""
    if manager is None:
        return WRITE_INTERVAL
    return lambda: WRITE_INTERVAL * max(1.0, manager.running / 16)


DOWNLOAD_JS = ("(f) => { if (f && f.url) { const a = document.createElement('a'); a.href = f.url; "
               "a.download = f.orig_name || ''; document.body.appendChild(a); a.click(); a.remove(); } }")
"""Has the browser download the file an export just wrote (a ``gr.File``'s value, given to a js step)."""
BROWSER_KEY = "turbostudio-browser-id"   # the localStorage key of the browser's own id
OPEN_KEY = "turbostudio-open-{kind}"      # the localStorage key of the conversation open (ConversationPanel)
OPEN_OWNERS = 8     # owners (users logged in on one browser) whose open conversation a browser keeps
HISTORY_OFF = ("**History is off** on this server (`--no-history`): this conversation lives in this "
               "browser tab only; a reload loses it. Export it to keep it.")


def to_messages(turns: list[dict], system: str | None = None) -> list[ChatMessage]:
    msgs = [ChatMessage("system", system.strip())] if system and system.strip() else []
    msgs += [ChatMessage(t["role"], t["content"], tuple(t.get("images") or ())) for t in turns]
    return msgs


def drop_reply(turns: list[dict]) -> list[dict]:
    """The turns without the trailing assistant reply (for regenerate, undo and edit)."""
    turns = list(turns)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def details(meta: dict | None) -> str:
    """A reply's details line: speed (first token, tokens, tok/s, how it ended), then what produced
    it (model, engine, device and dtype, weight format and KV quantization, sampling)."""
    if not meta:
        return ""
    parts = [fmt_stats(meta)] if fmt_stats(meta) else []
    if meta.get("model"):
        engine = meta.get("backend") or ""
        where = ", ".join(x for x in (meta.get("device"), meta.get("dtype")) if x)
        parts.append(f"{meta['model']}" + (f" on {engine}" if engine else "") + (f" ({where})" if where else ""))
    fmt = [meta["format"]] if meta.get("format") and meta["format"] != "hf" else []
    if meta.get("kv_quant"):
        fmt.append(f"KV int{meta['kv_quant']}")
    if fmt:
        parts.append(" ".join(fmt))
    p = meta.get("params") or {}
    if p:
        s = f"T {p.get('temperature', 0):g}" if p.get("temperature") else "greedy"
        if p.get("temperature"):
            s += f" · top_p {p.get('top_p', 1):g} · top_k {p.get('top_k', 0)}"
        if p.get("repetition_penalty", 1) != 1:
            s += f" · rep {p['repetition_penalty']:g}"
        if p.get("seed") is not None:
            s += f" · seed {p['seed']}"
        parts.append(s)
    return " · ".join(parts)


def branch_mark(turn: dict) -> str:
    sibs = turn.get("siblings") or ()
    if len(sibs) < 2 or turn.get("id") not in sibs:
        return ""
    return f"‹ {sibs.index(turn['id']) + 1}/{len(sibs)} ›"


DISPLAY_WINDOW = 100
"""Messages drawn in the chatbot: a long conversation shows its last ``DISPLAY_WINDOW`` under a line
saying how many earlier ones are not drawn (the model still sees them; the export has them all).
Gradio's Chatbot draws every message it is given, with no virtual scrolling: 1 000 messages took
~3-4 s to draw in Chromium on the 2-core machine (bench/bench_render.py), the last 100 well under 1 s."""


def hidden_turns(turns: list[dict]) -> int:
    """How many of ``turns`` (from the front) the chatbot does not draw."""
    return max(0, len(turns) - DISPLAY_WINDOW)


def display(turns: list[dict]) -> list[dict]:
    out = []
    skip = hidden_turns(turns)
    if skip:
        out.append({"role": "assistant", "content": f"<sub>… {skip} earlier messages are not drawn here "
                                                    f"(the model still sees them; Export has them all).</sub>"})
    for t in turns[skip:]:
        content = t["content"]
        line = " · ".join(x for x in (branch_mark(t), details(t.get("stats")) if t["role"] == "assistant" else "")
                          if x)
        if line:
            content = f"{content}\n\n<sub>{line}</sub>"
        out.append({"role": t["role"], "content": content})
    return out


def owner_key(request: gr.Request | None, browser_id: str | None = None) -> str:
    """Whose conversations a caller sees: the logged-in user (--auth), else the browser's own id
    (``gr.BrowserState``: every browser, and so every visitor of a shared app, its own), else
    the client's session (an API client without --auth: its own ``gradio_client`` session).
    Administrators get no view of others' conversations: they are private."""
    user = user_of(request)
    if user:
        return "user:" + user
    if browser_id and isinstance(browser_id, str):
        return "browser:" + browser_id
    return "session:" + session_id(request)


def reply_meta(manager: EngineManager, params: GenParams) -> dict:
    """What produces a reply: the model, engine, device, dtype, weight format and KV-cache
    quantization (LMDeploy engines) and the sampling parameters; the stats are added at its end."""
    info = manager.info()
    if info is None:
        return {"params": params.to_dict()}
    opts = getattr(getattr(manager, "_request", None), "options", None) or manager.options or {}
    meta = {"model": model_label(info), "backend": info.backend, "device": info.device, "dtype": info.dtype,
            "params": params.to_dict()}
    if info.backend in ("turbomind", "pytorch"):
        meta["format"] = opts.get("model_format") or "hf"
        meta["kv_quant"] = int(opts.get("quant_policy") or 0)
    else:       # Transformers: a quantized checkpoint (FP8, run dequantized on a CPU) or int8 at load
        fmt = [f for f in (info.extra.get("checkpoint_format"),
                           info.extra.get("weight_quant") and f"{info.extra['weight_quant']} weight-only") if f]
        if fmt:
            meta["format"] = " ".join(fmt)
    return meta


def turns_from(store: ConversationStore, owner: str, cid: str) -> list[dict]:
    """The branch shown of a stored conversation as the page's turns."""
    out = []
    for m in store.path(owner, cid):
        t = {"role": m.role, "content": m.content, "id": m.id, "siblings": m.siblings}
        if m.images:
            t["images"] = m.images
        if m.role == "assistant" and m.meta:
            t["stats"] = m.meta
        out.append(t)
    return out


def browser_secret(cache_dir: str) -> str:
    """The key ``gr.BrowserState`` encrypts the browser's id with, kept in the cache folder so an
    app restart still reads the ids browsers hold (a new random key per start would give every
    browser a new id, and its conversations would vanish from its list)."""
    path = os.path.join(cache_dir, "history", "browser-secret")
    try:
        with open(path) as f:
            s = f.read().strip()
        if s:
            return s
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(s)
    return s


class Conversation:
    """One page event's view of the store: creates the conversation at the first message, writes the
    user's message and the streaming reply. Every method is a no-op with history off."""

    def __init__(self, store: ConversationStore | None, kind: str, owner: str, cid: str | None):
        self.store, self.kind, self.owner, self.cid = store, kind, owner, cid

    def add_user(self, turns: list[dict], system: str = "") -> bool:
        """Store ``turns[-1]`` (the user's new message) under the turn before it; True if written."""
        if self.store is None or turns[-1].get("id"):
            return False
        if self.cid is None or not self.store.owns(self.owner, self.cid):
            self.cid = self.store.create(self.owner, self.kind, system=system or "")
        elif system is not None:
            self.store.set_system(self.owner, self.cid, system or "")
        parent = turns[-2].get("id") if len(turns) > 1 else None
        t = turns[-1]
        t["id"] = self.store.append(self.owner, self.cid, "user", t["content"], parent=parent,
                                    images=t.get("images") or ())
        return True

    def writer(self, turns: list[dict], meta: dict, manager: EngineManager | None = None) -> ReplyWriter | None:
        """The reply's writer; with ``manager``, it writes less often when many streams run."""
        if self.store is None or self.cid is None or not turns[-1].get("id"):
            return None
        return ReplyWriter(self.store, self.owner, self.cid, parent=turns[-1]["id"], meta=meta,
                           interval=write_pace(manager))

    def forget(self, mid: str | None) -> None:
        """Take back a message just written (a refused or unstarted reply's question)."""
        if self.store is not None and mid:
            try:
                self.store.delete_message(self.owner, mid)
            except NotFound:
                pass

    def back_to(self, turns: list[dict]) -> list[dict]:
        """The branch shown ends at ``turns[-1]`` again (after a reply taken back)."""
        if self.store is not None and self.cid is not None and all(t.get("id") for t in turns):
            try:
                self.store.set_leaf(self.owner, self.cid, turns[-1]["id"] if turns else None)
            except NotFound:
                return turns
            return self.reload(turns) if turns else []
        return turns

    def reload(self, turns: list[dict]) -> list[dict]:
        """The turns as stored (ids and siblings filled in), or ``turns`` with history off."""
        if self.store is None or self.cid is None:
            return turns
        try:
            return turns_from(self.store, self.owner, self.cid)
        except NotFound:
            return turns


async def stream_reply(manager: EngineManager, request: ChatRequest, interval: float = UPDATE_INTERVAL,
                       progress: dict | None = None) -> AsyncIterator[tuple[str, dict | None, str | None]]:
    """Yield (reply so far, stats or None until the end, notice or None), at most every ``interval``.
    ``progress`` (optional) is kept up to date while it streams: ``tokens`` generated so far and
    ``first`` (``time.perf_counter()`` at the first token), for a live tokens/s (Compare's panes).

    The request takes the one road (``manager.submit``: limits, admission, history fitting; a notice
    says how many turns were left out) and is read through the one relay; engine errors and
    refusals become ``gr.Error`` with the engine's message. If the consumer stops (Stop, a closed
    tab), the relay aborts the request."""
    try:
        sub = await manager.submit_async(request)
    except Exception as e:  # noqa: BLE001
        raise user_error(e) from e
    notice = None
    if sub.fit.dropped:
        notice = (f"The conversation is longer than the model's context: the {sub.fit.dropped} oldest "
                  f"turn(s) were left out of the prompt.")
    t0 = time.perf_counter()
    text, ttft, last_yield, last = "", None, 0.0, None

    def pace() -> float:
        # coalesce harder when many streams run: the text is never dropped, only sent in fewer,
        # larger pieces (20 updates/s for up to 16 streams, 5/s at 64). The relay reads at this
        # pace, so the event loop is not woken for each token in between (engines/relay.py)
        return interval * max(1.0, manager.running / 16)

    try:
        async for d in sub.updates(pace):
            last = d
            if d.text:
                text += d.text
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if progress is not None and ttft is not None:
                progress["tokens"], progress["first"] = d.tokens, t0 + ttft
            if d.finish_reason == "error":
                raise EngineError(d.error or "generation failed")
            now = time.perf_counter()
            if d.finish_reason is None and now - last_yield >= 0.8 * pace():   # 0.8: the relay's timer
                last_yield = now
                yield text, None, notice
    except (EngineError, ValueError) as e:
        raise user_error(e) from e
    finally:
        sub.close()
    seconds = time.perf_counter() - t0
    tokens = last.tokens if last else 0
    tps = (tokens - 1) / (seconds - ttft) if ttft is not None and tokens > 1 and seconds > ttft else 0.0
    stats = {"ttft": ttft, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tps, 2),
             "finish_reason": last.finish_reason if last else "abort",
             # the engine's count where the fit skipped its tokenizer (a short conversation: 0)
             "prompt_tokens": sub.prompt_tokens, "dropped_turns": sub.fit.dropped}
    yield text, stats, notice


def chat_request(messages: list[ChatMessage], params: GenParams, request: gr.Request | None,
                 source: str, limits: Limits) -> tuple[ChatRequest, int]:
    """The page's request: its history cut to the request limits (oldest turns first, the system
    prompt and the new message kept) and the number of turns left out."""
    kept, left_out = within_limits(messages, limits)
    return ChatRequest(tuple(kept), params, owner=user_of(request), session=session_id(request),
                       source=source), left_out


def identity(ctx: Context, demo: gr.Blocks | None) -> gr.State:
    """The browser's own id, for :func:`owner_key`: read from its localStorage at page load (a new
    random one the first time) into a ``gr.State`` that every page's events take. One per app: the
    Chat and Vision pages share it (two BrowserStates on one key would each make their own id)."""
    who = gr.State(None)
    if ctx.store is None or demo is None:
        return who
    kept = gr.BrowserState(None, storage_key=BROWSER_KEY, secret=browser_secret(ctx.settings.cache_dir))

    def read(stored):
        bid = stored if isinstance(stored, str) and 16 <= len(stored) <= 64 else secrets.token_urlsafe(18)
        return bid, bid

    # the pages' lists follow this event (.then): a State set by a load event fires no .change
    who.loaded = demo.load(read, kept, [kept, who], api_visibility="private", queue=False, show_progress="hidden")
    return who


class ConversationPanel:
    """The side list of a page's conversations (kind ``chat`` or ``vision``): new, open, rename,
    delete, search; newest first. With history off, a line saying so. ``wire`` connects it to the
    page: ``show(turns, system)`` gives the page's outputs for a conversation opened (or a new one).

    With ``reopen``, the browser keeps the id of the conversation open (a ``gr.BrowserState`` under
    :data:`OPEN_KEY`, next to the browser's own id: a dict of owner to id, so under --auth each
    user of a browser has their own) and a page load (a reload) opens it again; one gone meanwhile
    (deleted in another tab) opens the page empty, as before."""

    def __init__(self, ctx: Context, kind: str, prefix: str, who: gr.State, loader=None, reopen: bool = False):
        """``loader(store, owner, cid)``: what ``show`` gets for a conversation opened (default: the
        branch shown as turns, ``turns_from``; the Compare view reads both sides' branches).
        ``reopen``: a page load opens the conversation that was open in this browser."""
        self.store: ConversationStore | None = ctx.store
        self.kind, self.who, self.prefix = kind, who, prefix
        self.loader = loader or turns_from
        self.cid = gr.State(None)          # the conversation shown (None: a new one, not yet stored)
        self.opened = None                 # the browser's {owner: id of the conversation open} (reopen)
        if self.store is None:
            self.off = gr.Markdown(HISTORY_OFF, elem_id=f"{prefix}-history-off")
            return
        if reopen:
            self.opened = gr.BrowserState({}, storage_key=OPEN_KEY.format(kind=kind),
                                          secret=browser_secret(ctx.settings.cache_dir))
        self.new = gr.Button("+ New conversation", size="sm", elem_id=f"{prefix}-new")
        self.search = gr.Textbox(placeholder="Search conversations", show_label=False, max_lines=1,
                                 elem_id=f"{prefix}-search")
        self.listing = gr.Radio([], label="Conversations (newest first)", elem_id=f"{prefix}-list")
        self.title = gr.Textbox(label="Title", max_lines=1, elem_id=f"{prefix}-title")
        with gr.Row():
            self.rename = gr.Button("Rename", size="sm", elem_id=f"{prefix}-rename")
            self.delete = gr.Button("Delete", size="sm", variant="stop", elem_id=f"{prefix}-delete")

    @property
    def side_outputs(self) -> list:
        return [self.listing, self.title] if self.store is not None else []

    def side(self, owner: str, cid: str | None, query: str = "") -> list:
        """The list (the shown conversation selected) and its title field."""
        if self.store is None:
            return []
        items = self.store.list(owner, self.kind, query or "")
        title = ""
        if cid is not None:
            try:
                title = self.store.summary(owner, cid).title
            except NotFound:
                cid = None
        ids = {s.id for s in items}
        return [gr.update(choices=[(s.title, s.id) for s in items], value=cid if cid in ids else None), title]

    def refresh_fn(self):
        def refresh(who, query, cid, request: gr.Request = None):
            return self.side(owner_key(request, who), cid, query)
        return refresh

    def _remember(self, cid, who_id, opened, request: gr.Request = None):
        """The browser's record of the conversation open, after ``cid`` changed (sent, opened, + New,
        deleted, imported): this owner's entry set (or dropped for a new one), the newest last."""
        owner = owner_key(request, who_id)
        opened = {k: v for k, v in (opened if isinstance(opened, dict) else {}).items()
                  if isinstance(k, str) and isinstance(v, str) and k != owner}
        if isinstance(cid, str) and cid:
            opened[owner] = cid
        return dict(list(opened.items())[-OPEN_OWNERS:])

    def remembered(self, event):
        """``event`` (an unqueued one that sets :attr:`cid`: + New, Clear) followed by the browser's
        record of the conversation open. Gradio tells the browser of a State changed only by a
        queued event (``changed_state_ids`` come with the queue's messages), so ``cid.change`` does
        not follow these: + New, then a reload, reopened the conversation shown before it."""
        if self.opened is not None:
            event.then(self._remember, [self.cid, self.who, self.opened], self.opened,
                       api_visibility="private", queue=False, show_progress="hidden")
        return event

    def _reopen_fn(self, show, n_page: int):
        store = self.store

        def reopen(who_id, opened, query, request: gr.Request = None):
            """At page load: the list, and the conversation this browser had open (the caller's own
            only: the id comes from the browser); none, or one gone meanwhile: the list alone."""
            owner = owner_key(request, who_id)
            cid = opened.get(owner) if isinstance(opened, dict) else None
            if isinstance(cid, str) and cid:
                try:
                    if store.owns(owner, cid):
                        turns = self.loader(store, owner, cid)
                        system = store.conversation(owner, cid)["system"] if self.kind == "chat" else None
                        return [cid, *self.side(owner, cid, query), *show(turns, system)]
                except NotFound:
                    pass            # deleted between the check and the read
            # nothing to open: the page as it is (a message typed meanwhile stays in the box)
            return [gr.skip(), *self.side(owner, None, query), *[gr.skip()] * n_page]
        return reopen

    def wire(self, page_outputs: list, show) -> None:
        if self.store is None:
            return
        store, who, private = self.store, self.who, dict(api_visibility="private", queue=False)
        # events that may say something (a toast): Gradio delivers gr.Info/gr.Warning only through its
        # queue (an unqueued event's toast is dropped: "Send a message first" never showed); queued
        # outside the generation's concurrency group, so they never wait behind a streaming reply
        says = dict(api_visibility="private", concurrency_limit=None)
        refresh = self.refresh_fn()
        loaded = getattr(who, "loaded", None)
        if loaded is not None and self.opened is not None:
            # the list at page load, with the conversation that was open in this browser opened
            loaded.then(self._reopen_fn(show, len(page_outputs)), [who, self.opened, self.search],
                        [self.cid, *self.side_outputs, *page_outputs], **private)
            # a change of the conversation shown by a queued event (send, open, delete, import);
            # an unqueued one reports no State change to the browser: see ``remembered``
            self.cid.change(self._remember, [self.cid, who, self.opened], self.opened, **private)
        elif loaded is not None:        # the list at page load (see identity)
            loaded.then(refresh, [who, self.search, self.cid], self.side_outputs, **private)
        self.search.change(refresh, [who, self.search, self.cid], self.side_outputs, **private)

        def open_(picked, who_id, query, request: gr.Request = None):
            owner = owner_key(request, who_id)
            try:
                turns = self.loader(store, owner, picked)
                system = store.conversation(owner, picked)["system"] if self.kind == "chat" else ""
            except NotFound as e:
                gr.Warning(str(e))
                return [None, *self.side(owner, None, query), *show([], "")]
            return [picked, *self.side(owner, picked, query), *show(turns, system)]

        self.listing.input(open_, [self.listing, who, self.search], [self.cid, *self.side_outputs, *page_outputs],
                           **says)

        def new(who_id, query, request: gr.Request = None):
            return [None, *self.side(owner_key(request, who_id), None, query), *show([], None)]

        self.remembered(self.new.click(new, [who, self.search], [self.cid, *self.side_outputs, *page_outputs],
                                       **private))

        def rename(title, cid, who_id, query, request: gr.Request = None):
            owner = owner_key(request, who_id)
            if cid is None:
                gr.Info("Send a message first: a new conversation is stored with it.")
            else:
                try:
                    store.rename(owner, cid, title)
                except (ValueError, NotFound) as e:
                    refuse(e)
            return self.side(owner, cid, query)

        self.rename.click(rename, [self.title, self.cid, who, self.search], self.side_outputs, **says)
        self.title.submit(rename, [self.title, self.cid, who, self.search], self.side_outputs, **says)

        outputs = [self.cid, *self.side_outputs, *page_outputs]

        def delete(cid, who_id, query, request: gr.Request = None):
            owner = owner_key(request, who_id)
            if cid is None:         # a new conversation is stored with its first message: nothing to delete
                gr.Info("Nothing to delete: this conversation is not stored yet (Clear empties the page).")
                return [gr.skip()] * len(outputs)
            try:
                store.delete(owner, cid)
            except NotFound as e:
                refuse(e)
            return [None, *self.side(owner, None, query), *show([], None)]

        # Asked first in the browser; a "Cancel" ends a js-only step with no outputs, and the delete
        # runs only after it succeeded (.success). A js that threw inside the delete event itself
        # drew Gradio's red "Error" over every output (the chat, its input, the list). No question
        # where nothing stored is shown (no list entry picked, no title: nothing to lose).
        shown = (f"(document.querySelector('#{self.prefix}-list input:checked') || "
                 f"(document.querySelector('#{self.prefix}-title input, #{self.prefix}-title textarea') || {{}}).value)")
        ask = self.delete.click(None, None, None, queue=False,
                                js=f"() => {{ if ({shown} && !confirm('Delete this conversation?')) "
                                   "throw new Error('kept'); }")
        ask.success(delete, [self.cid, who, self.search], outputs, **says)


def nav_target(turns: list[dict], focus: str | None) -> int | None:
    """The turn whose siblings "‹ ›" moves between: the one picked (a click on a message) if it
    has siblings, else the last one that has."""
    idx = [i for i, t in enumerate(turns) if len(t.get("siblings") or ()) > 1]
    for i in idx:
        if turns[i].get("id") == focus:
            return i
    return idx[-1] if idx else None


def branch_row(row_id: str = "chat-branches", prefix: str = ""):
    """The row of ‹ label › under a page's chatbot (hidden until the branch shown has a message with
    versions): elem_ids ``row_id``, ``{prefix}branch-prev``, ``{prefix}branch-label`` and
    ``{prefix}branch-next``. Returns the row, the label, ‹ and ›; :func:`nav_view` fills the first two."""
    with gr.Row(visible=False, elem_id=row_id) as row:
        prev_b = gr.Button("‹", size="sm", min_width=40, scale=0, elem_id=f"{prefix}branch-prev")
        label = gr.Markdown("", elem_id=f"{prefix}branch-label")
        next_b = gr.Button("›", size="sm", min_width=40, scale=0, elem_id=f"{prefix}branch-next")
    return row, label, prev_b, next_b


def picked_index(evt: gr.SelectData) -> int | None:
    """The index of the chatbot message a click picked (Gradio gives an int, or a list in some
    versions), or None."""
    i = evt.index
    return i if isinstance(i, int) else (i[0] if i else None)


def move_branch(c: Conversation, turns: list[dict], focus: str | None, step: int) -> tuple[list[dict], str | None]:
    """‹ (``step`` -1) or › (+1): the branch through the previous or next version (wrapping round) of
    the message :func:`nav_target` picks, made the one shown in the store and read back as turns
    (the conversation continues from it); returns the turns and the new focus (that version).
    Unchanged where there is nothing to move between (no versions, history off, nothing stored
    yet); a message gone meanwhile is refused with a warning."""
    i = nav_target(turns, focus)
    if i is None or c.store is None or c.cid is None:
        return turns, focus
    sibs = turns[i]["siblings"]
    target = sibs[(sibs.index(turns[i]["id"]) + step) % len(sibs)]
    try:
        c.store.switch(c.owner, c.cid, target)
    except NotFound as e:
        refuse(e)
        return turns, focus
    return c.reload(turns), target


def nav_view(turns: list[dict], focus: str | None) -> list:
    i = nav_target(turns, focus)
    if i is None:
        return [gr.update(visible=False), ""]
    t = turns[i]
    what = "Reply" if t["role"] == "assistant" else "Message"
    n = len(t["siblings"])
    return [gr.update(visible=True), f"{what} {t['siblings'].index(t['id']) + 1}/{n} "
                                     f"(turn {i // 2 + 1}): ‹ › move between its {n} versions"]


def build(ctx: Context, demo: gr.Blocks | None = None, who: gr.State | None = None):
    """The page. ``demo`` (the app's Blocks) lets it read the browser's id at page load; ``who``
    is that id's state when another page made it first (see :func:`identity`)."""
    settings, manager, store = ctx.settings, ctx.manager, ctx.store
    who = who if who is not None else identity(ctx, demo)
    conv = gr.State([])
    focus = gr.State(None)        # the message whose versions ‹ › moves between (a click picks it)
    with gr.Row():
        with gr.Column(scale=1, min_width=220, elem_id="chat-conversations"):
            panel = ConversationPanel(ctx, "chat", "conv", who, reopen=True)
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy"], elem_id="chatbot",
                                 feedback_options=None)
            nav_row, nav_label, prev_b, next_b = branch_row("chat-branches", "")
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 lines=1, max_lines=8, elem_id="chat-input")
                # narrower than Gradio's 160 px minimum: at 1400 px, beside the conversation list and
                # the settings column, two such buttons left the message box a third of the row
                send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, elem_id="chat-stop")
            with gr.Row():          # one row of four (at 160 px each, Clear wrapped onto a row of its own)
                regen = gr.Button("Regenerate", size="sm", min_width=100, elem_id="chat-regenerate")
                undo = gr.Button("Undo last turn", size="sm", min_width=100, elem_id="chat-undo")
                edit = gr.Button("Edit last message", size="sm", min_width=100, elem_id="chat-edit")
                clear = gr.Button("Clear", size="sm", min_width=100, elem_id="chat-clear")
            status = gr.Markdown("", elem_id="chat-status")
        with gr.Column(scale=2):
            system = gr.Textbox(label="System prompt", lines=3, placeholder="(optional)",
                                elem_id="system-prompt")
            sampling = SamplingControls(settings, manager.info())
            with gr.Accordion("Export / import", open=False):
                # plain buttons whose file the browser then downloads (DOWNLOAD_JS): a DownloadButton
                # downloads the file it held *before* its click ran, so its first click gave nothing
                # and each later one the conversation shown at the click before
                export_btn = gr.Button("Export chat (JSON)", size="sm", elem_id="chat-export")
                export_md = gr.Button("Export chat (Markdown)", size="sm", elem_id="chat-export-md")
                exported = gr.File(visible="hidden", elem_id="chat-exported")
                import_btn = gr.UploadButton("Import chat (JSON)", file_types=[".json"], size="sm")
    cid = panel.cid

    def conversation(request, who_id, cid_value) -> Conversation:
        return Conversation(store, "chat", owner_key(request, who_id), cid_value)

    async def respond(message, turns, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, cid_value, who_id, request: gr.Request = None):
        message = (message or "")
        if not message.strip():
            gr.Info("Type a message first: nothing was sent.")
            yield gr.update(), turns, display(turns), "", cid_value
            return
        try:
            if len(message) > settings.max_input_chars:
                raise Refusal(f"The message has {len(message)} characters; the limit is "
                               f"{settings.max_input_chars}.", title="Message too long")
            params = make_params(settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except gr.Error as e:
            yield message, turns, display(turns), refuse(e), cid_value
            return
        turns = [dict(t) for t in turns] + [{"role": "user", "content": message}]
        c = conversation(request, who_id, cid_value)
        # the store is written from a worker thread: the event loop streams every other reply
        new_user = await asyncio.to_thread(c.add_user, turns, system_prompt)
        async for out in _run(turns, system_prompt, params, request, c, new_user):
            yield out

    async def _run(turns, system_prompt, params, request, c: Conversation, new_user: bool):
        shown = turns + [{"role": "assistant", "content": ""}]
        yield "", turns, display(shown), "*generating…*", c.cid
        stats = None
        text = ""
        warned = False
        meta = reply_meta(manager, params)
        writer = c.writer(turns, meta, manager)
        req, left_out = chat_request(to_messages(turns, system_prompt), params, request, "chat", manager.limits)
        if left_out:
            gr.Warning(f"The conversation is longer than one request may be: the {left_out} oldest "
                       "turn(s) were left out of the prompt.")
        ended = False
        try:
            async for text, stats, notice in stream_reply(manager, req):
                if notice and not warned:
                    gr.Warning(notice)
                    warned = True
                # the partial reply is kept in the state too, so Stop loses nothing
                shown = turns + [{"role": "assistant", "content": text}]
                yield gr.update(), shown, display(shown), gr.update(), gr.update()
                if writer is not None:      # after the update, handed to the store's writer: no wait
                    writer.feed_later(text)
            ended = True
        except gr.Error as e:
            ended = True
            # a refusal: a warning toast, and the page as it was (the message back in the box)
            if writer is not None:      # after the writes handed over (the reply may not exist yet)
                await asyncio.wrap_future(writer.store.later(lambda: c.forget(writer.id)))
            if new_user:
                c.forget(turns[-1].get("id"))
                back = c.back_to(turns[:-1])
                yield turns[-1]["content"], back, display(back), refuse(e), c.cid
            else:
                back = c.back_to(turns)
                yield gr.update(), back, display(back), refuse(e), c.cid
            return
        finally:
            if not ended and writer is not None:     # the tab closed mid-reply: keep what streamed
                writer.finish_later(text, {"finish_reason": "abort"})
        if not text and stats and stats["finish_reason"] == "abort":
            # stopped before its first token: no empty reply; the message goes back into the box
            if new_user:
                c.forget(turns[-1].get("id"))
                back = c.back_to(turns[:-1])
                yield turns[-1]["content"], back, display(back), "", c.cid
            else:
                back = c.back_to(turns)
                yield gr.update(), back, display(back), "", c.cid
            return
        if writer is not None:
            await asyncio.wrap_future(writer.finish_later(text, stats))
        turns = await asyncio.to_thread(
            c.reload, turns + [{"role": "assistant", "content": text, "stats": {**meta, **(stats or {})}}])
        yield gr.update(), turns, display(turns), "", c.cid

    async def regenerate(turns, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, cid_value, who_id, request: gr.Request = None):
        try:
            params = make_params(settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except gr.Error as e:
            yield gr.update(), turns, display(turns), refuse(e), cid_value
            return
        turns = drop_reply(turns)
        if not turns:
            gr.Info("Nothing to regenerate yet.")
            yield gr.update(), turns, display(turns), "", cid_value
            return
        c = conversation(request, who_id, cid_value)
        if store is not None and c.cid is not None and system_prompt is not None:
            try:
                store.set_system(c.owner, c.cid, system_prompt or "")
            except NotFound:
                pass
        # the new reply is a sibling of the old one (a branch), not a replacement
        async for out in _run(turns, system_prompt, params, request, c,
                              await asyncio.to_thread(c.add_user, turns, system_prompt)):
            yield out

    def on_stop(request: gr.Request = None):
        """Stop this tab's generation. The request is aborted in the engine and its stream ends
        normally, so the running event gives the last update itself: the cut reply kept and marked
        stopped, or, stopped before its first token, no empty reply (the message goes back into the
        box). Gradio's ``cancels=`` is not used: a cancelled stream left Gradio's red Error badge
        over the chat. (A reply still waiting in Gradio's queue when Stop is pressed starts later;
        Stop ends it then.)"""
        manager.abort_session(session_id(request))

    def undo_last(turns, cid_value, who_id, request: gr.Request = None):
        """Take the last exchange back: off the page and out of the store (its replies with it)."""
        turns = drop_reply(turns)
        if turns:
            gone = turns.pop()
            c = conversation(request, who_id, cid_value)
            if store is not None and c.cid is not None and gone.get("id"):
                c.forget(gone["id"])
                try:
                    store.set_leaf(c.owner, c.cid, turns[-1]["id"] if turns else None)
                except NotFound:
                    pass
                turns = c.reload(turns)
        return turns, display(turns), ""

    def edit_last(turns):
        """The last message back into the box; sent again, it becomes a new version (a sibling)."""
        turns = drop_reply(turns)
        text = turns.pop()["content"] if turns else ""
        return text, turns, display(turns), ""

    def export_chat(turns, system_prompt, cid_value, who_id, request: gr.Request = None):
        data = export_data(store, owner_key(request, who_id), cid_value, turns, system_prompt)
        fd, path = tempfile.mkstemp(prefix="chat-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        return path

    def export_markdown(turns, system_prompt, cid_value, who_id, request: gr.Request = None):
        data = export_data(store, owner_key(request, who_id), cid_value, turns, system_prompt)
        fd, path = tempfile.mkstemp(prefix="chat-", suffix=".md")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_markdown(data, details))
        return path

    def import_chat(file, who_id, request: gr.Request = None):
        try:
            with open(file if isinstance(file, str) else file.name, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("kind") == "vision":
                # its images would land in a chat the text model then refuses ("does not take images")
                raise ValueError("this is a Vision conversation: import it on the Vision page. Nothing was imported.")
            turns = parse_chat_json(data)
            if store is not None:
                owner = owner_key(request, who_id)
                new = store.import_data(owner, data, kind="chat")
                turns = turns_from(store, owner, new)
            else:
                new = None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise Refusal(f"Not a chat export: {e}", title="Import failed") from e
        system_prompt = data.get("system", "") if isinstance(data, dict) else ""
        return turns, display(turns), system_prompt, new

    def move(step):
        def go(turns, focus_id, cid_value, who_id, request: gr.Request = None):
            turns, focus_id = move_branch(conversation(request, who_id, cid_value), turns, focus_id, step)
            return turns, display(turns), focus_id, *nav_view(turns, focus_id)
        return go

    def pick(turns, evt: gr.SelectData, request: gr.Request = None):
        i = picked_index(evt)
        skip = hidden_turns(turns)
        if i is not None and skip:
            i += skip - 1                 # the drawn messages start with the "earlier messages" line
        fid = turns[i].get("id") if i is not None and 0 <= i < len(turns) else None
        return fid, *nav_view(turns, fid)

    def show(turns, system_prompt):
        """The page for a conversation opened from the list (or a new one: ``turns`` empty)."""
        return [turns, display(turns), gr.update() if system_prompt is None else system_prompt, "", "", None,
                *nav_view(turns, None)]

    page_outputs = [conv, chatbot, system, status, box, focus, nav_row, nav_label]
    panel.wire(page_outputs, show)
    side = panel.side_outputs
    nav_outputs = [nav_row, nav_label]

    def after(turns, who_id, query, cid_value, request: gr.Request = None):
        return [None, *nav_view(turns, None), *panel.side(owner_key(request, who_id), cid_value, query or "")]

    search = panel.search if store is not None else None
    after_inputs = [conv, who, search, cid] if search is not None else [conv, who, gr.State(""), cid]
    after_outputs = [focus, *nav_outputs, *side]
    outputs = [box, conv, chatbot, status, cid]
    inputs = [box, conv, system, *sampling.values, cid, who]
    common = dict(concurrency_id="generate", concurrency_limit="default")
    private = dict(api_visibility="private", queue=False, show_progress="hidden")
    box.submit(respond, inputs, outputs, api_name="send", **common).then(after, after_inputs, after_outputs, **private)
    send.click(respond, inputs, outputs, api_visibility="private", **common).then(
        after, after_inputs, after_outputs, **private)
    regen.click(regenerate, [conv, system, *sampling.values, cid, who], outputs, api_name="regenerate",
                **common).then(after, after_inputs, after_outputs, **private)
    stop.click(on_stop, None, None, api_name="stop", queue=False)
    undo.click(undo_last, [conv, cid, who], [conv, chatbot, status], api_name="undo", queue=False).then(
        after, after_inputs, after_outputs, **private)
    edit.click(edit_last, conv, [box, conv, chatbot, status], api_name="edit_last", queue=False).then(
        after, after_inputs, after_outputs, **private)

    def clear_fn():
        return [], [], "", None, None, gr.update(visible=False), ""

    for cleared in (clear.click(clear_fn, None, [conv, chatbot, status, cid, focus, *nav_outputs], api_name="clear",
                                queue=False),
                    chatbot.clear(clear_fn, None, [conv, chatbot, status, cid, focus, *nav_outputs],
                                  api_visibility="private", queue=False)):
        panel.remembered(cleared.then(after, after_inputs, after_outputs, **private))
    chatbot.select(pick, conv, [focus, *nav_outputs], **private)
    move_outputs = [conv, chatbot, focus, *nav_outputs]
    prev_b.click(move(-1), [conv, focus, cid, who], move_outputs, **private)
    next_b.click(move(+1), [conv, focus, cid, who], move_outputs, **private)
    export_btn.click(export_chat, [conv, system, cid, who], exported, api_name="export_chat",
                     api_visibility="undocumented").then(None, exported, None, js=DOWNLOAD_JS, **private)
    export_md.click(export_markdown, [conv, system, cid, who], exported, api_name="export_chat_markdown",
                    api_visibility="undocumented").then(None, exported, None, js=DOWNLOAD_JS, **private)
    import_btn.upload(import_chat, [import_btn, who], [conv, chatbot, system, cid], api_name="import_chat",
                      api_visibility="undocumented").then(after, after_inputs, after_outputs, **private)
    return sampling


def export_data(store: ConversationStore | None, owner: str, cid: str | None, turns: list[dict],
                system: str | None) -> dict:
    """The export (format ``turbostudio-chat`` version 2) of the conversation shown: the stored tree
    where there is one, else the tab's turns as one branch."""
    if store is not None and cid is not None:
        try:
            data = store.export(owner, cid)
            data["system"] = system if system is not None else data["system"]
            return data
        except NotFound:
            pass
    tree, parent = [], None
    for i, t in enumerate(turns):
        tree.append({"id": str(i), "parent": parent, "role": t["role"], "content": t["content"],
                     "images": list(t.get("images") or ()), "meta": t.get("stats") or {}, "created": None})
        parent = str(i)
    title = next((t["content"] for t in turns if t["role"] == "user"), "")
    return {"format": "turbostudio-chat", "version": 2, "title": " ".join(title.split())[:60], "kind": "chat",
            "system": system or "",
            "messages": [{k: t[k] for k in ("role", "content", "stats") if k in t} for t in turns],
            "tree": tree, "leaf": parent}


def parse_chat_json(data) -> list[dict]:
    """The branch shown of an exported chat (ours, version 1 or 2, or a bare list of OpenAI-style
    messages) as turns; ValueError saying what is wrong."""
    from storage.conversations import parse_export

    tree, leaf = parse_export(data)
    by_id = {m["id"]: m for m in tree}
    path = []
    while leaf is not None:
        path.append(by_id[leaf])
        leaf = by_id[leaf]["parent"]
    turns = []
    for m in path[::-1]:
        t = {"role": m["role"], "content": m["content"]}
        if m["images"]:
            t["images"] = m["images"]
        if m["role"] == "assistant" and m["meta"]:
            t["stats"] = m["meta"]
        turns.append(t)
    return turns


async def api_chat(manager: EngineManager, settings, messages, params, request: gr.Request | None,
                   store: ConversationStore | None = None, conversation_id: str | None = None):
    """The public ``/chat`` endpoint: OpenAI-style messages and a dict of sampling parameters in
    (``stop`` included), the reply streamed out (each update is the whole reply so far). The same
    road and limits as ``/v1``: the whole request counts against --max-messages and
    --max-input-chars, system and assistant text included.

    ``conversation_id`` (optional, one of the caller's: see ``/conversations``): the last message
    (the user's) and the reply are appended to that conversation's branch shown, the reply written
    as it streams. The model sees ``messages`` as given, not the stored history."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise Refusal("messages must be a JSON list of {role, content}", title="Invalid input") from e
    if not isinstance(messages, list) or not messages:
        raise Refusal("messages must be a non-empty list of {role, content}", title="Invalid input")
    try:
        if isinstance(params, str):
            params = json.loads(params or "{}")
        info = manager.info()
        msgs = tuple(ChatMessage.from_dict(m) for m in messages)
        p = GenParams.from_dict(params, defaults=info.defaults if info else None,
                                max_new_tokens_limit=settings.max_new_tokens_limit)
        req = ChatRequest(msgs, p, owner=user_of(request), session=session_id(request), source="api")
    except (ValueError, InvalidRequest) as e:
        raise user_error(e) from e
    writer = None
    if conversation_id:
        if store is None:
            raise Refusal("History is off on this server (--no-history): there are no conversations.",
                          title="No history")
        owner = owner_key(request)
        if msgs[-1].role != "user":
            raise Refusal("To append to a conversation, the last message must be the user's.", title="Invalid input")
        system = next((m.content for m in msgs if m.role == "system"), None)

        # known: confirmed before (no thread hop per request); else asked of SQLite off the event loop
        if not (store.known(owner, conversation_id)
                or await asyncio.to_thread(store.owns, owner, conversation_id)):
            raise Refusal(str(NotFound("conversation", conversation_id)), title="Not found")
        uid = new_id()
        # handed to the store's writer process, before the reply's writes: nobody waits for a write
        # (waiting behind 64 streams' writes cost /chat 16-25% of its tokens/s with history on), and
        # SQLite runs off this process's GIL (storage.conversations._WriterProcess says why)
        if system is not None:
            store.write("set_system", owner, conversation_id, system)
        store.write("append", owner, conversation_id, "user", msgs[-1].content, mid=uid)
        writer = ReplyWriter(store, owner, conversation_id, parent=uid, meta=reply_meta(manager, p),
                             interval=write_pace(manager))
    text, done = "", False
    try:
        async for text, stats, _notice in stream_reply(manager, req):
            yield text                   # first: the client waits for no write
            if writer is not None:
                if stats is not None:
                    writer.finish_later(text, stats, wait=False)     # lands in order; the client is not held
                    done = True
                else:
                    writer.feed_later(text)      # the store's writer process; the stream goes on
    finally:
        if writer is not None and not done:      # a client gone or an error: keep what streamed
            writer.finish_later(text, {"finish_reason": "abort"}, wait=False)


# ---------------------------------------------------------------------- named endpoints
def _store_or_refuse(store):
    if store is None:
        raise Refusal("History is off on this server (--no-history): there are no conversations.",
                      title="No history")
    return store


def api_conversations(store: ConversationStore | None, request: gr.Request | None, query: str = "") -> list[dict]:
    """``/conversations``: the caller's conversations, newest first (id, title, kind, updated,
    messages). Under --auth the user's; without, the client session's own."""
    return [s.to_dict() for s in _store_or_refuse(store).list(owner_key(request), None, query or "")]


def api_conversation_get(store: ConversationStore | None, conversation_id: str, request: gr.Request | None) -> dict:
    """``/conversation_get``: one of the caller's conversations, every message (the tree, each with
    its parent, images and metadata) and ``path``, the branch shown. Someone else's id is refused
    exactly like a missing one."""
    try:
        return _store_or_refuse(store).get(owner_key(request), str(conversation_id or ""))
    except NotFound as e:
        raise Refusal(str(e), title="Not found") from e


def api_conversation_delete(store: ConversationStore | None, conversation_id: str, request: gr.Request | None) -> str:
    """``/conversation_delete``: delete one of the caller's conversations (refused like a missing id
    otherwise)."""
    try:
        _store_or_refuse(store).delete(owner_key(request), str(conversation_id or ""))
    except NotFound as e:
        raise Refusal(str(e), title="Not found") from e
    return f"Deleted {conversation_id}."


__all__ = ["build", "api_chat", "stream_reply", "parse_chat_json", "drop_reply", "to_messages", "identity",
           "ConversationPanel", "Conversation", "owner_key", "branch_row", "nav_view", "nav_target",
           "move_branch", "picked_index", "details", "reply_meta", "turns_from",
           "api_conversations", "api_conversation_get", "api_conversation_delete", "export_data"]
