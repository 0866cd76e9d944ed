"""The int8 TFLite writer: LiteRT's reference kernels give the integer reference's integers on every
element of every tensor, on the zoo and the realistic zoo; what has no int8 form is refused by
name; a container reads back into the same integers; Vela compiles the zoo fully onto the NPU."""

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tflite")
pytest.importorskip("onnx")
litert = pytest.importorskip("ai_edge_litert.interpreter")

from nnshrink import zoo  # noqa: E402
from nnshrink.errors import ConfigError, UnsupportedModelError, UnsupportedOpError  # noqa: E402
from nnshrink.io import read_onnx_from_container, save  # noqa: E402
from nnshrink.io.qdq import graph_from_qdq  # noqa: E402
from nnshrink.io.tflite import _Model, _Writer, litert_run, quantize_input, to_tflite  # noqa: E402
from nnshrink.plan import Plan, compress  # noqa: E402
from nnshrink.techniques.quant import Quantize  # noqa: E402
from nnshrink.techniques.quant import tflite_kernels as K  # noqa: E402
from nnshrink.techniques.quant.graph import freeze  # noqa: E402
from nnshrink.techniques.quant.reference import IntegerModel, quantize_multiplier  # noqa: E402
from nnshrink.techniques.quant.reference import multiply_by_quantized_multiplier as mbqm  # noqa: E402
from nnshrink.zoo import realistic as R  # noqa: E402
from nnshrink.zoo.realistic import exports as E  # noqa: E402

REF = litert.OpResolverType.BUILTIN_REF


def _npu(model, x, **cfg):
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial batch norms, so folding matters
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return compress(model.eval(), Plan([Quantize(target="npu", **cfg)]), x[:2], calib=[x]).model


def _mnist(n=24):
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(0))


def _every_tensor_equal(sim, x, samples=3):
    """LiteRT's reference kernels and the integer reference, every element of every int8 tensor
    the file holds (intermediates included), on ``samples`` inputs."""
    graph = freeze(sim)
    writer = _Writer(graph, x[:1])
    data = writer.run()
    it = litert.Interpreter(model_content=data, experimental_op_resolver_type=REF,
                            experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    ref = IntegerModel(graph, "fixed")
    checked = 0
    for i in range(samples):
        xi = x[i:i + 1].numpy()
        env = ref.run(xi)
        it.set_tensor(it.get_input_details()[0]["index"], quantize_input(graph, xi))
        it.invoke()
        for name in graph.int_tensor_names():
            v = writer.values.get(name)
            if v is None:
                continue
            want = env[name].ravel()[writer.perm_of(v.shape, v.layout, v.perm)]
            np.testing.assert_array_equal(it.get_tensor(v.tensor).ravel().astype(np.int64), want, err_msg=name)
            checked += 1
    assert checked >= samples * 2
    return data


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet8", "mobilenet"])
def test_litert_reference_kernels_equal_the_integer_reference_on_the_zoo(name):
    x = _mnist()
    _every_tensor_equal(_npu(zoo.build(name), x), x)


@pytest.mark.parametrize("name", ["dbnet", "mbv3", "pnet", "pitchnet"])
def test_litert_reference_kernels_equal_the_integer_reference_on_the_realistic_zoo(name):
    t = R.task(name, scale=0.01)
    torch.manual_seed(0)
    x = E.example(t, batch=12)
    _every_tensor_equal(_npu(t.build(), x), x, samples=2)


def test_what_has_no_int8_tflite_form_is_refused_by_op_type():
    for name, op in (("crnn", "LSTM"), ("transformer", "LayerNormalization")):
        t = R.task(name, scale=0.01)
        torch.manual_seed(0)
        x = E.example(t, batch=6)
        with pytest.raises(UnsupportedOpError, match=op):
            to_tflite(_npu(t.build(), x), x[:1])
    with pytest.raises(ConfigError, match="quantized model"):
        to_tflite(zoo.build("lenet5"))
    x = _mnist(8)
    with pytest.raises(UnsupportedModelError, match="16-bit"):
        to_tflite(_npu(zoo.build("lenet300"), x, act_bits=16), x[:1])
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedOpError, match="grouped conv"):
        to_tflite(_npu(grouped, x), x[:1])


def _run(m: _Model, ins, outs, feeds):
    it = litert.Interpreter(model_content=m.serialize(ins, outs, "t"), experimental_op_resolver_type=REF)
    it.allocate_tensors()
    for d, f in zip(it.get_input_details(), feeds):
        it.set_tensor(d["index"], f)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64)


