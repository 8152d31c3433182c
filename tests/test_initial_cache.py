"""The cache of seeded initial models: a hit equals the build, and anything else is rebuilt, never trusted."""

from __future__ import annotations

import numpy as np
import pytest

from fedkeeper import federation
from fedkeeper.core import blob
from tests.extras import mark


@pytest.fixture
def builds(monkeypatch, tmp_path):
    """Count real builds, replaced by a cheap seeded stand-in, with the cache in a fresh folder."""
    calls = []

    def fake_build(model, input_shape, num_classes, seed):
        calls.append((model, tuple(input_shape), num_classes, seed))
        rng = np.random.default_rng(seed)
        return {"hidden/kernel": rng.standard_normal((int(np.prod(input_shape)), 4)).astype(np.float32),
                "output/kernel": rng.standard_normal((4, num_classes)).astype(np.float32)}

    monkeypatch.setattr(federation, "build_initial_weights", fake_build)
    monkeypatch.setenv(federation.CACHE_ENV, str(tmp_path / "cache"))
    return calls


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "initial").glob("*.blob"))


def test_a_second_setup_of_the_same_model_reads_the_cache(builds, tmp_path):
    # Execute
    first = federation.initial_weights("nn", (8, 8), 10, 3)
    second = federation.initial_weights("nn", (8, 8), 10, 3)
    # Assert
    assert len(builds) == 1
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    assert len(_cache_files(tmp_path)) == 1


@pytest.mark.parametrize("other", [("cnn", (8, 8), 10, 3), ("nn", (8, 9), 10, 3), ("nn", (8, 8), 7, 3),
                                   ("nn", (8, 8), 10, 4)])
def test_any_other_model_shape_classes_or_seed_is_built_anew(builds, tmp_path, other):
    # Prepare
    federation.initial_weights("nn", (8, 8), 10, 3)
    # Execute
    federation.initial_weights(*other)
    # Assert
    assert builds == [("nn", (8, 8), 10, 3), other]
    assert len(_cache_files(tmp_path)) == 2


def test_the_key_follows_the_library_versions(monkeypatch):
    # Prepare: the same model drawn by another Keras release is a different model
    from importlib import metadata

    real = metadata.version
    before = federation.initial_key("nn", (8, 8), 10, 3)
    monkeypatch.setattr(metadata, "version", lambda d: "0.0.1" if d == "keras" else real(d))
    # Execute
    after = federation.initial_key("nn", (8, 8), 10, 3)
    # Assert
    assert before != after


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other_key", "not_a_model"])
def test_a_damaged_or_foreign_cache_file_is_rebuilt_and_replaced(builds, tmp_path, damage):
    # Prepare
    good = federation.initial_weights("nn", (8, 8), 10, 3)
    [path] = _cache_files(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_key":  # a whole model stored for another key, under this key's name
        path.write_bytes(blob.encode({"hidden/kernel": np.zeros((2, 2), np.float32)},
                                     {"kind": "initial-model", "cache_key": "0" * 32}))
    else:
        path.write_bytes(blob.encode(good, {"kind": "update", "cache_key": federation.initial_key("nn", (8, 8), 10, 3)}))
    # Execute
    again = federation.initial_weights("nn", (8, 8), 10, 3)
    # Assert
    assert len(builds) == 2
    assert all(np.array_equal(good[k], again[k]) for k in good)
    assert blob.decode(path.read_bytes()).meta["kind"] == "initial-model"
    assert len(_cache_files(tmp_path)) == 1


@pytest.mark.parametrize("value", ["off", "", "none", "OFF"])
def test_the_cache_can_be_turned_off(builds, monkeypatch, tmp_path, value):
    # Prepare
    monkeypatch.setenv(federation.CACHE_ENV, value)
    # Execute
    federation.initial_weights("nn", (8, 8), 10, 3)
    federation.initial_weights("nn", (8, 8), 10, 3)
    # Assert
    assert len(builds) == 2
    assert not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_written_only_costs_the_rebuild(builds, tmp_path, monkeypatch):
    # Prepare: the cache folder is a file, so nothing can be created under it
    (tmp_path / "blocked").write_text("x")
    monkeypatch.setenv(federation.CACHE_ENV, str(tmp_path / "blocked"))
    # Execute
    w = federation.initial_weights("nn", (8, 8), 10, 3)
    w2 = federation.initial_weights("nn", (8, 8), 10, 3)
    # Assert
    assert len(builds) == 2 and all(np.array_equal(w[k], w2[k]) for k in w)
    assert list(tmp_path.glob("**/*.tmp")) == [] and list(tmp_path.glob("**/.tmp-*")) == []


def test_the_default_cache_is_under_xdg_cache_home(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.delenv(federation.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # Execute / Assert
    assert federation.cache_dir() == tmp_path / "xdg" / "fedkeeper"


@pytest.mark.slow
@mark("tf")
def test_a_cached_initial_model_is_bit_identical_to_a_fresh_build(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv(federation.CACHE_ENV, str(tmp_path / "cache"))
    built = federation.initial_weights("nn", (8, 8), 10, 5)  # a real TensorFlow build, then stored
    # Execute
    [path] = (tmp_path / "cache" / "initial").glob("*.blob")
    cached = federation._cached_initial(tmp_path / "cache", f"initial/{path.name}",
                                        federation.initial_key("nn", (8, 8), 10, 5))
    # Assert
    assert cached is not None and cached.keys() == built.keys()
    assert all(cached[k].tobytes() == built[k].tobytes() and cached[k].shape == built[k].shape for k in built)
    assert blob.fingerprint(cached) == blob.fingerprint(built)
