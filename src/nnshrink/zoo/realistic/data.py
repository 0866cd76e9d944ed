"""Seeded generators of the realistic zoo's data: rendered text lines, pasted objects, tones.

Everything is drawn here from a seed, offline: text is rendered with the DejaVu fonts that
matplotlib installs (Debian's default family), shapes and faces are drawn with Pillow, tones are
synthesized with numpy. Each generator returns numpy arrays; the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

ALPHABET = "0123456789"
LINE_HEIGHT = 32
PITCH_BINS = 36           # semitones from F_MIN: three octaves
F_MIN = 110.0             # Hz (A2)
SAMPLE_RATE = 8000
FRAME = 1024
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


@functools.cache
def fonts() -> tuple[Path, ...]:
    """The TrueType fonts text is rendered with (DejaVu Sans, Serif and Mono, their variants)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = tuple(sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name))
    if not found:  # pragma: no cover - matplotlib always ships them
        raise RuntimeError(f"no DejaVu fonts under {folder}")
    return found


@functools.lru_cache(maxsize=64)
def _font(path: Path, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def _render(text: str, rng: np.random.Generator, height: int = LINE_HEIGHT):
    """A grayscale crop of ``text`` (dark ink on light paper), its height ``height``."""
    from PIL import Image, ImageDraw

    font = _font(fonts()[rng.integers(len(fonts()))], int(rng.integers(18, 25)))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 4, height), 255)
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    ImageDraw.Draw(img).text((2 - left, y), text, fill=0, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def _paper(shape, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0.6, 1.0)
    grad = np.linspace(0, rng.uniform(-0.2, 0.2), shape[-1], dtype=np.float32)
    return (base + grad + rng.normal(0, 0.03, shape)).astype(np.float32)


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur (a scanned or photographed line is never sharp)."""
    from PIL import Image, ImageFilter

    if radius < 0.3:
        return img
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def text_lines(n: int, seed: int, width: int | None = 128, min_len: int = 3, max_len: int = 8):
    """``n`` rendered digit strings as ``(n, 1, 32, width)`` images in [0, 1] (ink dark), the
    labels as ``(n, max_len)`` int64 class ids 1..10 padded with 0, and their lengths.

    With ``width=None`` each line is as wide as its text (rounded up to a multiple of 4) and a
    list of arrays is returned instead of one array.
    """
    rng = np.random.default_rng(seed)
    images, labels, lengths = [], np.zeros((n, max_len), np.int64), np.zeros(n, np.int64)
    for i in range(n):
        k = int(rng.integers(min_len, max_len + 1))
        text = "".join(ALPHABET[j] for j in rng.integers(0, len(ALPHABET), k))
        ink = _render(text, rng)
        w = width or (ink.shape[1] + 8 + 3) // 4 * 4
        if ink.shape[1] > w - 2:  # squeeze a line wider than the canvas, as a resize would
            from PIL import Image

            ink = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((w - 2, LINE_HEIGHT)),
                             np.float32) / 255.0
        canvas = _paper((LINE_HEIGHT, w), rng)
        x0 = int(rng.integers(0, w - ink.shape[1] + 1))
        darkness = rng.uniform(0.25, 1.0)
        canvas[:, x0:x0 + ink.shape[1]] -= (1.0 - ink) * darkness
        canvas = _blur(canvas, rng.uniform(0.0, 1.3)) + rng.normal(0, rng.uniform(0.02, 0.12), canvas.shape)
        images.append(np.clip(canvas, 0, 1).astype(np.float32)[None])
        labels[i, :k] = [ALPHABET.index(c) + 1 for c in text]
        lengths[i] = k
    x = np.stack(images) if width else images
    return x, labels, lengths


def text_pages(n: int, seed: int, size: tuple[int, int] = (64, 64)):
    """``n`` pages with 1-3 rendered words each as ``(n, 1, H, W)`` and their text masks
    ``(n, 1, H, W)`` (1 inside each word's box)."""
    rng = np.random.default_rng(seed)
    h, w = size
    x = np.empty((n, 1, h, w), np.float32)
    y = np.zeros((n, 1, h, w), np.float32)
    for i in range(n):
        page = _paper((h, w), rng)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(1, 5))
            ink = _render("".join(ALPHABET[j] for j in rng.integers(0, 10, k)), rng, height=20)
            rows = np.where(ink.min(axis=1) < 0.6)[0]
            cols = np.where(ink.min(axis=0) < 0.6)[0]
            if not len(rows) or ink.shape[1] >= w:
                continue
            ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            ih, iw = ink.shape
            r0, c0 = int(rng.integers(0, h - ih + 1)), int(rng.integers(0, w - iw + 1))
            page[r0:r0 + ih, c0:c0 + iw] -= (1.0 - ink) * rng.uniform(0.5, 1.0)
            y[i, 0, r0:r0 + ih, c0:c0 + iw] = 1.0
        x[i, 0] = np.clip(page, 0, 1)
    return x, y


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    else:
        corners = {"square": 4, "diamond": 4, "triangle": 3}.get(kind)
        if corners:
            offset = angle + (np.pi / 4 if kind == "diamond" else 0)
            rr = r * (1.0 if kind != "diamond" else 1.1)
            pts = [(cx + rr * np.cos(offset + 2 * np.pi * j / corners),
                    cy + rr * np.sin(offset + 2 * np.pi * j / corners)) for j in range(corners)]
            if kind == "diamond":  # a rhombus: stretched along one axis
                pts = [(cx + (px - cx) * (0.6 if j % 2 else 1.0), cy + (py - cy) * (0.6 if j % 2 else 1.0))
                       for j, (px, py) in enumerate(pts)]
            draw.polygon(pts, fill=fill)
        else:  # cross
            t = max(2.0, r / 2.5)
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def shapes(n: int, seed: int, size: int = 32):
    """``n`` RGB images ``(n, 3, size, size)`` of one pasted shape on a textured background and
    the shape's class (:data:`SHAPES`)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    x = np.empty((n, 3, size, size), np.float32)
    y = rng.integers(0, len(SHAPES), n)
    big = size * 2
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (big, big), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 4))):  # clutter: lines of other colours
            draw.line([tuple(rng.integers(0, big, 2).tolist()), tuple(rng.integers(0, big, 2).tolist())],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        fg = tuple(int((b + rng.integers(80, 176)) % 256) for b in bg)
        r = rng.uniform(0.25, 0.42) * big
        cx, cy = rng.uniform(r, big - r, 2)
        _draw_shape(draw, SHAPES[y[i]], cx, cy, r, rng.uniform(0, np.pi), fg)
        arr = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        x[i] = np.clip(arr.transpose(2, 0, 1) + rng.normal(0, 0.03, (3, size, size)), 0, 1)
    return x, y.astype(np.int64)


def faces(n: int, seed: int, size: int = 12):
    """``n`` RGB patches ``(n, 3, size, size)``: about half hold a face (a skin-toned oval with
    eyes and mouth) whose box is given as offsets ``(x1, y1, x2, y2)`` relative to the patch
    (the rest hold background, clutter or a part of a face). Returns images, labels (1 face,
    0 not) and boxes (zeros for non-faces)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = size * 4
    x = np.empty((n, 3, size, size), np.float32)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (big, big), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 3))):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            p = rng.integers(-big // 2, big * 3 // 2, 4)
            draw.ellipse([min(p[0], p[2]), min(p[1], p[3]), max(p[0], p[2]), max(p[1], p[3])], fill=c)
        if labels[i]:
            w = rng.uniform(0.65, 0.95) * big
            h = w * rng.uniform(1.0, 1.25)
            x1, y1 = rng.uniform(-0.1 * w, big - 0.9 * w), rng.uniform(-0.1 * h, big - 0.9 * h)
        else:  # a face far off-centre (only a part visible) or none
            w = rng.uniform(0.6, 1.0) * big
            h = w * 1.1
            far = rng.random() < 0.5
            x1 = rng.choice([-0.75, 0.75]) * w + rng.uniform(0, big - w) if far else -10 * big
            y1 = rng.uniform(-0.5 * h, big - 0.5 * h)
        skin = (int(rng.integers(150, 256)), int(rng.integers(100, 200)), int(rng.integers(60, 160)))
        draw.ellipse([x1, y1, x1 + w, y1 + h], fill=skin)
        eye = max(2.0, w / 10)
        for ex in (0.32, 0.68):
            draw.ellipse([x1 + ex * w - eye, y1 + 0.4 * h - eye, x1 + ex * w + eye, y1 + 0.4 * h + eye], fill=(20, 20, 20))
        draw.rectangle([x1 + 0.35 * w, y1 + 0.7 * h, x1 + 0.65 * w, y1 + 0.75 * h], fill=(120, 30, 30))
        if labels[i]:
            boxes[i] = [x1 / big, y1 / big, (x1 + w) / big, (y1 + h) / big]
        arr = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        x[i] = np.clip(arr.transpose(2, 0, 1) + rng.normal(0, 0.02, (3, size, size)), 0, 1)
    return x, labels, boxes


def tones(n: int, seed: int):
    """``n`` frames ``(n, 1, 1024)`` of harmonic tones at 8 kHz with noise, and each frame's pitch
    as a fractional bin (semitones above 110 Hz, in [0, 36))."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / SAMPLE_RATE
    pitch = rng.uniform(0, PITCH_BINS - 1, n)
    x = np.empty((n, 1, FRAME), np.float32)
    for i in range(n):
        f0 = F_MIN * 2 ** (pitch[i] / 12)
        sig = np.zeros(FRAME)
        decay = rng.uniform(0.3, 0.9)
        for k in range(1, 12):
            if k * f0 >= SAMPLE_RATE / 2:
                break
            sig += decay ** (k - 1) * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
        sig *= rng.uniform(0.2, 1.0) / max(1e-6, np.abs(sig).max())
        sig += rng.normal(0, rng.uniform(0.005, 0.08), FRAME)
        x[i, 0] = sig
    return x, pitch.astype(np.float32)


def pitch_targets(pitch: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    """Gaussian-blurred one-hot targets over the pitch bins (CREPE's training targets)."""
    bins = np.arange(PITCH_BINS)[None, :]
    return np.exp(-0.5 * ((bins - pitch[:, None]) / sigma) ** 2).astype(np.float32)
