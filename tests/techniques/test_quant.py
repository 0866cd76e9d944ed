"""Quantization: quantizers, lowering, CLE, the simulated model, QDQ export, the integer reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnshrink import zoo
from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.plan import Plan, compress
from nnshrink.techniques import Quantize
from nnshrink.techniques.quant import build_sim, calibrate, equalize, fake_quantize, int_range, lower
from nnshrink.techniques.quant.graph import freeze
from nnshrink.techniques.quant.ptq import float_copy, init_weight_quantizers
from nnshrink.techniques.quant.quantizers import estimate_range, scale_zero_point
from nnshrink.techniques.quant.reference import IntegerModel, multiply_by_quantized_multiplier, quantize_multiplier


def _data(n=64, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def _quantized(name_or_model, n=48, **cfg):
    model = zoo.build(name_or_model) if isinstance(name_or_model, str) else name_or_model
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial batch norms, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = _data(n)
    return model.eval(), compress(model, Plan([Quantize(**cfg)]), x[:2], calib=[x]).model, x


# -- quantizers ---------------------------------------------------------------------------------
def test_int_ranges():
    assert int_range(8, True) == (-127, 127)
    assert int_range(8, False) == (-128, 127)
    assert int_range(4, True) == (-7, 7)


def test_fake_quantize_rounds_half_to_even_and_passes_gradients_straight_through():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), -127, 127)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, 127.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # clipped value: no gradient


def test_lsq_gradient_of_the_scale():
    x = torch.tensor([0.3, 10.0])
    s = torch.tensor(0.25, requires_grad=True)
    fake_quantize(x, s, torch.tensor(0.0), -7, 7).sum().backward()
    # inside: round(x/s) - x/s = 1 - 1.2; clipped: qmax = 7
    assert s.grad.item() == pytest.approx((1 - 1.2) + 7)


def test_mse_and_percentile_ranges_clip_outliers():
    x = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0
    lo_mm, hi_mm = estimate_range(x, 8, False, "minmax")
    lo_p, hi_p = estimate_range(x, 8, False, "percentile", 99.9)
    lo_m, hi_m = estimate_range(x, 8, False, "mse")
    assert hi_mm.item() == 40.0 and hi_p.item() < 5 and hi_m.item() < 40.0
    s, zp = scale_zero_point(torch.tensor([0.0]), torch.tensor([2.55]), 8, False)
    assert zp.item() == -128 and s.item() == pytest.approx(0.01)


# -- lowering -------------------------------------------------------------------------------------
def test_lowering_fuses_activations_and_keeps_residual_adds():
    ops, layers, output = lower(zoo.build("resnet8"), _data(2))
    kinds = [op.kind for op in ops]
    assert kinds.count("conv") == 9 and kinds.count("add") == 3 and kinds[-1] == "linear"
    assert {op.act for op in ops if op.kind == "add"} == {"relu"}
    assert output == "fc" and "stem.0" in layers


class _Mixed(nn.Module):
    """A conv, LayerNorm and GELU (no integer kernels on ONNX Runtime), a sigmoid (integer on every target)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(26)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(F.gelu(self.norm(self.conv(x)))).flatten(1))


def test_partial_quantization_leaves_what_has_no_integer_kernel_float():
    from nnshrink.techniques.quant.graph import float_ops

    low = lower(_Mixed(), _data(2))
    by = {op.op_type: op for op in low.ops}
    # a float chain stays float inside; its end, read by an integer op, is quantized (the border)
    assert by["LayerNormalization"].quant == "float" and not by["LayerNormalization"].integer
    assert by["Gelu"].quant == "own" and not by["Gelu"].integer
    assert by["Sigmoid"].quant == "own" and by["Sigmoid"].integer
    assert by["Conv"].quant == "own" and by["Gemm"].quant == "own"
    assert [(g["op_type"], g["count"]) for g in float_ops(low.ops)] == [("LayerNormalization", 1), ("Gelu", 1)]
    assert [g["op_type"] for g in float_ops(lower(_Mixed(), _data(2), target="npu").ops)] == ["LayerNormalization"]
    with pytest.raises(UnsupportedModelError, match=r"strict .*LayerNormalization x1"):
        compress(_Mixed(), Plan([Quantize(strict=True)]), _data(2), calib=[_data(8)])


