"""ASTC weight compression: real blocks, the one decode profile, layouts, budgets, re-training A and B."""

import itertools
import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from nnshrink import ConfigError, CorruptDataError, Plan, compress, load, save
from nnshrink.search.solvers import least_noise, smallest_within
from nnshrink.techniques.astc import Astc, AstcRecord, blocks as B, codec
from nnshrink.io.astc import export_textures
from nnshrink.techniques.astc.layout import Layout, chain_order, make_layout
from nnshrink.techniques.records import record_of

# the worked example of a 12x12 block: 6x6 grid at 4 levels, luminance endpoints 0x20 and 0xE0,
# grid weight (x + y) % 4; written by hand from the Khronos specification's bit layout
GOLDEN = bytes.fromhex("080140c0010000c929279c7c72c92927")


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))


def x8(n=64):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_golden_block_decodes_to_the_specified_texels():
    tex = codec.decode(GOLDEN, 12, 12, (12, 12))[..., 0]
    bits = tex.view(np.uint16)
    assert (bits[0, 0], bits[0, 1], bits[1, 1]) == (0x3004, 0x3367, 0x3595)  # (x, y) = (0,0), (1,0), (1,1)
    grid = np.array([[(x + y) % 4 for x in range(6)] for y in range(6)]).reshape(1, -1)
    assert B.write_blocks(np.array([[0x20, 0xE0]]), grid, 6, 6, 4).tobytes() == GOLDEN


@pytest.mark.parametrize("fp", [(4, 4), (6, 5), (8, 8), (10, 6), (12, 12)])
@pytest.mark.parametrize("channels", [1, 2])
def test_block_model_forward_is_the_astcenc_decode_of_the_blocks_it_writes(fp, channels):
    rng = np.random.default_rng(fp[0] * 13 + fp[1])
    configs = B.configurations(fp, channels)
    assert configs
    for gw, gh, levels in configs[:: max(1, len(configs) // 8)] + configs[-1:]:
        tex = rng.random((2 * fp[1] + 1, 3 * fp[0] - 1, channels)).astype(np.float32)  # partial edge blocks too
        model = B.BlockModel(tex, fp, gw, gh, levels)
        with torch.no_grad():
            model.e.uniform_(0, 1)
            model.g.uniform_(0, 1)
            ours = model().numpy()
        blocks = model.to_blocks()
        decoded = codec.decode(blocks.tobytes(), tex.shape[1], tex.shape[0], fp, channels=channels)
        assert np.array_equal(decoded.astype(np.float32), ours), (fp, gw, gh, levels)


def test_every_weight_range_has_its_specified_values():
    assert B.unquantized(4) == [0, 21, 43, 64]
    assert B.unquantized(6) == [0, 12, 25, 39, 52, 64]
    assert B.unquantized(32)[16:18] == [34, 36]
    for levels in B.RANGES:
        values = B.unquantized(levels)
        assert len(values) == levels and values == sorted(values) and values[0] == 0 and values[-1] == 64


@pytest.mark.parametrize("channels", [1, 2])
def test_encode_decode_round_trip_is_float16_and_close(channels):
    rng = np.random.default_rng(0)
    tex = np.clip(rng.normal(0.5, 0.1, (20, 28, channels)), 0, 1).astype(np.float32)
    blocks = codec.encode(tex, (4, 4))
    assert len(blocks) == codec.block_count(28, 20, (4, 4)) * 16
    back = codec.decode(blocks, 28, 20, (4, 4), channels=channels)
    assert back.dtype == np.float16 and back.shape == tex.shape
    assert np.abs(back.astype(np.float32) - tex).max() < 0.1


@pytest.mark.parametrize("kind,shape,hw", [("rows", (10, 33), None), ("kernels", (6, 4, 3, 3), None),
                                           ("input", (7, 2 * 5 * 5), (5, 5)), ("input", (6, 1, 5, 5), None)])
@pytest.mark.parametrize("channels", [1, 2])
def test_layouts_place_every_weight_once(kind, shape, hw, channels):
    layout, why = make_layout(kind, shape, (6, 6), hw, channels)
    assert why is None and layout.kind == kind and layout.channels == channels
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    tex = layout.to_texture(w)
    assert tex.shape == (layout.height, layout.width, channels)
    assert np.array_equal(layout.from_texture(tex).reshape(shape), w)
    rows, cols, chan = layout.index()
    assert len(set(zip(rows.tolist(), cols.tolist(), chan.tolist()))) == w.size
    assert Layout.from_dict(layout.to_dict()) == layout


def test_an_output_order_places_like_rows_next_to_each_other_and_round_trips():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 30))
    rows = np.concatenate([base + 0.01 * rng.normal(size=base.shape) for _ in range(5)])  # 5 near-copies each
    order = chain_order(rows)
    assert sorted(order.tolist()) == list(range(20))
    jumps = sum(np.abs(rows[a] - rows[b]).sum() > 1 for a, b in zip(order[:-1], order[1:]))
    assert jumps == 3  # one chain through each family, three jumps between families
    for channels in (1, 2):
        layout, _ = make_layout("rows", rows.shape, (6, 6), None, channels, order)
        tex = layout.to_texture(rows)
        assert np.array_equal(layout.from_texture(tex).reshape(rows.shape), rows.astype(np.float32))
        assert Layout.from_dict(layout.to_dict(), np.array(layout.order)) == layout
    with pytest.raises(ValueError, match="permutation"):
        Layout.from_dict(layout.to_dict(), np.zeros(20, np.int64))


