"""Weight-only quantization below 8 bits without retraining: MSE scales, groups, GPTQ rounding."""

import pytest
import torch

import nnshrink as ns
from nnshrink.plan import Plan
from nnshrink.techniques import QuantizeWeights


@pytest.fixture(scope="module")
def lenet300(mnist):
    return ns.zoo.pretrained("lenet300", "mnist", show_progress=False)


def _acc(model, mnist, **kw):
    result = ns.compress(model, Plan([QuantizeWeights(**kw)]), torch.zeros(1, 1, 28, 28),
                         calib=mnist.loader("train", batch_size=64, shuffle=True, seed=0))
    return ns.zoo.accuracy(result.model, mnist, "val")


def test_gptq_holds_two_bit_weights_where_rounding_collapses(lenet300, mnist):
    float_acc = ns.zoo.accuracy(lenet300, mnist, "val")
    nearest = _acc(lenet300, mnist, bits=2)
    gptq = _acc(lenet300, mnist, bits=2, rounding="gptq", calib_samples=256)
    grouped = _acc(lenet300, mnist, bits=2, scales="mse", rounding="gptq", group_size=32, calib_samples=256)
    assert nearest < 0.6 and gptq > float_acc - 0.02 and grouped > float_acc - 0.02
    assert _acc(lenet300, mnist, bits=3, scales="mse") >= _acc(lenet300, mnist, bits=3) - 0.004


def test_bad_options_and_missing_calibration_are_config_errors(lenet300):
    with pytest.raises(ns.ConfigError, match="rounding must be one of nearest, gptq"):
        QuantizeWeights(rounding="adaround")
    with pytest.raises(ns.ConfigError, match="scales must be one of"):
        QuantizeWeights(scales="percentile")
    with pytest.raises(ns.ConfigError, match="group_size"):
        QuantizeWeights(group_size=-1)
    with pytest.raises(ns.ConfigError, match="needs calibration inputs"):
        ns.compress(lenet300, Plan([QuantizeWeights(bits=4, rounding="gptq")]), torch.zeros(1, 1, 28, 28))