def test_mixed_precision_meets_its_budget_with_few_evaluations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 24 * 24, 10)).eval()
    x = _data(256 + 128)

    def mean_bits(step):
        r = compress(model, Plan([step]), x[:2], calib=[x], evaluate=evaluate)
        return r.steps[0].details["mixed_precision"], r.model

    ref = model(x[:64]).detach()

    def evaluate(m):  # higher is better: 1 minus the relative output error (float: 1)
        with torch.no_grad():
            return 1 - float((m(x[:64]) - ref).pow(2).mean() / ref.pow(2).mean())

    low, _ = mean_bits(Quantize(mixed_bits=(4, 8), min_sqnr_db=15, adaround=False))
    high, _ = mean_bits(Quantize(mixed_bits=(4, 8), min_sqnr_db=30, adaround=False))
    assert low["sqnr_db"] >= 15 and high["sqnr_db"] >= 30 and low["evaluations"] == 0
    assert set(low["bits"].values()) <= {4, 7} and low["weight_bits"] <= high["weight_bits"]
    drop, sim = mean_bits(Quantize(mixed_bits=(4, 8, 32), max_drop=0.001, adaround=False))
    assert set(drop["bits"].values()) <= {4, 7, 32} and drop["evaluations"] <= 8
    assert drop["metric"] >= 0.999 and drop["weight_bits"] < 32
    assert sim.float_layers == {n for n, b in drop["bits"].items() if b == 32}
    with pytest.raises(ConfigError, match="one budget"):
        Quantize(mixed_bits=(4, 8))
    with pytest.raises(ConfigError, match="mixed_bits"):
        Quantize(mixed_bits=(4,), min_sqnr_db=20)
    # activation widths in the same search: a budget 8-bit outputs cannot meet raises some to 16
    best, _ = mean_bits(Quantize(mixed_bits=(4, 8), min_sqnr_db=99, adaround=False))  # 8-bit weights and outputs
    goal = best["sqnr_db"] + 0.5  # above what 8-bit outputs reach with every weight at its widest
    both, sim = mean_bits(Quantize(mixed_bits=(4, 8), mixed_act_bits=(8, 16), min_sqnr_db=goal, adaround=False))
    assert both["sqnr_db"] >= goal and set(best["bits"].values()) == {7}
    assert 16 in both["act_bits"].values() and "8-bit output" in both["sensitivity"]["settings"]
    assert sim.act_bits_of() == {n: 16 for n, b in both["act_bits"].items() if b == 16}
    with pytest.raises(ConfigError, match="mixed_act_bits"):
        Quantize(mixed_act_bits=(8, 16), min_sqnr_db=20)


def test_lowering_refuses_a_second_input():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(UnsupportedModelError, match="one input"):
        lower(Two(), _data(2))


def test_cle_keeps_the_float_model_and_equalizes_ranges():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(8, 1, 1, 1))
    x = _data(8)
    sim = build_sim(model, x[:2])
    sim.enable_only(set())
    before = sim(x)
    pairs = equalize(sim)
    assert ("0", "2") in pairs and ("2", "4") in pairs
    torch.testing.assert_close(sim(x), before, rtol=1e-4, atol=1e-4)  # ReLU6 became ReLU: no clip hit here
    r1 = sim.layer("0").weight.abs().amax(dim=(1, 2, 3))
    r2 = sim.layer("2").weight.abs().amax(dim=(1, 2, 3))
    assert (r1 / r2).max() < 1.2 and (r1 / r2).min() > 0.8  # was 1000x apart
    assert r1.max() / r1.min() < 50


def test_sim_with_quantizers_off_is_the_folded_float_model():
    model, sim, x = _quantized("mobilenet", cle=False, bias_correction=False)
    ref = float_copy(sim)
    torch.testing.assert_close(ref(x), model(x), rtol=1e-4, atol=1e-4)


def test_quantize_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="weight_bits"):
        Quantize(weight_bits=9)
    with pytest.raises(ConfigError, match="act_estimator"):
        Quantize(act_estimator="kl")
    with pytest.raises(ConfigError, match="'nope' match no quantized layer"):
        _quantized("lenet5", layers={"nope": "skip"})
    with pytest.raises(ConfigError, match="calibration"):
        compress(zoo.build("lenet5"), Plan([Quantize()]), _data(2), calib=None)