def test_a_layout_that_does_not_fit_falls_back_to_rows_with_the_reason():
    layout, why = make_layout("kernels", (10, 20), (8, 8))
    assert layout.kind == "rows" and "kernel" in why
    layout, why = make_layout("input", (10, 20), (8, 8))
    assert layout.kind == "rows" and "spatial shape" in why


def test_step_stores_real_blocks_that_decode_to_the_weights(tmp_path):
    model, x = tiny(), x8()
    own = compress(model, Plan([Astc(footprint="6x6", min_weights=16, order="none")]), x[:1]).steps[0].details
    assert own["layers"]["0"]["layout"] == "input" and own["layers"]["3"]["layout"] == "input"
    assert {e["output_order"] for e in own["layers"].values()} == {"own"}
    result = compress(model, Plan([Astc(footprint="6x6", min_weights=16)]), x[:1])  # order: auto
    for name in ("0", "3"):
        layer = result.model.get_submodule(name)
        record = record_of(layer)
        assert isinstance(record, AstcRecord)
        assert np.array_equal(layer.weight.detach().numpy(), record.dequantize())
    # the container holds the blocks byte for byte and gives the same weights back
    path = tmp_path / "m.nsz"
    save(result.model, path, x[:1])
    data = path.read_bytes()
    back = load(path)
    for name in ("0", "3"):
        record = record_of(result.model.get_submodule(name))
        assert record.blocks.tobytes() in data
        got = dict(back.named_parameters())
        assert any(np.array_equal(p.detach().numpy(), record.dequantize()) for p in got.values())
    with torch.no_grad():
        assert torch.equal(back(x), result.model(x))


def _ktx_float16(path):
    raw = path.read_bytes()
    fields = struct.unpack("<12s13I", raw[:64])
    width, height, kv = fields[7], fields[8], fields[13]
    size = struct.unpack("<I", raw[64 + kv:68 + kv])[0]
    px = np.frombuffer(raw[68 + kv:68 + kv + size], np.float16)
    return px.reshape(height, width, -1)


