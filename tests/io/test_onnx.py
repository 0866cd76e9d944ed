import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nnshrink import FormatError, InputShapeError, UnsupportedOpError, analyze, export_onnx, load_model, zoo  # noqa: E402
from nnshrink.testing import ConcatNet, DynamicConvNet  # noqa: E402

pytestmark = pytest.mark.onnxruntime


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _check_matches_ort(path, x, atol=1e-4):
    model = load_model(path)
    with torch.no_grad():
        ours = model(x).numpy()
    np.testing.assert_allclose(ours, _ort(path, x), atol=atol, rtol=0)
    return model


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_models_round_trip_through_onnx(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    x = torch.randn(5, 1, 28, 28)
    imported = _check_matches_ort(path, x)
    ours, theirs = analyze(imported, x[:1]), analyze(model, x[:1])
    assert ours.total_macs == theirs.total_macs
    assert [i.name for i in ours.layers] == [i.name for i in theirs.layers]  # module names survive
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in imported.parameters())


@pytest.mark.parametrize("name", ["resnet8", "mobilenet"])
def test_unoptimized_exports_with_shape_arithmetic(name, tmp_path):
    # torch's exporter without its optimizer leaves BatchNormalization, Shape/Squeeze/Reshape
    # chains, CastLike and Expand: the kind of graph third-party tools produce.
    model = zoo.build(name).eval()
    program = torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), dynamo=True, optimize=False,
                                dynamic_shapes=({0: torch.export.Dim("b")},))
    path = tmp_path / "raw.onnx"
    program.save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"BatchNormalization", "Shape", "Expand"} <= ops
    imported = _check_matches_ort(path, torch.randn(3, 1, 28, 28))
    x = torch.zeros(1, 1, 28, 28)
    assert analyze(imported, x).total_macs == analyze(model, x).total_macs
    # an imported model exports again, and keeps its layer names through the second round trip
    again = _check_matches_ort(export_onnx(imported, tmp_path / "again.onnx"), torch.randn(2, 1, 28, 28))
    assert [i.name for i in analyze(again, x).layers] == [i.name for i in analyze(model, x).layers]


def test_concat_and_global_pooling(tmp_path):
    model = ConcatNet().eval()
    path = export_onnx(model, tmp_path / "concat.onnx")
    assert "Concat" in {n.op_type for n in onnx.load(str(path)).graph.node}
    _check_matches_ort(path, torch.randn(4, 3, 16, 16))


def test_dynamic_batch_and_spatial_dims(tmp_path):
    model = DynamicConvNet().eval()
    path = tmp_path / "dyn.onnx"
    h, w = torch.export.Dim("h", min=4, max=64), torch.export.Dim("w", min=4, max=64)
    program = torch.onnx.export(model, (torch.zeros(2, 1, 20, 20),), dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("b"), 2: h, 3: w},))
    program.save(str(path))
    imported = load_model(path)
    assert imported.input_shape == (1, None, None)
    for shape in [(1, 1, 20, 20), (3, 1, 33, 17)]:
        x = torch.randn(shape)
        np.testing.assert_allclose(imported(x).detach().numpy(), _ort(path, x), atol=1e-4)


