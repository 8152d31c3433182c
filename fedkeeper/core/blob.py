"""Safetensors blobs for models and updates, read and written with numpy alone, with checked metadata."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fedkeeper.core import validate

FORMAT = "fedkeeper/1"
# A header names tensors and carries small metadata: 16 MiB holds ~100,000 tensor entries.
MAX_HEADER = 16 * 1024 * 1024
MAX_DIMS = 16
MAX_DIM = 1 << 40
MAX_META_VALUE = 1 << 20

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class BlobError(ValueError):
    """A blob is not a valid FedKeeper safetensors file; the message says what is wrong."""


Weights = dict[str, np.ndarray]


@dataclass
class Blob:
    """Named tensors plus FedKeeper's metadata (kind, round, client, examples, metrics, timings)."""

    tensors: Weights
    meta: dict = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        """Examples the update was trained on (0 for a model)."""
        return int(self.meta.get("num_examples", 0))


def fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """Short hash of tensor names, shapes and dtypes: two blobs match iff they hold the same architecture."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{np.dtype(t.dtype).str}\n".encode())
    return h.hexdigest()[:16]


def _code(dtype: np.dtype) -> str:
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODES[dt]
    except KeyError:
        raise BlobError(f"dtype {dtype} cannot be stored; convert the tensor to float32") from None


def encode(tensors: Mapping[str, np.ndarray], meta: Mapping | None = None) -> bytes:
    """Serialise tensors and metadata to safetensors bytes (metadata values become JSON text)."""
    meta = dict(meta or {})
    meta.setdefault("format", FORMAT)
    meta["fingerprint"] = fingerprint(tensors)
    header: dict = {"__metadata__": {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        code = _code(arr.dtype)
        arr = arr.astype(_DTYPES[code], copy=False)
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    # One buffer, filled in place: encoding costs one model of memory, not three.
    out = bytearray(8 + len(head) + offset)
    struct.pack_into("<Q", out, 0, len(head))
    out[8:8 + len(head)] = head
    pos = 8 + len(head)
    for a in arrays:
        out[pos:pos + a.nbytes] = memoryview(a.reshape(-1)).cast("B")
        pos += a.nbytes
    return bytes(out) if len(out) < 1 << 16 else out


def _meta_value(text):
    """A metadata value: JSON text parsed with bounds, or the text itself if it is not JSON."""
    if not isinstance(text, str):
        raise BlobError("__metadata__ values must be strings (safetensors stores metadata as text)")
    try:
        return validate.loads(text, max_bytes=MAX_META_VALUE, max_depth=8, what="metadata value")
    except validate.NotJSON:
        return text  # plain text metadata (e.g. written by another safetensors tool)
    except validate.InputError as exc:
        raise BlobError(str(exc)) from None


def _trusted_value(text):
    """A metadata value of a blob the protocol wrote: plain JSON, or the text itself."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return text