def test_exported_textures_read_back_and_decode_to_the_weights(tmp_path):
    model, x = tiny(), x8()
    result = compress(model, Plan([Astc(footprint="5x5", layers={"3": {"footprint": "8x8/2"}}, min_weights=16)]), x[:1],
                      calib=[x])  # compensated blocks (written strip by strip), as a budget run makes them
    assert all(e["compensated"] for e in result.steps[0].details["layers"].values())
    path = tmp_path / "m.nsz"
    save(result.model, path, x[:1])
    written = export_textures(path, tmp_path / "tex")
    manifest = json.loads((tmp_path / "tex" / "manifest.json").read_text())
    assert len(written) == 3 and len(manifest["textures"]) == 2 and manifest["schema"] == "nnshrink.astc-manifest/1"
    records = {r.name: r for r in (record_of(result.model.get_submodule(n)) for n in ("0", "3"))}
    cli = shutil.which("astcenc")
    for entry in manifest["textures"]:
        data = (tmp_path / "tex" / entry["file"]).read_bytes()
        width, height, fp = codec.read_header(data)
        assert (width, height, codec.footprint_name(fp)) == (entry["width"], entry["height"], entry["footprint"])
        layout = Layout.from_dict(entry["layout"], entry.get("order"))
        decoded = codec.decode(data[16:], width, height, fp, channels=layout.channels)
        w = layout.from_texture(decoded).astype(np.float32).reshape(layout.outputs, -1)
        w = w * np.float32(entry["scale"]).reshape(-1, 1) + np.float32(entry["offset"]).reshape(-1, 1)
        record = next(r for r in records.values() if r.shape == tuple(entry["shape"]))
        assert np.array_equal(w.reshape(record.shape), record.dequantize())
        if cli:  # Arm's own command-line decoder (Debian's astcenc) gives the same float16 texels
            out = tmp_path / (entry["file"] + ".ktx")
            subprocess.run([cli, "-dh", str(tmp_path / "tex" / entry["file"]), str(out)], check=True,
                           capture_output=True)
            texels = _ktx_float16(out)
            ours = record.texture()
            assert np.array_equal(texels[..., 0].view(np.uint16), ours[..., 0].view(np.uint16))
            if layout.channels == 2:
                assert np.array_equal(texels[..., -1].view(np.uint16), ours[..., 1].view(np.uint16))  # KTX: L, A


@pytest.mark.skipif(shutil.which("astcenc") is None, reason="the astcenc command-line tool is not installed "
                    "(Debian package astcenc; CI installs it)")
def test_astcenc_cli_decodes_the_golden_block_as_we_do(tmp_path):
    src = tmp_path / "g.astc"
    src.write_bytes(codec.header(12, 12, (12, 12)) + GOLDEN)
    subprocess.run([shutil.which("astcenc"), "-dh", str(src), str(tmp_path / "g.ktx")], check=True, capture_output=True)
    assert np.array_equal(_ktx_float16(tmp_path / "g.ktx")[..., 0].view(np.uint16),
                          codec.decode(GOLDEN, 12, 12, (12, 12))[..., 0].view(np.uint16))


def test_damaged_blocks_and_headers_are_refused_naming_the_layer(tmp_path):
    model, x = tiny(), x8()
    result = compress(model, Plan([Astc(footprint="6x6", min_weights=16)]), x[:1])
    record = record_of(result.model.get_submodule("3"))
    fields, arrays = record.to_parts()
    broken = arrays["blocks"].copy()
    broken[1] = 0  # block mode 0: reserved, decodes to the error colour
    with pytest.raises(CorruptDataError, match="not a valid luminance block"):
        AstcRecord.from_parts(fields, {**arrays, "blocks": broken}, "3.weight")
    with pytest.raises(ValueError, match="blocks expected"):
        AstcRecord.from_parts(fields, {**arrays, "blocks": arrays["blocks"][:-1]})
    data = record.astc_file()
    with pytest.raises(CorruptDataError, match="magic"):
        codec.read_header(b"\0" + data[1:])
    with pytest.raises(CorruptDataError, match="expected"):
        codec.read_header(data[:-16])
    path = tmp_path / "m.nsz"
    save(result.model, path, x[:1])
    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(record.blocks.tobytes())
    raw[at + 20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="'3.weight'|3.weight"):
        load(path)


def _correlated(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 48, generator=torch.Generator().manual_seed(7))
    return torch.randn(n, 6, generator=g) @ mix + 0.1 * torch.randn(n, 48, generator=g)


