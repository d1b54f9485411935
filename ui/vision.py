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

Export / import (issue #18), the Chat page's (``ui.chat.export_data``, ``DOWNLOAD_JS``) with the
images carried in the file: the JSON export is the Chat page's format (``turbostudio-chat`` version 2,
kind ``vision``) with every image of the tree as a base64 data URL in its message's ``images``, so
the file stands alone and imports on another machine (:func:`export_conversation`,
:func:`import_conversation`: each image goes through the upload's own path, ``save_prepared``). The
Markdown (:func:`to_markdown`) embeds the images as data URLs too, as reference definitions at its
end so the text stays readable, and lists every version of a reply, not only the one shown.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import mimetypes
import tempfile
from dataclasses import dataclass

import hashlib
import os
import threading

import gradio as gr

from engines import models
from engines.base import ChatMessage, GenParams
from engines.images import ImageError, prepare
from engines.manager import EngineManager

from storage.conversations import EXPORT_FORMAT, EXPORT_VERSION, ConversationStore, parse_export, title_from

from .chat import (DOWNLOAD_JS, Conversation, ConversationPanel, branch_mark, branch_row, chat_request, details,
                   drop_reply, export_data, move_branch, nav_view, owner_key, parse_chat_json, picked_index,
                   reply_meta, stream_reply, to_messages, turns_from)
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


def save_prepared(cache_dir: str, src: str, name: str | None = None) -> tuple[str, list[str]]:
    """Normalize an upload and store it as PNG (content-addressed); returns the path and notes.
    ``name``: what messages call it (default: the file's name)."""
    prep = prepare(src, name or os.path.basename(src))
    digest = hashlib.sha1(prep.image.tobytes()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "uploads")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{digest}.png")
    if not os.path.exists(path):
        prep.image.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
    return path, prep.notes


# ---------------------------------------------------------------------- export / import
MAX_IMPORT_IMAGES_FACTOR = 4
"""An import keeps at most this many times --max-images distinct images (the branch shown holds at
most --max-images; other versions may have asked about other images): a file of thousands of tiny
images is not decoded one by one (the rest are left out, with a warning)."""


def image_data_url(path: str, uploads: str) -> str:
    """The image at ``path`` as a base64 data URL; ValueError (naming the file, not the server's path)
    when it is missing or not in ``uploads``, the folder the page keeps its images in (a conversation's
    image list is never read outside it)."""
    name = os.path.basename(str(path))
    real, folder = os.path.realpath(str(path)), os.path.realpath(uploads)
    if os.path.commonpath([real, folder]) != folder:
        raise ValueError(f"{name}: not one of this app's images")
    try:
        with open(real, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{name}: missing from the server's image folder ({e.strerror})") from e
    mime = mimetypes.guess_type(real)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def export_conversation(store: ConversationStore | None, owner: str, cid: str | None, turns: list[dict],
                        uploads: str) -> tuple[dict, list[str]]:
    """The Vision export of the conversation shown and the warnings it gave: the Chat page's
    (``ui.chat.export_data``: the stored tree, or the tab's turns with history off) with kind
    ``vision`` and each image of the tree as a data URL in its message's ``images``. An image that
    cannot be read (gone from the cache folder) keeps its file name and is named in a warning (an
    import warns about it again). ``messages``, the branch shown in version 1's shape, carries no
    images: they are in the tree, once."""
    data = export_data(store, owner, cid, turns, None)
    data["kind"] = "vision"
    urls: dict[str, str] = {}
    warnings = []
    for m in data["tree"]:
        images = []
        for p in m.get("images") or ():
            if p not in urls:
                try:
                    urls[p] = image_data_url(p, uploads)
                except ValueError as e:
                    warnings.append(f"{e}: exported without it (only its name).")
                    urls[p] = os.path.basename(str(p))
            images.append(urls[p])
        m["images"] = images
    data["messages"] = [{k: v for k, v in m.items() if k != "images"} for m in data["messages"]]
    return data, warnings


def to_markdown(data: dict) -> str:
    """Markdown of a Vision export (:func:`export_conversation`): the branch shown, where a message
    has versions every version in order (the one the conversation goes on from marked), each reply
    with its details line (``ui.chat.details``). Images are embedded as data URLs, written as
    reference definitions at the end (``![image 1][image-1]`` in the text), so the one file shows
    them wherever data URLs render (VS Code, Obsidian, Typora, pandoc; not GitHub, which drops them)
    and the text still reads as text; an image the export lacks is named."""
    lines = [f"# {data.get('title') or 'Vision conversation'}", ""]
    if data.get("system"):
        lines += [f"> **System:** {data['system']}", ""]
    tree = data.get("tree") or []
    by_id = {m["id"]: m for m in tree}
    kids: dict = {}
    for m in tree:
        kids.setdefault(m["parent"], []).append(m["id"])
    path, cur = [], data.get("leaf")
    while cur is not None and cur in by_id:
        path.append(by_id[cur])
        cur = by_id[cur]["parent"]
    path.reverse()
    refs: dict[str, str] = {}         # data URL -> its reference label

    def below(mid: str) -> int:
        n, todo = 0, list(kids.get(mid, ()))
        while todo:
            n += 1
            todo += kids.get(todo.pop(), ())
        return n

    def block(m: dict, head: str, note: str = "") -> None:
        lines.extend([head, ""])
        for u in m.get("images") or ():
            if u.startswith("data:"):
                label = refs.setdefault(u, f"image-{len(refs) + 1}")
                lines.extend([f"![image {label.split('-')[1]}][{label}]", ""])
            else:
                lines.extend([f"*(image `{u}`: not in the export)*", ""])
        lines.extend([m["content"], ""])
        if m["role"] == "assistant" and m.get("meta") and details(m["meta"]):
            lines.extend([f"<sub>{details(m['meta'])}</sub>", ""])
        if note:
            lines.extend([note, ""])

    for i, m in enumerate(path):
        who = "**User**" if m["role"] == "user" else "**Assistant**"
        sibs = kids.get(m["parent"], [m["id"]])
        if len(sibs) < 2:
            block(m, who)
            continue
        for k, sid in enumerate(sibs, 1):
            s, more = by_id[sid], below(sid)
            head = f"{who} (version {k} of {len(sibs)})"
            if sid == m["id"]:
                note = "*(the conversation goes on from this version)*" if i + 1 < len(path) else ""
            else:
                note = f"*({more} more message(s) follow this version: see the JSON export)*" if more else ""
            block(s, head, note)
    if refs:
        lines += [f"[{label}]: {url}" for url, label in refs.items()]
    return "\n".join(lines).rstrip() + "\n"


class WrongKind(ValueError):
    """An export of another page's conversation (a chat, a comparison)."""


def import_conversation(store: ConversationStore | None, owner: str, data, cache_dir: str,
                        max_images: int = 8 * MAX_IMPORT_IMAGES_FACTOR) -> tuple[list[dict], str | None, list[str], list[str]]:
    """A new Vision conversation from an export: (the branch shown as turns, its id or None with
    history off, warnings, notes). Each data URL is written back as a file under the cache folder
    through the upload's own path (``save_prepared``: checked, normalized, content-addressed, so the
    same image imported twice is one file). An image that cannot be used (not a data URL, not an
    image, over the size limits, past ``max_images``) is left out of its message with a warning; the
    rest, every message, version and metadata, is imported. Raises :class:`WrongKind` for another
    page's export (kind ``chat`` or ``compare``; a file without a kind and without images is a text
    chat) and ValueError for a file that is no export; nothing is written then."""
    if isinstance(data, dict) and data.get("kind") is not None and data.get("kind") != "vision":
        kind = data.get("kind")
        where = "import it on the Chat page" if kind == "chat" else "the Vision page imports Vision conversations"
        raise WrongKind(f"This file is a {kind!r} conversation, not a Vision one: {where}. Nothing was imported.")
    tree, leaf = parse_export(data)
    if not (isinstance(data, dict) and data.get("kind") == "vision") and not any(m["images"] for m in tree):
        raise WrongKind("This file has no images: a text chat, not a Vision conversation (import it on the "
                        "Chat page). Nothing was imported.")
    saved: dict[str, str | Exception] = {}
    warnings, notes = [], []
    with tempfile.TemporaryDirectory(prefix="vision-import-") as tmp:
        for i, m in enumerate(tree, 1):
            kept = []
            for k, u in enumerate(m["images"], 1):
                label = f"image {k} of message {i}"
                if u not in saved:
                    if len(saved) >= max_images:
                        saved[u] = ImageError(f"{label}: past the {max_images} images one import may hold")
                    else:
                        try:
                            saved[u], n = _save_data_url(cache_dir, u, label, os.path.join(tmp, f"{len(saved)}"))
                            notes += n
                        except ImageError as e:
                            saved[u] = e
                got = saved[u]
                if isinstance(got, Exception):
                    said = " ".join(m["content"].split())
                    said = said if len(said) <= 40 else said[:39] + "…"
                    warnings.append(f"{got} (the {m['role']}'s “{said}”): left out; the message is imported "
                                    "without it.")
                else:
                    kept.append(got)
            m["images"] = kept
    meta = data if isinstance(data, dict) else {}
    clean = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kind": "vision",
             "title": str(meta.get("title") or "") or next((title_from(m["content"]) for m in tree
                                                           if m["role"] == "user"), ""),
             "system": str(meta.get("system") or ""), "tree": tree, "leaf": leaf}
    if store is None:
        return parse_chat_json(clean), None, warnings, notes
    cid = store.import_data(owner, clean, kind="vision")
    return turns_from(store, owner, cid), cid, warnings, notes


def _save_data_url(cache_dir: str, url: str, label: str, tmp: str) -> tuple[str, list[str]]:
    """One image of an import (a ``data:image/...;base64,`` URL) saved as an upload is; ImageError
    saying what is wrong."""
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:59] + "…"
        raise ImageError(f"{label}: {shown!r} is a file name, not an image embedded in the file")
    head, _, body = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError(f"{label}: not a base64 image data URL ({head[:40]!r})")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{label}: its base64 data is damaged ({e})") from e
    with open(tmp, "wb") as f:
        f.write(raw)
    return save_prepared(cache_dir, tmp, label)


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
            with gr.Accordion("Export / import", open=False, elem_id="vision-export-box"):
                # the Chat page's: plain buttons whose file the browser then downloads (DOWNLOAD_JS;
                # a DownloadButton downloads the file it held before its click ran)
                export_btn = gr.Button("Export (JSON, images included)", size="sm", elem_id="vision-export")
                export_md = gr.Button("Export (Markdown)", size="sm", elem_id="vision-export-md")
                exported = gr.File(visible="hidden", elem_id="vision-exported")
                import_btn = gr.UploadButton("Import vision chat (JSON)", file_types=[".json"], size="sm",
                                             elem_id="vision-import")
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

    uploads = os.path.join(settings.cache_dir, "uploads")

    def export_file(turns, cid_value, who_id, request, suffix: str) -> str:
        """The conversation shown (the caller's own: ``owner_key``, as the Chat page's export) written
        to a file: JSON, or Markdown for ``suffix`` ".md"; warnings as toasts."""
        data, warnings = export_conversation(store, owner_key(request, who_id), cid_value, turns, uploads)
        fd, path = tempfile.mkstemp(prefix="vision-", suffix=suffix)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if suffix == ".md":
                f.write(to_markdown(data))
            else:
                json.dump(data, f, indent=1, ensure_ascii=False)
        for w in warnings:
            gr.Warning(w, title="Export")
        mb = os.path.getsize(path) / 2**20
        if suffix == ".json" and mb > settings.max_upload_mb:
            gr.Warning(f"This export is {mb:.0f} MB (its images): this server imports files of up to "
                       f"{settings.max_upload_mb} MB (--max-upload-mb).", title="Export")
        return path

    def export_json(turns, cid_value, who_id, request: gr.Request = None):
        return export_file(turns, cid_value, who_id, request, ".json")

    def export_markdown(turns, cid_value, who_id, request: gr.Request = None):
        return export_file(turns, cid_value, who_id, request, ".md")

    def import_json(file, who_id, request: gr.Request = None):
        """A Vision export as a new conversation of the caller's, shown. A wrong kind or a file that
        is no export: a warning, nothing imported, the page as it was; an image that cannot be used:
        a warning naming it, the rest imported."""
        keep = [gr.update(), gr.update()]
        try:
            with open(file if isinstance(file, str) else file.name, encoding="utf-8") as f:
                data = json.load(f)
            turns, new, warnings, notes = import_conversation(
                store, owner_key(request, who_id), data, settings.cache_dir,
                max_images=settings.max_images * MAX_IMPORT_IMAGES_FACTOR)
        except WrongKind as e:
            return [*keep, refuse(Refusal(str(e), title="Not a Vision conversation")), gr.update()]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return [*keep, refuse(Refusal(f"Not a Vision export: {e}. Nothing was imported.",
                                          title="Import failed")), gr.update()]
        for w in warnings:
            gr.Warning(w, title="Image left out")
        images = len({p for t in turns for p in t.get("images") or ()})
        line = " ".join([f"Imported: {len(turns)} messages on the branch shown, {images} image(s).",
                         *(f"⚠️ {w}" for w in warnings), *notes])
        return [turns, display(turns), line, new]

    def show(turns, _system):
        """The page for a conversation opened from the list (or a new one)."""
        return [turns, display(turns), "", None, *nav_view(turns, None)]

    panel.wire([conv, chatbot, context_md, focus, nav_row, nav_label], show)
    # named endpoints like the Chat page's (/export_chat ...): undocumented, each on the caller's own
    # conversation; the browser downloads what an export wrote (a private js step)
    export_btn.click(export_json, [conv, panel.cid, who], exported, api_name="export_vision",
                     api_visibility="undocumented").then(None, exported, None, js=DOWNLOAD_JS, **private)
    export_md.click(export_markdown, [conv, panel.cid, who], exported, api_name="export_vision_markdown",
                    api_visibility="undocumented").then(None, exported, None, js=DOWNLOAD_JS, **private)
    import_btn.upload(import_json, [import_btn, who], [conv, chatbot, context_md, panel.cid], api_name="import_vision",
                      api_visibility="undocumented").then(after, after_inputs, after_outputs, **private)
    vload.click(load_vision, [vmodel, vengine], status, api_name="load_vision_model", concurrency_limit=1,
                concurrency_id="admin")
    # without a vision model the page says what to do and its controls are off (ui.app's timer
    # switches them with the model's state)
    return status, VisionControls(box, [stop, regen], ex.dataset if ex is not None else None, model_box)


__all__ = ["VisionSlot", "build", "display", "GenParams", "export_conversation", "import_conversation",
           "to_markdown", "WrongKind"]
