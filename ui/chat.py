"""Chat page: streaming multi-turn chat through the model's own chat template.

The conversation lives in a per-browser-session ``gr.State`` as plain turns ``{"role", "content"}``
(assistant turns also carry ``stats``); the Chatbot only displays it, with each reply's speed under
it. What the model sees is the turns alone, so stats never leak into the prompt.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import AsyncIterator

import gradio as gr

from engines.base import ChatMessage, ChatRequest, EngineError, GenParams, InvalidRequest
from engines.manager import EngineManager, Limits, within_limits

from .common import (Context, Refusal, SamplingControls, fmt_stats, make_params, refuse, session_id,
                     user_error, user_of)

UPDATE_INTERVAL = 0.05   # seconds between UI updates while streaming (text is coalesced, not dropped)


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


def display(turns: list[dict]) -> list[dict]:
    out = []
    for t in turns:
        content = t["content"]
        stats = fmt_stats(t.get("stats"))
        if t["role"] == "assistant" and stats:
            content = f"{content}\n\n<sub>{stats}</sub>"
        out.append({"role": t["role"], "content": content})
    return out


async def stream_reply(manager: EngineManager, request: ChatRequest,
                       interval: float = UPDATE_INTERVAL) -> AsyncIterator[tuple[str, dict | None, str | None]]:
    """Yield (reply so far, stats or None until the end, notice or None), at most every ``interval``.

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
    try:
        async for d in sub:
            last = d
            if d.text:
                text += d.text
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if d.finish_reason == "error":
                raise EngineError(d.error or "generation failed")
            now = time.perf_counter()
            # coalesce harder when many streams run: the text is never dropped, only sent in
            # fewer, larger pieces (20 updates/s for up to 16 streams, 5/s at 64)
            if d.finish_reason is None and now - last_yield >= interval * max(1.0, manager.running / 16):
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
             "prompt_tokens": sub.fit.prompt_tokens, "dropped_turns": sub.fit.dropped}
    yield text, stats, notice


def chat_request(messages: list[ChatMessage], params: GenParams, request: gr.Request | None,
                 source: str, limits: Limits) -> tuple[ChatRequest, int]:
    """The page's request: its history cut to the request limits (oldest turns first, the system
    prompt and the new message kept) and the number of turns left out."""
    kept, left_out = within_limits(messages, limits)
    return ChatRequest(tuple(kept), params, owner=user_of(request), session=session_id(request),
                       source=source), left_out


