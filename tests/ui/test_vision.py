"""Vision: a tiny LLaVA (SmolLM2 tokenizer, random CLIP tower) end to end, and every bad image."""
from __future__ import annotations

import io
import os
import struct
import zlib

import pytest

pytest.importorskip("gradio_client")
from gradio_client import handle_file

from engines.base import ChatMessage, ChatRequest, GenParams
from engines.images import ImageError, prepare

from tests.conftest import ROOT, AppProcess

EXAMPLES = os.path.join(ROOT, "assets", "examples")
SHAPES = os.path.join(EXAMPLES, "shapes.png")
CHART = os.path.join(EXAMPLES, "chart.png")
SAMPLING = [32, 0, 0.9, 40, 1.0, None]    # max_new_tokens, temperature (greedy), top_p, top_k, rep, seed


# ---------------------------------------------------------------- engine level
@pytest.mark.slow
def test_tiny_llava_streams_and_batches_like_it_answers_alone(tiny_llava, tmp_path):
    import threading

    from engines import models, registry
    from engines.configs import TransformersConfig

    eng = registry.create(models.resolve(tiny_llava, str(tmp_path)), TransformersConfig())
    try:
        assert eng.info.vision and eng.info.extra["batching"] == "continuous"
        assert eng.info.capabilities.vision and eng.info.capabilities.penalties
        p = GenParams(temperature=0, max_new_tokens=12)
        q1 = [ChatMessage("user", "What is this?", (SHAPES,))]
        q2 = [ChatMessage("user", "Compare them.", (SHAPES, CHART))]
        solo = {}
        for k, q in (("a", q1), ("b", q2)):
            solo[k] = "".join(d.text for d in eng.stream(ChatRequest(tuple(q), p)))
        ref_ids = eng._encode(q1)
        import torch
        with torch.inference_mode():
            ref = eng.model.generate(**ref_ids, max_new_tokens=12, do_sample=False, top_k=None, top_p=None,
                                     temperature=None)
        assert solo["a"] == eng.tokenizer.decode(ref[0, ref_ids["input_ids"].shape[1]:], skip_special_tokens=True)
        both = {}
        ts = [threading.Thread(target=lambda k=k, q=q: both.__setitem__(
            k, "".join(d.text for d in eng.stream(ChatRequest(tuple(q), p))))) for k, q in (("a", q1), ("b", q2))]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        assert both == solo
        # the image changes the answer's input: two images cost twice the image tokens of one
        one = eng.count_tokens(q1) - eng.count_tokens([ChatMessage("user", "What is this?")])
        two = eng.count_tokens([ChatMessage("user", "What is this?", (SHAPES, CHART))]) - \
            eng.count_tokens([ChatMessage("user", "What is this?")])
        assert one > 0 and two == 2 * one
    finally:
        eng.close()


# ---------------------------------------------------------------- through the app
@pytest.mark.slow
def test_whole_path_upload_answer_follow_up_second_image(vision_app):
    c = vision_app.client()
    job = c.submit({"text": "What shapes are here?", "files": [handle_file(SHAPES)]}, None, *SAMPLING,
                   api_name="/vision_send")
    import time
    while not job.done():
        time.sleep(0.01)
    box, chat, webcam, context = job.result()
    assert len(job.outputs()) >= 3, "the answer streams"
    roles = [m["role"] for m in chat]
    assert roles == ["user", "user", "assistant"]     # the image, the question, the answer
    assert "image" in str(chat[0]["content"]).lower() or ".png" in str(chat[0]["content"])
    assert "Image cost: shapes.png" in context and "tokens used" in context
    # a follow-up question about the first image, with no new image
    _, chat, _, context = c.predict({"text": "What colour is the circle?", "files": []}, None, *SAMPLING,
                                    api_name="/vision_send")
    assert [m["role"] for m in chat][-2:] == ["user", "assistant"]
    # a second image later in the conversation
    _, chat, _, context = c.predict({"text": "And this one?", "files": [handle_file(CHART)]}, None, *SAMPLING,
                                    api_name="/vision_send")
    assert sum(1 for m in chat if ".png" in str(m["content"])) == 2
    assert "chart.png" in context


