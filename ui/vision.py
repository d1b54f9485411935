"""Vision page: LLaVA-style image question answering, several images and turns, streamed.

Images are normalized on upload (``engines.images.prepare``: rotation, modes, size) and saved as
PNG under the app's cache folder; the conversation keeps their paths, so later turns can ask about
any earlier image and the history shows them. The vision model has its own EngineManager (the
"vision slot"), so it can sit beside the chat model.

Conversations are kept like the Chat page's (issue #18): regenerate adds a version of the reply (a
sibling, marked "‹ n/m ›"), and the Chat page's row of ‹ › (``ui.chat.branch_row``, ``move_branch``,
``nav_view``; elem_ids ``vision-branches``, ``vision-branch-prev`` ...) moves between the versions of
the message clicked (default: the last one with versions). The next question continues from the
branch shown, with that branch's images.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import hashlib
import os
import threading

import gradio as gr

from engines import models
from engines.base import ChatMessage, GenParams
from engines.images import ImageError, prepare
from engines.manager import EngineManager

from .chat import (Conversation, ConversationPanel, branch_mark, branch_row, chat_request, details, drop_reply,
                   move_branch, nav_view, owner_key, picked_index, reply_meta, stream_reply, to_messages)
from .common import (Context, Refusal, SamplingControls, make_params, model_label, refuse, require_admin,
                     session_id)

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "examples")
EXAMPLES = [("shapes.png", "What shapes do you see, and what colours are they?"),
            ("chart.png", "Which bar is the tallest?"),
            ("sign.png", "What does the sign say?")]


class VisionSlot:
    """Loads the vision model in the background so the app starts at once and never hangs on a
    download; ``status`` says what is going on (loading, offline, error, ready)."""

    def __init__(self, ctx: Context):
        s = ctx.settings
        self.settings = s
        self.chat_manager = ctx.manager
        self.manager = EngineManager(s.cache_dir, s.engine_options(), s.limits())
        self.status = "not loaded"
        self.error: str | None = None
        self.loading = False
        self._lock = threading.Lock()

    def start(self, model: str | None = None, engine: str | None = None):
        with self._lock:
            if self.loading:
                return
            self.loading = True
        threading.Thread(target=self._load, args=(model, engine), daemon=True, name="vision-load").start()

    def _load(self, model, engine):
        s = self.settings
        model = model or s.vision_model
        try:
            if not model:
                if not models.hub_reachable(s.hub_offline, s.hub_endpoint):
                    self.status = ("offline: no model hub is reachable, so the default "
                                   f"`{models.DEFAULT_VISION_HUB_ID}` cannot be downloaded. Start the app "
                                   "with `--vision-model /path/to/llava-folder` (a llava-hf style folder), "
                                   "or load a folder on this page.")
                    return
                model = models.DEFAULT_VISION_HUB_ID
            self.status = f"loading {os.path.basename(model.rstrip('/'))} …"
            try:
                info = self.manager.load(model, engine or s.vision_engine)
            except Exception as e:  # noqa: BLE001
                chat = self.chat_manager.info()
                if "out of memory" not in str(e).lower() or chat is None or chat.device == "cpu":
                    raise
                # Both do not fit: the switch frees the chat model's GPU memory and tries again.
                self.chat_manager.unload()
                self.status = f"loading {model} (the chat model {chat.model} was unloaded to make room) …"
                info = self.manager.load(model, engine or s.vision_engine)
            if not info.vision:
                self.manager.unload()
                raise ValueError(f"{model} is not a vision-language model (its config has no vision_config).")
            self.status = "ready"
            self.error = None
        except Exception as e:  # noqa: BLE001 - shown on the page
            self.error = getattr(e, "message", None) or str(e)
            self.status = f"failed to load {model}: {self.error}"
        finally:
            self.loading = False

    def describe(self) -> str:
        info = self.manager.info()
        if info is None:
            return f"**Vision model:** {self.status}"
        return (f"**Vision model:** {model_label(info)} on **{info.backend}** ({info.device}, {info.dtype}) · "
                f"context {info.context_length} tokens" + (f" · {info.reason}" if info.reason else ""))


@dataclass
class VisionControls:
    """What is usable only with a vision model loaded."""

    box: object
    buttons: list
    examples: object | None
    model_box: object       # the accordion to load a model: open while none is loaded

    @property
    def components(self) -> list:
        return [self.box, *self.buttons, self.model_box] + ([self.examples] if self.examples is not None else [])

    def updates(self, ready: bool) -> list:
        placeholder = ("Attach or paste images and ask about them" if ready else
                       "No vision model is loaded: see the status above")
        out = [gr.update(interactive=ready, placeholder=placeholder)]
        out += [gr.update(interactive=ready) for _ in self.buttons]
        out.append(gr.update(open=not ready))
        if self.examples is not None:
            out.append(gr.update(visible=ready))
        return out


def image_token_cost(manager: EngineManager, path: str) -> int | None:
    """Prompt tokens one image adds, measured through the model's own processor."""
    if manager.info() is None:
        return None
    try:
        with_img = manager.token_cost([ChatMessage("user", "x", (path,))])
        without = manager.token_cost([ChatMessage("user", "x")])
        return with_img - without
    except Exception:  # noqa: BLE001
        return None