@pytest.mark.parametrize("fp", ["4x4", "5x4/2"])
def test_compensated_encoding_leaves_less_output_error_in_the_same_bytes(fp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 20))
    calib, held = _correlated(256, 1), _correlated(256, 2)
    with torch.no_grad():
        ref = model(held)
    error, blocks = {}, {}
    for how in ("none", "hessian"):
        result = compress(model, Plan([Astc(layers={"0": {"footprint": fp}}, compensate=how, min_weights=16)]),
                          held[:1], calib=[calib])
        layer, entry = result.model[0], result.steps[0].details["layers"]["0"]
        record = record_of(layer)
        assert entry["compensated"] == (how == "hessian")
        assert np.array_equal(layer.weight.detach().numpy(), record.dequantize())  # astcenc's decode of the blocks
        with torch.no_grad():
            error[how] = float((result.model(held) - ref).pow(2).mean())
        blocks[how] = record.blocks.shape
    assert blocks["none"] == blocks["hessian"]
    assert error["hessian"] < 0.5 * error["none"]


def test_compensation_needs_calibration_and_leaves_grouped_convs_plain():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.rand(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="calibration"):
        compress(model, Plan([Astc(footprint="6x6", compensate="hessian", min_weights=16)]), x[:1])
    result = compress(model, Plan([Astc(footprint="6x6", min_weights=16)]), x[:1], calib=[x])
    layers = result.steps[0].details["layers"]
    assert not layers["0"]["compensated"] and layers["3"]["compensated"]
    plain = compress(model, Plan([Astc(footprint="6x6", min_weights=16)]), x[:1])  # auto, no calibration
    assert not any(e["compensated"] for e in plain.steps[0].details["layers"].values())
    assert np.array_equal(record_of(plain.model[0]).blocks, record_of(result.model[0]).blocks)


def test_small_layers_stay_float_with_the_reason():
    result = compress(tiny(), Plan([Astc(footprint="4x4", min_weights=64)]), x8(1))
    reasons = {s["layer"]: s["reason"] for s in result.steps[0].skipped}
    assert "min_weights" in reasons["0"] and "3" in result.steps[0].details["layers"]


@pytest.mark.parametrize("bad", [dict(footprint="7x7"), dict(channels=3), dict(footprints=("8x8/3",)),
                                 dict(layers={"fc1": {"footprint": "7x7"}}), dict(layers={"fc1": "float"}),
                                 dict(layers={"fc1": {"size": 3}}), dict(bits_per_weight=1.0, max_drop=0.01),
                                 dict(quality="best"), dict(layout="diagonal"),
                                 dict(compensate="gptq"), dict(executor="cluster")])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Astc(**bad)


def test_unknown_layer_and_impossible_budget_are_config_errors():
    with pytest.raises(ConfigError, match="'fc9' match no Conv/Linear layer"):
        compress(tiny(), Plan([Astc(layers={"fc9": {"footprint": "8x8"}})]), x8(1))
    with pytest.raises(ConfigError, match="below the smallest"):
        compress(tiny(), Plan([Astc(bits_per_weight=0.05, min_weights=16)]), x8(1), calib=[x8()])


def test_size_budget_is_met_with_the_least_estimated_noise():
    model, x = tiny(), x8()
    result = compress(model, Plan([Astc(bits_per_weight=2.5, min_weights=16)]), x[:1], calib=[x])
    details = result.steps[0].details
    assert details["bits_per_weight"] <= 2.5
    assert details["choice"]["estimated_bits_per_weight"] == pytest.approx(details["bits_per_weight"], abs=1e-3)


def test_budget_sensitivity_comes_from_the_engine_cached_and_the_same_in_a_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path))
    model, x = tiny(), x8()

    def run(executor):
        plan = Plan([Astc(bits_per_weight=2.5, min_weights=16, footprints=("4x4", "6x6", "8x8/2", "12x12"),
                          executor=executor)])
        d = compress(model, plan, x[:1], calib=[x]).steps[0].details
        return d["choice"]["sensitivity"]["layers"], {n: v["footprint"] for n, v in d["layers"].items()}

    pooled, chosen = run("process")
    (cached,) = (tmp_path / "sensitivity").glob("*.json")
    cached.unlink()
    serial, again = run("serial")
    assert again == chosen
    for n in serial:  # workers run torch on one thread: the same figures to rounding
        assert serial[n] == pytest.approx(pooled[n], rel=1e-5)
    stamp = cached.stat().st_mtime_ns
    assert run("serial") == (serial, chosen) and cached.stat().st_mtime_ns == stamp  # measured nothing


