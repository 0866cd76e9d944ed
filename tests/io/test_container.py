import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")

from nnshrink import CorruptDataError, FormatError, InputShapeError, Plan, QuantizeWeights, compress, load, save, zoo  # noqa: E402
from nnshrink.io import describe, load_model, read_onnx_from_container  # noqa: E402
from nnshrink.testing import randomize_batchnorm  # noqa: E402


def _quantized(name, bits=8):
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.build(name)).eval()
    return compress(model, Plan([QuantizeWeights(bits=bits)]), torch.zeros(1, 1, 28, 28)).model


@pytest.fixture(scope="module")
def lenet5_nsz(tmp_path_factory):
    path = tmp_path_factory.mktemp("nsz") / "lenet5.nsz"
    model = _quantized("lenet5")
    save(model, path)
    return model, path


@pytest.mark.parametrize("name, bits", [("lenet300", 8), ("resnet8", 8), ("mobilenet", 4), ("lenet5", 2)])
def test_weights_come_back_bit_identical(name, bits, tmp_path):
    model = _quantized(name, bits)
    reports = save(model, tmp_path / "m.nsz")
    back = load(tmp_path / "m.nsz")
    theirs = dict(back.named_parameters())
    ours = dict(model.named_parameters())
    weights = [k for k in ours if k.endswith(".weight")]
    assert weights and all(k in theirs for k in weights)
    for k in weights:
        assert torch.equal(theirs[k], ours[k]), k
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(back(x), model(x), atol=1e-4, rtol=1e-4)
    assert {r.kind for r in reports} == {"quantized", "raw"}
    assert all(r.kind == "raw" or r.name.endswith(".weight") for r in reports)


def test_quantized_streams_are_near_their_entropy(lenet5_nsz):
    _, path = lenet5_nsz
    reports = {r.name: r for r in describe(path)}
    big = reports["fc1.weight"]
    assert big.kind == "quantized" and big.ratio_to_entropy <= 1.01
    assert "rans" in big.modes
    assert set(big.models) <= {"prediction", "sign contexts", "mirrored table"}
    assert big.to_dict()["models"] == list(big.models)
    overhead = path.stat().st_size - sum(r.stored_bytes for r in reports.values())
    assert 0 < overhead < 2048  # graph, index and headers together


def test_float_models_are_stored_raw_and_exact(tmp_path):
    model = randomize_batchnorm(zoo.build("resnet8")).eval()
    save(model, tmp_path / "f.nsz")
    back = load(tmp_path / "f.nsz")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(r.kind == "raw" for r in describe(tmp_path / "f.nsz"))


def test_decode_to_onnx_runs_in_onnxruntime(lenet5_nsz):
    ort = pytest.importorskip("onnxruntime")
    model, path = lenet5_nsz
    proto = read_onnx_from_container(path)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 1, 28, 28)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)
    assert isinstance(load_model(path), torch.nn.Module)


def test_write_is_atomic_and_never_half_overwrites(tmp_path, lenet5_nsz):
    model, _ = lenet5_nsz
    target = tmp_path / "out.nsz"
    target.write_bytes(b"previous version")
    with pytest.raises(InputShapeError):
        save(model, target, example_input=torch.zeros(1, 3, 28, 28))
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nsz"]


def test_truncated_flipped_and_foreign_files(tmp_path, lenet5_nsz):
    _, path = lenet5_nsz
    data = path.read_bytes()
    bad = tmp_path / "bad.nsz"
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises((CorruptDataError, FormatError)):
            load(bad)
    flipped = bytearray(data)
    flipped[-5000] ^= 0x01  # inside the weight data
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CorruptDataError, match="fc1.weight|fc2.weight|checksum"):
        load(bad)
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FormatError, match="not an nnshrink container"):
        load(bad)
    from safetensors.numpy import save as st_save

    bad.write_bytes(st_save({"w": np.zeros(3, np.float32)}))
    with pytest.raises(FormatError, match="not an nnshrink container"):
        load(bad)