def save_prepared(cache_dir: str, src: str) -> tuple[str, list[str]]:
    """Normalize an upload and store it as PNG (content-addressed); returns the path and notes."""
    prep = prepare(src, os.path.basename(src))
    digest = hashlib.sha1(prep.image.tobytes()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "uploads")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{digest}.png")
    if not os.path.exists(path):
        prep.image.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
    return path, prep.notes


def drawn(turns: list[dict]) -> list[tuple[int, dict]]:
    """The chatbot's messages, each with the index of the turn it draws: a turn's images come first,
    one message each, then its text (with its "‹ n/m ›" mark and, for a reply, its details line)."""
    out = []
    for i, t in enumerate(turns):
        for p in t.get("images") or ():
            out.append((i, {"role": t["role"], "content": {"path": p}}))
        content = t["content"]
        line = " · ".join(x for x in (branch_mark(t), details(t.get("stats")) if t["role"] == "assistant" else "")
                          if x)
        if line:
            content = f"{content}\n\n<sub>{line}</sub>"
        if content or t["role"] == "assistant":
            out.append((i, {"role": t["role"], "content": content}))
    return out


def display(turns: list[dict]) -> list[dict]:
    return [m for _, m in drawn(turns)]


def picked_turn(turns: list[dict], index: int | None) -> int | None:
    """The turn a click on the chatbot's message ``index`` picked (an image picks its turn), or None."""
    owners = [i for i, _ in drawn(turns)]
    return owners[index] if index is not None and 0 <= index < len(owners) else None