@pytest.mark.slow
def test_first_message_needs_an_image(vision_app):
    # a refusal leaves the page as it was, with the reason in the status line (and a warning toast)
    _, chat, _, context = vision_app.client().predict({"text": "hello", "files": []}, None, *SAMPLING,
                                                      api_name="/vision_send")
    assert chat == [] and "Attach an image" in context


def _png_16bit(path, w=32, h=24):
    raw = b"".join(b"\x00" + b"".join(struct.pack(">H", (x * 2000 + y * 50) % 65535) for x in range(w))
                   for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    open(path, "wb").write(data)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    files = {}
    p = d / "corrupt.png"
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, "PNG")
    p.write_bytes(good.getvalue()[:60])
    files["corrupt"] = p
    p = d / "notes.png"
    p.write_text("this is a text file renamed .png\n" * 20)
    files["not_image"] = p
    p = d / "anim.gif"
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated"] = p
    p = d / "deep.png"
    _png_16bit(p)
    files["png16"] = p
    p = d / "cmyk.jpg"
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(p, "JPEG")
    files["cmyk"] = p
    p = d / "rgba.png"
    Image.new("RGBA", (40, 30), (0, 0, 255, 100)).save(p)
    files["rgba"] = p
    p = d / "palette.png"
    Image.new("RGB", (40, 30), "green").convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    files["palette"] = p
    p = d / "rotated.jpg"
    img = Image.new("RGB", (60, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90° clockwise on display
    img.save(p, "JPEG", exif=exif)
    files["exif"] = p
    p = d / "tiny.png"
    Image.new("RGB", (1, 1), "white").save(p)
    files["tiny"] = p
    p = d / "huge.jpg"
    Image.new("RGB", (12000, 12000), (200, 180, 160)).save(p, "JPEG", quality=50)
    files["huge"] = p
    p = d / "empty.png"
    p.write_bytes(b"")
    files["empty"] = p
    return files


@pytest.mark.parametrize("kind, outcome", [
    ("corrupt", "refused"), ("not_image", "refused"), ("empty", "refused"),
    ("animated", "ok"), ("png16", "ok"), ("cmyk", "ok"), ("rgba", "ok"), ("palette", "ok"),
    ("exif", "ok"), ("tiny", "ok"), ("huge", "ok"),
])
def test_prepare_each_kind_of_upload(bad_images, kind, outcome):
    if outcome == "refused":
        with pytest.raises(ImageError) as e:
            prepare(str(bad_images[kind]))
        assert bad_images[kind].name in str(e.value)
        return
    prep = prepare(str(bad_images[kind]))
    assert prep.image.mode == "RGB"
    w, h = prep.image.size
    assert 16 <= min(w, h) and max(w, h) <= 2048
    if kind == "exif":
        assert (w, h) == (20, 60), "EXIF orientation applied"
    if kind == "animated":
        assert any("first frame" in n for n in prep.notes)
    if kind == "huge":
        assert any("downscaled" in n for n in prep.notes)
    if kind == "rgba":
        assert prep.image.getpixel((0, 0))[0] > 100, "alpha composited on white, not black"
    if kind == "cmyk":
        r, g, b = prep.image.getpixel((5, 5))
        assert r > 200 and g < 60 and b < 60, "CMYK (0,255,255,0) is red"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt", "not_image", "empty", "animated", "png16", "cmyk", "rgba",
                                  "palette", "exif", "tiny", "huge"])
def test_every_upload_through_the_ui_api_works_or_is_refused_clearly(vision_app, bad_images, kind):
    c = vision_app.client()
    _, chat, _, context = c.predict({"text": "What is this?", "files": [handle_file(str(bad_images[kind]))]},
                                    None, *SAMPLING, api_name="/vision_send")
    if kind in ("corrupt", "not_image", "empty"):
        assert chat == [], "a refused upload starts no turn"
        assert bad_images[kind].name in context, context
    else:
        assert chat[-1]["role"] == "assistant", f"{kind} should have worked: {context}"
    assert vision_app.alive()


