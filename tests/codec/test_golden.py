"""Known-good streams: this version reads them, and writes the same bytes again.

If the decode test fails, the format changed: bump ``stream.VERSION``, keep a reader for the old
version, and add new golden files beside the old ones. If only the encode test fails, the
encoder now chooses differently (still a valid stream): check the new bytes decode, then
regenerate the golden stream.
"""

from pathlib import Path

import numpy as np
import pytest

from nnshrink.codec import CodecConfig, decode, encode, stream_info

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NAMES = sorted(p.stem for p in GOLDEN.glob("*.nsw"))


def test_golden_files_exist():
    assert len(NAMES) >= 4


@pytest.mark.parametrize("name", NAMES)
def test_golden_stream_decodes_to_its_array(name):
    expected = np.load(GOLDEN / f"{name}.npy", allow_pickle=False)
    out = decode((GOLDEN / f"{name}.nsw").read_bytes())
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_encoder_writes_the_golden_bytes(name):
    """With the features of the golden stream's version (mirrored tables came with version 3),
    the encoder writes its bytes again."""
    array = np.load(GOLDEN / f"{name}.npy", allow_pickle=False)
    golden = (GOLDEN / f"{name}.nsw").read_bytes()
    assert encode(array, CodecConfig(block_size=256, mirror=golden[2] >= 3)) == golden


def test_golden_streams_cover_every_block_mode_family():
    modes = set()
    for name in NAMES:
        modes |= set(stream_info((GOLDEN / f"{name}.nsw").read_bytes()).block_modes)
    assert {"rans"} <= modes and len(modes) >= 3, modes


def test_golden_streams_cover_every_stream_version():
    versions = {(GOLDEN / f"{name}.nsw").read_bytes()[2] for name in NAMES}
    assert versions == {1, 2, 3}


def test_golden_streams_cover_every_model():
    infos = [stream_info((GOLDEN / f"{name}.nsw").read_bytes()) for name in NAMES]
    assert any(i.predictor for i in infos) and any(i.sign_contexts for i in infos)
    assert any(i.mirrored for i in infos)