def build(ctx: Context, slot: VisionSlot, who: gr.State | None = None):
    """The page; ``who``: the browser's id (``ui.chat.identity``) its conversations are kept under."""
    settings, store = ctx.settings, ctx.store
    who = who if who is not None else gr.State(None)
    conv = gr.State([])
    focus = gr.State(None)        # the message whose versions ‹ › moves between (a click picks it)
    status = gr.Markdown(slot.describe(), elem_id="vision-status")
    with gr.Row():
        with gr.Column(scale=1, min_width=200, elem_id="vision-conversations"):
            panel = ConversationPanel(ctx, "vision", "vconv", who)
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Vision chat", height=480, elem_id="vision-chatbot", feedback_options=None)
            # the Chat page's branch row: "Reply 2/3 (turn 1)", ‹ › move between a message's versions
            nav_row, nav_label, prev_b, next_b = branch_row("vision-branches", "vision-")
            box = gr.MultimodalTextbox(placeholder="Attach or paste images and ask about them",
                                       file_types=["image"], file_count="multiple", show_label=False,
                                       elem_id="vision-input", sources=["upload"])
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", size="sm", elem_id="vision-stop")
                regen = gr.Button("Regenerate", size="sm", elem_id="vision-regenerate")
                clear = gr.Button("Clear", size="sm", elem_id="vision-clear")
            context_md = gr.Markdown("", elem_id="vision-context")
        with gr.Column(scale=2):
            with gr.Accordion("Webcam", open=False):
                webcam = gr.Image(sources=["webcam"], type="filepath", label="Snapshot (sent with the next message)")
            sampling = SamplingControls(settings, slot.manager.info(), max_new_tokens=256)
            with gr.Accordion("Vision model", open=False) as model_box:
                vmodel = gr.Textbox(label="Model folder or hub id (llava-hf style)", value=settings.vision_model or "")
                vengine = gr.Dropdown(["auto", "transformers", "pytorch", "turbomind"], value=settings.vision_engine,
                                      label="Engine")
                vload = gr.Button("Load vision model", size="sm")
            examples = [[{"text": q, "files": [os.path.join(EXAMPLES_DIR, f)]}] for f, q in EXAMPLES
                        if os.path.exists(os.path.join(EXAMPLES_DIR, f))]
            ex = gr.Examples(examples, [box], label="Examples (images made for this project, CC0)",
                             elem_id="vision-examples") if examples else None

    def check_message(text, files, turns, pvals: tuple) -> GenParams:
        """Refuse (gr.Error) what cannot be sent; the sampling parameters of what can."""
        if slot.manager.info() is None:
            raise Refusal(f"No vision model is loaded: {slot.status}", title="Vision model")
        if len(text) > settings.max_input_chars:
            raise Refusal(f"The message has {len(text)} characters; the limit is {settings.max_input_chars}.",
                           title="Message too long")
        if len(files) > settings.max_images_per_turn:
            raise Refusal(f"{len(files)} images in one message; the limit is {settings.max_images_per_turn}.",
                           title="Too many images")
        held = sum(len(t.get("images") or ()) for t in turns)
        if held + len(files) > settings.max_images:
            raise Refusal(f"This conversation would hold {held + len(files)} images; the limit is "
                           f"{settings.max_images}. Clear the conversation to start again.", title="Too many images")
        if not any(t.get("images") for t in turns) and not files:
            raise Refusal("Attach an image to ask about (the first message needs one).", title="No image")
        return make_params(settings, *pvals)

    def context_report(turns, costs):
        info = slot.manager.info()
        if info is None:
            return ""
        try:
            used = slot.manager.token_cost(to_messages(turns)) if turns else 0
        except Exception:  # noqa: BLE001 - the model was unloaded meanwhile
            return ""
        ctx_len = info.context_length
        left = ctx_len - used
        line = f"Context: {used} of {ctx_len} tokens used, {left} left."
        if costs:
            line += " Image cost: " + ", ".join(f"{n} ≈ {c} tokens" for n, c in costs if c is not None) + "."
        if left < ctx_len * 0.2:
            line += " **Warning: the context is nearly full; old turns will be dropped.**"
        return line

    async def respond(message, turns, snapshot, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, cid_value, who_id, request: gr.Request = None):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
                 for f in message.get("files") or []]
        if snapshot:
            files.append(snapshot)
        if not text and not files:
            gr.Info("Type a question (and attach images) first: nothing was sent.")
            yield gr.update(), turns, display(turns), gr.update(), gr.update(), cid_value
            return
        try:
            params = check_message(text, files, turns, (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed))
        except gr.Error as e:
            # a warning toast; the message stays in the box, the page as it was
            yield gr.update(), turns, display(turns), gr.update(), refuse(e), cid_value
            return
        def prepare_uploads():      # decoding and resizing images: off the event loop
            saved, notes = [], []
            for f in files:
                try:
                    p, n = save_prepared(settings.cache_dir, f)
                except ImageError as e:
                    raise Refusal(str(e), title="Image refused") from e
                saved.append(p)
                notes += n
            return saved, notes, [(os.path.basename(f), image_token_cost(slot.manager, p))
                                  for f, p in zip(files, saved)]

        try:
            saved, notes, costs = await asyncio.to_thread(prepare_uploads)
        except gr.Error as e:
            yield gr.update(), turns, display(turns), gr.update(), refuse(e), cid_value
            return
        for n in notes:
            gr.Warning(n)
        turns = [dict(t) for t in turns] + [{"role": "user", "content": text or "Describe the image.",
                                              "images": saved}]
        c = Conversation(store, "vision", owner_key(request, who_id), cid_value)
        new_user = c.add_user(turns)
        async for out in _run(turns, params, request, c, new_user, costs):
            yield out

    async def _run(turns, params, request, c: Conversation, new_user: bool, costs=None):
        shown = turns + [{"role": "assistant", "content": ""}]
        report = await asyncio.to_thread(context_report, turns, costs)
        yield None, turns, display(shown), None, report, c.cid
        text, stats = "", None
        meta = reply_meta(slot.manager, params)
        writer = c.writer(turns, meta, slot.manager)
        ended = False
        warned = False
        req, left_out = chat_request(to_messages(turns), params, request, "vision", slot.manager.limits)
        if left_out:
            gr.Warning(f"The conversation is longer than one request may be: the {left_out} oldest "
                       "turn(s) were left out of the prompt.")
        try:
            async for text, stats, notice in stream_reply(slot.manager, req):
                if notice and not warned:
                    gr.Warning(notice)
                    warned = True
                shown = turns + [{"role": "assistant", "content": text}]
                yield gr.update(), shown, display(shown), gr.update(), gr.update(), gr.update()
                if writer is not None:      # after the update, handed to the store's writer: no wait
                    writer.feed_later(text)
            ended = True
        except gr.Error as e:
            ended = True
            # the question goes back into the box; the conversation as it was
            if writer is not None:      # after the writes handed over (the reply may not exist yet)
                await asyncio.wrap_future(writer.store.later(lambda: c.forget(writer.id)))
            last = turns[-1]
            if new_user:
                c.forget(last.get("id"))
                back = {"text": last["content"], "files": list(last.get("images") or ())}
                yield back, c.back_to(turns[:-1]), display(c.back_to(turns[:-1])), gr.update(), refuse(e), c.cid
            else:
                yield gr.update(), c.back_to(turns), display(c.back_to(turns)), gr.update(), refuse(e), c.cid
            return
        finally:
            if not ended and writer is not None:     # the tab closed mid-reply: keep what streamed
                writer.finish_later(text, {"finish_reason": "abort"})
        if not text and stats and stats["finish_reason"] == "abort":
            # stopped before its first token: no empty reply; the question goes back into the box
            last = turns[-1]
            if new_user:
                c.forget(last.get("id"))
                back = c.back_to(turns[:-1])
                yield ({"text": last["content"], "files": list(last.get("images") or ())}, back,
                       display(back), gr.update(), "", c.cid)
            else:
                back = c.back_to(turns)
                yield gr.update(), back, display(back), gr.update(), "", c.cid
            return
        if writer is not None:
            await asyncio.wrap_future(writer.finish_later(text, stats))
        turns = await asyncio.to_thread(
            c.reload, turns + [{"role": "assistant", "content": text, "stats": {**meta, **(stats or {})}}])
        report = await asyncio.to_thread(context_report, turns, costs)
        yield gr.update(), turns, display(turns), gr.update(), report, c.cid

    async def regenerate(turns, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, cid_value, who_id, request: gr.Request = None):
        try:
            if slot.manager.info() is None:
                raise Refusal(f"No vision model is loaded: {slot.status}", title="Vision model")
            params = make_params(settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except gr.Error as e:
            yield gr.update(), turns, display(turns), gr.update(), refuse(e), cid_value
            return
        turns = drop_reply(turns)
        if not turns:
            gr.Info("Nothing to regenerate yet.")
            yield gr.update(), turns, display(turns), gr.update(), gr.update(), cid_value
            return
        # the new reply is a sibling of the old one (a branch), not a replacement
        c = Conversation(store, "vision", owner_key(request, who_id), cid_value)
        async for out in _run(turns, params, request, c, c.add_user(turns)):
            yield out

    def load_vision(model, engine, request: gr.Request = None):
        require_admin(settings, request)
        try:
            settings.load_policy().check(model.strip() or models.DEFAULT_VISION_HUB_ID)
        except Exception as e:  # noqa: BLE001
            raise Refusal(getattr(e, "message", str(e)), title="Not allowed") from e
        slot.start(model.strip() or None, engine)
        import time

        while slot.loading:
            time.sleep(0.5)
        if slot.error:
            raise Refusal(slot.status, title="Vision model")
        return slot.describe()

    outputs = [box, conv, chatbot, webcam, context_md, panel.cid]
    common = dict(concurrency_id="generate", concurrency_limit="default")
    private = dict(api_visibility="private", queue=False, show_progress="hidden")

    def after(turns, who_id, query, cid_value, request: gr.Request = None):
        """After a reply (or Clear): the branch row for the last message with versions, and the list."""
        return [None, *nav_view(turns, None), *panel.side(owner_key(request, who_id), cid_value, query or "")]

    after_inputs = [conv, who, panel.search if store is not None else gr.State(""), panel.cid]
    after_outputs = [focus, nav_row, nav_label, *panel.side_outputs]
    sent = box.submit(respond, [box, conv, webcam, *sampling.values, panel.cid, who], outputs,
                      api_name="vision_send", **common)
    regenerated = regen.click(regenerate, [conv, *sampling.values, panel.cid, who], outputs,
                              api_name="vision_regenerate", **common)
    def on_stop(request: gr.Request = None):
        slot.manager.abort_session(session_id(request))

    # no cancels=: the aborted stream ends normally (a cancelled one left Gradio's Error badge)
    stop.click(on_stop, None, None, api_name="vision_stop", queue=False)
    cleared = clear.click(lambda: ([], [], "", None), None, [conv, chatbot, context_md, panel.cid],
                          api_name="vision_clear", queue=False)
    for event in (sent, regenerated, cleared):      # the branch row and the side list follow
        event.then(after, after_inputs, after_outputs, **private)

    def move(step):
        """‹ / ›: the Chat page's move between versions (``ui.chat.move_branch``); the next question
        continues from the branch shown, with that branch's images."""
        def go(turns, focus_id, cid_value, who_id, request: gr.Request = None):
            c = Conversation(store, "vision", owner_key(request, who_id), cid_value)
            turns, focus_id = move_branch(c, turns, focus_id, step)
            return turns, display(turns), focus_id, *nav_view(turns, focus_id)
        return go

    def pick(turns, evt: gr.SelectData):
        i = picked_turn(turns, picked_index(evt))
        fid = turns[i].get("id") if i is not None else None
        return fid, *nav_view(turns, fid)

    chatbot.select(pick, conv, [focus, nav_row, nav_label], **private)
    move_outputs = [conv, chatbot, focus, nav_row, nav_label]
    prev_b.click(move(-1), [conv, focus, panel.cid, who], move_outputs, **private)
    next_b.click(move(+1), [conv, focus, panel.cid, who], move_outputs, **private)

    def show(turns, _system):
        """The page for a conversation opened from the list (or a new one)."""
        return [turns, display(turns), "", None, *nav_view(turns, None)]

    panel.wire([conv, chatbot, context_md, focus, nav_row, nav_label], show)
    vload.click(load_vision, [vmodel, vengine], status, api_name="load_vision_model", concurrency_limit=1,
                concurrency_id="admin")
    # without a vision model the page says what to do and its controls are off (ui.app's timer
    # switches them with the model's state)
    return status, VisionControls(box, [stop, regen], ex.dataset if ex is not None else None, model_box)


__all__ = ["VisionSlot", "build", "display", "GenParams"]
