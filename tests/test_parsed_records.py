"""Records read per invocation are parsed once per warm process, and again whenever their bytes change."""

from __future__ import annotations

import json

import pytest

from fedkeeper.core import keys, rounds
from fedkeeper.functions import protocol
from fedkeeper.functions.context import parsed_record
from fedkeeper.store import NotFound


def _counting_parse():
    calls = []

    def parse(raw: bytes):
        calls.append(bytes(raw))
        return json.loads(raw)
    return parse, calls


def test_unchanged_bytes_are_parsed_once(federation):
    # Prepare
    federation.store.put_json("data/meta.json", {"num_classes": 3})
    parse, calls = _counting_parse()
    # Execute
    first = parsed_record(federation.store, "data/meta.json", parse)
    second = parsed_record(federation.store, "data/meta.json", parse)
    # Assert
    assert first == second == {"num_classes": 3}
    assert len(calls) == 1


def test_changed_bytes_are_parsed_again(federation):
    # Prepare
    federation.store.put_json("data/meta.json", {"num_classes": 3})
    parse, calls = _counting_parse()
    parsed_record(federation.store, "data/meta.json", parse)
    # Execute
    federation.store.put_json("data/meta.json", {"num_classes": 7})
    value = parsed_record(federation.store, "data/meta.json", parse)
    # Assert
    assert value == {"num_classes": 7}
    assert len(calls) == 2


def test_one_record_parsed_by_two_readers_gives_each_its_own_value(federation):
    # Prepare: the client reads the class count, the aggregator the example counts, from one record
    federation.store.put_json("data/meta.json", {"num_classes": 3, "client_examples": {"p-000": 12}})
    # Execute
    whole = parsed_record(federation.store, "data/meta.json", json.loads)
    known = protocol.known_examples(federation.store)
    again = parsed_record(federation.store, "data/meta.json", json.loads)
    # Assert
    assert whole["num_classes"] == 3 and again is whole
    assert known == {"p-000": 12}


def test_a_deleted_record_is_missing_even_after_a_cached_parse(federation):
    # Prepare
    federation.open_round(0)
    assert protocol.read_manifest(federation.store, 0) is not None
    # Execute
    federation.store.delete(keys.manifest(0))
    # Assert
    assert protocol.read_manifest(federation.store, 0) is None
    with pytest.raises(NotFound):
        parsed_record(federation.store, keys.manifest(0), rounds.Manifest.from_json)


def test_a_rewritten_manifest_is_read_anew(federation):
    # Prepare
    federation.open_round(0)
    before = protocol.read_manifest(federation.store, 0)
    # Execute: a test (or an operator) writes a different manifest under the same key
    m = rounds.Manifest(round=0, clients=before.clients[:2], model=before.model, deadline=before.deadline, quorum=1)
    federation.store.put(keys.manifest(0), rounds.dumps(m))
    after = protocol.read_manifest(federation.store, 0)
    # Assert
    assert after.ids == before.ids[:2]
    assert after.entry(before.ids[3]) is None


def test_manifest_lookups_by_client(federation):
    # Prepare
    m = rounds.Manifest(round=4, clients=[{"id": f"c{i}", "platform": "p", "data": ""} for i in (3, 1, 2, 0)],
                        model="models/000004.safetensors", deadline=0.0, quorum=1, fan_in=2)
    # Execute / Assert
    assert m.entry("c2") == {"id": "c2", "platform": "p", "data": ""}
    assert m.entry("c9") is None
    assert m.groups == [["c0", "c1"], ["c2", "c3"]]
    assert [m.group_of(c) for c in ("c0", "c1", "c2", "c3")] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="client 'c9' is not selected in round 4"):
        m.group_of("c9")


class _CountingStore:
    """The folder store, counting whole-object reads; `versions` False hides its cheap version lookup."""

    def __init__(self, inner, versions: bool = True):
        self.inner, self.versions, self.reads = inner, versions, []
        self.url = inner.url

    def version(self, key):
        return self.inner.version(key) if self.versions else None

    def get(self, key):
        self.reads.append(key)
        return self.inner.get(key)

    def get_versioned(self, key):
        self.reads.append(key)
        return self.inner.get_versioned(key)


def test_an_unchanged_record_is_not_downloaded_again_where_the_store_tells_its_version(federation):
    # Prepare
    federation.store.put_json("data/meta.json", {"num_classes": 3, "pad": "x" * 1000})
    store = _CountingStore(federation.store)
    parse, calls = _counting_parse()
    # Execute
    for _ in range(5):
        value = parsed_record(store, "data/meta.json", parse)
    # Assert: one download and one parse for five reads
    assert value["num_classes"] == 3
    assert store.reads == ["data/meta.json"] and len(calls) == 1


def test_a_record_rewritten_with_the_same_size_is_read_and_parsed_again(federation):
    # Prepare
    federation.store.put_json("data/meta.json", {"num_classes": 3})
    store = _CountingStore(federation.store)
    parse, calls = _counting_parse()
    parsed_record(store, "data/meta.json", parse)
    # Execute
    federation.store.put_json("data/meta.json", {"num_classes": 7})
    value = parsed_record(store, "data/meta.json", parse)
    # Assert
    assert value == {"num_classes": 7} and len(calls) == 2


def test_a_store_without_versions_compares_the_bytes_instead(federation):
    # Prepare
    federation.store.put_json("data/meta.json", {"num_classes": 3})
    store = _CountingStore(federation.store, versions=False)
    parse, calls = _counting_parse()
    # Execute
    parsed_record(store, "data/meta.json", parse)
    parsed_record(store, "data/meta.json", parse)
    federation.store.put_json("data/meta.json", {"num_classes": 4})
    value = parsed_record(store, "data/meta.json", parse)
    # Assert: every call reads the bytes, but only changed bytes are parsed
    assert len(store.reads) == 3 and len(calls) == 2 and value == {"num_classes": 4}


def test_a_missing_record_still_raises_not_found(federation):
    with pytest.raises(NotFound):
        parsed_record(_CountingStore(federation.store), "data/never.json", json.loads)


def test_the_config_is_not_downloaded_again_while_federation_json_is_unchanged(federation):
    # Prepare
    from fedkeeper.functions.context import Context

    store = _CountingStore(federation.store)
    first = Context(store=store).config()
    # Execute
    again = Context(store=store).config()
    raw = federation.store.get_json(keys.FEDERATION)
    raw["rounds"] = raw["rounds"] + 1
    federation.store.put_json(keys.FEDERATION, raw)
    changed = Context(store=store).config()
    # Assert
    assert again is first and store.reads.count(keys.FEDERATION) == 2
    assert changed.rounds == first.rounds + 1