def test_weights_held_as_buffers_become_parameters(tmp_path):
    class BufferConv(nn.Module):
        input_shape = (2, 9, 9)

        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(4, 2, 3, 3))
            self.register_buffer("b", torch.randn(4))
            self.fc = nn.Linear(4 * 7 * 7, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.conv2d(x, self.w, self.b), 1))

    model = BufferConv().eval()
    path = export_onnx(model, tmp_path / "buf.onnx")
    imported = _check_matches_ort(path, torch.randn(2, 2, 9, 9))
    convs = [m for m in imported.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and isinstance(convs[0].weight, nn.Parameter)


def _handmade_model(opset=13):
    """Constant-node conv weights, a Transposed initializer feeding MatMul + Add, Reshape via Shape."""
    rng = np.random.default_rng(0)
    conv_w = rng.normal(size=(3, 1, 3, 3)).astype(np.float32)
    fc_w_t = rng.normal(size=(10, 3 * 6 * 6)).astype(np.float32)  # stored transposed
    fc_b = rng.normal(size=(10,)).astype(np.float32)
    q = np.clip(np.round(rng.normal(size=(4, 10)) * 40), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("Constant", [], ["conv_w"], value=numpy_helper.from_array(conv_w)),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], kernel_shape=[3, 3], name="/features/conv/Conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_1d"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("Transpose", ["fc_w_t"], ["fc_w"], perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="/classifier/MatMul"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["q_w"]),
        helper.make_node("Gemm", ["logits", "q_w"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(fc_w_t, "fc_w_t"), numpy_helper.from_array(fc_b, "fc_b"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "zero_1d"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.array(0.02, np.float32), "q_scale")]
    graph = helper.make_graph(
        nodes, "handmade", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_third_party_style_graph(tmp_path):
    path = tmp_path / "handmade.onnx"
    onnx.save(_handmade_model(), str(path))
    model = _check_matches_ort(path, torch.randn(6, 1, 8, 8))
    info = analyze(model, torch.zeros(1, 1, 8, 8))
    assert [(i.name, i.kind) for i in info.layers] == [
        ("features_conv", "conv2d"), ("classifier", "linear"), ("linear", "linear")]
    assert model.get_submodule("classifier").bias is not None  # MatMul + Add became one Linear
    assert info.total_macs == 36 * 3 * 9 + 108 * 10 + 10 * 4


def test_unsupported_ops_are_all_listed(tmp_path):
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="if0"),
        helper.make_node("Einsum", ["y", "y"], ["z"], equation="ijk,ijk->ijk", name="einsum0"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array(0, np.float32), "zero")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOpError) as info:
        load_model(path)
    msg = str(info.value)
    assert "If (condition from a tensor value" in msg and "'if0'" in msg and "Einsum" in msg


def test_not_onnx_and_missing_files(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    with pytest.raises(FormatError, match="not an ONNX model"):
        load_model(bad)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(FormatError, match="unknown model file type"):
        load_model(tmp_path / "weights.pt")


def test_export_is_atomic_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(InputShapeError):
        export_onnx(zoo.build("lenet5"), target, torch.zeros(1, 3, 28, 28))
    assert target.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_ops_without_a_converter_are_kept_and_run_by_onnx_runtime(tmp_path):
    """An ONNX Runtime contrib op and a standard op nnshrink has no converter for sit between two
    convs: the convs are still compressed, the nodes are written back as they were."""
    import io
    import warnings

    import onnxruntime as ort

    import nnshrink as ns
    from nnshrink.io import to_onnx
    from nnshrink.plan import Plan
    from nnshrink.techniques import QuantizeWeights

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "c1.weight"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "c2.weight")]
    nodes = [helper.make_node("Conv", ["x", "c1.weight"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Gelu", ["a"], ["b"], domain="com.microsoft", name="gelu_ms"),
             helper.make_node("Einsum", ["b", "b"], ["c"], equation="nchw,nchw->nchw", name="square"),
             helper.make_node("Conv", ["c", "c2.weight"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = load_model(path)
    kept = [str(w.message) for w in caught if "kept as they are" in str(w.message)]
    assert kept == ["kept as they are, run by ONNX Runtime (not compressed, no gradients): "
                    "Einsum (1 node), com.microsoft.Gelu (1 node)"]
    source = ort.InferenceSession(str(path))
    for shape in [(2, 3, 10, 12), (1, 3, 5, 7)]:
        x = torch.rand(shape)
        with torch.no_grad():
            np.testing.assert_allclose(gm(x).numpy(), source.run(None, {"x": x.numpy()})[0], atol=1e-4)
    x = torch.rand(2, 3, 10, 12)
    back = to_onnx(gm, x)
    assert [(n.op_type, n.domain) for n in back.graph.node] == [("Conv", ""), ("Gelu", "com.microsoft"),
                                                                ("Einsum", ""), ("Conv", "")]
    again = ort.InferenceSession(back.SerializeToString())
    x2 = torch.rand(3, 3, 7, 9)
    np.testing.assert_allclose(again.run(None, {"x": x2.numpy()})[0], source.run(None, {"x": x2.numpy()})[0], atol=1e-4)
    result = ns.compress(gm, Plan([QuantizeWeights(bits=8)]), x)
    kinds = {r.name: r.kind for r in ns.save(result.model, tmp_path / "m.nsz", x)}
    assert kinds == {"c1.weight": "quantized", "c2.weight": "quantized"}
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), gm(x))


def test_an_input_constant_in_use_can_be_pinned_to_choose_an_if_branch(tmp_path):
    """An audio model's convs sit in If branches chosen by a sample-rate input."""
    rng = np.random.default_rng(1)

    def branch(name, k):
        w = numpy_helper.from_array(rng.normal(size=(4, 1, k)).astype(np.float32), f"{name}.weight")
        return helper.make_graph([helper.make_node("Conv", ["x", f"{name}.weight"], [f"{name}_y"], pads=[k // 2] * 2)],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])

    nodes = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branch("conv16k", 5), else_branch=branch("conv8k", 3))]
    graph = helper.make_graph(nodes, "audio", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "T"]),
                                               helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "T"])],
                              [numpy_helper.from_array(np.array(16000, np.int64), "sr16k")])
    path = tmp_path / "audio.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOpError, match="constant_inputs"):
        load_model(path)
    gm = load_model(path, constant_inputs={"sr": 16000})
    x = torch.rand(2, 1, 50)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(path)).run(None, {"x": x.numpy(), "sr": np.array(16000, np.int64)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), ref, atol=1e-5)
    assert [n for n, m in gm.named_modules() if isinstance(m, torch.nn.Conv1d)] == ["conv16k"]
    with pytest.raises(FormatError, match="no input called"):
        load_model(path, constant_inputs={"rate": 8000})
