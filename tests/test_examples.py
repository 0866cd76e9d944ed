"""Every Python block of the README runs as written, in order, in one namespace (as a reader
pastes them), and every example plan does what its comment says on a zoo model."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, lenet5_trained):
    import nnshrink as ns

    assert len(BLOCKS) >= 4
    monkeypatch.chdir(tmp_path)
    ns.export_onnx(ns.zoo.build("lenet5").eval(), tmp_path / "model.onnx")  # "your" model file
    namespace: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the block that fails
            pytest.fail(f"README python block {i} fails: {type(exc).__name__}: {exc}")
    assert (tmp_path / "small.nsz").is_file() and (tmp_path / "q.nsz").is_file()


PLANS = ROOT / "examples" / "plans"


def _distinct_per_row(w):
    return max(len(set(row.tolist())) for row in w.detach().reshape(w.shape[0], -1))


def _run_plan(name, model, data, **kw):
    import torch

    import nnshrink as ns

    x = torch.zeros((2, *data.input_shape))
    plan = ns.Plan.from_yaml(PLANS / name)
    return ns.compress(model, plan, x, evaluate=ns.zoo.make_evaluator(data, "val"),
                       train=ns.zoo.make_trainer(data, show_progress=False),
                       calib=data.loader("train", batch_size=64, shuffle=True), **kw)


def test_every_example_plan_is_checked_below():
    assert {p.name for p in PLANS.glob("*.yaml")} == set(_CHECKS)


def _fold_bn(result, model, data):
    import torch
    from torch import nn

    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    x = data.tensors("val", 16)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)  # the same outputs


def _finetune(result, model, data):
    from torch import nn

    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert [r.step for r in result.steps] == ["fold_batchnorm", "finetune"]


def _weights(bits):
    def check(result, model, data):
        from nnshrink.techniques.sparsity import prunable_layers

        for name, layer in prunable_layers(result.model).items():
            assert _distinct_per_row(layer.weight) <= 2 ** bits - 1, name
    return check


def _int3_gptq(result, model, data):
    from nnshrink.techniques.weights import GroupQuant

    records = [m.nnshrink_records["weight"] for m in result.model.modules() if hasattr(m, "nnshrink_records")]
    assert records and all(isinstance(r, GroupQuant) and r.group_size == 32 and r.q.min() >= -3 and r.q.max() <= 3
                           for r in records)
    import nnshrink as ns

    assert ns.zoo.accuracy(result.model, data, "test") >= ns.zoo.accuracy(model, data, "test") - 0.006


def _int8(result, model, data):
    sim = result.model
    assert sim.is_quant_sim and sim.target == "ort-x86"
    assert all(sim.weight_quantizer(op.name).qmax == 63 for op in sim.layer_ops())  # capped at 7 bits


def _int8_npu(result, model, data):
    pytest.importorskip("ai_edge_litert")
    from nnshrink.io.tflite import litert_run, to_tflite

    sim = result.model
    assert sim.is_quant_sim and sim.target == "npu"
    assert all(sim.weight_quantizer(op.name).qmax == 127 for op in sim.layer_ops())  # full-range int8
    x, y = data.tensors("test", 500)
    tfl = float((litert_run(to_tflite(sim), x.numpy())[0].argmax(1) == y.numpy()).mean())
    assert tfl >= ns_accuracy(sim, data) - 0.002  # the int8 TFLite file holds the accuracy (1 of 500)


def ns_accuracy(model, data):
    import nnshrink as ns

    return ns.zoo.accuracy(model, data, "test", limit=500)


def _w4a8(result, model, data):
    sim = result.model
    assert all(sim.weight_quantizer(op.name).qmax == 7 for op in sim.layer_ops())
    assert result.steps[0].details["adaround"] and "val_qat" in result.steps[0].details


def _mixed(result, model, data):
    import nnshrink as ns

    chosen = result.steps[0].details["mixed_precision"]
    assert chosen["sqnr_db"] >= 30 and chosen["evaluations"] == 0
    assert set(chosen["bits"].values()) <= {4, 7, 32} and chosen["weight_bits"] < 7  # some layers at 4 bits
    assert ns.zoo.accuracy(result.model, data, "test") >= ns.zoo.accuracy(model, data, "test") - 0.005


def _deep_compression(result, model, data):
    from nnshrink.techniques import sparsity_of

    assert abs(sparsity_of(result.model) - 0.92) < 0.01
    for layer in (m for m in result.model.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1):
        assert len(set(layer.weight.detach().flatten().tolist())) <= 8  # 3 bits: 8 centroids, zero one of them


def _svd_cp(result, model, data):
    import torch

    import nnshrink as ns

    x = torch.zeros((1, *data.input_shape))
    ratio = ns.analyze(result.model, x).total_macs / ns.analyze(model, x).total_macs
    assert 0.49 <= ratio <= 0.50


def _astc(result, model, data):
    import torch

    import nnshrink as ns
    from nnshrink.techniques.astc import AstcRecord
    from nnshrink.techniques.records import record_of

    details = result.steps[0].details
    assert details["bits_per_weight"] <= 1.0 and details["retrain"] == "interleaved"
    layers = [m for m in result.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(record_of(m), AstcRecord) for m in layers)
    assert ns.zoo.accuracy(result.model, data, "test") >= ns.zoo.accuracy(model, data, "test") - 0.01


def _budget(result, model, data):
    import tempfile

    import nnshrink as ns

    d = result.steps[0].details
    assert d["target"] == "ratio=40x" and d["layers"]["fc3"]["sparsity"] <= 0.7
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.nsz"
        ns.save(result.model, path, ns.zoo.example_input(model).repeat(2, 1, 1, 1))
        assert path.stat().st_size <= ns.analyze(model, ns.zoo.example_input(model)).total_bytes / 40
    assert ns.zoo.accuracy(result.model, data, "test") >= ns.zoo.accuracy(model, data, "test") - 0.012


def _budget_macs(result, model, data):
    import torch

    import nnshrink as ns

    d = result.steps[0].details
    x = torch.zeros((1, *data.input_shape))
    assert ns.analyze(result.model, x).total_macs <= 0.5 * ns.analyze(model, x).total_macs
    assert d["channels"] and d["retrained"]  # the groups were offered (LeNet-300 takes ranks: SVD of a Linear wins)
    assert ns.zoo.accuracy(result.model, data, "test") >= ns.zoo.accuracy(model, data, "test") - 0.01


_CHECKS = {"astc.yaml": ("lenet300", _astc), "budget.yaml": ("lenet300", _budget), "budget-macs.yaml": ("lenet300", _budget_macs), "fold-bn.yaml": ("resnet8", _fold_bn), "finetune.yaml": ("resnet8", _finetune),
           "int4-weights.yaml": ("lenet300", _weights(4)), "int3-gptq.yaml": ("lenet300", _int3_gptq), "int8-weights.yaml": ("lenet300", _weights(8)),
           "int8.yaml": ("lenet300", _int8), "int8-npu.yaml": ("lenet300", _int8_npu), "w4a8-qat.yaml": ("lenet300", _w4a8),
           "mixed-precision.yaml": ("lenet300", _mixed),
           "deep-compression.yaml": ("lenet300", _deep_compression), "svd-cp-0.5.yaml": ("lenet300", _svd_cp)}


@pytest.mark.parametrize("name", sorted(_CHECKS))
def test_example_plan_does_what_its_comment_says(name, mnist):
    import torch

    import nnshrink as ns
    from nnshrink.testing import randomize_batchnorm

    arch, check = _CHECKS[name]
    if arch == "resnet8":  # batch norms to fold: untrained, with non-trivial statistics
        torch.manual_seed(0)
        model = randomize_batchnorm(ns.zoo.build(arch)).eval()
    else:
        model = ns.zoo.pretrained(arch, "mnist", show_progress=False)
    check(_run_plan(name, model, mnist), model, mnist)


def test_the_json_and_yaml_blocks_of_the_docs_are_what_nnshrink_reads_and_writes():
    import json

    import nnshrink as ns

    text = (ROOT / "docs" / "cli.md").read_text()
    docs = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    assert {d["schema"] for d in docs} >= {"nnshrink.analysis/2", "nnshrink.report/2", "nnshrink.deploy/1"}
    # the report example's derived parts are what nnshrink derives from its steps and sides
    from nnshrink.report import derive
    from nnshrink.report.html import render

    example = next(d for d in docs if d["schema"] == "nnshrink.report/2")
    again = derive(example)
    for key in ("run", "layers", "skipped", "frontier", "sensitivity", "quant_sensitivity"):
        assert again[key] == example[key], key
    assert "<svg" in render(again)
    plans = [ns.Plan.from_dict(yaml.safe_load(b)) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert plans and all(p.steps for p in plans)