def _unary(code, s_in, z_in, s_out, z_out, options=None, version=2):
    m = _Model()
    a = m.tensor("a", (1, 256), scale=[s_in], zero_point=[z_in])
    c = m.tensor("c", (1, 256), scale=[s_out], zero_point=[z_out])
    m.op(code, [a], [c], options, version)
    return _run(m, [a], [c], [np.arange(-128, 128, dtype=np.int8)[None]]).ravel()


def test_tflite_kernels_equal_litert_on_every_input_value():
    rng = np.random.default_rng(0)
    v = np.arange(-128, 128)
    for _ in range(4):
        s_in, s_out = np.float32(rng.uniform(0.01, 0.2)), np.float32(rng.uniform(0.01, 0.1))
        z_in, z_out = int(rng.integers(-60, 60)), int(rng.integers(-100, 0))
        sig = K.lookup_table(lambda u: 1 / (1 + np.exp(-u)), s_in, z_in, np.float32(1 / 256), -128)
        np.testing.assert_array_equal(sig, _unary("LOGISTIC", s_in, z_in, np.float32(1 / 256), -128))
        np.testing.assert_array_equal(K.lookup_table(np.tanh, s_in, z_in, np.float32(1 / 128), 0),
                                      _unary("TANH", s_in, z_in, np.float32(1 / 128), 0))
        np.testing.assert_array_equal(K.hard_swish(v, s_in, z_in, s_out, z_out),
                                      _unary("HARD_SWISH", s_in, z_in, s_out, z_out, None, 1))
        alpha = np.float32(rng.uniform(0.01, 0.3))
        got = _unary("LEAKY_RELU", s_in, z_in, s_out, z_out, ("LeakyReluOptions", {"Alpha": float(alpha)}))
        np.testing.assert_array_equal(K.two_slopes(v, None, s_in, z_in, alpha, s_out, z_out), got)


def test_softmax_add_mul_and_requantize_equal_litert():
    rng = np.random.default_rng(1)
    for _ in range(6):
        depth = int(rng.integers(2, 30))
        shape = (1, 200, depth)
        s_a, s_b, s_c = (np.float32(v) for v in rng.uniform(0.005, 0.3, 3))
        za, zb, zc = (int(v) for v in rng.integers(-50, 50, 3))
        xa, xb = (rng.integers(-128, 128, shape).astype(np.int8) for _ in range(2))
        m = _Model()
        a = m.tensor("a", shape, scale=[s_a], zero_point=[za])
        c = m.tensor("c", shape, scale=[1 / 256], zero_point=[-128])
        m.op("SOFTMAX", [a], [c], ("SoftmaxOptions", {"Beta": 1.0}), 2)
        np.testing.assert_array_equal(K.softmax(xa.astype(np.int64), 2, s_a), _run(m, [a], [c], [xa]))
        for code in ("MUL", "QUANTIZE"):
            m = _Model()
            a = m.tensor("a", shape, scale=[s_a], zero_point=[za])
            b = m.tensor("b", shape, scale=[s_b], zero_point=[zb])
            c = m.tensor("c", shape, scale=[s_c], zero_point=[zc])
            if code == "MUL":
                m.op("MUL", [a, b], [c], ("MulOptions", {"FusedActivationFunction": 0}), 2)
                got = _run(m, [a, b], [c], [xa, xb])
                mult, shift = quantize_multiplier(np.float64(s_a) * np.float64(s_b) / np.float64(s_c))
                want = mbqm((xa.astype(np.int64) - za) * (xb.astype(np.int64) - zb), mult, shift, single=False)
            else:
                m.op("QUANTIZE", [a], [c], None, 2)
                got = _run(m, [a], [c], [xa])
                mult, shift = quantize_multiplier(np.float64(s_a) / np.float64(s_c))
                want = mbqm(xa.astype(np.int64) - za, mult, shift, single=False)
            np.testing.assert_array_equal(np.clip(want + zc, -128, 127), got, err_msg=code)


@pytest.mark.parametrize("name", ["lenet5", "mbv3"])
def test_a_container_reads_back_into_the_same_integers(name, tmp_path):
    if name == "mbv3":
        t = R.task(name, scale=0.01)
        torch.manual_seed(0)
        x, model = E.example(t, batch=12), t.build()
    else:
        x, model = _mnist(), zoo.build(name)
    sim = _npu(model, x)
    path = tmp_path / "q.nsz"
    save(sim, path, x[:2])
    back = graph_from_qdq(read_onnx_from_container(path), x[:1])
    a, b = IntegerModel(freeze(sim), "fixed").run(x.numpy()), IntegerModel(back, "fixed").run(x.numpy())
    for graph_name, g in (("saved", freeze(sim)), ("read back", back)):
        assert g.outputs, graph_name
    np.testing.assert_array_equal(a[freeze(sim).outputs[0]], b[back.outputs[0]])
    original = litert_run(to_tflite(sim, x[:1]), x[:4].numpy())[0]
    np.testing.assert_array_equal(litert_run(to_tflite(back, x[:1]), x[:4].numpy())[0], original)


