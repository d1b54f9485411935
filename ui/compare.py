"""Compare (on the Chat page): one prompt, two models side by side, both streaming at once.

Model A is the app's model (the Chat page's); model B is a second slot (``ctx.compare``, its own
:class:`~engines.manager.EngineManager`), loaded here from a short list of the comparisons people
make (the same weights in another dtype or on another engine, a Quantize result) or with every
option on the Engines page ("Load as model B"). A load of B that would not fit beside A is refused
with the figures (:func:`engines.manager.room_beside`) before anything is unloaded or loaded.

Each side keeps its own history (a multi-turn comparison: A continues from A's replies, B from
B's), both requests take the one road (``manager.submit``, through ``ui.chat.stream_reply``), and
Stop aborts both. With greedy decoding the verdict line says whether the texts are the same, or at
which token they first differ (tokens counted with A's tokenizer). The comparison is saved as a
conversation of kind ``compare`` with the two replies as sibling branches, each with its metadata
(model, engine, format, sampling, first-token latency, tokens/s), so it is listed, exported and
reopened like any other (``storage.conversations``).
"""
from __future__ import annotations

import asyncio
import time

import gradio as gr

from engines.base import ChatMessage
from engines.manager import room_beside

from . import chat
from .engines import wire
from .common import (Context, Refusal, SamplingControls, fmt_stats, make_params, model_label, refuse,
                     require_admin, session_id, user_error)

UPDATE_INTERVAL = 0.1     # seconds between the page's updates while both sides stream
DIFF_CONTEXT = 24         # characters of each side shown around the first difference

SAME_DTYPE = {"float32": "bfloat16", "bfloat16": "float32", "float16": "float32"}


# ---------------------------------------------------------------------------------------- model B
def b_choices(ctx: Context, request: gr.Request | None = None) -> dict[str, tuple[str | None, str, dict]]:
    """The comparisons offered for model B, label -> (model, engine, options): A's weights in the
    other dtype, on the other engines this machine runs, and each finished Quantize result the
    caller may see. (Every other combination: the Engines page's "Load as model B".)"""
    out: dict[str, tuple[str | None, str, dict]] = {}
    info = ctx.manager.info()
    req = getattr(ctx.manager, "_request", None)
    model = req.model if req is not None else ctx.settings.model
    if info is not None and info.backend != "remote":
        name = model_label(info)
        if info.backend == "transformers":
            other = SAME_DTYPE.get(info.dtype.replace("torch.", ""), "bfloat16")
            out[f"{name} · transformers · {other} (A's weights, cast)"] = (model, "transformers",
                                                                          {"dtype": other, "device": info.device.split(":")[0]})
        from .engines import machine

        m = machine()
        for backend in ("turbomind", "pytorch", "transformers"):
            if backend == info.backend or (backend != "transformers" and not m.gpu_engines):
                continue
            label = {"turbomind": "TurboMind", "pytorch": "LMDeploy PyTorch", "transformers": "transformers"}[backend]
            out[f"{name} · {label} (A's weights, other engine)"] = (model, backend, {})
    if ctx.jobs is not None:
        from engines.quantize import result_load_options

        from .common import user_of

        gpu = info is not None and info.device.startswith("cuda")
        for job in ctx.jobs.jobs(user_of(request), everyone=False):
            if job.state == "done":
                out[f"Quantize result: {job.output.rstrip('/').rsplit('/', 1)[-1]} ({job.kind})"] = (
                    job.output, "auto", result_load_options(job, gpu))
    return out


def describe_b(ctx: Context) -> str:
    a, b = ctx.manager.info(), ctx.compare.info() if ctx.compare is not None else None
    left = f"**A:** {model_label(a)} on {a.backend} ({a.device}, {a.dtype})" if a else "**A:** no model loaded"
    right = (f"**B:** {model_label(b)} on {b.backend} ({b.device}, {b.dtype})" if b else
             "**B:** not loaded — pick a comparison below and press *Load model B* (or use *Load as model B* "
             "on the Engines page for any model and options)")
    return f"{left} &nbsp;·&nbsp; {right}"


