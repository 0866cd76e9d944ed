"""The realistic zoo: generated data, every export form imported as ONNX Runtime runs it, drop-in
ONNX written back, compact containers, and a trained model above its bar."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import nnshrink as ns  # noqa: E402
from nnshrink.io import describe, read_onnx_from_container, to_onnx  # noqa: E402
from nnshrink.io.onnx_import import onnx_to_torch  # noqa: E402
from nnshrink.plan import Plan  # noqa: E402
from nnshrink.techniques import QuantizeWeights  # noqa: E402
from nnshrink.zoo import realistic as R  # noqa: E402
from nnshrink.zoo.realistic import data as gen  # noqa: E402
from nnshrink.zoo.realistic import exports as E  # noqa: E402


def _session(proto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so)


def _outputs(out):
    return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _shapes(t):
    return [tuple(E.example(t).shape), *t.example_shapes]


@pytest.fixture(scope="module", params=R.NAMES)
def untrained(request):
    t = R.task(request.param, scale=0.01)
    torch.manual_seed(0)
    return t.build().eval(), t


def test_generators_are_seeded_and_shaped():
    a, la, na = gen.text_lines(4, seed=3)
    b, lb, nb = gen.text_lines(4, seed=3)
    assert a.shape == (4, 1, 32, 128) and np.array_equal(a, b) and np.array_equal(la, lb)
    assert ((la > 0).sum(1) == na).all() and a.min() >= 0 and a.max() <= 1
    assert not np.array_equal(a, gen.text_lines(4, seed=4)[0])
    lines, _, _ = gen.text_lines(3, seed=0, width=None)
    assert all(x.shape[1] == 32 and x.shape[2] % 4 == 0 for x in lines)
    pages, masks = gen.text_pages(2, seed=0)
    assert pages.shape == masks.shape == (2, 1, 64, 64) and 0 < masks.mean() < 0.8
    x, y = gen.shapes(12, seed=0)
    assert x.shape == (12, 3, 32, 32) and set(y.tolist()) <= set(range(len(gen.SHAPES)))
    f, lab, box = gen.faces(20, seed=0)
    assert f.shape == (20, 3, 12, 12) and (box[lab == 0] == 0).all() and (box[lab == 1, 2:] > box[lab == 1, :2]).all()
    w, pitch = gen.tones(5, seed=0)
    assert w.shape == (5, 1, 1024) and ((0 <= pitch) & (pitch < gen.PITCH_BINS)).all()


@pytest.mark.onnxruntime
def test_every_export_form_imports_as_onnx_runtime_runs_it(untrained):
    model, t = untrained
    for form in E.FORMS:
        proto = E.export(model, t, form)
        gm = onnx_to_torch(proto)
        sess = _session(proto)
        for shape in _shapes(t):
            x = torch.rand(shape)
            ref = sess.run(None, {"input": x.numpy()})
            with torch.no_grad():
                got = _outputs(gm(x))
            assert len(got) == len(ref)
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r, atol=1e-4, err_msg=f"{t.name} {form} {shape}")


def _io(proto):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return [(i.name, dims(i)) for i in proto.graph.input], [(o.name, dims(o)) for o in proto.graph.output]


@pytest.mark.onnxruntime
def test_onnx_written_back_drops_in_for_the_source(untrained):
    """Names, symbolic dims and metadata_props of the source, and its outputs at other batch sizes
    and lengths than the example's."""
    model, t = untrained
    src = E.export(model, t, "quirks")
    back = to_onnx(onnx_to_torch(src), E.example(t))
    assert _io(back) == _io(src)
    assert {p.key: p.value for p in back.metadata_props} == {p.key: p.value for p in src.metadata_props}
    a, b = _session(src), _session(back)
    again = onnx_to_torch(back)  # what nnshrink writes, nnshrink reads
    for shape in _shapes(t) + [(5, *_shapes(t)[0][1:])]:
        x = {"input": torch.rand(shape).numpy()}
        ref = a.run(None, x)
        for p, q in zip(ref, b.run(None, x)):
            np.testing.assert_allclose(q, p, atol=1e-4, err_msg=f"{t.name} {shape}")
        with torch.no_grad():
            for p, q in zip(ref, _outputs(again(torch.from_numpy(x["input"])))):
                np.testing.assert_allclose(q, p, atol=1e-4, err_msg=f"{t.name} {shape} read back")


