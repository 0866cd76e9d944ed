import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nnshrink import ConfigError, CorruptDataError, FormatError
from nnshrink.codec import CodecConfig, decode, encode, entropy_bits, stream_info

DTYPES = [np.int8, np.uint8, np.int16, np.uint16]
RNG = np.random.default_rng(0)


def _laplace(n, scale=20, dtype=np.int8, rng=RNG):
    info = np.iinfo(dtype)
    return np.clip(np.round(rng.laplace(0, scale, n)), info.min, info.max).astype(dtype)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40)))
def test_round_trip_any_dtype_and_shape(array):
    data = encode(array)
    out = decode(data)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33,), (100,), (511, 350), (3, 1, 5, 5), (0,), (2, 0, 3), ()])
@pytest.mark.parametrize("block_size", [64, 8192])
def test_round_trip_grid(dtype, shape, block_size):
    info = np.iinfo(dtype)
    array = RNG.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    if array.size > 10:
        array.flat[::3] = 0  # sparse-ish and extreme values in one go
        array.flat[1] = info.min
        array.flat[2] = info.max
    np.testing.assert_array_equal(decode(encode(array, CodecConfig(block_size=block_size))), array)


@pytest.mark.parametrize("mode", ["raw", "rice", "rans", "zero-run", "palette"])
def test_each_mode_round_trips_when_forced(mode):
    array = _laplace(20_000, 6)
    array[RNG.random(array.size) < 0.6] = 0
    data = encode(array, CodecConfig(block_size=1024, modes={mode}))
    assert mode in stream_info(data).block_modes
    np.testing.assert_array_equal(decode(data), array)


def test_modes_are_chosen_by_content():
    dense = _laplace(50_000)
    assert set(stream_info(encode(dense)).block_modes) == {"rans"}
    assert set(stream_info(encode(np.zeros(5000, np.int8))).block_modes) == {"const"}
    few = RNG.choice(np.array([-120, -3, 5, 110], np.int8), 3000)
    assert set(stream_info(encode(few, CodecConfig(modes={"raw", "palette"}))).block_modes) == {"palette"}
    noise = RNG.integers(-128, 128, 700).astype(np.int8)
    assert stream_info(encode(noise)).block_modes == ("stored",)


def test_close_to_the_entropy_bound():
    for array, bound in [(_laplace(16_384), 1.01), (_laplace(1_000_000), 1.01)]:
        assert len(encode(array)) <= bound * entropy_bits(array) / 8
    pruned = _laplace(100_000)
    pruned[RNG.random(pruned.size) < 0.5] = 0
    assert len(encode(pruned)) <= 1.02 * entropy_bits(pruned) / 8


@pytest.mark.parametrize("n", [1, 10, 100, 500, 1023])
def test_small_tensors_cost_at_most_raw_plus_16_bytes(n):
    noise = RNG.integers(-128, 128, n).astype(np.int8).reshape(-1, 1, 1, 1)
    assert len(encode(noise)) <= n + 16


def test_input_is_not_modified():
    array = _laplace(3000)
    copy = array.copy()
    encode(array)
    np.testing.assert_array_equal(array, copy)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="int8, uint8, int16 or uint16"):
        encode(np.zeros(4, np.float32))
    with pytest.raises(ConfigError, match="power of two"):
        CodecConfig(block_size=1000)
    with pytest.raises(ConfigError, match="mirror must be True or False"):
        CodecConfig(mirror="no")
    with pytest.raises(ConfigError, match="unknown codec modes"):
        CodecConfig(modes={"huffman"})


