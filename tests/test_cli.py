import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnshrink import export_onnx, zoo
from nnshrink.cli import main

PLANS = Path(__file__).resolve().parents[1] / "examples" / "plans"


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_prints_analysis_and_accuracy(capsys, lenet5_trained):
    code, out, _ = _run(capsys, "demo", "--quick")
    assert code == 0
    assert "2,293,000" in out and "431,080" in out
    assert "held-out accuracy" in out and "container" in out


@pytest.mark.slow
def test_full_demo_ends_with_the_deep_compression_frontier(capsys, tmp_path, lenet5_trained):
    plot, page = tmp_path / "frontier.png", tmp_path / "report.html"
    code, out, _ = _run(capsys, "demo", "--plot", str(plot), "--html", str(page))
    assert code == 0
    assert "smaller than float32" in out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'data-plot="metric-bytes"' in page.read_text()


def test_analyze_json_schema(capsys):
    code, out, _ = _run(capsys, "analyze", "lenet5", "--json", "--groups")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "nnshrink.analysis/2"
    assert doc["totals"]["macs"] == 2_293_000
    assert {"edges", "groups"} <= set(doc["dependencies"])


def test_compress_writes_output_and_a_report_measured_from_it(capsys, tmp_path, lenet5_trained, mnist):
    out_file, report = tmp_path / "lenet5.nsz", tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", "lenet5", "--plan", str(PLANS / "fold-bn.yaml"),
                          "--out", str(out_file), "--report", str(report))
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["schema"] == "nnshrink.report/2"
    for side in ("before", "after"):
        assert set(doc[side]) >= {"accuracy", "macs", "params", "bytes"}
    assert doc["after"]["bytes"] == out_file.stat().st_size
    assert doc["after"]["macs"] == doc["before"]["macs"] == 2_293_000
    assert doc["after"]["accuracy"] == pytest.approx(zoo.accuracy(lenet5_trained, mnist, "test"))
    assert [row["name"] for row in doc["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(row["after"] is not None for row in doc["layers"])
    assert doc["output"]["format"] == "nsz"
    code, out, _ = _run(capsys, "evaluate", str(out_file))
    assert code == 0 and "test accuracy" in out


def test_int8_container_is_smaller_than_plain_int8_and_keeps_accuracy(capsys, tmp_path, lenet5_trained, mnist):
    out_file, report = tmp_path / "q.nsz", tmp_path / "q.json"
    code, _, err = _run(capsys, "compress", "lenet5", "--plan", str(PLANS / "int8-weights.yaml"),
                        "--out", str(out_file), "--report", str(report))
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["sizes"]["container"] == out_file.stat().st_size < doc["sizes"]["int8"] < doc["sizes"]["float32"]
    assert abs(doc["after"]["accuracy"] - doc["before"]["accuracy"]) <= 0.003
    fc1 = next(r for r in doc["layers"] if r["name"] == "fc1")["after"]["storage"]
    assert fc1["kind"] == "quantized" and fc1["ratio_to_entropy"] <= 1.01 and fc1["bits_per_weight"] < 8
    onnx_file = tmp_path / "q.onnx"
    code, out, _ = _run(capsys, "decode", str(out_file), "--onnx", str(onnx_file))
    assert code == 0 and onnx_file.exists()
    code, out, _ = _run(capsys, "evaluate", str(onnx_file))
    assert code == 0 and f"{doc['after']['accuracy']:.2%}" in out


def test_int8_ptq_plan_gives_a_qdq_model_onnx_runtime_runs_as_accurate(capsys, tmp_path, lenet5_trained, mnist):
    ort = pytest.importorskip("onnxruntime")
    out_file, report = tmp_path / "w8a8.nsz", tmp_path / "w8a8.json"
    code, _, err = _run(capsys, "compress", "lenet5", "--plan", str(PLANS / "int8.yaml"),
                        "--out", str(out_file), "--report", str(report))
    assert code == 0, err
    doc = json.loads(report.read_text())
    import hashlib

    assert doc["container_sha256"] == hashlib.sha256(out_file.read_bytes()).hexdigest()
    assert doc["after"]["accuracy"] >= doc["before"]["accuracy"] - 0.003
    assert doc["sizes"]["container"] < doc["sizes"]["int8"]
    conv2 = next(r for r in doc["layers"] if r["name"] == "conv2")["after"]["storage"]
    assert conv2["kind"] == "int" and conv2["bits_per_weight"] < 8
    onnx_file = tmp_path / "w8a8.onnx"
    assert _run(capsys, "decode", str(out_file), "--onnx", str(onnx_file))[0] == 0
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    x, y = mnist.tensors("test")
    pred = sess.run(None, {"input": x.numpy()})[0].argmax(1)
    assert abs(float((pred == y.numpy()).mean()) - doc["after"]["accuracy"]) <= 0.001


def test_quant_sensitivity_table_json_and_plot(capsys, tmp_path, lenet5_trained):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    code, out, err = _run(capsys, "quant-sensitivity", "lenet5", "--weight-bits", "4", "--json", str(js),
                          "--plot", str(png))
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert [r["layer"] for r in doc["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert "most sensitive" in out and png.read_bytes()[:4] == b"\x89PNG"


def _one_line_error(capsys, *argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_damaged_container_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.nsz"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "container" in _one_line_error(capsys, "evaluate", str(bad))
    assert ".nsz container" in _one_line_error(capsys, "compress", "lenet300", "--plan", str(PLANS / "fold-bn.yaml"),
                                               "--out", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"))


def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    assert "neither a zoo model" in _one_line_error(capsys, "analyze", str(tmp_path / "missing.onnx"))
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"hello")
    assert "not an ONNX model" in _one_line_error(capsys, "analyze", str(not_onnx))
    assert "unknown step" in _one_line_error(capsys, "compress", "lenet300", "--plan", str(_plan(tmp_path)),
                                             "--out", str(tmp_path / "o.nsz"), "--report", str(tmp_path / "r.json"))
    assert "--input-shape" in _one_line_error(capsys, "analyze", "lenet300", "--input-shape", "a,b")
    assert not (tmp_path / "o.nsz").exists()


def test_wrong_input_shape_for_the_data(capsys, tmp_path):
    class RGB(torch.nn.Module):
        input_shape = (3, 28, 28)

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    path = export_onnx(RGB().eval(), tmp_path / "rgb.onnx")
    line = _one_line_error(capsys, "evaluate", str(path))
    assert "(3, 28, 28)" in line and "(1, 28, 28)" in line


def test_compress_never_overwrites_its_input(capsys, tmp_path):
    path = export_onnx(zoo.build("lenet300").eval(), tmp_path / "m.onnx")
    before = path.read_bytes()
    line = _one_line_error(capsys, "compress", str(path), "--plan", str(PLANS / "fold-bn.yaml"),
                           "--out", str(path), "--report", str(tmp_path / "r.json"))
    assert "--out" in line and "is an input" in line and path.read_bytes() == before


@pytest.mark.parametrize("case", ["same-file", "folder", "no-folder", "plan"])
def test_compress_checks_every_output_before_any_work(capsys, tmp_path, case):
    plan = tmp_path / "p.yaml"
    plan.write_text((PLANS / "fold-bn.yaml").read_text())
    out, report = tmp_path / "o.nsz", tmp_path / "r.json"
    if case == "same-file":
        report = out
    elif case == "folder":
        report = tmp_path
    elif case == "no-folder":
        report = tmp_path / "missing" / "r.json"
    else:
        report = plan
    want = {"same-file": "are the same file", "folder": "is a folder", "no-folder": "does not exist",
            "plan": "is an input"}[case]
    line = _one_line_error(capsys, "compress", "lenet300", "--plan", str(plan), "--out", str(out),
                           "--report", str(report))
    assert want in line
    assert not out.exists() and plan.read_text() == (PLANS / "fold-bn.yaml").read_text()


def test_unsupported_onnx_op_is_one_line(capsys, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="choose")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[onnx.numpy_helper.from_array(np.array(0, np.float32), "zero")])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert "If (condition from a tensor value" in _one_line_error(capsys, "analyze", str(path))


def _plan(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nsteps:\n  - shrink: {}\n")
    return p


def _console(*argv, env=None):
    import os
    import signal
    import subprocess
    import sys

    # Ctrl-C's default disposition in the child, as in a terminal: a suite started in the
    # background of a script without job control inherits SIGINT ignored, and the command would
    # rightly go on ignoring it
    return subprocess.Popen([sys.executable, "-c", "import sys; from nnshrink.entry import main; sys.exit(main())",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_version_and_help_answer_without_importing_torch(capsys):
    import subprocess
    import sys

    from nnshrink import __version__

    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"nnshrink {__version__}"
    probe = ("import sys; from nnshrink.cli import main; code = main(['compress', '--help']); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr
    assert "--plan" in done.stdout


@pytest.mark.parametrize("after", [0.2, 6.0], ids=["while-starting", "while-training"])
def test_ctrl_c_exits_130_with_one_line(tmp_path, after):
    import signal
    import time

    proc = _console("train", "lenet5", "--retrain", env={"NNSHRINK_CACHE_DIR": str(tmp_path)})
    time.sleep(after)  # whenever it lands, the answer is the same
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


def test_a_plan_that_shrinks_nothing_says_so(capsys, tmp_path):
    plan = tmp_path / "empty.yaml"
    plan.write_text("version: 1\nsteps: []\n")
    code, out, err = _run(capsys, "compress", "lenet300", "--plan", str(plan), "--out", str(tmp_path / "o.nsz"),
                          "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "not smaller" in out and "x smaller" not in out


def test_labels_the_model_cannot_score_are_one_line(capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), y=np.arange(60) % 12)
    path = export_onnx(zoo.build("lenet5").eval(), tmp_path / "m.onnx")
    line = _one_line_error(capsys, "evaluate", str(path), "--data", str(tmp_path / "d.npz"))
    assert "labels up to 11" in line and "scores 10 classes" in line
    line = _one_line_error(capsys, "evaluate", "lenet5", "--data", str(tmp_path / "d.npz"))
    assert "nnshrink train lenet5 --data" in line  # never trained behind the user's back


@pytest.fixture(scope="module")
def dbnet_onnx(tmp_path_factory):
    """An untrained DB-style detector as a third-party ONNX file (symbolic batch, height, width)."""
    import onnx

    from nnshrink.zoo import realistic
    from nnshrink.zoo.realistic import exports

    t = realistic.task("dbnet", scale=0.02)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dbnet")
    onnx.save(exports.export(t.build().eval(), t, "ts13"), str(folder / "dbnet.onnx"))
    np.savez(folder / "calib.npz", input=t.calibration(24).numpy())
    return folder


def test_compress_with_unlabelled_calibration_reports_fidelity(capsys, tmp_path, dbnet_onnx):
    out_path, report = tmp_path / "d.nsz", tmp_path / "d.json"
    code, out, err = _run(capsys, "compress", str(dbnet_onnx / "dbnet.onnx"), "--plan", str(PLANS / "int8-weights.yaml"),
                          "--out", str(out_path), "--report", str(report), "--calib", str(dbnet_onnx / "calib.npz"))
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["before"]["accuracy"] is None and doc["after"]["metric"]["name"].startswith("output SQNR")
    assert doc["after"]["metric"]["value"] > 30 and doc["after"]["fidelity"]["max_abs_error"] < 0.05
    assert doc["sizes"]["float32"] / doc["sizes"]["container"] > 3.5 and "fidelity on 6 held-out" in out


def test_compress_with_the_users_metric_and_a_folder_of_varying_inputs(capsys, tmp_path, dbnet_onnx):
    folder = tmp_path / "pages"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (48, 96), (64, 40)]):
        np.save(folder / f"{i}.npy", np.random.default_rng(i).random((1, h, w), dtype=np.float32))  # one sample each
    user = tmp_path / "metric.py"
    user.write_text("import torch\n\ndef score(model):\n"
                    "    with torch.no_grad():\n        return float(model(torch.full((1, 1, 32, 32), 0.5)).mean())\n")
    out_path, report = tmp_path / "d.nsz", tmp_path / "d.json"
    code, out, err = _run(capsys, "compress", str(dbnet_onnx / "dbnet.onnx"), "--plan", str(PLANS / "int8-weights.yaml"),
                          "--out", str(out_path), "--report", str(report), "--calib", str(folder),
                          "--eval", f"{user}:score")
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["before"]["metric"]["name"] == f"{user}:score (yours)"
    assert abs(doc["after"]["metric"]["value"] - doc["before"]["metric"]["value"]) < 0.01


@pytest.mark.parametrize("case", ["eval-spec", "eval-missing", "npz-keys", "npy-rank", "calib-missing"])
def test_calibration_and_metric_mistakes_are_one_line(capsys, tmp_path, dbnet_onnx, case):
    args = ["compress", str(dbnet_onnx / "dbnet.onnx"), "--plan", str(PLANS / "int8-weights.yaml"),
            "--out", str(tmp_path / "o.nsz"), "--report", str(tmp_path / "r.json")]
    calib = str(dbnet_onnx / "calib.npz")
    if case == "eval-spec":
        args += ["--calib", calib, "--eval", "no_colon_here"]
        expected = "module:function"
    elif case == "eval-missing":
        args += ["--calib", calib, "--eval", "json:no_such_function"]
        expected = "has no function"
    elif case == "npz-keys":
        np.savez(tmp_path / "two.npz", a=np.zeros((2, 1, 8, 8), np.float32), b=np.zeros((2, 1, 8, 8), np.float32))
        args += ["--calib", str(tmp_path / "two.npz")]
        expected = "one key per input"
    elif case == "npy-rank":
        (tmp_path / "f").mkdir()
        np.save(tmp_path / "f" / "x.npy", np.zeros((8, 8), np.float32))
        args += ["--calib", str(tmp_path / "f")]
        expected = "does not fit a model input of rank 4"
    else:
        args += ["--calib", str(tmp_path / "nothing.npz")]
        expected = "no such file"
    code, out, err = _run(capsys, *args)
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o.nsz").exists()


def test_analyze_of_a_model_with_symbolic_sizes_names_input_shape(capsys, dbnet_onnx):
    code, _, err = _run(capsys, "analyze", str(dbnet_onnx / "dbnet.onnx"))
    assert code == 2 and "--input-shape" in err and "[N, 1, ?, ?]" in err
    code, out, _ = _run(capsys, "analyze", str(dbnet_onnx / "dbnet.onnx"), "--input-shape", "1,64,96")
    assert code == 0 and "(1, 1, 64, 96)" in out


def test_export_of_an_imported_model_keeps_its_interface(capsys, tmp_path, dbnet_onnx):
    import onnx

    target = tmp_path / "back.onnx"
    code, _, err = _run(capsys, "export", str(dbnet_onnx / "dbnet.onnx"), "--out", str(target))
    assert code == 2 and "--input-shape" in err and not target.exists()
    code, _, err = _run(capsys, "export", str(dbnet_onnx / "dbnet.onnx"), "--out", str(target), "--input-shape", "1,64,64")
    assert code == 0, err
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(target)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]


def test_compress_deploy_puts_velas_figures_and_the_tflite_accuracy_in_the_report(capsys, tmp_path, lenet5_trained,
                                                                                  mnist):
    pytest.importorskip("ethosu.vela")
    pytest.importorskip("ai_edge_litert")
    out_file, report, page = tmp_path / "q.nsz", tmp_path / "q.json", tmp_path / "q.html"
    plan = tmp_path / "npu.yaml"  # the bundled int8-npu plan, with the per-layer sensitivity measured
    plan.write_text((PLANS / "int8-npu.yaml").read_text().replace("target: npu", "target: npu\n      sensitivity: true"))
    code, out, err = _run(capsys, "compress", "lenet5", "--plan", str(plan), "--out", str(out_file),
                          "--report", str(report), "--deploy", "ethos-u55-128", "--html", str(page))
    assert code == 0, err
    d = json.loads(report.read_text())
    sens = d["quant_sensitivity"]
    assert [r["layer"] for r in sens["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    text = page.read_text()
    assert 'id="vela"' in text and 'data-plot="quant-sensitivity"' in text and "NPU cycles" in text
    deploy = d["deploy"]
    assert deploy["target"] == "ethos-u55-128" and deploy["cpu_operators"] == 0 and deploy["cycles_npu"] > 0
    assert deploy["weight_bytes_encoded"] > 0 and deploy["flash_bytes"] > 0 and not deploy["warnings"]
    assert abs(deploy["tflite_accuracy"] - d["after"]["accuracy"]) <= 0.001  # the same integers: one digit at most
    assert (tmp_path / "q_vela.tflite").read_bytes()[4:8] == b"TFL3" and "NPU cycles" in out
    code, _, err = _run(capsys, "compress", "lenet5", "--plan", str(PLANS / "fold-bn.yaml"), "--out",
                        str(tmp_path / "f.nsz"), "--report", str(tmp_path / "f.json"), "--deploy", "ethos-u55-128")
    assert code == 2 and "quantize step" in err and not (tmp_path / "f.nsz").exists()