@pytest.mark.onnxruntime
@pytest.mark.parametrize("name,form", [("crnn", "ts13"), ("transformer", "ts11"), ("dbnet", "ts13")])
def test_int8_weights_of_imported_models_are_stored_as_integers(tmp_path, name, form):
    """LSTM matrices, Linear layers that arrive as MatMul with a transposed initializer, and
    ConvTranspose: every matrix stored as an integer stream, bit-exact on reading."""
    t = R.task(name, scale=0.01)
    torch.manual_seed(0)
    src = E.export(t.build().eval(), t, form)
    res = ns.compress(onnx_to_torch(src), Plan([QuantizeWeights(bits=8)]), E.example(t))
    path = tmp_path / f"{name}.nsz"
    reports = ns.save(res.model, path, E.example(t))
    raw_big = [r.name for r in reports if r.kind == "raw" and r.count > 256]
    assert not raw_big, raw_big
    assert len(src.SerializeToString()) / path.stat().st_size > 3.3
    written = {i.name: i for i in to_onnx(res.model, E.example(t)).graph.initializer}
    stored = {i.name: i for i in read_onnx_from_container(path).graph.initializer}
    from onnx import numpy_helper

    for key, init in written.items():
        np.testing.assert_array_equal(numpy_helper.to_array(stored[key]), numpy_helper.to_array(init), err_msg=key)
    assert {r.name: r.kind for r in describe(path)} == {r.name: r.kind for r in reports}


@pytest.mark.onnxruntime
def test_pruned_float_layers_are_stored_sparse_and_exact(tmp_path):
    t = R.task("mbv3", scale=0.01)
    torch.manual_seed(0)
    model = t.build().eval()
    with torch.no_grad():
        w = model.fc1.weight
        w[torch.rand_like(w) < 0.7] = 0.0
        model.blocks[3].expand[0].weight.mul_(0.0)
    dense, sparse = tmp_path / "dense.nsz", tmp_path / "pruned.nsz"
    ns.save(t.build().eval(), dense, E.example(t))
    reports = {r.name: r for r in ns.save(model, sparse, E.example(t))}
    assert reports["fc1.weight"].kind == "sparse" and reports["fc1.weight"].bits_per_weight < 0.45 * 32
    back = ns.load(sparse)
    np.testing.assert_array_equal(back.fc1.weight.detach().numpy(), model.fc1.weight.detach().numpy())
    assert sparse.stat().st_size < dense.stat().st_size * 0.8


def test_pnet_trains_above_its_bar():
    t = R.task("pnet", scale=0.5)
    torch.manual_seed(0)
    model = R.fit(t.build(), t, steps=600, show_progress=False)
    assert t.evaluate(model) > 0.85
    assert 0.0 <= t.evaluate(t.build()) < 0.8  # untrained: the metric can fail


def test_metrics_score_what_they_name():
    blank_then_ab = torch.full((1, 6, 3), -9.0)
    for step, cls in enumerate([1, 1, 0, 2, 2, 0]):
        blank_then_ab[0, step, cls] = 0.0
    assert R.ctc_greedy(blank_then_ab) == [[1, 2]]
    assert R.char_accuracy(blank_then_ab, torch.tensor([[1, 2, 0]]), torch.tensor([2])) == 1.0
    assert R.char_accuracy(blank_then_ab, torch.tensor([[1, 1, 2]]), torch.tensor([3])) == pytest.approx(2 / 3)
    assert R.mask_iou(torch.tensor([0.9, 0.9, 0.1]), torch.tensor([1.0, 0.0, 0.0])) == 0.5
    with pytest.raises(ns.ConfigError, match="unknown realistic-zoo model"):
        R.task("resnet")


def test_imported_models_survive_torch_save_and_ns_save(tmp_path):
    import io

    t = R.task("crnn", scale=0.01)
    torch.manual_seed(0)
    gm = onnx_to_torch(E.export(t.build().eval(), t, "ts13"))
    x = torch.rand(2, 1, 32, 72)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)  # a whole module: only from a trusted file
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    assert ns.graph.signature.get(back) == ns.graph.signature.get(gm)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = onnx_to_torch(E.export(t.build().eval(), t, "ts13"))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    ns.save(gm, tmp_path / "m.nsz", E.example(t))
    again = ns.load(tmp_path / "m.nsz")
    with torch.no_grad():
        torch.testing.assert_close(again(x), gm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