def test_layer_rules_keep_float_and_give_bits():
    _, sim, x = _quantized("lenet5", layers={"fc1": "skip", "conv2": {"bits": 4}})
    assert sim.float_layers == {"fc1"}
    w = sim.weight(next(op for op in sim.ops if op.name == "conv2"))
    assert all(len(torch.unique(row)) <= 15 for row in w.reshape(w.shape[0], -1))
    # the integer reference runs a layer kept in float in float, between quantized tensors
    step = float(sim.aq[sim.output].scale)
    with torch.no_grad():
        np.testing.assert_allclose(IntegerModel(sim, "float")(x.numpy()), sim(x).numpy(), atol=1.01 * step)


# -- ONNX Runtime and the integer reference -------------------------------------------------------
ort = pytest.importorskip("onnxruntime")


def _session(proto, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["lenet5", "resnet8", "mobilenet"])
def test_onnx_runtime_runs_every_layer_with_integer_kernels(name, tmp_path):
    import onnx

    from nnshrink.io.qdq import to_qdq_onnx

    _, sim, x = _quantized(name)
    _session(to_qdq_onnx(sim), tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert not {"Conv", "Gemm", "Add", "MatMul", "GlobalAveragePool"} & set(ops), ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1


@pytest.mark.parametrize("name", ["lenet5", "resnet8", "mobilenet", "lenet300"])
def test_integer_reference_equals_onnx_runtime_on_every_element(name):
    from nnshrink.io.qdq import int_tensor_names, to_qdq_onnx

    _, sim, x = _quantized(name)
    names = int_tensor_names(sim)
    outs = _session(to_qdq_onnx(sim, int_outputs=names)).run(None, {"input": x.numpy()})
    ort_ints = {n: o.astype(np.int64) - 128 for n, o in zip(names, outs)}  # ORT holds uint8
    env = IntegerModel(sim, "float").run(x.numpy())
    for n in names:
        np.testing.assert_array_equal(env[n], ort_ints[n], err_msg=n)
    # fixed-point requantization (TFLite / Ethos-U): each layer within 1 LSB of ONNX Runtime's
    fixed = IntegerModel(sim, "fixed")
    for op in fixed.ops:
        xs = [ort_ints[i] for i in op.inputs]
        if op.kind in ("conv", "linear"):
            y = fixed._layer(op, xs[0])
        elif op.kind == "add":
            y = fixed._add(op, *xs)
        elif op.kind == "gap":
            y = fixed._pool_avg(op, xs[0])
        else:
            continue
        assert np.abs(y - ort_ints[op.name]).max() <= 1, op.name


def test_a_layer_with_16_bit_activations_runs_in_onnx_runtime_as_the_reference_computes_it():
    from nnshrink.errors import UnsupportedModelError
    from nnshrink.io.qdq import int_tensor_names, to_qdq_onnx
    from nnshrink.io.tflite import to_tflite

    model, sim, x = _quantized("lenet5", layers={"conv2": {"act_bits": 16}, "fc2": {"act_bits": 16}})
    widths = {n: t.bits for n, t in freeze(sim).tensors.items()}
    assert widths["conv2"] == widths["fc2"] == 16 and widths["fc1"] == 8
    assert sum(b == 16 for b in widths.values()) >= 3  # the pool after conv2 moves it at 16 bits
    with torch.no_grad():  # the 16-bit output is 256 times finer than W8A8's
        ref, wide, narrow = model(x), sim(x), _quantized("lenet5")[1](x)
    assert (wide - ref).abs().max() < 0.25 * (narrow - ref).abs().max()
    names = int_tensor_names(sim)
    proto = to_qdq_onnx(sim, int_outputs=names)
    assert {i.name: i.data_type for i in proto.graph.initializer}["conv2.act_zero_point"] == onnx_int16()
    got = {n: o.astype(np.int64) - (128 if o.dtype == np.uint8 else 0)
           for n, o in zip(names, _session(proto).run(None, {"input": x.numpy()}))}
    reference = IntegerModel(sim, "float")
    env = reference.run(x.numpy())
    for n in ("conv1", "pool1"):  # the 8-bit island before: ONNX Runtime's integer kernels, exact
        np.testing.assert_array_equal(got[n], env[n], err_msg=n)
    # each layer reading or writing int16 runs in ONNX Runtime as DQ -> float -> Q, whose float
    # sums may round an element the other way: on ONNX Runtime's own inputs, within 1 LSB
    for op in (op for op in sim.ops if op.name in ("conv2", "fc1", "fc2")):
        assert np.abs(reference._layer(op, got[op.inputs[0]]) - got[op.name]).max() <= 1, op.name
    with pytest.raises(UnsupportedModelError, match="16-bit activations at conv2"):
        to_tflite(sim, x[:1])
    with pytest.raises(ConfigError, match="act_bits must be 8 or 16"):
        Quantize(layers={"fc1": {"act_bits": 12}})


def onnx_int16() -> int:
    import onnx

    return onnx.TensorProto.INT16


def _ort_ints(proto, x, precision_mode=False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if precision_mode:
        so.add_session_config_entry("session.x64quantprecision", "1")
    outs = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    return [o.astype(np.int64) - 128 for o in outs]  # ORT holds uint8


def test_weights_are_written_for_the_target():
    from onnx import numpy_helper

    from nnshrink.io.qdq import to_qdq_onnx

    def dtypes(**cfg):
        sim = _quantized("lenet5", n=8, **cfg)[1]
        inits = {i.name: numpy_helper.to_array(i) for i in to_qdq_onnx(sim).graph.initializer}
        return sim, {k: str(v.dtype) for k, v in inits.items() if k.endswith("weight_quantized")}, inits

    sim, got, inits = dtypes()  # default ort-x86: 7-bit int8 weights, exact in u8 x s8 kernels
    assert sim.target == "ort-x86" and set(got.values()) == {"int8"}
    assert max(int(np.abs(inits[k]).max()) for k in got) == 63
    sim, got, inits = dtypes(target="ort-x86-u8")  # 8-bit weights as uint8, zero point 128
    assert set(got.values()) == {"uint8"} and set(inits["conv1.weight_zero_point"].tolist()) == {128}
    ints = sim.weight_quantizer("conv1").integers(sim.layer("conv1").weight).numpy()
    assert np.abs(ints).max() == 127
    np.testing.assert_array_equal(inits["conv1.weight_quantized"].astype(np.int64) - 128, ints)
    _, got, inits = dtypes(target="npu")
    assert set(got.values()) == {"int8"} and max(int(np.abs(inits[k]).max()) for k in got) == 127
    # below 8 bits u8 x s8 is exact anyway: int8 on every target
    assert set(dtypes(weight_bits=4, adaround=False, target="ort-x86-u8")[1].values()) == {"int8"}
    with pytest.raises(ConfigError, match="target"):
        Quantize(target="gpu")
    with pytest.raises(ConfigError, match="act_type='uint8'"):
        to_qdq_onnx(_quantized("lenet5", n=8, target="ort-x86-u8")[1], act_type="int8")


def test_int8_weights_in_onnx_runtime_on_this_cpu_behave_as_documented():
    """Full-range int8 weights (target ``npu``) against uint8 activations: exact where the CPU
    has VNNI; on AVX2 without it, ONNX Runtime's VPMADDUBSW kernels saturate pairs of products
    to int16, so results differ unless its precision mode is set (docs/ARCHITECTURE.md)."""
    from nnshrink.io.qdq import int_tensor_names, to_qdq_onnx, x86_int8_kernel

    _, sim, x = _quantized("lenet5", n=16, target="npu")
    proto = to_qdq_onnx(sim, int_outputs=int_tensor_names(sim))
    env = IntegerModel(sim, "float").run(x.numpy())
    want = [env[n] for n in int_tensor_names(sim)]
    exact = [np.array_equal(a, b) for a, b in zip(_ort_ints(proto, x.numpy()), want)]
    kernel = x86_int8_kernel()
    if kernel == "other":
        pytest.skip("not an x86 CPU with AVX2: ONNX Runtime's int8 kernels here are not measured")
    if kernel == "vnni":
        assert all(exact)
    else:
        assert not all(exact)  # the first conv already differs
        assert all(np.array_equal(a, b) for a, b in zip(_ort_ints(proto, x.numpy(), True), want))


_EMULATED = """
import sys, llvmlite.binding as llvm, numpy as np, onnxruntime as ort
folder = sys.argv[1]
cpu = llvm.get_host_cpu_features()  # CPUID as the emulated CPU answers it (not importing torch is 20 s faster)
out = {"cpu": np.array([cpu.get(f, False) for f in ("avx2", "avx512vnni", "avxvnni")])}
x = np.load(folder + "/x.npy")
for name in sys.argv[2:]:
    for prec in (0, 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        if prec:
            so.add_session_config_entry("session.x64quantprecision", "1")
        sess = ort.InferenceSession(f"{folder}/{name}.onnx", so, providers=["CPUExecutionProvider"])
        for i, o in enumerate(sess.run(None, {"input": x})):
            out[f"{name}/{prec}/{i}"] = o
np.savez(folder + "/out.npz", **out)
"""


@pytest.mark.parametrize("name", ["lenet5", "mobilenet"])
def test_on_an_emulated_avx2_only_cpu(name, tmp_path):
    """ONNX Runtime in an AMD EPYC (Zen 2: AVX2, no VNNI) emulated by QEMU, whatever the host: the
    ``ort-x86`` (default) and ``ort-x86-u8`` models equal the integer reference on every element;
    a ``npu`` model differs there, and equals it in ONNX Runtime's precision mode."""
    import shutil
    import subprocess
    import sys

    from nnshrink.io.qdq import int_tensor_names, to_qdq_onnx

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (Debian's qemu-user; .ci/run installs it)")
    want = {}
    for cfg in ("ort-x86", "ort-x86-u8", "npu"):
        _, sim, x = _quantized(name, n=4, target=cfg)
        names = int_tensor_names(sim)
        (tmp_path / f"{cfg}.onnx").write_bytes(to_qdq_onnx(sim, int_outputs=names).SerializeToString())
        env = IntegerModel(sim, "float").run(x.numpy())
        want[cfg] = [env[n] for n in names]
    np.save(tmp_path / "x.npy", x.numpy())
    run = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, "-c", _EMULATED, str(tmp_path), *want],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    assert got["cpu"].tolist() == [True, False, False]  # AVX2, neither VNNI

    def exact(cfg, prec):
        return all(np.array_equal(got[f"{cfg}/{prec}/{i}"].astype(np.int64) - 128, w) for i, w in enumerate(want[cfg]))

    assert exact("ort-x86", 0) and exact("ort-x86-u8", 0)
    assert not exact("npu", 0) and exact("npu", 1)


def test_integer_reference_is_close_to_the_simulation():
    _, sim, x = _quantized("resnet8")
    with torch.no_grad():
        sim_out = sim(x).numpy()
    ref_out = IntegerModel(sim, "float")(x.numpy())
    step = float(sim.aq["fc"].scale)
    assert np.abs(sim_out - ref_out).max() <= 2 * step + 1e-6
    assert (sim_out.argmax(1) == ref_out.argmax(1)).mean() >= 0.95


def test_fixed_point_multiplier():
    mult, shift = quantize_multiplier(np.array([0.75, 0.001, 3.0]))
    np.testing.assert_allclose(mult * 2.0 ** (shift - 31), [0.75, 0.001, 3.0], rtol=1e-9)
    x = np.array([1000, -1000, 7, -7], dtype=np.int64)
    got = multiply_by_quantized_multiplier(x, *quantize_multiplier(np.array(0.5)))
    assert got.tolist() == [500, -500, 4, -3]  # gemmlowp: the high multiply rounds -3.5 to -3


def test_container_round_trip_of_a_quantized_model(tmp_path):
    from nnshrink import load
    from nnshrink.io import describe, read_onnx_from_container, save

    _, sim, x = _quantized("resnet8")
    path = tmp_path / "q.nsz"
    reports = save(sim, path, x[:2])
    assert {r.kind for r in reports if r.name.endswith("weight_quantized")} == {"int"}
    back = load(path)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sim(x), rtol=0, atol=1e-6)
    from nnshrink.io.qdq import to_qdq_onnx
    from onnx import numpy_helper

    want = {i.name: numpy_helper.to_array(i) for i in to_qdq_onnx(sim).graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in read_onnx_from_container(path).graph.initializer}
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == want[k].dtype
    assert any(r.kind == "int" for r in describe(path))


def test_w8a8_ptq_of_trained_lenet5_keeps_accuracy(lenet5_trained, mnist):
    x, y = mnist.tensors("test", 500)
    calib = mnist.loader("train", batch_size=64, shuffle=True, seed=0)
    sim = compress(lenet5_trained, Plan([Quantize()]), x[:2], calib=calib).model
    with torch.no_grad():
        float_acc = (lenet5_trained(x).argmax(1) == y).float().mean().item()
        q_acc = (sim(x).argmax(1) == y).float().mean().item()
    assert q_acc >= float_acc - 0.006  # 3 of 500 images


def test_automatic_choice_equals_its_chosen_settings_run_alone():
    """The automatic CLE / bias-correction choice calibrates once per CLE setting and corrects a
    copy; the model it keeps must be the one the chosen settings give when run by themselves."""
    model = zoo.build("resnet8").eval()
    x = _data(160 + 64)  # the last 64 are held out to score the options on
    # per-channel 8-bit weights: CLE is not a candidate (per-channel scales absorb it)
    default = compress(model, Plan([Quantize(calib_samples=160)]), x[:2], calib=[x]).steps[0].details
    assert set(default["selection_sqnr_db"]) == {"cle=False,bias_correction=True", "cle=False,bias_correction=False"}
    auto = compress(model, Plan([Quantize(calib_samples=160, per_channel=False)]), x[:2], calib=[x])
    details = auto.steps[0].details
    assert len(details["selection_sqnr_db"]) == 4
    chosen = Quantize(calib_samples=160, per_channel=False, cle=details["cle"],
                      bias_correction=details["bias_correction"])
    alone = compress(model, Plan([chosen]), x[:2], calib=list(x[:160].split(64))).model
    with torch.no_grad():
        assert torch.equal(auto.model(x[:32]), alone(x[:32]))
    for cle in (True, False):  # each corrected candidate differs from its uncorrected twin
        key = f"cle={cle},bias_correction="
        assert details["selection_sqnr_db"][key + "True"] != details["selection_sqnr_db"][key + "False"]


def test_calibration_uses_at_most_the_requested_samples():
    sim = build_sim(zoo.build("lenet5").eval(), _data(2))
    init_weight_quantizers(sim)
    seen = []
    sim.aq["input"].register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    from nnshrink.techniques.quant.ptq import calibration_batches

    batches = calibration_batches([(_data(40), None), (_data(40), None)], 50)
    calibrate(sim, batches, show_progress=False)
    assert sum(seen) == 50


def test_sensitivity_finds_the_layer_that_was_broken():
    from nnshrink.techniques.quant.sensitivity import quant_sensitivity

    _, sim, x = _quantized("lenet5")
    ref = float_copy(sim)
    with torch.no_grad():
        labels = ref(x).argmax(1)
    # ruin conv2's weight grid: 2 levels per channel
    wq = sim.weight_quantizer("conv2")
    wq.qmin, wq.qmax = -1, 1
    wq.scale.data *= 60

    def agreement(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == labels).float().mean())

    sens = quant_sensitivity(sim, agreement, x, show_progress=False)
    assert sens.float_accuracy == 1.0
    assert sens.worst(1) == ["conv2"]
    assert sens.sqnr_only["conv2"] == min(sens.sqnr_only.values())
    assert all(q.enabled for q in sim.aq.values())  # left fully quantized
    doc = sens.to_dict()
    assert doc["schema"] == "nnshrink.quant_sensitivity/1" and len(doc["layers"]) == 4


def test_an_imported_onnx_model_quantizes_like_the_torch_one(tmp_path):
    from nnshrink import export_onnx, load_model
    from nnshrink.io.qdq import to_qdq_onnx

    model = _quantized("resnet8")[0]
    export_onnx(model, tmp_path / "r.onnx")
    imported = load_model(tmp_path / "r.onnx")
    x = _data(32)
    sim = compress(imported, Plan([Quantize(cle=False, bias_correction=False)]), x[:2], calib=[x]).model
    ref = compress(model, Plan([Quantize(cle=False, bias_correction=False)]), x[:2], calib=[x]).model
    assert [op.kind for op in sim.ops] == [op.kind for op in ref.ops]
    out = _session(to_qdq_onnx(sim)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert (out.argmax(1) == ref(x).numpy().argmax(1)).mean() >= 0.9