def test_accuracy_budget_keeps_the_metric_within_the_drop():
    model, x = tiny(), x8()
    with torch.no_grad():
        ref = model(x)

    def fidelity(m):
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    result = compress(model, Plan([Astc(max_drop=0.5, min_weights=16)]), x[:1], evaluate=lambda m: 1 + fidelity(m),
                      calib=[x])
    assert 1 + fidelity(result.model) >= 0.5
    assert 0 < result.steps[0].details["choice"]["evaluations"] <= 6


def test_least_noise_matches_brute_force():
    rng = np.random.default_rng(0)
    options = {f"l{i}": sorted([(float(rng.integers(10, 100)), float(rng.random())) for _ in range(4)], reverse=True)
               for i in range(4)}
    budget = 200.0
    best = min((sum(options[n][i][1] for n, i in zip(options, c)), c)
               for c in itertools.product(range(4), repeat=4)
               if sum(options[n][i][0] for n, i in zip(options, c)) <= budget)
    got = least_noise(options, budget)
    assert sum(options[n][i][0] for n, i in got.items()) <= budget
    assert sum(options[n][i][1] for n, i in got.items()) == pytest.approx(best[0])
    plan, evaluations = smallest_within(options, lambda a: sum(options[n][i][0] for n, i in a.items()) >= 150)
    assert sum(options[n][i][0] for n, i in plan.items()) >= 150 and evaluations <= 6


def _trainer(x, target):
    def train(model, steps):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
        return model
    return train


@pytest.mark.parametrize("retrain", ["interleaved", "blocks"])
def test_retraining_lowers_the_error_and_leaves_real_blocks(retrain):
    model, x = tiny(), x8()
    with torch.no_grad():
        target = model(x)

    def err(m):
        with torch.no_grad():
            return float((m(x) - target).pow(2).mean())

    plain = compress(model, Plan([Astc(footprint="8x8", min_weights=16)]), x[:1]).model
    trained = compress(model, Plan([Astc(footprint="8x8", min_weights=16, retrain=retrain, steps=200)]), x[:1],
                       train=_trainer(x, target)).model
    assert err(trained) < err(plain)
    for name in ("0", "3"):
        layer = trained.get_submodule(name)
        record = record_of(layer)
        assert isinstance(record, AstcRecord) and record.origin == ("trained" if retrain == "blocks" else "astcenc")
        assert np.array_equal(layer.weight.detach().numpy(), record.dequantize())
    if retrain == "blocks":
        assert not list(trained.get_submodule("3").parametrizations.keys()) if hasattr(
            trained.get_submodule("3"), "parametrizations") else True


def test_retraining_b_decodes_exactly_to_what_it_trained(tmp_path):
    model, x = tiny(), x8()
    with torch.no_grad():
        target = model(x)
    result = compress(model, Plan([Astc(footprint="6x6", layers={"3": {"footprint": "10x10/2"}}, min_weights=16,
                                        retrain="blocks", steps=20)]), x[:1],
                      train=_trainer(x, target))
    for entry in result.steps[0].details["layers"].values():
        assert entry["origin"] == "trained" and entry["trained_max_diff"] == 0.0 and "grid" in entry["block_mode"]
    cli = shutil.which("astcenc")
    if cli:  # the blocks nnshrink wrote itself decode the same in Arm's command-line decoder
        for i, name in enumerate(("0", "3")):
            record = record_of(result.model.get_submodule(name))
            (tmp_path / f"{i}.astc").write_bytes(record.astc_file())
            subprocess.run([cli, "-dh", str(tmp_path / f"{i}.astc"), str(tmp_path / f"{i}.ktx")], check=True,
                           capture_output=True)
            texels = _ktx_float16(tmp_path / f"{i}.ktx")
            assert np.array_equal(texels[..., 0].view(np.uint16), record.texture()[..., 0].view(np.uint16))
            if record.layout.channels == 2:
                assert np.array_equal(texels[..., -1].view(np.uint16), record.texture()[..., 1].view(np.uint16))
