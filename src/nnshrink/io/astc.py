"""``nnshrink export X.nsz --astc DIR``: the ``.astc`` textures a GPU pipeline uploads, and how to read them.

One ``<weight>.astc`` per ASTC-stored weight (the standard 16-byte header, then the blocks exactly
as the container holds them) and ``manifest.json``: for each texture its weight's name and shape,
footprint, layout (where weight ``[o, c, y, x]`` sits in the texture) and the float32 scale and
offset that map a decoded texel ``t`` (the float16 decode) to the weight ``offset + scale * t``, and the output order where the step placed outputs in another order than
their own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nnshrink.cache import atomic_write_bytes
from nnshrink.errors import ConfigError
from nnshrink.io.container import records
from nnshrink.techniques.astc import codec
from nnshrink.techniques.astc.record import AstcRecord

SCHEMA = "nnshrink.astc-manifest/1"


def _file_name(weight: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", weight) + ".astc"


def export_textures(container: str | Path, folder: str | Path) -> list[Path]:
    """Write the container's ASTC textures and ``manifest.json`` into ``folder``; returns the paths.

    Raises:
        ConfigError: The container holds no ASTC-stored weight, or ``folder`` is a file.
        FileNotFoundError, FormatError, CorruptDataError: as for reading the container.
    """
    folder = Path(folder)
    found = {n: r for n, r in records(container).items() if isinstance(r, AstcRecord)}
    if not found:
        raise ConfigError(f"{container} holds no ASTC-stored weights (compress with an 'astc' step first)")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--astc {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written, textures = [], []
    for name, r in found.items():
        path = folder / _file_name(name)
        data = r.astc_file()
        codec.read_header(data, str(path))  # what is written reads back
        atomic_write_bytes(path, data)
        written.append(path)
        entry = {"weight": name, "file": path.name, "shape": list(r.shape),
                 "footprint": codec.footprint_name(r.footprint), "width": r.layout.width,
                 "height": r.layout.height, "layout": r.layout.to_dict(),
                 "scale": r.scale.tolist(), "offset": r.offset.tolist(),
                 "scale_per": "layer" if r.scale.size == 1 else "output"}
        if r.layout.order is not None:
            entry["order"] = list(r.layout.order)
        textures.append(entry)
    manifest = {"schema": SCHEMA,
                "decode": "ASTC LDR, decode_float16 (astcenc -dh); weight = offset + scale * texel.r",
                "placement": "weight[o, c, y, x] is texel (row, col) = ((s // group) * tile_h + y, "
                             "((s % group) * tiles + c) * tile_w + x) of channel s // per, where s is o's "
                             "slot in order (o itself without order) taken modulo per = ceil(outputs / channels)",
                "textures": textures}
    path = folder / "manifest.json"
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return [*written, path]
