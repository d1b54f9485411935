"""Turn whatever a user uploads into an RGB image a vision model can take, or a clear refusal.

Handled: EXIF rotation, CMYK/16-bit/greyscale/palette/alpha modes (alpha composited on white),
animated images (first frame, with a note), tiny images (upscaled to a minimum side), huge images
(decoded at reduced size where the format allows, then downscaled), decompression bombs (refused),
corrupt or non-image files (refused). Nothing here imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

MAX_PIXELS = 200_000_000       # refuse larger (a 12000x12000 photo is 144 M and is accepted)
MAX_SIDE = 2048                # downscale so the longer side is at most this
MIN_SIDE = 16                  # upscale smaller images (a 1x1 image becomes 16x16)
MAX_FILE_BYTES = 50 * 2**20


class ImageError(ValueError):
    """An upload that cannot be used, with a message for the user."""


@dataclass
class PreparedImage:
    image: object                   # PIL.Image.Image, RGB
    name: str
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def prepare(src, name: str | None = None, *, max_side: int = MAX_SIDE) -> PreparedImage:
    """Open ``src`` (a path or a PIL image) and normalize it; raises ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (os.path.basename(src) if isinstance(src, str) else "image")
    notes: list[str] = []
    if isinstance(src, str):
        try:
            size = os.path.getsize(src)
        except OSError as e:
            raise ImageError(f"{label}: cannot read the file ({e.strerror}).") from e
        if size == 0:
            raise ImageError(f"{label}: the file is empty.")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{label}: {size / 2**20:.0f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit.")
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            img = Image.open(src)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{label}: {w}x{h} is too large ({w * h / 1e6:.0f} M pixels; "
                                 f"the limit is {MAX_PIXELS / 1e6:.0f} M).")
            if img.format == "JPEG" and max(w, h) > 2 * max_side:
                img.draft("RGB", (max_side, max_side))    # decode a huge JPEG at reduced size
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"{label}: too many pixels to open safely.") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{label}: not an image file (or a format that cannot be read).") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: the image is corrupt or truncated ({e}).") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old
        original = (w, h)
    else:
        img = src
        original = img.size
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        notes.append(f"{label}: animated ({img.n_frames} frames); the first frame is used.")
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
        notes.append(f"{label}: unreadable EXIF orientation ignored.")
    img = _to_rgb(img)
    w, h = img.size
    if max(w, h) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notes.append(f"{label}: downscaled from {w}x{h} to {img.size[0]}x{img.size[1]}.")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        scale = MIN_SIDE / min(w, h)
        img = img.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))),
                         Image.Resampling.NEAREST)
        notes.append(f"{label}: upscaled from {w}x{h} to {img.size[0]}x{img.size[1]}.")
    return PreparedImage(img, label, original, notes)


def _to_rgb(img):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else a * 0
        return Image.fromarray(a.astype("uint8"), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")   # CMYK (Pillow applies the inversion), L, 1, YCbCr, LAB, HSV
