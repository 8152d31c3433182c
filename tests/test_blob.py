"""Blob format: round trips, interoperability with the safetensors package, and rejection of damaged blobs."""

import json
import struct

import numpy as np
import pytest

from fedkeeper.core import blob

from tests.conftest import make_weights


def test_round_trip_keeps_tensors_and_metadata():
    # Prepare
    w = make_weights(1)
    meta = {"kind": "update", "round": 3, "client": "123", "num_examples": 40, "metrics": {"loss": 0.5}}
    # Execute
    b = blob.decode(blob.encode(w, meta))
    # Assert
    assert b.tensors.keys() == w.keys()
    for k in w:
        np.testing.assert_array_equal(b.tensors[k], w[k])
        assert b.tensors[k].dtype == np.float32
    assert b.meta["client"] == "123" and isinstance(b.meta["client"], str)
    assert b.meta["round"] == 3 and b.meta["metrics"] == {"loss": 0.5}
    assert b.num_examples == 40
    assert b.meta["fingerprint"] == blob.fingerprint(w)


def test_interoperates_with_safetensors_package():
    st = pytest.importorskip("safetensors.numpy")
    w = make_weights(2)
    ours = blob.encode(w, {"kind": "model"})
    theirs = st.load(ours)
    for k in w:
        np.testing.assert_array_equal(theirs[k], w[k])
    back = blob.decode(st.save(w, metadata={"note": "plain"}))
    for k in w:
        np.testing.assert_array_equal(back.tensors[k], w[k])
    assert back.meta["note"] == "plain"


def test_fingerprint_changes_with_shape_and_name():
    w = make_weights(3)
    other = dict(w)
    other["output/bias"] = np.zeros(4, np.float32)
    renamed = {("x" + k): v for k, v in w.items()}
    assert blob.fingerprint(w) != blob.fingerprint(other)
    assert blob.fingerprint(w) != blob.fingerprint(renamed)
    assert blob.fingerprint(w) == blob.fingerprint(make_weights(99))


@pytest.mark.parametrize("damage", ["truncate_body", "truncate_header", "garbage_header", "trailing", "tamper_shape",
                                    "empty", "tamper_values_meta"])
def test_damaged_blob_is_rejected(damage):
    # Prepare
    good = blob.encode(make_weights(4), {"kind": "update"})
    (hlen,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + hlen])
    if damage == "truncate_body":
        bad = good[:-7]
    elif damage == "truncate_header":
        bad = good[:8 + hlen // 2]
    elif damage == "garbage_header":
        bad = good[:8] + b"\xff" * hlen + good[8 + hlen:]
    elif damage == "trailing":
        bad = good + b"\0" * 8
    elif damage == "tamper_shape":
        header["output/bias"]["shape"] = [4]
        h = json.dumps(header).encode()
        bad = struct.pack("<Q", len(h)) + h + good[8 + hlen:]
    elif damage == "empty":
        bad = b""
    else:  # header names a different architecture than the tensors: fingerprint mismatch
        header["__metadata__"]["fingerprint"] = json.dumps("0" * 16)
        h = json.dumps(header).encode()
        bad = struct.pack("<Q", len(h)) + h + good[8 + hlen:]
    # Execute / Assert
    with pytest.raises(blob.BlobError):
        blob.decode(bad)


def test_unsupported_dtype_names_the_fix():
    with pytest.raises(blob.BlobError, match="float32"):
        blob.encode({"x": np.array(["a"])})
