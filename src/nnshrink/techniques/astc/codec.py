"""ASTC textures of weights: encoding with Arm's astcenc, the one decode profile, ``.astc`` files.

Encoding uses astcenc itself (PyPI ``astc-encoder-py`` bundles it): its block search is the
product of years of tuning and there is nothing to gain from another one. Weights are stored as a
luminance texture (R = G = B = value, A = 1) in the LDR linear profile, so astcenc picks the
luminance endpoint modes and spends every bit on the one channel; or, with two channels, as
luminance and alpha (R = G = B = first value, A = second), two weights per texel.

**Decode profile.** The weights nnshrink evaluates are the astcenc decode of the stored blocks
to float16 (``ASTCType.F16``; ``astcenc -dh`` on the command line), which is the ASTC
specification's default LDR decode mode (``decode_float16``) and what a GPU's texture unit
returns for an LDR ASTC texture without the decode-mode extension. It is exact integer
arithmetic ending in one fixed float16 conversion, so it is the same on every CPU and in every
conforming decoder; the 8-bit (``decode_unorm8``) outputs of different decoders differ by one
step and are not used. A texel whose three colour channels differ, or whose alpha is not 1, is
not a luminance block nnshrink wrote (an illegal block decodes to the error colour, magenta):
:func:`decode` refuses such blocks.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from nnshrink.errors import ConfigError, CorruptDataError

#: The 14 two-dimensional ASTC footprints (width x height), from 8 to 0.89 bits per texel.
FOOTPRINTS = ((4, 4), (5, 4), (5, 5), (6, 5), (6, 6), (8, 5), (8, 6), (8, 8), (10, 5), (10, 6), (10, 8),
              (10, 10), (12, 10), (12, 12))
BLOCK_BYTES = 16
MAGIC = 0x5CA1AB13
#: Quality presets of astcenc (0-100); a plan may also give a number.
QUALITIES = {"fastest": 0.0, "fast": 10.0, "medium": 60.0, "thorough": 98.0, "verythorough": 99.0,
             "exhaustive": 100.0}
#: The largest texture side GPUs are required to accept (Vulkan maxImageDimension2D on most mobile parts).
MAX_SIDE = 16384


def parse_footprint(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"8x6"`` (width x height) or ``(8, 6)`` -> ``(8, 6)``; anything else is a ConfigError."""
    if isinstance(text, tuple):
        fp = tuple(int(v) for v in text)
    else:
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"an ASTC footprint looks like '8x8' (width x height), got {text!r}")
        fp = (int(parts[0]), int(parts[1]))
    if fp not in FOOTPRINTS:
        raise ConfigError(f"{fp[0]}x{fp[1]} is not a 2-D ASTC footprint; use one of "
                          f"{', '.join(f'{w}x{h}' for w, h in FOOTPRINTS)}")
    return fp


def footprint_name(fp: tuple[int, int]) -> str:
    return f"{fp[0]}x{fp[1]}"


