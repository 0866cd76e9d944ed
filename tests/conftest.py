import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Datasets and trained checkpoints go to one cache per test session (or NNSHRINK_TEST_CACHE)."""
    path = os.environ.get("NNSHRINK_TEST_CACHE") or str(tmp_path_factory.mktemp("nnshrink-cache"))
    old = os.environ.get("NNSHRINK_CACHE_DIR")
    os.environ["NNSHRINK_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("NNSHRINK_CACHE_DIR", None)
    else:
        os.environ["NNSHRINK_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def mnist():
    from nnshrink.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="session")
def lenet5_trained(mnist):
    from nnshrink import zoo

    return zoo.pretrained("lenet5", "mnist", show_progress=False)
