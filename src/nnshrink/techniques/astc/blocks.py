"""Re-training B: ASTC blocks trained directly, then written as real blocks.

No library exposes ASTC's block arithmetic for training, nor writes a block from given endpoints
and weights (astcenc only searches), so this module holds both, for one block configuration per
layer: a single partition, 8-bit endpoints, a weight grid of ``gw x gh`` values at ``levels``
quantization levels (any of ASTC's 12 weight ranges, trits and quints included), and either
colour endpoint mode 0 (LDR luminance, direct) with one weight plane, or, for two weights per
texel, mode 4 (LDR luminance + alpha, direct) with a second weight plane for alpha. Everything follows the Khronos Data
Format Specification's ASTC chapter:

- the weight grid's infill to texels (its fixed-point bilinear rule), the unquantization of
  weights to 0..64 and the interpolation ``C = (257 e0 (64 - w) + 257 e1 w + 32) >> 6``, then the
  float16 decode of the 16-bit result (rounded toward zero, 0xFFFF -> 1.0);
- the block's bits: the 11-bit block mode, partition count, endpoint mode, endpoints from bit 17,
  and the weights' integer-sequence encoding bit-reversed from the top of the block.

:class:`BlockModel` computes the decode exactly in its forward pass (integers held in float
tensors) with straight-through gradients, so what trains is what decodes; :func:`write_blocks`
emits the 16-byte blocks, and the record made from them is decoded by astcenc, which must give
the trained weights bit for bit (``retrain_blocks`` checks and reports the largest difference).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from nnshrink.progress import progress_bar
from nnshrink.techniques.astc import codec
from nnshrink.techniques.astc.record import AstcRecord
from nnshrink.techniques.records import attach

# weight levels -> (trits, quints, bits) and the (R, P) block-mode code of the range
RANGES = {2: (0, 0, 1), 3: (1, 0, 0), 4: (0, 0, 2), 5: (0, 1, 0), 6: (1, 0, 1), 8: (0, 0, 3), 10: (0, 1, 1),
          12: (1, 0, 2), 16: (0, 0, 4), 20: (0, 1, 2), 24: (1, 0, 3), 32: (0, 0, 5)}
_RP = {2: (2, 0), 3: (3, 0), 4: (4, 0), 5: (5, 0), 6: (6, 0), 8: (7, 0), 10: (2, 1), 12: (3, 1), 16: (4, 1),
       20: (5, 1), 24: (6, 1), 32: (7, 1)}
# trit/quint ranges: stored value -> unquantized weight, and quantization level -> stored value
_RAW = {6: [0, 64, 12, 52, 25, 39], 10: [0, 64, 7, 57, 14, 50, 21, 43, 28, 36],
        12: [0, 64, 17, 47, 5, 59, 23, 41, 11, 53, 28, 36],
        20: [0, 64, 16, 48, 3, 61, 19, 45, 6, 58, 23, 41, 9, 55, 26, 38, 13, 51, 29, 35],
        24: [0, 64, 8, 56, 16, 48, 24, 40, 2, 62, 11, 53, 19, 45, 27, 37, 5, 59, 13, 51, 22, 42, 30, 34]}
_SCRAMBLE = {6: [0, 2, 4, 5, 3, 1], 10: [0, 2, 4, 6, 8, 9, 7, 5, 3, 1], 12: [0, 4, 8, 2, 6, 10, 11, 7, 3, 9, 5, 1],
             20: [0, 4, 8, 12, 16, 2, 6, 10, 14, 18, 19, 15, 11, 7, 3, 17, 13, 9, 5, 1],
             24: [0, 8, 16, 2, 10, 18, 4, 12, 20, 6, 14, 22, 23, 15, 7, 21, 13, 5, 19, 11, 3, 17, 9, 1]}
# the most weight bits that leave room for 8-bit endpoints: 111 - 2 x 8 (one plane, luminance),
# 109 - 4 x 8 (two planes: the 2-bit colour component selector, luminance and alpha)
_MAX_WB = {1: 95, 2: 77}


def _replicate(v: int, bits: int, to: int) -> int:
    out, have = 0, 0
    while have < to:
        out = (out << bits) | v
        have += bits
    return out >> (have - to)


def unquantized(levels: int) -> list[int]:
    """The 0..64 weight value of each quantization level, ascending."""
    t, q, b = RANGES[levels]
    if not t and not q:
        values = [_replicate(v, b, 6) for v in range(levels)]
        return [v + 1 if v > 32 else v for v in values]
    if not b:
        return [0, 32, 64] if t else [0, 16, 32, 48, 64]
    return [_RAW[levels][_SCRAMBLE[levels][k]] for k in range(levels)]


def stored(levels: int) -> list[int]:
    """The value stored for each quantization level (the identity, except for trit/quint ranges with bits)."""
    return _SCRAMBLE.get(levels, list(range(levels)))


def weight_bits(levels: int, count: int) -> int:
    """Bits of the integer-sequence encoding of ``count`` weights at ``levels`` levels."""
    t, q, b = RANGES[levels]
    return count * b + (-(-8 * count // 5) if t else 0) + (-(-7 * count // 3) if q else 0)


def block_mode(gw: int, gh: int, levels: int, dual: bool = False) -> int | None:
    """The 11-bit block mode of a ``gw x gh`` grid at ``levels`` (``dual``: two weight planes),
    or None if none exists."""
    r, p = _RP[levels]
    r0, r21, hi = r & 1, r >> 1, int(dual) << 10 | p << 9
    if 4 <= gw <= 7 and 2 <= gh <= 5:
        return hi | (gw - 4) << 7 | (gh - 2) << 5 | r0 << 4 | 0b00 << 2 | r21
    if 8 <= gw <= 11 and 2 <= gh <= 5:
        return hi | (gw - 8) << 7 | (gh - 2) << 5 | r0 << 4 | 0b01 << 2 | r21
    if 2 <= gw <= 5 and 8 <= gh <= 11:
        return hi | (gh - 8) << 7 | (gw - 2) << 5 | r0 << 4 | 0b10 << 2 | r21
    if 2 <= gw <= 5 and 6 <= gh <= 7:
        return hi | (gh - 6) << 7 | (gw - 2) << 5 | r0 << 4 | 0b11 << 2 | r21
    if 2 <= gw <= 3 and 2 <= gh <= 5:
        return hi | 1 << 8 | (gw - 2) << 7 | (gh - 2) << 5 | r0 << 4 | 0b11 << 2 | r21
    if gw == 12 and 2 <= gh <= 5:
        return hi | (gh - 2) << 5 | r0 << 4 | r21 << 2
    if 2 <= gw <= 5 and gh == 12:
        return hi | 0b01 << 7 | (gw - 2) << 5 | r0 << 4 | r21 << 2
    if (gw, gh) in ((6, 10), (10, 6)):
        return hi | 0b11 << 7 | (1 if gw == 10 else 0) << 5 | r0 << 4 | r21 << 2
    if 6 <= gw <= 9 and 6 <= gh <= 9 and p == 0 and not dual:
        return (gh - 6) << 9 | 0b10 << 7 | (gw - 6) << 5 | r0 << 4 | r21 << 2
    return None


def configurations(fp: tuple[int, int], channels: int = 1) -> list[tuple[int, int, int]]:
    """Every ``(gw, gh, levels)`` a ``fp`` block can hold with 8-bit endpoints for ``channels``
    channels (one weight plane each); per grid only the most levels that fit (fewer levels on the
    same grid only lose precision)."""
    out = []
    for gw in range(2, fp[0] + 1):
        for gh in range(2, fp[1] + 1):
            if gw * gh * channels > 64:
                continue
            fits = [lv for lv in sorted(RANGES) if 24 <= weight_bits(lv, gw * gh * channels) <= _MAX_WB[channels]
                    and block_mode(gw, gh, lv, channels == 2) is not None]
            if fits:
                out.append((gw, gh, fits[-1]))
    return out


def _trit_block(t: list[int]) -> int:
    t0, t1, t2, t3, t4 = t
    dc = 0
    if t2 == 2 and t1 == 2:
        c, dc = 1 << 4 | 0b11 << 2 | t0, 1 << 4
    elif t2 == 2:
        c = t1 << 4 | {0: 0, 1: 1, 2: 3}[t0] << 2 | 0b11
        dc = 4 if t0 == 2 else 0
    else:
        c = t2 << 4 | t1 << 2 | t0
    if t3 == 2 and t4 == 2:
        return (c >> 2 & 0b111) << 5 | 0b111 << 2 | (c & 0b11)
    if c >> 2 == 0b111:
        c &= ~dc
    return (t3 << 7 | 0b11 << 5 | c) if t4 == 2 else (t4 << 7 | t3 << 5 | c)


def _quint_block(q: list[int]) -> int:
    q0, q1, q2 = q
    if q1 == 4 and q0 == 4:
        return 0b0011111 if q2 == 4 else (q2 >> 1) << 4 | (q2 & 1) << 3 | 0b110
    c = (q0 << 3 | 0b101) if q1 == 4 else (q1 << 3 | q0)
    if q2 == 4:
        return ((~c >> 1) & 3) << 5 | ((c >> 3) & 3) << 3 | 0b110 | (c & 1)
    return q2 << 5 | c


def ise_encode(values: list[int], levels: int) -> int:
    """The integer-sequence encoding of ``values`` (stored values) as an integer, stream bit 0 first."""
    t, q, b = RANGES[levels]
    out, mask = 0, (1 << b) - 1
    if not t and not q:
        for i, v in enumerate(values):
            out |= v << (i * b)
        return out
    size, fields = (5, (2, 2, 1, 2, 1)) if t else (3, (3, 2, 2))
    group_bits = size * b + (8 if t else 7)
    for g in range(0, len(values), size):
        chunk = list(values[g:g + size]) + [0] * (size - len(values[g:g + size]))
        packed = (_trit_block if t else _quint_block)([v >> b for v in chunk])
        pos, used = (g // size) * group_bits, 0
        for k, v in enumerate(chunk):
            out |= (v & mask) << pos
            pos += b
            n = fields[k]
            out |= ((packed >> used) & ((1 << n) - 1)) << pos
            pos += n
            used += n
    return out


def write_blocks(endpoints: np.ndarray, levels_idx: np.ndarray, gw: int, gh: int, levels: int) -> np.ndarray:
    """16-byte blocks from integer endpoints (0..255) and grid levels (0..levels-1): ``(n, 2)``
    and ``(n, gw*gh)`` for luminance, or ``(n, 4)`` (L0, L1, A0, A1) and ``(n, 2, gw*gh)`` for
    luminance + alpha (plane 0 luminance, plane 1 alpha)."""
    levels_idx = levels_idx.reshape(len(levels_idx), -1, gw * gh)
    channels = levels_idx.shape[1]
    mode = block_mode(gw, gh, levels, channels == 2)
    wb = weight_bits(levels, gw * gh * channels)
    if mode is None or not 24 <= wb <= _MAX_WB[channels] or endpoints.shape[1] != 2 * channels:
        raise ValueError(f"no block mode for a {gw}x{gh} grid at {levels} levels with 8-bit endpoints "
                         f"for {channels} channel(s)")
    table = stored(levels)
    out = np.empty((len(endpoints), codec.BLOCK_BYTES), np.uint8)
    cem = 0 if channels == 1 else 4
    for i, (e, k) in enumerate(zip(endpoints.tolist(), levels_idx.tolist())):
        values = [table[v] for pair in zip(*k) for v in pair]  # planes interleaved per grid point
        stream = ise_encode(values, levels)
        if stream >> wb:  # pragma: no cover - the encoding's size is exact
            raise RuntimeError("weight stream longer than its bit count")
        rev = int(format(stream, f"0{wb}b")[::-1], 2)
        x = mode | 0 << 11 | cem << 13 | rev << (128 - wb)
        for j, v in enumerate(e):
            x |= v << (17 + 8 * j)
        if channels == 2:
            x |= 3 << (126 - wb)  # colour component selector: plane 1 drives alpha
        out[i] = np.frombuffer(x.to_bytes(16, "little"), np.uint8)
    return out


def infill(fp: tuple[int, int], gw: int, gh: int) -> tuple[np.ndarray, np.ndarray]:
    """For each texel of a block (row-major), the 4 grid indices and integer factors (summing to 16)."""
    bx, by = fp
    ds, dt = (1024 + bx // 2) // (bx - 1), (1024 + by // 2) // (by - 1)
    idx, fac = [], []
    for t in range(by):
        for s in range(bx):
            gs, gt = (ds * s * (gw - 1) + 32) >> 6, (dt * t * (gh - 1) + 32) >> 6
            js, fs, jt, ft = gs >> 4, gs & 15, gt >> 4, gt & 15
            v0 = js + jt * gw
            w11 = (fs * ft + 8) >> 4
            four = [v0, v0 + 1, v0 + gw, v0 + gw + 1]
            idx.append([min(v, gw * gh - 1) for v in four])  # a clamped index always has factor 0
            fac.append([16 - fs - ft + w11, fs - w11, ft - w11, w11])
    return np.array(idx, np.int64), np.array(fac, np.int64)


def _ste(soft: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return soft + (exact - soft).detach()


def _fp16_rtz(c: torch.Tensor) -> torch.Tensor:
    """The float16 decode of 16-bit values ``c`` (float tensor of integers): c / 65536 rounded
    toward zero to float16 precision, 65535 -> 1.0."""
    f = (c / 65536.0).to(torch.float32)
    bits = f.view(torch.int32) & torch.tensor(-8192, dtype=torch.int32)  # 0xFFFFE000: 10 mantissa bits
    return torch.where(c >= 65535, torch.ones_like(f), bits.view(torch.float32))


class BlockModel(nn.Module):
    """The blocks of one texture (``H x W x channels``, 1 or 2 channels) as trainable endpoints
    and grid weights (both in [0, 1]), whose forward pass is the exact decode to the texture
    (straight-through gradients)."""

    def __init__(self, texture: np.ndarray, fp: tuple[int, int], gw: int, gh: int, levels: int) -> None:
        super().__init__()
        h, w, c = texture.shape
        self.fp, self.gw, self.gh, self.levels, self.size, self.channels = fp, gw, gh, levels, (h, w), c
        self.nx, self.ny = -(-w // fp[0]), -(-h // fp[1])
        idx, fac = infill(fp, gw, gh)
        infill_matrix = np.zeros((fp[0] * fp[1], gw * gh), np.float32)  # texel x grid factors (4 per row)
        np.add.at(infill_matrix, (np.repeat(np.arange(len(idx)), 4), idx.reshape(-1)), fac.reshape(-1))
        self.register_buffer("infill", torch.from_numpy(infill_matrix.T.copy()))
        self.register_buffer("unq", torch.tensor(unquantized(levels), dtype=torch.float32))
        blocks = self._blocks(torch.from_numpy(np.ascontiguousarray(texture, np.float32)))  # (n, c, by*bx)
        lo, hi = blocks.min(dim=2).values, blocks.max(dim=2).values
        self.e = nn.Parameter(torch.stack([lo, hi], 2).reshape(len(blocks), 2 * c).clamp(0, 1))
        norm = (blocks - lo[..., None]) / (hi - lo).clamp_min(1e-6)[..., None]
        grid = torch.nn.functional.interpolate(norm.reshape(-1, 1, fp[1], fp[0]), size=(gh, gw), mode="area")
        self.g = nn.Parameter(grid.reshape(len(blocks), c, gw * gh).clamp(0, 1))

    def _blocks(self, tex: torch.Tensor) -> torch.Tensor:
        """Texture (h, w, c) -> blocks (n, c, by*bx), edge texels repeated into the padding."""
        bx, by = self.fp
        h, w = self.size
        rows = torch.arange(self.ny * by).clamp_max(h - 1)
        cols = torch.arange(self.nx * bx).clamp_max(w - 1)
        full = tex[rows][:, cols]
        return full.reshape(self.ny, by, self.nx, bx, -1).permute(0, 2, 4, 1, 3).reshape(self.ny * self.nx, -1, by * bx)

    def integers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Endpoints (n, 2c) in 0..255 and grid levels (n, c, gw*gh) in 0..levels-1, as float tensors."""
        e = self.e.clamp(0, 1) * 255
        k = self.g.clamp(0, 1) * (self.levels - 1)
        return _ste(e, torch.round(e)), _ste(k, torch.round(k))

    def forward(self) -> torch.Tensor:
        e, k = self.integers()
        p = _ste(k * (64.0 / (self.levels - 1)), self.unq[k.detach().long()])
        texel = p @ self.infill  # (n, c, by*bx): 16 x the weight, integers (exact in float32)
        i = _ste(texel / 16, torch.floor((texel + 8) / 16))
        e0, e1 = e[:, 0::2, None], e[:, 1::2, None]  # (L0, L1, A0, A1): per channel its two endpoints
        c_soft = (257 * e0 * (64 - i) + 257 * e1 * i) / 64
        c = _ste(c_soft, torch.floor((257 * e0 * (64 - i) + 257 * e1 * i + 32) / 64))
        t = _ste(c / 65536, _fp16_rtz(c.detach()))
        bx, by = self.fp
        h, w = self.size
        full = t.reshape(self.ny, self.nx, self.channels, by, bx).permute(0, 3, 1, 4, 2)
        return full.reshape(self.ny * by, self.nx * bx, self.channels)[:h, :w]

    def to_blocks(self) -> np.ndarray:
        with torch.no_grad():
            e, k = self.integers()
        return write_blocks(e.long().numpy(), k.long().numpy(), self.gw, self.gh, self.levels)


