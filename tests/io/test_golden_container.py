"""A committed container written by format version 1: this reader must keep reading it."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

from nnshrink import load  # noqa: E402
from nnshrink.io import describe  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_golden_container_loads_with_identical_weights_and_outputs():
    model = load(GOLDEN / "tiny_w6.nsz")
    expected = np.load(GOLDEN / "tiny_w6_expected.npz", allow_pickle=False)
    params = dict(model.named_parameters())
    for key in expected.files:
        if key in ("x", "y"):
            continue
        name = key.replace("__", ".")
        np.testing.assert_array_equal(params[name].detach().numpy(), expected[key], err_msg=name)
    out = model(torch.from_numpy(expected["x"])).detach().numpy()
    np.testing.assert_allclose(out, expected["y"], atol=1e-5)
    kinds = {r.name: r.kind for r in describe(GOLDEN / "tiny_w6.nsz")}
    assert kinds["c1.weight"] == kinds["c2.weight"] == kinds["fc.weight"] == "quantized"


def test_golden_quantized_container_v2_loads_with_identical_integers_and_outputs():
    """A W8A8 QDQ container written by format version 2 (int8 weights stored as kind "int")."""
    from onnx import numpy_helper

    from nnshrink.io import read_onnx_from_container

    path = GOLDEN / "tiny_qdq_v2.nsz"
    expected = np.load(GOLDEN / "tiny_qdq_v2_expected.npz", allow_pickle=False)
    inits = {i.name: numpy_helper.to_array(i) for i in read_onnx_from_container(path).graph.initializer}
    for key in expected.files:
        if key in ("x", "y"):
            continue
        name = key.replace("__", ".")
        assert inits[name].dtype == np.int8
        np.testing.assert_array_equal(inits[name], expected[key], err_msg=name)
    out = load(path)(torch.from_numpy(expected["x"])).detach().numpy()
    np.testing.assert_allclose(out, expected["y"], atol=1e-6)
    kinds = {r.name: r.kind for r in describe(path)}
    assert kinds["c1.weight_quantized"] == kinds["c2.weight_quantized"] == "int"
