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