def test_corruption_is_detected_and_named():
    data = bytearray(encode(_laplace(20_000), CodecConfig(block_size=4096)))
    with pytest.raises(CorruptDataError, match="checksum"):
        decode(bytes(data[:-10]))
    data[len(data) // 2] ^= 0x10
    with pytest.raises(CorruptDataError, match="checksum"):
        decode(bytes(data))
    with pytest.raises(FormatError, match="not an nnshrink weight stream"):
        decode(b"PK\x03\x04 a zip file")
    with pytest.raises(CorruptDataError, match="truncated"):
        decode(b"NW")


def _reseal(body: bytes) -> bytes:
    import struct
    import zlib

    return body + struct.pack("<I", zlib.crc32(body))


def test_structural_checks_behind_a_valid_checksum():
    """A crafted stream whose checksum is right must still fail cleanly, never crash."""
    good = encode(_laplace(5000), CodecConfig(block_size=1024))
    body = bytearray(good[:-4])
    body[2] = 9  # version
    with pytest.raises(FormatError, match="version 9"):
        decode(_reseal(bytes(body)))
    for cut in (30, 200, len(body) - 3):
        with pytest.raises(CorruptDataError):
            decode(_reseal(bytes(good[:cut])))
    huge = bytearray(good[:-4])
    huge[4:6] = b"\xff\x7f"  # first dimension becomes ~16K: more values than the blocks hold
    with pytest.raises(CorruptDataError):
        decode(_reseal(bytes(huge)))


def _smooth(n, rng=RNG, dtype=np.int8):
    """Correlated neighbours, like the rows of a trained fully connected layer."""
    x = np.convolve(rng.laplace(0, 30, n + 8), np.ones(8) / 3, mode="valid")[:n]
    info = np.iinfo(dtype)
    return np.clip(np.round(x), info.min, info.max).astype(dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("block_size", [64, 1024, 8192])
def test_prediction_is_used_where_neighbours_correlate_and_round_trips(dtype, block_size):
    array = _smooth(30_000, dtype=dtype) if dtype == np.int8 else (_smooth(30_000).astype(np.int16) + 128).astype(np.uint8)
    array[5] = np.iinfo(dtype).min  # the largest residuals a block can hold
    array[6] = np.iinfo(dtype).max
    array[7] = np.iinfo(dtype).min
    data = encode(array, CodecConfig(block_size=block_size))
    info = stream_info(data)
    assert info.predictor != 0 and data[2] == (3 if info.mirrored else 2)  # 2 or 3 only with a model
    np.testing.assert_array_equal(decode(data), array)
    plain = encode(array, CodecConfig(block_size=block_size, neighbours=False, mirror=False))
    assert plain[2] == 1 and stream_info(plain).predictor == 0
    assert len(data) < (0.9 if dtype == np.int8 else 0.98) * len(plain)  # uint8: no centring, so less
    for mode in ("raw", "rice", "rans", "zero-run", "palette"):
        forced = encode(array[:3000], CodecConfig(block_size=block_size, modes={mode}))
        np.testing.assert_array_equal(decode(forced), array[:3000])


def _pruned_runs(n, rng=RNG):
    """Zeros in runs and signs that follow their neighbour, as in a pruned, trained layer."""
    x = _smooth(n, rng=rng)
    keep = np.repeat(rng.random(n // 16 + 1) < 0.4, 16)[:n]
    return np.where(keep, x, 0).astype(np.int8)


@pytest.mark.parametrize("block_size", [64, 1024, 8192])
def test_sign_contexts_are_used_for_pruned_neighbours_and_round_trip(block_size):
    array = _pruned_runs(40_000)
    array[100:103] = (-128, 127, -128)
    data = encode(array, CodecConfig(block_size=block_size))
    info = stream_info(data)
    assert info.sign_contexts and info.predictor == 0 and data[2] == 2 and "rans" in info.block_modes
    assert info.models == ("sign contexts",)
    np.testing.assert_array_equal(decode(data), array)
    plain = encode(array, CodecConfig(block_size=block_size, neighbours=False))
    assert len(data) < 0.95 * len(plain)
    one_sign = np.abs(array)  # a context no value falls in (negative) still round-trips
    np.testing.assert_array_equal(decode(encode(one_sign, CodecConfig(block_size=block_size))), one_sign)


def test_neighbour_models_are_not_used_where_they_do_not_pay():
    for array in (_laplace(50_000), _smooth(50_000).astype(np.int16), _smooth(500)):  # independent, 16-bit, small
        info = stream_info(encode(array))
        assert info.predictor == 0 and not info.sign_contexts
    sparse = _smooth(50_000)
    sparse[RNG.random(sparse.size) < 0.5] = 0  # pruning at random breaks the prediction
    assert stream_info(encode(sparse)).predictor == 0
    assert not stream_info(encode(_pruned_runs(40_000), CodecConfig(modes={"rice", "raw"}))).sign_contexts


def test_bad_model_byte_is_reported():
    good = encode(_smooth(5000), CodecConfig(block_size=1024, mirror=False))
    assert good[2] == 2
    for bad in (0, 17, 0x2F, 0x80 | 4, 0x40 | 4):  # none, t > 16, t < -16, mirrored in v2, prediction and contexts
        body = bytearray(good[:-4])
        body[4] = bad
        with pytest.raises(CorruptDataError, match="model byte"):
            decode(_reseal(bytes(body)))
    v3 = encode(_mirrorable(), CodecConfig(block_size=256))
    assert v3[2] == 3
    for bad in (0, 4, 0x80 | 0x40, 0x80 | 17):  # not mirrored, prediction alone, with contexts, t > 16
        body = bytearray(v3[:-4])
        body[4] = bad
        with pytest.raises(CorruptDataError, match="model byte"):
            decode(_reseal(bytes(body)))
    as_uint8 = bytearray(v3[:-4])
    as_uint8[3] = (as_uint8[3] & ~7) | 2  # a mirrored table is for int8 only
    with pytest.raises(CorruptDataError, match="model byte"):
        decode(_reseal(bytes(as_uint8)))


def _mirrorable(rng=RNG):
    """A small pruned tensor, symmetric about 0 (like a pruned depthwise conv): its table is the
    stream's largest cost, and a mirrored one halves it."""
    x = np.clip(np.round(rng.laplace(0, 30, 1200)), -127, 127)
    x[np.abs(x) < 25] = 0
    return x.astype(np.int8)


@pytest.mark.parametrize("block_size", [256, 1024, 8192])
def test_mirrored_table_is_used_where_it_is_smaller_and_round_trips(block_size):
    array = _mirrorable()
    array[:3] = (-128, 127, -127)  # the extremes: the mirrored table spans -128 .. 128
    data = encode(array, CodecConfig(block_size=block_size))
    info = stream_info(data)
    assert info.mirrored and data[2] == 3 and "rans" in info.block_modes
    assert info.models == ("mirrored table",)
    np.testing.assert_array_equal(decode(data), array)
    plain = encode(array, CodecConfig(block_size=block_size, mirror=False))
    assert not stream_info(plain).mirrored and plain[2] == 1 and len(data) < len(plain)
    for skewed in (np.abs(array), (array.astype(np.int16) + 128).astype(np.uint8)):  # one-sided, unsigned
        assert not stream_info(encode(skewed, CodecConfig(block_size=block_size))).mirrored
    assert not stream_info(encode(_laplace(1200, 4))).mirrored  # a Rice code beats any table here
    predicted = _smooth(30_000)  # prediction residuals may use a mirrored table too
    both = encode(predicted, CodecConfig(block_size=1024))
    np.testing.assert_array_equal(decode(both), predicted)


def test_corrupt_mirrored_table_is_reported():
    data = encode(_mirrorable(), CodecConfig(block_size=256))
    info = stream_info(data)
    assert info.mirrored and info.shape == (1200,) and info.table_bytes < 128
    # magic, version, packed, model byte, shape (2-byte varint), block size, table length: then
    # the half table, whose first bits hold zigzag(tmin)
    table_at = 2 + 1 + 1 + 1 + 2 + 1 + 1
    body = bytearray(data[:-4])
    body[table_at] ^= 0x02  # tmin becomes 1: a mirrored table must start at 0
    with pytest.raises(CorruptDataError, match="frequency table"):
        decode(_reseal(bytes(body)))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["plain", "predicted", "sign contexts", "mirrored"]))
def test_fuzzed_streams_raise_only_our_errors(data, model):
    rng = np.random.default_rng(1)
    array = {"plain": lambda: _laplace(3000, 10, rng=rng), "predicted": lambda: _smooth(3000, rng=rng),
             "sign contexts": lambda: _pruned_runs(3000, rng=rng), "mirrored": lambda: _mirrorable(rng=rng)}[model]()
    base = bytearray(encode(array, CodecConfig(block_size=512)))
    info = stream_info(bytes(base))
    assert (info.predictor != 0, info.sign_contexts) == (model == "predicted", model == "sign contexts")
    assert info.mirrored or model != "mirrored"
    body = base[:-4]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    try:
        out = decode(_reseal(bytes(body)))  # resealed: only the structural checks stand guard
    except (CorruptDataError, FormatError):
        return
    assert out.dtype == np.int8