def test_a_float_container_is_not_a_quantized_graph(tmp_path):
    path = tmp_path / "f.nsz"
    save(zoo.build("lenet300"), path)
    with pytest.raises(UnsupportedModelError, match="not a quantized graph"):
        graph_from_qdq(read_onnx_from_container(path))


def test_tflite_accuracy_equals_the_container(lenet5_trained, mnist, tmp_path):
    from nnshrink import load

    calib = mnist.loader("train", batch_size=64, shuffle=True, seed=0)
    x = torch.zeros(2, *mnist.input_shape)
    sim = compress(lenet5_trained, Plan([Quantize(target="npu", calib_samples=128)]), x, calib=calib).model
    path = tmp_path / "q.nsz"
    save(sim, path, x)
    xt, yt = mnist.tensors("test", 500)
    acc_nsz = zoo.accuracy(load(path), mnist, "test", limit=500)
    tfl = to_tflite(graph_from_qdq(read_onnx_from_container(path), x[:1]), x[:1])
    acc_tfl = float((litert_run(tfl, xt.numpy())[0].argmax(1) == yt.numpy()).mean())
    assert acc_tfl >= 0.97 and abs(acc_tfl - acc_nsz) <= 0.002  # one of 500 digits


# -- Vela -------------------------------------------------------------------------------------------
vela = pytest.importorskip("ethosu.vela")


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet8", "mobilenet"])
def test_vela_compiles_every_zoo_model_fully_onto_the_npu(name, tmp_path):
    from nnshrink.deploy import ethos_u

    x = _mnist(16)
    out = tmp_path / "m_vela.tflite"
    d = ethos_u.compile_for(to_tflite(_npu(zoo.build(name), x), x[:1]), "ethos-u55-128", out, name=name)
    assert d["cpu_operators"] == 0 and d["npu_operators"] > 0 and d["npu_fraction"] == 1.0
    assert d["cycles_npu"] > 0 and d["inference_ms"] > 0 and d["sram_bytes"] > 0 and d["flash_bytes"] > 0
    assert d["weight_bytes_encoded"] > 0 and d["macs"] > 0 and not d["warnings"]
    assert (d["system_config"], d["memory_mode"]) == ("Ethos_U55_High_End_Embedded", "Shared_Sram")
    assert out.read_bytes()[4:8] == b"TFL3"


def test_vela_errors_are_one_line(tmp_path):
    from nnshrink.deploy import ethos_u

    x = _mnist(8)
    data = to_tflite(_npu(zoo.build("lenet300"), x), x[:1])
    with pytest.raises(ConfigError, match="unknown Ethos-U target"):
        ethos_u.compile_for(data, "ethos-u99")
    with pytest.raises(ConfigError, match="System_Config 'Nope'"):
        ethos_u.compile_for(data, "ethos-u55-128", system_config="Nope")
    with pytest.raises(UnsupportedModelError, match="Vela could not compile"):
        ethos_u.compile_for(b"TFL3 not a model", "ethos-u55-128")


def test_cli_export_tflite_and_deploy(tmp_path):
    from typer.testing import CliRunner

    from nnshrink.cli import app

    x = _mnist(16)
    nsz = tmp_path / "q.nsz"
    save(_npu(zoo.build("lenet5"), x), nsz, x[:2])
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(nsz), "--tflite", str(tmp_path / "q.tflite")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q.tflite").read_bytes()[4:8] == b"TFL3"
    r = runner.invoke(app, ["deploy", str(nsz), "--target", "ethos-u65-256", "--report", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "d.json").read_text())["deploy"]
    assert d["target"] == "ethos-u65-256" and d["cpu_operators"] == 0 and (tmp_path / "q_vela.tflite").exists()
    r = runner.invoke(app, ["deploy", str(tmp_path / "q.tflite"), "--target", "ethos-u99"])
    assert r.exit_code == 2 and "unknown Ethos-U target" in r.output
    r = runner.invoke(app, ["export", "lenet5", "--tflite", str(tmp_path / "x.tflite")])
    assert r.exit_code == 2 and "quantized model" in r.output
    r = runner.invoke(app, ["deploy", str(tmp_path / "q.tflite"), "--out", str(tmp_path / "q.tflite")])
    assert r.exit_code == 2 and "is an input" in r.output