@pytest.mark.slow
def test_too_many_images_are_refused(vision_app):
    c = vision_app.client()
    _, chat, _, context = c.predict({"text": "Compare", "files": [handle_file(SHAPES)] * 5}, None, *SAMPLING,
                                    api_name="/vision_send")
    assert chat == [] and "limit is 4" in context
    for _ in range(3):
        c.predict({"text": "More", "files": [handle_file(SHAPES), handle_file(CHART)]}, None, *SAMPLING,
                  api_name="/vision_send")
    _, chat, _, context = c.predict({"text": "One more", "files": [handle_file(SHAPES)]}, None, *SAMPLING,
                                    api_name="/vision_send")
    assert "limit is 6" in context and sum(1 for m in chat if m["role"] == "assistant") == 3
    assert "Paris" in c.predict([{"role": "user", "content": "What is the capital of France?"}],
                                {"temperature": 0, "max_new_tokens": 16}, api_name="/chat")


@pytest.mark.slow
def test_offline_default_says_how_to_point_at_a_folder(cache_dir, smollm2):
    app = AppProcess(["--cache-dir", cache_dir], env={"HF_HUB_OFFLINE": "1"})
    try:
        status = app.client().predict(api_name="/engine_info_vision")
        assert "offline" in status and "--vision-model" in status
        _, chat, _, context = app.client().predict({"text": "hi", "files": [handle_file(SHAPES)]}, None,
                                                   *SAMPLING, api_name="/vision_send")
        assert chat == [] and "No vision model is loaded" in context
    finally:
        app.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llava-next", "interleave"])
def test_other_llava_families_stream_their_greedy_answer(kind, tmp_path_factory):
    """LLaVA-NeXT (any-resolution tiles) and LLaVA-Interleave (SigLIP + Qwen2), tiny and random,
    through the same engine: streamed text equals transformers' own greedy generate, and a second
    turn with a second image works."""
    import torch

    from bench.models import build_tiny_vlm
    from engines import models, registry
    from engines.configs import TransformersConfig

    path = build_tiny_vlm(str(tmp_path_factory.mktemp("vlm") / kind), kind)
    eng = registry.create(models.resolve(path, str(tmp_path_factory.mktemp("c"))), TransformersConfig())
    try:
        assert eng.info.vision
        q = [ChatMessage("user", "What is this?", (SHAPES,))]
        text = "".join(d.text for d in eng.stream(ChatRequest(tuple(q), GenParams(temperature=0, max_new_tokens=10))))
        enc = eng._encode(q)
        with torch.inference_mode():
            ref = eng.model.generate(**enc, max_new_tokens=10, do_sample=False, top_k=None, top_p=None,
                                     temperature=None)
        assert text == eng.tokenizer.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        q2 = q + [ChatMessage("assistant", text), ChatMessage("user", "And this one?", (CHART,))]
        last = list(eng.stream(ChatRequest(tuple(q2), GenParams(temperature=0, max_new_tokens=6))))[-1]
        assert last.finish_reason in ("length", "stop") and last.tokens >= 1
        assert eng.count_tokens(q2) > eng.count_tokens(q)
    finally:
        eng.close()


@pytest.mark.slow
def test_uploads_over_the_size_limit_are_refused(cache_dir, smollm2, tiny_llava, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    import numpy as np
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2 * 2**20
    app = AppProcess(["--cache-dir", cache_dir, "--vision-model", tiny_llava, "--max-upload-mb", "2"])
    try:
        with pytest.raises(Exception) as e:
            app.client().predict({"text": "What is this?", "files": [handle_file(str(big))]}, None, *SAMPLING,
                                 api_name="/vision_send")
        assert "2" in str(e.value) and ("size" in str(e.value).lower() or "large" in str(e.value).lower())
        assert app.alive()
    finally:
        app.stop()
