"""Random-weight models of real shapes, with SmolLM2's real tokenizer (``assets/tokenizers/smollm2``).

No model hub is reachable on CI or on the GPU test machine, and weights do not matter for speed or
memory: a model of a real architecture and size with random weights runs exactly the same kernels.
Tests use the tiny shapes; benchmarks use real ones (SmolLM2-135M, a 1.8B InternLM2-like Llama,
Llama-2-7B). ``python -m bench.models SHAPE OUT`` writes one to a folder.
"""
from __future__ import annotations

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "..", "assets", "tokenizers", "smollm2")
VOCAB = 49152

# Llama-architecture shapes: (hidden, intermediate, layers, heads, kv_heads)
SHAPES = {
    "tiny": (256, 688, 4, 4, 2),              # ~30M params with the 49k vocab; CPU tests
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "awq-small": (1024, 2816, 8, 8, 8),       # ~0.2B, dims divisible by AWQ's group 128; GPU tests
    "1.8b": (2048, 8192, 24, 16, 8),          # the gpu-kit's 1.8B shape (InternLM2-1.8B-like)
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-7b-32k": (4096, 11008, 32, 32, 32),   # the same with Llama-2's own 32 000-token vocabulary
}
# shapes whose vocabulary is not SmolLM2's 49 152: their tokenizer keeps SmolLM2's first N tokens
VOCABS = {"llama2-7b-32k": 32000}


def truncate_tokenizer(folder: str, vocab: int) -> None:
    """Cut the byte-level BPE tokenizer in ``folder`` to its first ``vocab`` ids: the tokens above go,
    and so does every merge that makes or uses one. The 256 byte tokens sit low in SmolLM2's vocabulary,
    so any text still encodes (into more, shorter tokens), and no id reaches past the model's
    embedding. Gives a real tokenizer for a shape with another vocabulary size (Llama-2: 32 000)."""
    import json

    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok["model"]
    keep = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in keep and b in keep and a + b in keep:
            merges.append(m)
    model["vocab"], model["merges"] = keep, merges
    tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["id"] < vocab]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)


def copy_tokenizer(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(TOKENIZER_DIR):
        if name != "README.md":
            shutil.copy(os.path.join(TOKENIZER_DIR, name), out_dir)


def llama_config(shape: str, max_pos: int = 4096, **overrides):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = SHAPES[shape]
    kw = dict(vocab_size=VOCABS.get(shape, VOCAB), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
              rope_theta=10000.0, architectures=["LlamaForCausalLM"])
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(out_dir: str, shape: str = "tiny", *, device: str = "cpu", dtype: str = "float32",
                seed: int = 0, max_pos: int = 4096) -> str:
    """Write a random-weight Llama of ``shape`` with SmolLM2's tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    cfg = llama_config(shape, max_pos=max_pos)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    copy_tokenizer(tmp)
    if shape in VOCABS:
        truncate_tokenizer(tmp, VOCABS[shape])
    os.replace(tmp, out_dir)
    del model
    return out_dir


def save_llava(model, folder: str) -> None:
    """Save a LLaVA in the llava-hf hub layout (``vision_tower.vision_model.*``), which LMDeploy's
    loader expects; transformers 5 would otherwise write ``vision_tower.*`` (it reads both)."""
    sd = {}
    for k, v in model.state_dict().items():
        for old in ("model.vision_tower.", "vision_tower."):
            if k.startswith(old) and not k.startswith("vision_tower.vision_model."):
                k = "vision_tower.vision_model." + k[len(old):]
                break
        sd[k] = v
    model.save_pretrained(folder, state_dict=sd)


def save_vlm(model, processor, out_dir: str) -> str:
    """Write a vision-language model and its processor to ``out_dir`` atomically (via a .tmp folder)."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_llava(model, tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def build_tiny_llava(out_dir: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                     image_size: int = 64, patch: int = 16, text_shape: str = "tiny",
                     vision: tuple[int, int, int, int] = (128, 256, 2, 2)) -> str:
    """A tiny LLaVA-1.5-style model: a small random CLIP vision tower and a tiny Llama text side
    with SmolLM2's tokenizer plus an ``<image>`` token, saved with a LlavaProcessor."""
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text_cfg = llama_config(text_shape, vocab_size=len(tok))
    # head_dim 64: LMDeploy's vision kernels assert on smaller heads (a device-side assert was seen
    # on the H100 with 32)
    v_hidden, v_inter, v_layers, v_heads = vision
    vision_cfg = CLIPVisionConfig(hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers,
                                  num_attention_heads=v_heads, image_size=image_size, patch_size=patch,
                                  projection_dim=64)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(getattr(torch, dtype))
    improc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
                "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", chat_template=template,
                          num_additional_image_tokens=1)
    return save_vlm(model, proc, out_dir)


if __name__ == "__main__":
    shape, out = sys.argv[1], sys.argv[2]
    dev = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    if shape == "tiny-llava":
        print(build_tiny_llava(out, device=dev))
    else:
        print(build_llama(out, shape, device=dev, dtype="bfloat16" if dev == "cuda" else "float32"))


_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
             "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
             "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
             "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_vlm(out_dir: str, kind: str, *, seed: int = 0) -> str:
    """Tiny random-weight models of the other llava-hf families, for CPU tests:
    ``llava-next`` (LLaVA-1.6: CLIP tower, any-resolution tiles, image_newline) and
    ``interleave`` (LLaVA-Interleave: SigLIP tower, Qwen2 text side), with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if kind == "llava-next":
        from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                                  LlavaNextImageProcessor, LlavaNextProcessor)

        vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=16, projection_dim=64)
        cfg = LlavaNextConfig(vision_config=vision, text_config=llama_config("tiny", vocab_size=len(tok)),
                              image_token_index=image_token_id, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
        cfg.architectures = ["LlavaNextForConditionalGeneration"]
        model = LlavaNextForConditionalGeneration(cfg)
        improc = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
        proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=16,
                                  vision_feature_select_strategy="default", chat_template=_TEMPLATE,
                                  num_additional_image_tokens=1)
    elif kind == "interleave":
        from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config,
                                  SiglipImageProcessor, SiglipVisionConfig)

        vision = SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=16)
        text = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                          vision_feature_layer=-1, vision_feature_select_strategy="full")
        cfg.architectures = ["LlavaForConditionalGeneration"]
        model = LlavaForConditionalGeneration(cfg)
        improc = SiglipImageProcessor(size={"height": 32, "width": 32})
        proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=16,
                              vision_feature_select_strategy="full", chat_template=_TEMPLATE,
                              num_additional_image_tokens=0)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return save_vlm(model, proc, out_dir)