def load_b(ctx: Context, model: str | None, engine: str, options: dict, request: gr.Request | None,
           progress=None) -> str:
    """Load model B (administrators, where the app has users or is public), after the memory check."""
    require_admin(ctx.settings, request)
    if ctx.compare is None:
        raise Refusal("Compare is off on this server.", title="Not available")
    try:
        why = room_beside(ctx.compare, model, engine, options,
                          beside=[ctx.manager, getattr(ctx.vision, "manager", None)])
        if why:
            raise Refusal(why, title="Model B does not fit")
        ctx.compare.load(model, engine, progress=progress, policy=ctx.settings.load_policy(), **options)
    except gr.Error:
        raise
    except Exception as e:  # noqa: BLE001
        raise user_error(e) from e
    return describe_b(ctx)


# ---------------------------------------------------------------------------------------- verdict
def first_difference(a: str, b: str) -> int | None:
    """The first character index where ``a`` and ``b`` differ (None when they are equal)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def verdict(ctx: Context, a: str, b: str, greedy: bool, generated: int | None = None) -> str:
    """"Same text (N tokens)" or "First difference at token N" with both sides' text around it.
    ``generated``: the tokens both sides generated, when they agree (the replies' own count, which
    includes the end-of-turn token the text does not show); else the text is counted with A's
    tokenizer."""
    i = first_difference(a, b)
    tokens = generated if i is None and generated else _token_count(ctx, a if i is None else a[:i])
    if i is None:
        return f"**Same text** ({tokens} tokens)" + ("" if greedy else " — sampled, so this can be chance")
    ctx_a = a[max(0, i - DIFF_CONTEXT): i + DIFF_CONTEXT].replace("\n", " ")
    ctx_b = b[max(0, i - DIFF_CONTEXT): i + DIFF_CONTEXT].replace("\n", " ")
    where = f"token {tokens + 1}" if tokens is not None else f"character {i + 1}"
    note = "" if greedy else " (sampled: texts differ by design; choose greedy to compare the models)"
    return (f"**First difference at {where}**{note}  \nA: `…{ctx_a}…`  \nB: `…{ctx_b}…`")


def _token_count(ctx: Context, text: str) -> int | None:
    """Tokens of ``text`` with A's tokenizer: an assistant message of it, less an empty one (the
    chat template's own tokens cancel out)."""
    try:
        full = ctx.manager.token_cost([ChatMessage("assistant", text)])
        empty = ctx.manager.token_cost([ChatMessage("assistant", "")])
        return max(0, full - empty)
    except Exception:  # noqa: BLE001 - a remote engine may not count tokens: the verdict says characters
        return None


# ---------------------------------------------------------------------------------------- reopening
def branches(store, owner: str, cid: str) -> dict:
    """A stored comparison as the view's state: each side's branch (question, that side's reply,
    the next question under it, ...), found by the replies' ``side`` mark."""
    msgs = store.get(owner, cid)["messages"]
    children: dict = {}
    for m in msgs:
        children.setdefault(m["parent"], []).append(m)

    def turn(m: dict) -> dict:
        t = {"role": m["role"], "content": m["content"], "id": m["id"]}
        if m["role"] == "assistant" and m["meta"]:
            t["stats"] = m["meta"]
        return t

    out = {"a": [], "b": [], "cid": cid}
    first = next((m for m in children.get(None, []) if m["role"] == "user"), None)
    for k in ("a", "b"):
        node, turns = first, []
        while node is not None:
            turns.append(turn(node))
            reply = next((m for m in children.get(node["id"], []) if m["role"] == "assistant"
                          and m["meta"].get("side", "").lower() == k), None)
            if reply is None:
                break
            turns.append(turn(reply))
            node = next((m for m in reversed(children.get(reply["id"], [])) if m["role"] == "user"), None)
        out[k] = turns
    return out


# ---------------------------------------------------------------------------------------- the page
def _pane(turns: list[dict]) -> list[dict]:
    return chat.display(turns)


