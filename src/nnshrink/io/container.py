"""The ``.nsz`` container: a whole compressed model in one safe, versioned, checksummed file.

Built on safetensors (no pickle, mmap-able, a JSON header) holding three uint8 tensors:

- ``__graph__``: the model's ONNX graph with the weights taken out (zlib-compressed protobuf);
- ``__index__``: our index (zlib-compressed JSON): for every weight its kind, dtype, shape,
  quantization parameters, and the offset, length and CRC-32 of each stored part;
- ``__blob__``: the stored parts back to back: entropy-coded integer streams
  (:mod:`nnshrink.codec`) and per-channel scales of quantized layers, raw tensors of the rest.

The safetensors metadata holds the format name, the version and the CRC-32 of the index and of
the graph. One tensor table entry per part would cost ~80 bytes of JSON each; packing them keeps
a MobileNet's container overhead to a few hundred bytes. See docs/FORMATS.md.

Reading checks everything before building anything, so a truncated, bit-flipped or foreign file
raises :class:`CorruptDataError` or :class:`FormatError` naming what failed.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnshrink.cache import atomic_write_bytes
from nnshrink.codec import CodecConfig, decode, encode, entropy_bits, stream_info
from nnshrink.errors import CorruptDataError, FormatError
from nnshrink.io.onnx_export import to_onnx
from nnshrink.io.onnx_import import onnx_to_torch
from nnshrink.techniques.records import Record, SparseRecord, StackedRecord, kind_class, records_of

FORMAT = "nnshrink.nsz"
VERSION = 3  # 2: adds the "int" kind (integer tensors of QDQ graphs); 3: records store themselves
_READABLE = ("1", "2", "3")
_GRAPH, _INDEX, _BLOB = "__graph__", "__index__", "__blob__"
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
           "int32": np.int32, "int16": np.int16, "uint16": np.uint16, "int8": np.int8, "uint8": np.uint8,
           "bool": np.bool_}
_CODED = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))
_CODED_MIN = 64  # smaller integer tensors (zero points) are stored raw
_SPARSE_MIN = 256  # float weights at least this large are tried as sparse when they hold zeros


@dataclass(frozen=True)
class StreamReport:
    """Per-weight storage figures, measured from the bytes written.

    Attributes:
        name: Weight name in the graph (``conv1.weight``).
        kind: ``quantized`` (entropy-coded stream) or ``raw``.
        count: Number of values.
        stored_bytes: Bytes of the stored tensors (stream and scales, or the raw tensor).
        bits_per_weight: ``stored_bytes * 8 / count``.
        entropy_bits: Order-0 entropy of the integers, in bits per weight (quantized only).
        ratio_to_entropy: Stream bytes over the entropy bound (quantized only).
        modes: Block modes used (quantized only).
        models: Stream-wide models used besides them (``prediction``, ``sign contexts``,
            ``mirrored table``; see ``StreamInfo.models``).
    """

    name: str
    kind: str
    count: int
    stored_bytes: int
    bits_per_weight: float
    entropy_bits: float | None
    ratio_to_entropy: float | None
    modes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**self.__dict__, "modes": list(self.modes), "models": list(self.models)}


def _crc(data: bytes) -> int:
    return zlib.crc32(data)


def _records(model: nn.Module) -> dict[str, tuple[Record, np.ndarray]]:
    """Parameter name -> (record, float value) for every parameter stored as a record (quantized,
    shared, ...), whose record still holds."""
    out = {}
    for name, module in model.named_modules():
        for param, record in records_of(module).items():
            key = f"{name}.{param}" if name else param
            out[key] = (record, getattr(module, param).detach().cpu().numpy())
    return out


# ONNX's gate order in the blocks of a recurrent layer's rows, as torch's gate indices: LSTM
# i o f c from torch's i f g o, GRU z r h from torch's r z n (the ONNX operator specification)
_GATES = ((nn.LSTM, (0, 3, 1, 2)), (nn.GRU, (1, 0, 2)), (nn.RNN, (0,)))


def _stacked_views(model: nn.Module) -> list[tuple[Record, np.ndarray]]:
    """(record, value) of each recurrent layer's stacked input and recurrent matrices, as the
    exporter may fold them into one constant ``W[direction, gates x hidden, input]`` with the
    gates reordered (it does where a matrix is small): a stack of the directions' records (a
    matrix without one as a float :class:`SparseRecord`), for layers with at least one record."""
    out = []
    for _, module in model.named_modules():
        order = next((g for t, g in _GATES if isinstance(module, t)), None)
        if order is None or getattr(module, "proj_size", 0):
            continue
        held = records_of(module)
        suffixes = [""] + (["_reverse"] if module.bidirectional else [])
        for layer in range(module.num_layers):
            for kind in ("ih", "hh"):
                names = [f"weight_{kind}_l{layer}{s}" for s in suffixes]
                if not any(n in held for n in names):
                    continue
                values = [getattr(module, n).detach().cpu().numpy().astype(np.float32) for n in names]
                hidden = values[0].shape[0] // len(order)
                rows = [g * hidden + j for g in order for j in range(hidden)]
                items = [held[n] if n in held else SparseRecord.of(v) for n, v in zip(names, values)]
                out.append((StackedRecord(items, rows), np.stack([v[rows] for v in values])))
    return out


def _stream_report(name: str, kind: str, ints: np.ndarray, stream: bytes, side_bytes: int) -> StreamReport:
    count = max(1, ints.size)
    ent = entropy_bits(ints) / count
    stored = len(stream) + side_bytes
    info = stream_info(stream, name)
    return StreamReport(name, kind, ints.size, stored, stored * 8 / count, ent,
                        len(stream) * 8 / count / ent if ent > 0 else None,
                        tuple(sorted(set(info.block_modes))), info.models)


def _view(array: np.ndarray, perm: list[int] | None) -> np.ndarray:
    return array if perm is None else np.ascontiguousarray(array.transpose(perm))


class _Blob:
    def __init__(self, codec: CodecConfig | None) -> None:
        self.data = bytearray()
        self.codec = codec

    def put(self, data: bytes) -> list[int]:
        part = [len(self.data), len(data), _crc(data)]
        self.data.extend(data)
        return part

    def put_array(self, array: np.ndarray, raw: bool = False) -> tuple[dict, bytes | None]:
        """Integer arrays entropy-coded (returned as the stream), others (and ``raw``) little-endian."""
        array = np.asarray(array)
        if not raw and array.dtype in _CODED and array.size >= _CODED_MIN:
            stream = encode(array, self.codec)
            return {"coded": self.put(stream)}, stream
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise FormatError(f"arrays of dtype {dtype} cannot be stored")
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        return {"raw": self.put(raw), "dtype": dtype, "shape": list(array.shape)}, None


def _put_record(blob: _Blob, name: str, record: Record, shape, perm) -> tuple[dict, StreamReport]:
    fields, arrays = record.to_parts()
    parts, stream, ints, side = {}, None, None, 0
    raw_parts = getattr(record, "raw_parts", ())  # parts a decoder reads as they are (ASTC blocks)
    whole = record.kind == StackedRecord.kind  # several items' streams: reported as one tensor's bytes
    for key, array in arrays.items():
        parts[key], coded = blob.put_array(array, raw=key in raw_parts)
        if coded is not None and stream is None and not whole:
            stream, ints = coded, np.asarray(array)
        else:
            side += (parts[key].get("coded") or parts[key]["raw"])[1]
    entry = {"kind": record.kind, "shape": list(shape), "fields": fields, "parts": parts}
    if perm is not None:
        entry["perm"] = perm
    if stream is None:
        report = StreamReport(name, record.kind, int(np.prod(shape)), side, side * 8 / max(1, int(np.prod(shape))),
                              None, None)
    else:
        report = _stream_report(name, record.kind, ints, stream, side)
    return entry, report


def record_bytes(record: Record) -> int:
    """Bytes the record's parts take in a container's blob (integer parts entropy-coded exactly as
    :func:`save` codes them): the codec's own count, so a search can price a setting without
    writing a file. The index entry and the graph come on top (a few dozen bytes per weight)."""
    blob = _Blob(None)
    raw_parts = getattr(record, "raw_parts", ())
    for key, array in record.to_parts()[1].items():
        blob.put_array(array, raw=key in raw_parts)
    return len(blob.data)


def float_bytes(array: np.ndarray) -> int:
    """Bytes :func:`save` spends on a float weight without a record: sparse where that is smaller."""
    array = np.asarray(array, np.float32)
    if array.size >= _SPARSE_MIN and np.count_nonzero(array) < 0.8 * array.size:
        return min(array.nbytes, record_bytes(SparseRecord.of(array)))
    return array.nbytes


def save(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None,
         codec: CodecConfig | None = None) -> list[StreamReport]:
    """Write ``model`` as an ``.nsz`` container, atomically.

    Every parameter with a record (:mod:`nnshrink.techniques.records`: quantized, shared, ...)
    is stored as the record's parts, integer ones entropy-coded; it is found by name, or by value
    where the exporter renamed or transposed it (a ``Linear`` on a sequence becomes a ``MatMul``
    with the transposed weight). Integer tensors of a QDQ graph are entropy-coded as they are; a
    float weight with enough exact zeros (a pruned layer left in float) is stored sparse
    (positions coded, the non-zeros as they are) where that is smaller; the rest raw.

    Returns:
        Per-weight storage figures, measured from the bytes written.
    """
    from onnx import numpy_helper
    from safetensors.numpy import save as st_save

    proto = to_onnx(model, example_input)
    records = _records(model)
    by_value: dict[tuple, tuple[Record, list[int] | None]] = {}
    for record, w in records.values():
        by_value.setdefault((w.shape, w.tobytes()), (record, None))
        if w.ndim == 2:
            by_value.setdefault((w.T.shape, np.ascontiguousarray(w.T).tobytes()), (record, [1, 0]))
    for record, w in _stacked_views(model):  # a recurrent layer's matrices folded into one constant
        by_value.setdefault((w.shape, w.tobytes()), (record, None))
    blob = _Blob(codec)
    index: dict[str, dict] = {}
    reports = []
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        found = (records[init.name][0], None) if init.name in records else \
            by_value.get((array.shape, array.tobytes()), (None, None))
        record, perm = found
        if record is not None and np.array_equal(_view(record.dequantize(), perm), array):
            index[init.name], report = _put_record(blob, init.name, record, array.shape, perm)
            reports.append(report)
            continue
        if array.dtype in _CODED and array.size >= _CODED_MIN:
            # integer tensors of a QDQ graph (int8 or uint8 weights): entropy-coded as they are
            stream = encode(array, codec)
            index[init.name] = {"kind": "int", "shape": list(array.shape), "dtype": str(array.dtype),
                                "stream": blob.put(stream)}
            reports.append(_stream_report(init.name, "int", array, stream, 0))
            continue
        if array.dtype == np.float32 and array.size >= _SPARSE_MIN and np.count_nonzero(array) < 0.8 * array.size:
            start = len(blob.data)
            entry, report = _put_record(blob, init.name, SparseRecord.of(array), array.shape, None)
            if len(blob.data) - start < array.nbytes:
                index[init.name] = entry
                reports.append(report)
                continue
            del blob.data[start:]  # not smaller than the raw tensor: stored raw below
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise FormatError(f"weight {init.name!r} has dtype {dtype}, which the container does not store")
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        index[init.name] = {"kind": "raw", "shape": list(array.shape), "dtype": dtype, "data": blob.put(raw)}
        reports.append(StreamReport(init.name, "raw", array.size, len(raw), len(raw) * 8 / max(1, array.size),
                                    None, None))
    del proto.graph.initializer[:]
    del proto.graph.value_info[:]  # shapes of intermediates: optional, and a third of the graph
    graph = zlib.compress(proto.SerializeToString(), 9)
    index_bytes = zlib.compress(json.dumps({"weights": index}, sort_keys=True, separators=(",", ":")).encode(), 9)
    data = bytes(blob.data)
    tensors = {_GRAPH: np.frombuffer(graph, np.uint8), _INDEX: np.frombuffer(index_bytes, np.uint8),
               _BLOB: np.frombuffer(data, np.uint8)}
    metadata = {"format": FORMAT, "version": str(VERSION), "index_crc": str(_crc(index_bytes)),
                "graph_crc": str(_crc(graph)), "blob_bytes": str(len(data))}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return reports


def _open(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load as st_load

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise FormatError(f"{path}: not an nnshrink container (too short)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8 or data[8:9] != b"{":
        raise FormatError(f"{path}: not an nnshrink container (no safetensors header)")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = st_load(data)
    except Exception as exc:  # safetensors and json raise several types on malformed input
        raise CorruptDataError(f"{path}: the container header or tensor table is damaged ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{path}: a safetensors file, but not an nnshrink container")
    return meta, tensors


def _part(blob: bytes, part: object, path: Path, what: str) -> bytes:
    if not (isinstance(part, list) and len(part) == 3 and all(isinstance(v, int) for v in part)):
        raise CorruptDataError(f"{path}: the index entry of {what} is malformed")
    offset, length, crc = part
    if offset < 0 or length < 0 or offset + length > len(blob):
        raise CorruptDataError(f"{path}: {what} lies outside the stored data (truncated file?)")
    data = blob[offset:offset + length]
    if _crc(data) != crc:
        raise CorruptDataError(f"{path}: {what} fails its checksum")
    return data


def _check(path: Path, meta: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, bytes, bytes]:
    """Verify version and checksums; return the index, the graph protobuf and the blob."""
    version = meta.get("version")
    if version not in _READABLE:
        raise FormatError(f"{path}: container version {version} is not supported (this reader: "
                          f"{', '.join(_READABLE)})")
    if set(tensors) != {_GRAPH, _INDEX, _BLOB} or any(t.dtype != np.uint8 for t in tensors.values()):
        raise CorruptDataError(f"{path}: the container holds {sorted(tensors)}, expected {_GRAPH}, {_INDEX}, {_BLOB}")
    index_bytes, graph = tensors[_INDEX].tobytes(), tensors[_GRAPH].tobytes()
    if str(_crc(index_bytes)) != meta.get("index_crc"):
        raise CorruptDataError(f"{path}: the container index fails its checksum")
    if str(_crc(graph)) != meta.get("graph_crc"):
        raise CorruptDataError(f"{path}: the model graph fails its checksum")
    blob = tensors[_BLOB].tobytes()
    if str(len(blob)) != meta.get("blob_bytes"):
        raise CorruptDataError(f"{path}: the weight data is {len(blob)} bytes, expected {meta.get('blob_bytes')}")
    try:
        doc = json.loads(zlib.decompress(index_bytes))
        weights = doc["weights"]
        graph = zlib.decompress(graph)
        if not isinstance(weights, dict):
            raise TypeError("weights is not a mapping")
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CorruptDataError(f"{path}: the container index or graph is damaged ({exc})") from exc
    return weights, graph, blob


def _array(blob: bytes, part: dict, path: Path, what: str) -> np.ndarray:
    if "coded" in part:
        return decode(_part(blob, part["coded"], path, what), name=f"{path}: {what}")
    dtype = np.dtype(_DTYPES[part["dtype"]]).newbyteorder("<")
    shape = tuple(int(d) for d in part["shape"])
    raw = _part(blob, part["raw"], path, what)
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise CorruptDataError(f"{path}: {what} has {len(raw)} bytes for shape {shape}")
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("=")).reshape(shape)


def _legacy_parts(entry: dict) -> tuple[dict, dict]:
    """A version 1-2 entry of kind quantized or codebook, as fields and part locations."""
    if entry["kind"] == "quantized":
        fields = {k: entry[k] for k in ("bits", "axis", "zero_point")}
        return fields, {"q": {"coded": entry["stream"]}, "scale": {"raw": entry["scale"], "dtype": "float32",
                                                                    "shape": [entry["scale"][1] // 4]}}
    return {"bits": entry["bits"]}, {"indices": {"coded": entry["stream"]},
                                      "codebook": {"raw": entry["codebook"], "dtype": "float32",
                                                   "shape": [entry["codebook"][1] // 4]}}


def _record(path: Path, name: str, entry: dict, blob: bytes) -> Record:
    cls = kind_class(entry["kind"])
    if cls is None:
        raise CorruptDataError(f"{path}: weight {name!r} has unknown kind {entry['kind']!r}")
    if "parts" in entry:
        fields, parts = entry["fields"], entry["parts"]
    else:
        fields, parts = _legacy_parts(entry)
    arrays = {key: _array(blob, part, path, f"{key} of {name!r}") for key, part in parts.items()}
    try:
        record = cls.from_parts(fields, arrays)
    except ValueError as exc:
        raise CorruptDataError(f"{path}: stored parts of {name!r} do not fit together ({exc})") from exc
    except CorruptDataError as exc:  # the record's own check of its parts (an ASTC block, say)
        raise CorruptDataError(f"{path}: weight {name!r}: {exc}") from exc
    return record


def _weights(path: Path, index: dict, blob: bytes) -> dict[str, np.ndarray]:
    out = {}
    for name, entry in index.items():
        try:
            shape = tuple(int(d) for d in entry["shape"])
            kind = entry["kind"]
            if kind == "raw":
                array = _array(blob, {"raw": entry["data"], "dtype": entry["dtype"], "shape": shape}, path,
                               f"weight {name!r}")
            elif kind == "int":
                array = decode(_part(blob, entry["stream"], path, f"stream {name!r}"), name=f"{path}: {name}")
                if str(array.dtype) != entry["dtype"]:
                    raise CorruptDataError(f"{path}: stream {name!r} does not match its recorded type {entry['dtype']}")
            else:
                array = _view(_record(path, name, entry, blob).dequantize(), entry.get("perm"))
            if array.shape != shape:
                raise CorruptDataError(f"{path}: stream {name!r} does not match its recorded shape {shape}")
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise CorruptDataError(f"{path}: the index entry of {name!r} is malformed ({exc})") from exc
        out[name] = array
    return out


def read_onnx_from_container(path: str | Path):
    """Rebuild the ONNX model (weights included) stored in a container.

    Raises:
        FileNotFoundError, FormatError, CorruptDataError: as for :func:`load`.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    meta, tensors = _open(path)
    index, graph, blob = _check(path, meta, tensors)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(graph)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CorruptDataError(f"{path}: the stored graph is not a valid ONNX model ({exc})") from exc
    for name, array in _weights(path, index, blob).items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return proto


