import shutil

import numpy as np
import pytest

from nnshrink import ConfigError, DataError
from nnshrink.data import load_dataset


def test_mnist_split_is_fixed_stratified_and_disjoint(mnist):
    sizes = {s: len(mnist.arrays(s)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    counts = np.bincount(mnist.arrays("test")[1], minlength=10)
    full = np.bincount(np.concatenate([mnist.arrays(s)[1] for s in sizes]), minlength=10)
    np.testing.assert_allclose(counts / 1000, full / 5000, atol=0.002)  # stratified
    keys = {s: {x.tobytes() for x in mnist.arrays(s)[0]} for s in sizes}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    x = mnist.arrays("train")[0]
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0


def test_split_is_reproducible_from_the_cache_and_from_scratch(mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path))
    fresh = load_dataset("mnist")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(fresh.arrays(split)[0], mnist.arrays(split)[0])
        np.testing.assert_array_equal(fresh.arrays(split)[1], mnist.arrays(split)[1])
    assert (tmp_path / "data").is_dir()


def test_digits():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8)
    assert [len(d.arrays(s)[1]) for s in ("train", "val", "test")] == [1077, 360, 360]
    assert 0.0 <= d.arrays("test")[0].min() and d.arrays("test")[0].max() <= 1.0


def test_loader_batches_and_seeded_shuffle(mnist):
    a = next(iter(mnist.loader("train", batch_size=32, shuffle=True, seed=3)))
    b = next(iter(mnist.loader("train", batch_size=32, shuffle=True, seed=3)))
    assert a[0].shape == (32, 1, 28, 28) and a[1].dtype.is_floating_point is False
    assert (a[1] == b[1]).all()


def test_user_npz_with_x_and_y(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 10, 10), dtype=np.uint8)
    y = np.repeat(np.arange(4), 50)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    d = load_dataset(tmp_path / "mine.npz")
    assert d.input_shape == (1, 10, 10) and d.num_classes == 4
    assert sum(len(d.arrays(s)[1]) for s in ("train", "val", "test")) == 200
    assert d.arrays("train")[0].max() <= 1.0


_NAN = np.full((20, 2, 2), 0.5)
_NAN[3, 1, 1] = np.nan


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 2, 2))}, "needs arrays 'x' and 'y'"),
    ({"x": np.zeros((4, 4)), "y": np.zeros(4, int)}, r"images must be .* layout='raw'"),
    ({"x": np.zeros((4, 2, 2)), "y": np.zeros(4)}, "labels"),
    ({"x": _NAN, "y": np.zeros(20, int)}, "1 values that are NaN or infinite"),
    ({"x": np.linspace(-1.5, 2.8, 80).reshape(20, 2, 2), "y": np.zeros(20, int)},
     r"span \[-1.5, 2.8\].*\[0, 1\] or 8-bit 0..255"),  # standardized images are not divided by 255
    ({"x": np.zeros((20, 2, 2)), "y": np.zeros(19, int)}, "20 samples but 'y' has 19 labels"),
    ({"x": np.zeros((20, 2, 2)), "y": np.arange(20) % 3, "classes": np.array(["a", "b"])},
     "labels go up to 2 but 'classes' names 2"),
    ({"x": np.zeros((20, 2, 2)), "y": np.zeros(20, int), "layout": np.array("nchw")}, "'layout' must be"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "bad.npz")


def test_float_images_in_0_255_are_8_bit_and_raw_inputs_keep_any_rank(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 4, 4)).astype(np.float64)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(50) % 5)
    np.testing.assert_allclose(np.sort(load_dataset(tmp_path / "f.npz").arrays("train")[0].ravel())[-1], 1.0, atol=1 / 255)
    signal = rng.normal(size=(50, 2, 64))  # 1-D signals, standardized: fed as saved
    np.savez(tmp_path / "s.npz", x=signal, y=np.arange(50) % 5, layout=np.array("raw"))
    d = load_dataset(tmp_path / "s.npz")
    assert d.input_shape == (2, 64) and d.arrays("train")[0].min() < 0
    np.savez(tmp_path / "v.npz", x=rng.normal(size=(50, 7)), y=np.arange(50) % 5, layout=np.array("raw"))
    assert load_dataset(tmp_path / "v.npz").input_shape == (7,)


def test_fingerprint_is_the_content_not_the_path(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, size=(60, 6, 6), dtype=np.uint8), np.arange(60) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "a.npz", x=x, y=y)
    same = load_dataset(tmp_path / "a.npz").fingerprint
    assert load_dataset(tmp_path / "other" / "a.npz").fingerprint == same
    x[0, 0, 0] ^= 1  # one pixel
    np.savez(tmp_path / "a.npz", x=x, y=y)
    assert load_dataset(tmp_path / "a.npz").fingerprint != same


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(tmp_path)
    assert d.classes == ("cat", "dog") and d.input_shape == (1, 12, 12)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(tmp_path)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DataError, match="mnist, digits, mnist10k"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits").arrays("holdout")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_mnist10k_from_the_npm_package():
    d = load_dataset("mnist10k")
    assert [len(d.arrays(s)[1]) for s in ("train", "val", "test")] == [7000, 1000, 2000]
    assert d.input_shape == (1, 28, 28)


def test_calibration_sources_take_every_form_a_caller_has():
    import torch

    from nnshrink.data.calib import as_source, fidelity

    lines = [torch.rand(2, 1, 32, w) for w in (40, 64, 96)]  # variable widths
    for calib, n in ((lines[0], 1), (lines, 3), ([(x, None) for x in lines], 3), (lambda: iter(lines), 3),
                     (np.zeros((4, 1, 8, 8), np.float32), 1),
                     (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(10, 3)), batch_size=4), 3)):
        batches = list(as_source(calib))
        assert len(batches) == n and all(isinstance(b if not isinstance(b, tuple) else b[0], torch.Tensor) for b in batches)
        assert len(list(as_source(calib))) == n  # re-iterable, a callable included
    with pytest.raises(ConfigError, match="calib must be"):
        list(as_source(42))
    with pytest.raises(ConfigError, match="calibration batch 1"):
        list(as_source([torch.zeros(1), "text"]))
    with pytest.raises(DataError, match="NaN"):
        list(as_source([torch.tensor([float("nan")])]))
    net = torch.nn.Linear(3, 4)
    same = fidelity(net, net, [torch.rand(5, 3)])
    assert same["output_sqnr_db"] is None and same["top1_agreement"] == 1.0 and same["max_abs_error"] == 0.0