def block_count(width: int, height: int, fp: tuple[int, int]) -> int:
    return -(-width // fp[0]) * -(-height // fp[1])


def bits_per_texel(fp: tuple[int, int]) -> float:
    return 128 / (fp[0] * fp[1])


def quality_value(quality: str | float) -> float:
    if isinstance(quality, str):
        if quality.lower() not in QUALITIES:
            raise ConfigError(f"astc quality must be one of {', '.join(QUALITIES)} or a number 0-100, got {quality!r}")
        return QUALITIES[quality.lower()]
    if not 0 <= float(quality) <= 100:
        raise ConfigError(f"astc quality must be from 0 to 100, got {quality}")
    return float(quality)


def _astc():
    try:
        import astc_encoder
        from astc_encoder import enum
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("ASTC needs the astc-encoder-py package (pip install astc-encoder-py)") from exc
    return astc_encoder, enum


def encoder_version() -> str:
    """The astc-encoder-py release that encodes (part of the keys of cached measurements)."""
    return str(getattr(_astc()[0], "__version__", "unknown"))


@functools.lru_cache(maxsize=64)
def _context(fp: tuple[int, int], quality: float, threads: int):
    """astcenc's context for a footprint and preset, kept: making one costs about 10 ms, as much as
    encoding a small strip (re-training and error compensation encode many)."""
    A, E = _astc()
    config = A.ASTCConfig(E.ASTCProfile.LDR, fp[0], fp[1], 1, quality, 0)
    return A.ASTCContext(config, max(1, threads)), A.ASTCSwizzle.from_str("rgba")


def encode(texture: np.ndarray, fp: tuple[int, int], quality: str | float = "medium", threads: int = 1) -> bytes:
    """The ASTC blocks (16 bytes each, row by row) of a texture of values in [0, 1]: ``H x W``
    (luminance) or ``H x W x C`` with 1 or 2 channels (luminance, alpha)."""
    A, E = _astc()
    t = np.asarray(texture, np.float32)
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim != 3 or not t.size or t.shape[2] not in (1, 2):
        raise ValueError(f"a texture is a non-empty H x W x 1 or 2 array, got shape {t.shape}")
    if not (np.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
        raise ValueError("texture values must lie in [0, 1]")
    h, w = t.shape[:2]
    rgba = np.empty((h, w, 4), np.float32)
    rgba[..., :3] = t[..., :1]
    rgba[..., 3] = t[..., 1] if t.shape[2] == 2 else 1.0
    ctx, swizzle = _context(fp, quality_value(quality), threads)
    data = ctx.compress(A.ASTCImage(E.ASTCType.F32, w, h, 1, rgba.tobytes()), swizzle)
    if len(data) != block_count(w, h, fp) * BLOCK_BYTES:  # pragma: no cover - astcenc's contract
        raise RuntimeError(f"astcenc returned {len(data)} bytes for a {w}x{h} texture at {footprint_name(fp)}")
    return data


def decode(blocks: bytes, width: int, height: int, fp: tuple[int, int], what: str = "texture",
           channels: int = 1) -> np.ndarray:
    """The float16 texture (height x width x channels) the blocks decode to in the decode profile above.

    Raises:
        CorruptDataError: The byte count does not fit the texture, or a block is illegal or not
            a luminance block (naming ``what``).
    """
    A, E = _astc()
    if len(blocks) != block_count(width, height, fp) * BLOCK_BYTES:
        raise CorruptDataError(f"{what}: {len(blocks)} bytes of blocks for a {width}x{height} texture at "
                               f"{footprint_name(fp)} (expected {block_count(width, height, fp) * BLOCK_BYTES})")
    ctx, swizzle = _context(fp, 0.0, 1)
    image = ctx.decompress(bytes(blocks), A.ASTCImage(E.ASTCType.F16, width, height, 1), swizzle)
    rgba = np.frombuffer(image.data, np.float16).reshape(height, width, 4)
    bits = rgba.view(np.uint16)
    bad = (bits[..., 0] != bits[..., 1]) | (bits[..., 0] != bits[..., 2]) | ~np.isfinite(rgba).all(axis=-1)
    if channels == 1:
        bad |= rgba[..., 3] != 1
    if bad.any():
        y, x = (int(v[0]) for v in np.nonzero(bad))
        raise CorruptDataError(f"{what}: block at texel ({x}, {y}) is not a valid luminance block "
                               f"(illegal or damaged; it decodes to {rgba[y, x].astype(np.float32).tolist()})")
    return np.ascontiguousarray(rgba[..., [0, 3]] if channels == 2 else rgba[..., :1])


def header(width: int, height: int, fp: tuple[int, int]) -> bytes:
    """The 16-byte ``.astc`` file header of a 2-D texture."""
    return struct.pack("<I", MAGIC) + bytes([fp[0], fp[1], 1]) + width.to_bytes(3, "little") + \
        height.to_bytes(3, "little") + (1).to_bytes(3, "little")


def read_header(data: bytes, what: str = ".astc file") -> tuple[int, int, tuple[int, int]]:
    """``(width, height, footprint)`` of an ``.astc`` file's bytes, checked against its length."""
    if len(data) < 16 or struct.unpack("<I", data[:4])[0] != MAGIC:
        raise CorruptDataError(f"{what}: not an .astc file (bad magic number)")
    bx, by, bz = data[4], data[5], data[6]
    width, height, depth = (int.from_bytes(data[i:i + 3], "little") for i in (7, 10, 13))
    if bz != 1 or depth != 1 or (bx, by) not in FOOTPRINTS or not width or not height:
        raise CorruptDataError(f"{what}: header names a {bx}x{by}x{bz} block and a {width}x{height}x{depth} "
                               "texture, not a 2-D texture nnshrink writes")
    expected = 16 + block_count(width, height, (bx, by)) * BLOCK_BYTES
    if len(data) != expected:
        raise CorruptDataError(f"{what}: {len(data)} bytes, expected {expected} for its header")
    return width, height, (bx, by)