def build(ctx: Context):
    settings, manager = ctx.settings, ctx.manager
    conv = gr.State([])
    with gr.Row():
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy"], elem_id="chatbot",
                                 feedback_options=None)
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 lines=1, max_lines=8, elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
            with gr.Row():
                regen = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
                undo = gr.Button("Undo last turn", size="sm", elem_id="chat-undo")
                edit = gr.Button("Edit last message", size="sm", elem_id="chat-edit")
                clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
            status = gr.Markdown("", elem_id="chat-status")
        with gr.Column(scale=2):
            system = gr.Textbox(label="System prompt", lines=3, placeholder="(optional)",
                                elem_id="system-prompt")
            sampling = SamplingControls(settings, manager.info())
            with gr.Accordion("Export / import", open=False):
                export_btn = gr.DownloadButton("Export chat (JSON)", size="sm")
                import_btn = gr.UploadButton("Import chat (JSON)", file_types=[".json"], size="sm")

    async def respond(message, turns, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, request: gr.Request = None):
        message = (message or "")
        if not message.strip():
            gr.Info("Type a message first: nothing was sent.")
            yield gr.update(), turns, display(turns), ""
            return
        try:
            if len(message) > settings.max_input_chars:
                raise Refusal(f"The message has {len(message)} characters; the limit is "
                               f"{settings.max_input_chars}.", title="Message too long")
            params = make_params(settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except gr.Error as e:
            yield message, turns, display(turns), refuse(e)
            return
        turns = list(turns) + [{"role": "user", "content": message}]
        async for out in _run(turns, system_prompt, params, request):
            yield out

    async def _run(turns, system_prompt, params, request):
        shown = turns + [{"role": "assistant", "content": ""}]
        yield "", turns, display(shown), "*generating…*"
        stats = None
        text = ""
        warned = False
        req, left_out = chat_request(to_messages(turns, system_prompt), params, request, "chat", manager.limits)
        if left_out:
            gr.Warning(f"The conversation is longer than one request may be: the {left_out} oldest "
                       "turn(s) were left out of the prompt.")
        try:
            async for text, stats, notice in stream_reply(manager, req):
                if notice and not warned:
                    gr.Warning(notice)
                    warned = True
                # the partial reply is kept in the state too, so Stop loses nothing
                shown = turns + [{"role": "assistant", "content": text}]
                yield gr.update(), shown, display(shown), gr.update()
        except gr.Error as e:
            # a refusal: a warning toast, and the page as it was (the message back in the box)
            yield turns[-1]["content"], turns[:-1], display(turns[:-1]), refuse(e)
            return
        if not text and stats and stats["finish_reason"] == "abort":
            # stopped before its first token: no empty reply; the message goes back into the box
            yield turns[-1]["content"], turns[:-1], display(turns[:-1]), ""
            return
        turns = turns + [{"role": "assistant", "content": text, "stats": stats}]
        yield gr.update(), turns, display(turns), ""

    async def regenerate(turns, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, request: gr.Request = None):
        try:
            params = make_params(settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except gr.Error as e:
            yield gr.update(), turns, display(turns), refuse(e)
            return
        turns = drop_reply(turns)
        if not turns:
            gr.Info("Nothing to regenerate yet.")
            yield gr.update(), turns, display(turns), ""
            return
        async for out in _run(turns, system_prompt, params, request):
            yield out

    def on_stop(request: gr.Request = None):
        """Stop this tab's generation. The request is aborted in the engine and its stream ends
        normally, so the running event gives the last update itself: the cut reply kept and marked
        stopped, or, stopped before its first token, no empty reply (the message goes back into the
        box). Gradio's ``cancels=`` is not used: a cancelled stream left Gradio's red Error badge
        over the chat. (A reply still waiting in Gradio's queue when Stop is pressed starts later;
        Stop ends it then.)"""
        manager.abort_session(session_id(request))

    def undo_last(turns):
        turns = drop_reply(turns)
        if turns:
            turns.pop()
        return turns, display(turns), ""

    def edit_last(turns):
        turns = drop_reply(turns)
        text = turns.pop()["content"] if turns else ""
        return text, turns, display(turns), ""

    def export_chat(turns, system_prompt):
        data = {"format": "turbostudio-chat", "version": 1, "system": system_prompt or "",
                "messages": [{k: t[k] for k in ("role", "content", "stats") if k in t} for t in turns]}
        fd, path = tempfile.mkstemp(prefix="chat-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        return path

    def import_chat(file):
        try:
            with open(file if isinstance(file, str) else file.name, encoding="utf-8") as f:
                data = json.load(f)
            turns = parse_chat_json(data)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise Refusal(f"Not a chat export: {e}", title="Import failed") from e
        system_prompt = data.get("system", "") if isinstance(data, dict) else ""
        return turns, display(turns), system_prompt

    outputs = [box, conv, chatbot, status]
    inputs = [box, conv, system, *sampling.values]
    common = dict(concurrency_id="generate", concurrency_limit="default")
    box.submit(respond, inputs, outputs, api_name="send", **common)
    send.click(respond, inputs, outputs, api_visibility="private", **common)
    regen.click(regenerate, [conv, system, *sampling.values], outputs, api_name="regenerate", **common)
    stop.click(on_stop, None, None, api_name="stop", queue=False)
    undo.click(undo_last, conv, [conv, chatbot, status], api_name="undo", queue=False)
    edit.click(edit_last, conv, [box, conv, chatbot, status], api_name="edit_last", queue=False)
    clear.click(lambda: ([], [], ""), None, [conv, chatbot, status], api_name="clear", queue=False)
    chatbot.clear(lambda: ([], ""), None, [conv, status], api_visibility="private", queue=False)
    export_btn.click(export_chat, [conv, system], export_btn, api_name="export_chat", api_visibility="undocumented")
    import_btn.upload(import_chat, import_btn, [conv, chatbot, system], api_name="import_chat",
                      api_visibility="undocumented")
    return sampling


def parse_chat_json(data) -> list[dict]:
    """Turns from an exported chat (ours, or a bare list of OpenAI-style messages)."""
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list):
        raise ValueError("expected a list of messages")
    turns = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise ValueError("each message needs role user/assistant and text content")
        t = {"role": m["role"], "content": m["content"]}
        if m["role"] == "assistant" and isinstance(m.get("stats"), dict):
            t["stats"] = m["stats"]
        turns.append(t)
    return turns


async def api_chat(manager: EngineManager, settings, messages, params, request: gr.Request | None):
    """The public ``/chat`` endpoint: OpenAI-style messages and a dict of sampling parameters in
    (``stop`` included), the reply streamed out (each update is the whole reply so far). The same
    road and limits as ``/v1``: the whole request counts against --max-messages and
    --max-input-chars, system and assistant text included."""
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
        p = GenParams.from_dict(params, defaults=info.defaults if info else None)
        req = ChatRequest(msgs, p, owner=user_of(request), session=session_id(request), source="api")
    except (ValueError, InvalidRequest) as e:
        raise user_error(e) from e
    async for text, _stats, _notice in stream_reply(manager, req):
        yield text


__all__ = ["build", "api_chat", "stream_reply", "parse_chat_json", "drop_reply", "to_messages"]