def test_newer_version_is_refused(tmp_path, lenet5_nsz):
    _, path = lenet5_nsz
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["version"] = "99"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "v99.nsz").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    with pytest.raises(FormatError, match="version 99"):
        load(tmp_path / "v99.nsz")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_containers_raise_only_our_errors(lenet5_nsz, tmp_path, data):
    model, path = lenet5_nsz
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    target = tmp_path / "fuzz.nsz"
    target.write_bytes(bytes(raw))
    try:
        back = load(target)
    except (CorruptDataError, FormatError):
        return
    # a mutation that was not detected must have been harmless (safetensors header padding)
    for k, v in model.named_parameters():
        assert torch.equal(dict(back.named_parameters())[k], v)


def test_index_is_compressed_json_with_checksummed_parts(lenet5_nsz):
    from safetensors import safe_open

    _, path = lenet5_nsz
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        index = json.loads(zlib.decompress(f.get_tensor("__index__").tobytes()))
    assert meta["format"] == "nnshrink.nsz" and meta["version"] == "3"
    entry = index["weights"]["conv2.weight"]
    assert entry["kind"] == "quantized" and entry["fields"]["bits"] == 8
    assert len(entry["parts"]["q"]["coded"]) == 3 and entry["parts"]["scale"]["dtype"] == "float32"


class _PrunedDepthwise(torch.nn.Module):
    """A stem, a 50%-pruned depthwise conv (a small, symmetric, zero-heavy tensor) and a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 96, 3, padding=1)
        self.dw = torch.nn.Conv2d(96, 96, 3, padding=1, groups=96)
        self.head = torch.nn.Linear(96 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.stem(x)))).flatten(1))


def test_a_mirrored_table_stream_round_trips_through_the_container(tmp_path):
    torch.manual_seed(0)
    model = _PrunedDepthwise().eval()
    with torch.no_grad():
        w = torch.distributions.Laplace(0.0, 0.1).sample(model.dw.weight.shape)
        model.dw.weight.copy_(torch.where(w.abs() < 0.08, torch.zeros_like(w), w))
    x = torch.rand(2, 1, 8, 8)
    quantized = compress(model, Plan([QuantizeWeights()]), x).model
    save(quantized, tmp_path / "dw.nsz", x)
    reports = {r.name: r for r in describe(tmp_path / "dw.nsz")}
    assert reports["dw.weight"].models == ("mirrored table",)  # stream version 3
    back = load(tmp_path / "dw.nsz")
    assert torch.equal(dict(back.named_parameters())["dw.weight"], quantized.dw.weight)
    torch.testing.assert_close(back(x), quantized(x), atol=1e-5, rtol=1e-5)


def test_grouped_low_bit_weights_round_trip_exactly(tmp_path, lenet5_trained, mnist):
    """GPTQ-rounded 3-bit weights with one scale per 32 columns (ragged last groups: LeNet-5's
    conv1 has 25 columns) come back bit-identical, stored as their own kind."""
    import nnshrink as ns
    from nnshrink.plan import Plan
    from nnshrink.techniques import QuantizeWeights

    plan = Plan([QuantizeWeights(bits=3, scales="mse", rounding="gptq", group_size=32, calib_samples=128)])
    result = ns.compress(lenet5_trained, plan, torch.zeros(1, 1, 28, 28),
                         calib=mnist.loader("train", batch_size=64, shuffle=True, seed=0))
    kinds = {r.name: r.kind for r in ns.save(result.model, tmp_path / "g.nsz")}
    assert kinds["conv1.weight"] == kinds["fc1.weight"] == "grouped"
    back = ns.load(tmp_path / "g.nsz")
    for name, p in result.model.named_parameters():
        assert torch.equal(dict(back.named_parameters())[name], p), name
    assert result.steps[0].details["layers"]["fc1"]["method"] == "per-group 32 mse, gptq"


@pytest.mark.parametrize("cell", [torch.nn.LSTM, torch.nn.GRU])
def test_small_recurrent_matrices_folded_by_the_exporter_keep_their_records(cell, tmp_path):
    """Under its folding size the exporter folds a bidirectional layer's matrices into one
    gate-reordered constant per kind: each is stored as a stack of the directions' records (it
    was raw), and comes back bit-identical."""

    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(16, 8, bidirectional=True, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    x = torch.randn(4, 12, 16)
    model = compress(Recurrent().eval(), Plan([QuantizeWeights(bits=4)]), x[:1]).model
    kinds = [r.kind for r in save(model, tmp_path / "r.nsz", x[:2])]
    assert kinds.count("stacked") == 2 and all(r.numel() > 0 for r in model.rnn.parameters())
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "r.nsz")(x), model(x))
