"""Vision: image preprocessing cost per image and first-token latency with 1 and 4 images.

    python -m bench.bench_vision --shape tiny --backends transformers             # CPU
    python -m bench.bench_vision --shape llava-1.5-7b --backends pytorch,transformers   # GPU
    python -m bench.bench_vision --shape tiny --backends pytorch,transformers           # GPU, tiny
      (--shape small: the GPU agreement test's LLaVA, if LMDeploy refuses the tiny tower)

Shapes: ``tiny`` (the tests' tiny LLaVA, 64 px), ``tiny-336`` (tiny text side, 336 px / patch 14 like
LLaVA-1.5), ``llava-1.5-7b`` (CLIP ViT-L/14-336 + a Llama-2-7B text side, random weights, bf16).
Preprocessing = our normalization (``engines.images.prepare``) plus the model processor's own pixel
pipeline, per image. First-token latency = time to the first streamed delta through our engine layer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.base import ChatMessage, GenParams  # noqa: E402


def build(shape: str, device: str) -> str:
    from bench.models import build_tiny_llava

    dtype = "bfloat16" if device == "cuda" else "float32"
    if shape == "tiny":
        return build_tiny_llava(f"/tmp/turbostudio-llava-{shape}", device=device, dtype=dtype)
    if shape == "tiny-336":
        return build_tiny_llava(f"/tmp/turbostudio-llava-{shape}", device=device, dtype=dtype, image_size=336,
                                patch=14)
    if shape == "small":    # the GPU agreement test's model: SmolLM2-135M text, 4-layer ViT-B/16 at 224 px
        return build_tiny_llava(f"/tmp/turbostudio-llava-{shape}", device=device, dtype=dtype, image_size=224,
                                patch=16, text_shape="smollm2-135m", vision=(768, 3072, 4, 12))
    if shape == "llava-1.5-7b":
        return build_llava_7b("/tmp/turbostudio-llava-1.5-7b", device)
    raise SystemExit(f"unknown shape {shape}")


def build_llava_7b(out: str, device: str) -> str:
    """LLaVA-1.5-7B's shape: CLIP ViT-L/14 at 336 px, 2-layer MLP projector, Llama-2-7B text side."""
    import torch
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from bench.models import TOKENIZER_DIR, llama_config, save_vlm

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = llama_config("llama2-7b", vocab_size=len(tok), max_pos=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    from bench.models import build_tiny_llava  # reuse its chat template and processor settings
    tiny = build_tiny_llava("/tmp/turbostudio-llava-tiny-336", device="cpu", image_size=336, patch=14)
    save_vlm(model, LlavaProcessor.from_pretrained(tiny), out)
    del model
    torch.cuda.empty_cache()
    return out


def photo(seed: int, size=(1280, 960)):
    """A photo-sized test image (noise plus gradients: realistic decode and resize cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    noise = rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--backends", default="transformers")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import tempfile

    import torch

    from bench.bench_engines import build_engine
    from engines import models
    from engines.base import ChatRequest
    from engines.images import prepare

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = build(a.shape, device)
    tmp = tempfile.mkdtemp()
    files = []
    for i in range(4):
        f = os.path.join(tmp, f"photo{i}.jpg")
        photo(i).save(f, quality=90)
        files.append(f)
    resolved = models.resolve(path, "/tmp/turbostudio-bench-cache")
    results = {}
    for backend in a.backends.split(","):
        opts = {"device": device} if backend == "transformers" else {"cache_max_entry_count": 0.3,
                                                                      "session_len": 8192}
        eng = build_engine(resolved, backend, opts)
        # preprocessing: our normalization + the model's processor, per image
        proc = getattr(eng, "processor", None)
        if proc is None:
            from transformers import AutoProcessor
            proc = AutoProcessor.from_pretrained(path)
        t_prep, t_proc = [], []
        for _ in range(a.repeat):
            for f in files:
                t0 = time.perf_counter()
                img = prepare(f).image
                t1 = time.perf_counter()
                proc.image_processor(images=[img], return_tensors="pt")
                t_prep.append(t1 - t0)
                t_proc.append(time.perf_counter() - t1)
        imgs = [prepare(f).image for f in files]
        row = {"prepare_ms": 1000 * statistics.median(t_prep), "processor_ms": 1000 * statistics.median(t_proc)}
        p = GenParams(temperature=0, max_new_tokens=8)
        for n in (1, 4):
            msgs = [ChatMessage("user", "Describe these images.", tuple(imgs[:n]))]
            list(eng.stream(ChatRequest(tuple(msgs), p, source="bench")))
            ttfts = []
            for r in range(a.repeat):
                t0 = time.perf_counter()
                for d in eng.stream(ChatRequest(tuple(msgs), p, session=f"b{r}", source="bench")):
                    if d.finish_reason == "error":
                        raise SystemExit(f"{backend}: {d.error}")
                    if d.text or d.tokens:
                        ttfts.append(time.perf_counter() - t0)
                        break
                # the loop broke out early: closing the stream aborts the rest
            row[f"ttft_{n}img_ms"] = 1000 * statistics.median(ttfts)
            row[f"prompt_tokens_{n}img"] = eng.count_tokens(msgs)
        results[backend] = row
        print(f"{a.shape} {backend:12s} ({device}): prepare {row['prepare_ms']:.1f} ms + processor "
              f"{row['processor_ms']:.1f} ms per image | first token: 1 image {row['ttft_1img_ms']:.1f} ms "
              f"({row['prompt_tokens_1img']} prompt tokens), 4 images {row['ttft_4img_ms']:.1f} ms "
              f"({row['prompt_tokens_4img']} tokens)", flush=True)
        eng.close()
    names = list(results)
    if len(names) > 1:
        ref = names[-1]
        for name in names[:-1]:
            for n in (1, 4):
                print(f"first token, {n} image(s): {name} x{results[ref][f'ttft_{n}img_ms'] / results[name][f'ttft_{n}img_ms']:.1f} "
                      f"faster than {ref}")
    if a.json:
        json.dump({"shape": a.shape, "device": device, "results": results}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