def _live(stats: dict | None, t0: float, ttft: float | None, progress: dict | None = None) -> str:
    """A pane's line: its stats once done; while it streams, its first-token latency and its
    tokens/s so far (``progress``: ``ui.chat.stream_reply``'s tokens and first-token time)."""
    if stats:
        return fmt_stats(stats)
    if ttft is None:
        return f"*waiting… {time.perf_counter() - t0:.1f} s*"
    line = f"*streaming… first token {ttft * 1000:.0f} ms"
    tokens, first = (progress or {}).get("tokens") or 0, (progress or {}).get("first")
    elapsed = time.perf_counter() - first if first is not None else 0.0
    if tokens > 1 and elapsed > 0:
        line += f" · {tokens} tokens · {(tokens - 1) / elapsed:.1f} tok/s"
    return line + "*"


def build(ctx: Context, who: gr.State | None = None):
    """The Compare view (under the Chat page)."""
    state = gr.State({"a": [], "b": [], "cid": None})
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            # the saved comparisons (kind "compare"): open one to see both sides again
            panel = chat.ConversationPanel(ctx, "compare", "compare", who, loader=branches)
        with gr.Column(scale=5):
            body = _body(ctx, state)
    return _wire(ctx, who, state, panel, *body)


def _body(ctx: Context, state: gr.State):
    s = ctx.settings
    models_md = gr.Markdown(describe_b(ctx), elem_id="compare-models")
    with gr.Accordion("Model B", open=ctx.compare is not None and ctx.compare.info() is None,
                      elem_id="compare-b-panel"):
        choices = list(b_choices(ctx))
        with gr.Row():
            choice = gr.Dropdown(choices, value=choices[0] if choices else None, label="Compare A with",
                                 allow_custom_value=False, scale=4, elem_id="compare-b-choice")
            load_btn = gr.Button("Load model B", variant="primary", scale=1, elem_id="compare-b-load")
            unload_btn = gr.Button("Unload model B", scale=1, elem_id="compare-b-unload")
        b_action = gr.Markdown("", elem_id="compare-b-action")   # what the last load or unload did
    with gr.Row(equal_height=True):
        with gr.Column():
            bot_a = gr.Chatbot(label="A", height=420, elem_id="compare-a-chatbot", buttons=["copy"])
            stats_a = gr.Markdown("", elem_id="compare-a-stats")
        with gr.Column():
            bot_b = gr.Chatbot(label="B", height=420, elem_id="compare-b-chatbot", buttons=["copy"])
            stats_b = gr.Markdown("", elem_id="compare-b-stats")
    verdict_md = gr.Markdown("", elem_id="compare-verdict")
    with gr.Row():
        box = gr.Textbox(placeholder="One prompt for both models; Enter sends", show_label=False, scale=6,
                         lines=1, max_lines=6, elem_id="compare-input")
        send = gr.Button("Send to both", variant="primary", scale=1, elem_id="compare-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="compare-stop")
    with gr.Accordion("Sampling (both sides)", open=False):
        greedy = gr.Checkbox(True, label="Greedy (temperature 0): the same model must give the same text",
                             elem_id="compare-greedy")
        sampling = SamplingControls(s, ctx.manager.info())
    return (models_md, choice, load_btn, unload_btn, b_action, bot_a, stats_a, bot_b, stats_b, verdict_md, box,
            send, stop, greedy, sampling)


def _wire(ctx: Context, who, state, panel, models_md, choice, load_btn, unload_btn, b_action, bot_a, stats_a,
          bot_b, stats_b, verdict_md, box, send, stop, greedy, sampling):
    s = ctx.settings

    async def respond(message, st, use_greedy, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                      seed, browser_id=None, request: gr.Request = None):
        message = message or ""
        if not message.strip():
            gr.Info("Type a prompt first: nothing was sent.")
            yield gr.update(), st, gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
            return
        try:
            if ctx.manager.info() is None:
                raise Refusal("Model A is not loaded: load one on the Engines page.", title="No model")
            if ctx.compare is None or ctx.compare.info() is None:
                raise Refusal("Load a model B first (the *Model B* panel above).", title="No model B")
            if len(message) > s.max_input_chars:
                raise Refusal(f"The prompt has {len(message)} characters; the limit is {s.max_input_chars}.",
                              title="Prompt too long")
            params = make_params(s, max_new_tokens, 0 if use_greedy else temperature, top_p, top_k,
                                 repetition_penalty, seed)
        except gr.Error as e:
            yield message, st, gr.update(), gr.update(), gr.update(), gr.update(), refuse(e)
            return
        owner = chat.owner_key(request, browser_id)
        st = {"a": list(st["a"]), "b": list(st["b"]), "cid": st.get("cid")}
        sides = {"a": ctx.manager, "b": ctx.compare}
        store = ctx.store
        convs = {k: chat.Conversation(store, "compare", owner, st["cid"]) for k in sides}
        turns = {k: st[k] + [{"role": "user", "content": message}] for k in sides}
        def store_question():
            # the first side creates the conversation; the second writes its copy of the question
            # beside it (each side's branch holds its own history). Run in a worker thread: the
            # event loop streams every other user's reply meanwhile
            convs["a"].add_user(turns["a"])
            convs["b"].cid = convs["a"].cid
            if len(turns["a"]) == 1 and len(turns["b"]) == 1:
                turns["b"][-1]["id"] = turns["a"][-1].get("id")    # the first question: one message, two replies
            if not turns["b"][-1].get("id"):
                convs["b"].add_user(turns["b"])
            if store is not None and convs["a"].cid and not st["cid"]:
                try:
                    store.rename(owner, convs["a"].cid, "⚖ " + message.strip().splitlines()[0][:60])
                except Exception:  # noqa: BLE001 - a title is a nicety
                    pass

        await asyncio.to_thread(store_question)
        st["cid"] = convs["a"].cid
        out = {k: {"text": "", "stats": None, "ttft": None, "error": None, "done": False, "progress": {}}
               for k in sides}
        t0 = time.perf_counter()

        async def run(k):
            mgr = sides[k]
            writer = convs[k].writer(turns[k], {**chat.reply_meta(mgr, params), "side": k.upper()}, mgr)
            req, _left = chat.chat_request(chat.to_messages(turns[k]), params, request, "compare", mgr.limits)
            try:
                async for text, stats, _notice in chat.stream_reply(mgr, req, progress=out[k]["progress"]):
                    o = out[k]
                    if text and o["ttft"] is None:
                        o["ttft"] = time.perf_counter() - t0
                    o["text"], o["stats"] = text, stats
                    if writer is not None:
                        writer.feed_later(text)       # the store's writer thread: no wait
            except gr.Error as e:
                out[k]["error"] = str(e)
            finally:
                if writer is not None and out[k]["text"]:
                    out[k]["id"] = await asyncio.wrap_future(writer.finish_later(out[k]["text"], out[k]["stats"]))
                out[k]["done"] = True

        tasks = [asyncio.create_task(run(k)) for k in sides]
        try:
            while True:
                done = all(out[k]["done"] for k in sides)
                shown = {k: turns[k] + [{"role": "assistant", "content": out[k]["text"]}] for k in sides}
                lines = {k: (f"⚠ {out[k]['error']}" if out[k]["error"] else
                             _live(out[k]["stats"], t0, out[k]["ttft"], out[k]["progress"])) for k in sides}
                if done:
                    break
                yield (gr.update(), st, _pane(shown["a"]), _pane(shown["b"]), lines["a"], lines["b"],
                       "*both streaming…*")
                await asyncio.sleep(UPDATE_INTERVAL)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()       # the consumer left (a closed tab): the relays abort both requests
        for k in sides:
            o = out[k]
            if o["text"]:
                turns[k] = turns[k] + [{"role": "assistant", "content": o["text"], "stats": o["stats"],
                                        **({"id": o["id"]} if o.get("id") else {})}]
            st[k] = turns[k]
        if all(out[k]["error"] for k in sides):
            yield message, st, _pane(st["a"]), _pane(st["b"]), lines["a"], lines["b"], "Neither side answered."
            return
        stopped = any((out[k]["stats"] or {}).get("finish_reason") == "abort" for k in sides)
        counts = {(out[k]["stats"] or {}).get("tokens") for k in sides}
        v = verdict(ctx, out["a"]["text"], out["b"]["text"], bool(use_greedy) or params.greedy,
                    generated=counts.pop() if len(counts) == 1 else None)
        if stopped:
            v = "*Stopped.* " + v
        yield "", st, _pane(st["a"]), _pane(st["b"]), lines["a"], lines["b"], v

    def on_stop(request: gr.Request = None):
        """Stop both sides of this tab's comparison (each stream ends with what it has)."""
        ctx.manager.abort_session(session_id(request))
        if ctx.compare is not None:
            ctx.compare.abort_session(session_id(request))

    def do_load(label, request: gr.Request = None, progress=gr.Progress()):
        options = b_choices(ctx, request)
        if label not in options:
            raise Refusal("Pick one of the listed comparisons (or use the Engines page's *Load as model B*).",
                          title="Unknown choice")
        model, engine, opts = options[label]
        return load_b(ctx, model, engine, opts, request, progress=lambda f, m: progress(f, desc=m))

    def do_unload(request: gr.Request = None):
        require_admin(s, request)
        if ctx.compare is None or ctx.compare.info() is None:
            raise Refusal("No model B is loaded: there is nothing to unload.", title="Nothing to unload")
        ctx.compare.unload()
        return describe_b(ctx)

    def refresh(request: gr.Request = None):
        opts = list(b_choices(ctx, request))
        return describe_b(ctx), gr.Dropdown(choices=opts, value=opts[0] if opts else None)

    inputs = [box, state, greedy, *sampling.values] + ([who] if who is not None else [])
    outputs = [box, state, bot_a, bot_b, stats_a, stats_b, verdict_md]
    common = dict(concurrency_id="generate", concurrency_limit="default")
    sent = [box.submit(respond, inputs, outputs, api_name="compare", **common),
            send.click(respond, inputs, outputs, api_visibility="private", **common)]
    stop.click(on_stop, None, None, api_name="compare_stop", queue=False)
    view = [state, bot_a, bot_b, stats_a, stats_b, verdict_md]

    def show(payload, _system=None):
        """The panel opened a comparison (``branches``) or started a new one ([])."""
        st = payload if isinstance(payload, dict) else {"a": [], "b": [], "cid": None}
        last = {k: next((t.get("stats") for t in reversed(st[k]) if t["role"] == "assistant"), None) for k in "ab"}
        texts = {k: next((t["content"] for t in reversed(st[k]) if t["role"] == "assistant"), "") for k in "ab"}
        v = verdict(ctx, texts["a"], texts["b"], True) if texts["a"] and texts["b"] else ""
        return [st, _pane(st["a"]), _pane(st["b"]), fmt_stats(last["a"]), fmt_stats(last["b"]), v]

    panel.wire(view, show)
    if panel.store is not None:
        # after a send: the list shows the comparison (new ones first) with it selected
        list_refresh = panel.refresh_fn()
        for ev in sent:
            ev.then(lambda st: st.get("cid"), state, panel.cid, api_visibility="private", queue=False) \
              .then(list_refresh, [who, panel.search, panel.cid], panel.side_outputs, api_visibility="private",
                    queue=False)
    # refusals (not an admin, does not fit) are a warning and a line under the buttons (engines.wire)
    admin = dict(concurrency_id="admin", concurrency_limit=1)
    wire(load_btn, do_load, choice, models_md, api_name="compare_load", notice=b_action,
         after=lambda _r=None: ["✓ Model B loaded: type a prompt below."], after_outputs=[b_action],
         show_progress_on=[models_md], **admin)
    wire(unload_btn, do_unload, None, models_md, api_name="compare_unload", notice=b_action,
         after=lambda _r=None: ["Model B unloaded."], after_outputs=[b_action], **admin)
    return refresh, [models_md, choice]


__all__ = ["build", "b_choices", "describe_b", "load_b", "first_difference", "verdict"]
