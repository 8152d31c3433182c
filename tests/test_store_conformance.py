"""One store suite, run against the folder store, SeaweedFS, moto and fake-gcs-server."""

import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedkeeper.store import NotFound, open_store


def test_put_get_overwrite_delete(any_store):
    any_store.put("a/b.bin", b"one")
    assert any_store.get("a/b.bin") == b"one"
    any_store.put("a/b.bin", b"two")
    assert any_store.get("a/b.bin") == b"two"
    assert any_store.exists("a/b.bin") and not any_store.exists("a/c.bin")
    any_store.delete("a/b.bin")
    any_store.delete("a/b.bin")  # deleting a missing key is fine
    with pytest.raises(NotFound):
        any_store.get("a/b.bin")


def test_view_holds_the_same_bytes_and_survives_an_overwrite(any_store):
    any_store.put("v/blob.bin", b"first" * 1000)
    any_store.put("v/empty.bin", b"")
    view = any_store.get_view("v/blob.bin")
    any_store.put("v/blob.bin", b"second")  # objects are replaced, never rewritten under a reader
    assert bytes(view) == b"first" * 1000
    assert bytes(any_store.get_view("v/blob.bin")) == b"second"
    assert bytes(any_store.get_view("v/empty.bin")) == b""
    with pytest.raises(NotFound):
        any_store.get_view("v/never.bin")


def test_size_and_bounded_read_never_download_more_than_asked(any_store):
    any_store.put("s/big.bin", b"x" * 100_000)
    any_store.put("s/empty.bin", b"")
    assert any_store.size("s/big.bin") == 100_000 and any_store.size("s/empty.bin") == 0
    assert len(any_store.get_view("s/big.bin", max_bytes=1000)) in (1001, 100_000)  # ranged, or a free mmap
    assert bytes(any_store.get_view("s/big.bin", max_bytes=200_000)) == b"x" * 100_000
    assert bytes(any_store.get_view("s/empty.bin", max_bytes=10)) == b""
    with pytest.raises(NotFound):
        any_store.size("s/none.bin")
    with pytest.raises(NotFound):
        any_store.size("s")  # a prefix is not an object


def test_a_bounded_read_returns_what_fits_and_refuses_what_does_not(any_store):
    # Prepare
    from fedkeeper.store import TooLarge

    any_store.put("b/small.bin", b"y" * 1000)
    any_store.put("b/big.bin", b"x" * 100_000)
    any_store.put("b/empty.bin", b"")
    # Execute
    small = any_store.get_bounded("b/small.bin", 1000)
    empty = any_store.get_bounded("b/empty.bin", 10)
    with pytest.raises(TooLarge) as big:
        any_store.get_bounded("b/big.bin", 99_999)
    # Assert
    assert bytes(small) == b"y" * 1000 and bytes(empty) == b""
    assert big.value.size == 100_000 and big.value.limit == 99_999 and "b/big.bin" in str(big.value)
    with pytest.raises(NotFound):
        any_store.get_bounded("b/none.bin", 10)


def test_missing_key_raises_not_found(any_store):
    with pytest.raises(NotFound):
        any_store.get("nope/never.json")
    with pytest.raises(NotFound):
        any_store.get_versioned("nope/never.json")


def test_version_without_a_download_matches_the_versioned_read_and_changes_on_every_write(any_store):
    # Prepare
    any_store.put("ver/rec.json", b'{"n": 1}')
    # Execute
    v1 = any_store.version("ver/rec.json")
    raw, v1_read = any_store.get_versioned("ver/rec.json")
    any_store.put("ver/rec.json", b'{"n": 2}')  # same size: a version of size alone would miss it
    v2 = any_store.version("ver/rec.json")
    # Assert
    assert v1 is not None and v1 == v1_read and raw == b'{"n": 1}'
    assert v2 != v1 and any_store.get_versioned("ver/rec.json")[1] == v2
    assert any_store.version("ver/rec.json") == v2  # stable while nothing writes
    with pytest.raises(NotFound):
        any_store.version("ver/never.json")
    with pytest.raises(NotFound):
        any_store.version("ver")  # a prefix is not an object


def test_list_by_prefix_is_sorted_and_scoped(any_store):
    for k in ("rounds/000001/updates/b.safetensors", "rounds/000001/updates/a.safetensors",
              "rounds/000010/manifest.json", "models/000000.safetensors"):
        any_store.put(k, b"x")
    assert any_store.list("rounds/000001/updates/") == ["rounds/000001/updates/a.safetensors",
                                                        "rounds/000001/updates/b.safetensors"]
    assert any_store.list("rounds/") == ["rounds/000001/updates/a.safetensors", "rounds/000001/updates/b.safetensors",
                                         "rounds/000010/manifest.json"]
    assert "models/000000.safetensors" in any_store.list("")
    assert any_store.list("absent/") == []


def test_listing_paginates_past_1000_keys(any_store):
    names = [f"many/{i:05d}.json" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: any_store.put(k, b"{}"), names))
    assert any_store.list("many/") == names


def test_create_only(any_store):
    assert any_store.put_if_absent("rounds/000000/claim.json", b"first")
    assert not any_store.put_if_absent("rounds/000000/claim.json", b"second")
    assert any_store.get("rounds/000000/claim.json") == b"first"


def test_compare_and_swap(any_store):
    any_store.put("claim.json", b"v1")
    data, version = any_store.get_versioned("claim.json")
    assert data == b"v1"
    assert any_store.put_if_match("claim.json", b"v2", version)
    assert not any_store.put_if_match("claim.json", b"v3", version)  # stale version
    assert any_store.get("claim.json") == b"v2"
    assert not any_store.put_if_match("missing.json", b"x", version)


def _create(url, key, i, q):
    store = open_store(url)
    q.put(store.put_if_absent(key, f"writer-{i}".encode()))


def _swap(url, key, version, i, q):
    store = open_store(url)
    q.put(store.put_if_match(key, f"swapper-{i}".encode(), version))


def _race(target, args_for):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=args_for(i) + (q,)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [q.get(timeout=5) for _ in procs]


def test_create_only_race_between_8_processes(any_store):
    wins = _race(_create, lambda i: (any_store.url, "race/claim.json", i))
    assert wins.count(True) == 1 and wins.count(False) == 7
    assert any_store.get("race/claim.json").startswith(b"writer-")


def test_cas_race_between_8_processes(any_store):
    any_store.put("race/lease.json", b"expired")
    _, version = any_store.get_versioned("race/lease.json")
    wins = _race(_swap, lambda i: (any_store.url, "race/lease.json", version, i))
    assert wins.count(True) == 1
    assert any_store.get("race/lease.json").startswith(b"swapper-")


def test_large_object_round_trip(any_store):
    data = os.urandom(20 * 1024 * 1024)
    any_store.put("big/model.safetensors", data)
    assert any_store.get("big/model.safetensors") == data


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./x"])
def test_invalid_keys_are_rejected(any_store, key):
    with pytest.raises(ValueError):
        any_store.put(key, b"x")