def records(path: str | Path) -> dict[str, Record]:
    """The stored record (quantized, codebook, astc, ...) of every weight that has one, checksums
    verified, by weight name in the stored graph.

    Raises:
        FileNotFoundError, FormatError, CorruptDataError: as for :func:`load`.
    """
    path = Path(path)
    meta, tensors = _open(path)
    index, _, blob = _check(path, meta, tensors)
    out = {}
    for name, entry in index.items():
        if isinstance(entry, dict) and entry.get("kind") not in ("raw", "int", None):
            try:
                out[name] = _record(path, name, entry, blob)
            except (KeyError, TypeError, IndexError) as exc:
                raise CorruptDataError(f"{path}: the index entry of {name!r} is malformed ({exc})") from exc
    return out


def load(path: str | Path) -> nn.Module:
    """Load a container as a torch module whose weights are bit-identical to the ones saved.

    Raises:
        FileNotFoundError: No such file.
        FormatError: Not an nnshrink container, or a version this reader does not know.
        CorruptDataError: Truncated or damaged; the message names the stream and what failed.
    """
    return onnx_to_torch(read_onnx_from_container(path))


def describe(path: str | Path) -> list[StreamReport]:
    """Per-weight storage figures of a container, measured from its bytes."""
    path = Path(path)
    meta, tensors = _open(path)
    index, _, blob = _check(path, meta, tensors)
    reports = []
    for name, entry in index.items():
        count = int(np.prod(entry["shape"], dtype=np.int64))
        kind = entry["kind"]
        if kind == "raw":
            n = entry["data"][1]
            reports.append(StreamReport(name, "raw", count, n, n * 8 / max(1, count), None, None))
            continue
        if kind == "int":
            stream = _part(blob, entry["stream"], path, name)
            reports.append(_stream_report(name, kind, decode(stream, name=f"{path}: {name}"), stream, 0))
            continue
        parts = entry["parts"] if "parts" in entry else _legacy_parts(entry)[1]
        coded = [p["coded"] for p in parts.values() if "coded" in p] if kind != StackedRecord.kind else []
        side = sum((p.get("coded") or p["raw"])[1] for p in parts.values()) - (coded[0][1] if coded else 0)
        if not coded:
            reports.append(StreamReport(name, kind, count, side, side * 8 / max(1, count), None, None))
            continue
        stream = _part(blob, coded[0], path, name)
        reports.append(_stream_report(name, kind, decode(stream, name=f"{path}: {name}"), stream, side))
    return reports