def _whole(v) -> int:
    """A non-negative integer from a header field; anything else (floats, bools, text, huge values) is a defect."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_DIM * 16:
        raise ValueError(v)
    return v


@dataclass
class Header:
    """A blob's header alone: each tensor's dtype, shape and byte span (from the file's start), and its metadata."""

    entries: dict  # name -> (np.dtype, shape tuple, start, end), offsets from the start of the file
    meta: dict
    digest: str = ""  # sha256 of the header bytes (read_header only): two reads of one object agree iff this does

    @property
    def fingerprint(self) -> str:
        """The architecture fingerprint, as fingerprint() computes it from tensors."""
        h = hashlib.sha256()
        for name in sorted(self.entries):
            dtype, shape, _, _ = self.entries[name]
            h.update(f"{name}|{tuple(shape)}|{np.dtype(dtype).str}\n".encode())
        return h.hexdigest()[:16]


def _parse_header(head: bytes | memoryview, hlen: int, body_len: int, trusted: bool) -> Header:
    """Validate a header against the body's length; tensors must tile the body exactly."""
    try:
        header = validate.loads(head, max_bytes=MAX_HEADER, max_depth=4, what="header")
    except validate.InputError as exc:
        raise BlobError(f"{exc}; the blob is corrupt") from None
    if not isinstance(header, dict):
        raise BlobError("header is not a JSON object; the blob is corrupt")
    raw_meta = header.pop("__metadata__", {}) or {}
    if not isinstance(raw_meta, dict):
        raise BlobError("__metadata__ is not an object")
    spans = []
    entries: dict = {}
    for name, info in header.items():
        if len(name) > 256:
            raise BlobError(f"tensor name {name[:40]!r}... is over 256 characters")
        try:
            dtype = _DTYPES[info["dtype"]]
            if not isinstance(info["shape"], list) or len(info["shape"]) > MAX_DIMS:
                raise ValueError("shape")
            shape = tuple(_whole(s) for s in info["shape"])
            offsets = info["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError("offsets")
            start, end = (_whole(x) for x in offsets)
        except (KeyError, TypeError, ValueError):
            raise BlobError(f"tensor {name[:40]!r} has a malformed header entry (dtype, shape or data_offsets)") from None
        if any(s > MAX_DIM for s in shape):
            raise BlobError(f"tensor {name[:40]!r} has a dimension over {MAX_DIM}")
        count = math.prod(shape)
        if not (0 <= start <= end <= body_len) or end - start != count * dtype.itemsize:
            raise BlobError(f"tensor {name!r} spans bytes {start}..{end}, which do not fit the blob "
                            f"(body {body_len} bytes, shape {shape}); the blob is truncated or corrupt")
        spans.append((start, end))
        entries[name] = (dtype, shape, 8 + hlen + start, 8 + hlen + end)
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise BlobError("tensor data overlaps or leaves gaps; the blob is corrupt")
        pos = end
    if pos != body_len:
        raise BlobError(f"blob has {body_len - pos} trailing bytes after the last tensor; it is corrupt")
    meta = {k: (_trusted_value(v) if trusted else _meta_value(v)) for k, v in raw_meta.items()}
    return Header(entries=entries, meta=meta)


def _length(prefix: bytes | memoryview, total: int) -> int:
    if total < 8 or len(prefix) < 8:
        raise BlobError(f"blob is {total} bytes, too short to hold a header; it is truncated")
    (hlen,) = struct.unpack("<Q", bytes(prefix[:8]))
    if hlen > MAX_HEADER or 8 + hlen > total:
        raise BlobError(f"header length {hlen} exceeds the blob's {total} bytes; the blob is truncated or corrupt")
    return hlen


def read_header(read, total: int, trusted: bool = False) -> Header:
    """The header of a blob of `total` bytes, reading only its first bytes through read(start, end)."""
    hlen = _length(read(0, 8), total)
    head = read(8, 8 + hlen)
    if len(head) != hlen:
        raise BlobError("the header could not be read whole; the blob is truncated")
    h = _parse_header(head, hlen, total - 8 - hlen, trusted)
    h.digest = hashlib.sha256(bytes(head)).hexdigest()  # only the sharded fold compares reads of one object
    if "fingerprint" in h.meta and h.meta["fingerprint"] != h.fingerprint:
        raise BlobError("fingerprint in metadata does not match the tensors; the blob was altered")
    return h


def decode(data: bytes | memoryview, copy: bool = False, trusted: bool = False) -> Blob:
    """Parse safetensors bytes, validating the header against the buffer; raise BlobError on any defect.

    trusted: the blob was written by the protocol itself (a model, a partial sum), so its metadata values
    are parsed without the checks meant for what clients write (nesting scan, repeated keys).
    """
    buf = memoryview(data)
    hlen = _length(buf, len(buf))
    h = _parse_header(buf[8:8 + hlen], hlen, len(buf) - 8 - hlen, trusted)
    tensors: Weights = {}
    for name, (dtype, shape, start, end) in h.entries.items():
        arr = np.frombuffer(buf[start:end], dtype=dtype).reshape(shape)
        tensors[name] = arr.copy() if copy else arr
    if "fingerprint" in h.meta and h.meta["fingerprint"] != fingerprint(tensors):
        raise BlobError("fingerprint in metadata does not match the tensors; the blob was altered")
    return Blob(tensors=tensors, meta=h.meta)