class _Weight(nn.Module):
    """Parametrization: the layer's weight is ``offset + scale * texel`` of the block model's texture."""

    def __init__(self, blocks: BlockModel, record: AstcRecord) -> None:
        super().__init__()
        self.blocks = blocks
        rows, cols, chan = record.layout.index()
        self.register_buffer("rows", torch.from_numpy(rows))
        self.register_buffer("cols", torch.from_numpy(cols))
        self.register_buffer("chan", torch.from_numpy(chan))
        self.register_buffer("scale", torch.from_numpy(record.scale.astype(np.float32)))
        self.register_buffer("offset", torch.from_numpy(record.offset.astype(np.float32)))
        self.shape, self.outputs = record.shape, record.layout.outputs

    def weight_of(self, texture: torch.Tensor) -> torch.Tensor:
        t = texture[self.rows, self.cols, self.chan].reshape(self.outputs, -1)
        return (t * self.scale.reshape(-1, 1) + self.offset.reshape(-1, 1)).reshape(self.shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.weight_of(self.blocks())


def fit(model: BlockModel, target: torch.Tensor, steps: int = 200, lr: float = 0.05) -> float:
    """Fit the blocks to a texture (mean squared error); Adam, cosine-decayed step size, keeping
    the best integers seen. Returns the final error."""
    def error(texture: torch.Tensor) -> torch.Tensor:
        return (texture - target).pow(2).mean()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 100)
    best, best_state = math.inf, None
    for _ in range(steps):
        opt.zero_grad()
        loss = error(model())
        if float(loss.detach()) < best:
            best, best_state = float(loss.detach()), {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(error(model()))
    if best_state is not None and best < final:
        model.load_state_dict(best_state)
        final = best
    return final


def best_configuration(texture: np.ndarray, fp: tuple[int, int], sample: int = 256, steps: int = 60,
                       seed: int = 0) -> tuple[int, int, int]:
    """The grid and levels whose fitted blocks reproduce a sample of the texture's blocks best."""
    rng = np.random.default_rng(seed)
    bx, by = fp
    h, w, c = texture.shape
    ny, nx = -(-h // by), -(-w // bx)
    pick = rng.choice(ny * nx, size=min(sample, ny * nx), replace=False)
    rows = np.minimum(np.arange(ny * by), h - 1)
    cols = np.minimum(np.arange(nx * bx), w - 1)
    full = texture[rows][:, cols].reshape(ny, by, nx, bx, c).transpose(0, 2, 1, 3, 4).reshape(-1, by, bx, c)
    strip = np.concatenate(list(full[pick]), axis=1)  # the sampled blocks side by side: one row of blocks
    target = torch.from_numpy(strip.astype(np.float32))
    best, best_err = None, math.inf
    for gw, gh, lv in configurations(fp, c):
        m = BlockModel(strip, fp, gw, gh, lv)
        err = fit(m, target, steps)
        if err < best_err:
            best, best_err = (gw, gh, lv), err
    return best


def retrain_blocks(model: nn.Module, layers: dict[str, nn.Module], plan: dict, encode, ctx, steps: int,
                   show: bool = True) -> dict[str, AstcRecord]:
    """Re-training B on ``layers`` (name -> module) at ``plan[name] = (footprint, channels)``.

    ``encode(name, option)`` gives the astcenc record (for its layout and range). Each layer's
    blocks start from a fit to its texture; they then train with the task loss through
    ``ctx.train`` and are written as real blocks; the returned records are attached (weights =
    astcenc's decode).

    The blocks are not first refined to the least output error on calibration inputs (the
    error compensation's objective, ``tr(dW H dW^T)``): with that start, LeNet-300-100 at 45x
    lost 0.62 to 0.93 point of held-out accuracy after 1,200 task steps (three seeds), and from
    the texel fit 0.13 to 0.48 (footprints chosen on plain encodings); from the texel fit with
    footprints chosen on compensated encodings, after 3,000 steps, it ended -0.03 to +0.70.
    """
    records: dict[str, AstcRecord] = {}
    models: dict[str, tuple[BlockModel, AstcRecord]] = {}
    with progress_bar("astc: fitting blocks (re-training B)", len(layers), show) as adv:
        for name, layer in layers.items():
            fp, channels = plan[name]
            ref = encode(name, (fp, channels))
            w = layer.weight.detach().cpu().numpy().reshape(ref.layout.outputs, -1)
            t = np.clip((w - ref.offset.reshape(-1, 1)) / ref.scale.reshape(-1, 1), 0, 1)
            texture = ref.layout.to_texture(t)
            gw, gh, lv = best_configuration(texture, fp)
            bm = BlockModel(texture, fp, gw, gh, lv)
            fit(bm, torch.from_numpy(texture), 300)
            weight = _Weight(bm, ref)
            models[name] = (bm, ref)
            parametrize.register_parametrization(layer, "weight", weight)
            layer.parametrizations.weight.original.requires_grad_(False)
            adv(1)
    model.train()
    model = ctx.train(model, steps) or model
    model.eval()
    for name, layer in layers.items():
        bm, ref = models[name]
        with torch.no_grad():
            trained = layer.weight.detach().clone()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        record = AstcRecord(ref.shape, ref.footprint, ref.layout, bm.to_blocks(), ref.offset, ref.scale,
                            "trained", name)
        attach(layer, record)
        diff = float((torch.from_numpy(record.dequantize()) - trained).abs().max())
        record._cache["trained_max_diff"] = diff
        record._cache["mode"] = f"{bm.gw}x{bm.gh} grid, {bm.levels} levels"
        records[name] = record
    return records
