"""W8A8 PTQ of realistic graphs: every realistic-zoo model, imported as real exports arrive, is
quantized; ONNX Runtime runs every integer island with integer kernels and gives the integer
reference's outputs; a trained model keeps its task metric."""

import collections

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nnshrink.io.onnx_import import onnx_to_torch  # noqa: E402
from nnshrink.io.qdq import to_qdq_onnx  # noqa: E402
from nnshrink.plan import Plan, compress  # noqa: E402
from nnshrink.techniques import Quantize  # noqa: E402
from nnshrink.techniques.quant.graph import float_ops  # noqa: E402
from nnshrink.techniques.quant.reference import IntegerModel  # noqa: E402
from nnshrink.zoo import realistic as R  # noqa: E402
from nnshrink.zoo.realistic import exports as E  # noqa: E402

# each model arrives in a different export form
FORMS = {"crnn": "ts13", "dbnet": "dynamo18", "mbv3": "ts13", "pnet": "dynamo18", "pitchnet": "ts17",
         "transformer": "ts13"}
# what stays float on ONNX Runtime, by op type (its CPU kernels have no integer form of these)
FLOAT = {"crnn": {"LSTM", "LogSoftmax", "ConstantOfShape"}, "dbnet": {"ConvTranspose"},
         "mbv3": {"HardSigmoid"}, "pnet": {"PRelu"}, "pitchnet": set(),
         "transformer": {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul", "Erf"}}


def _session(proto, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), so)


@pytest.mark.parametrize("name", R.NAMES)
def test_w8a8_of_every_realistic_model_runs_on_integer_kernels_bit_exact(name, tmp_path):
    t = R.task(name, scale=0.01)
    torch.manual_seed(0)
    model = onnx_to_torch(E.export(t.build().eval(), t, FORMS[name]))
    calib = t.calibration(32)
    sim = compress(model, Plan([Quantize(cle=False, bias_correction=False)]), calib[:2], calib=[calib]).model
    assert {g["op_type"] for g in float_ops(sim.ops)} == FLOAT[name]
    proto = to_qdq_onnx(sim)
    x = t.inputs[:4].numpy()
    got = _session(proto, tmp_path / "o.onnx").run(None, {"input": x})
    # every integer conv, linear and matmul became an integer kernel
    kernels = collections.Counter(n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node)
    layers = [op for op in sim.ops if op.kind in ("conv", "linear", "matmul") and op.integer]
    assert kernels["QLinearConv"] + kernels["QGemm"] + kernels["QLinearMatMul"] == len(layers) > 0
    assert not {"Conv", "Gemm", "MatMul"} & set(kernels)
    # the integer reference gives ONNX Runtime's outputs: bit for bit where the path to an output is
    # integer; an LSTM's float kernels round differently from torch's
    want = IntegerModel(sim, "float")(x)
    for w, g in zip(want if isinstance(want, tuple) else (want,), got):
        if name == "crnn":
            np.testing.assert_allclose(g, w, atol=0.02 * float(np.abs(w).max()))
        else:
            np.testing.assert_array_equal(g, w)


def test_ptq_of_a_trained_two_headed_model_keeps_its_metric():
    t = R.task("pnet", scale=0.5)
    torch.manual_seed(0)
    model = R.fit(t.build(), t, steps=600, show_progress=False).eval()
    before = t.evaluate(model)
    calib = t.calibration(128)
    sim = compress(model, Plan([Quantize()]), calib[:2], calib=[calib]).model
    assert before > 0.85 and t.evaluate(sim) >= 0.99 * before
    ort_model = _OrtModel(to_qdq_onnx(sim))
    assert t.evaluate(ort_model) >= 0.99 * before


class _OrtModel(torch.nn.Module):
    def __init__(self, proto):
        super().__init__()
        self.session = _session(proto)

    def forward(self, x):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {"input": x.numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)
