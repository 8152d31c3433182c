"""The folder store's object events: the notification rule, the per-process event logs and their reader."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from fedkeeper.core import config, keys
from fedkeeper.runtime.local import LocalRuntime
from fedkeeper.store import StoreError
from fedkeeper.store.local import EVENT_LOG, EventReader, LocalStore

UPDATE = keys.update(0, "p-000")


def _write_update_in_child(root: str, key: str) -> None:
    LocalStore(root).put(key, b"update")


def test_only_keys_matching_the_rule_fire_events(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    reader = EventReader(store.enable_events(prefix="rounds/", suffix=".safetensors"))
    # Execute
    store.put_json(keys.running(0, "p-000"), {"attempt": 1})
    store.put(UPDATE, b"update")
    store.put_json(keys.client_timings(0, "p-000"), {"upload_s": 0.1})
    store.put("models/000001.safetensors", b"model")
    events = reader.drain()
    # Assert
    assert [e["key"] for e in events] == [UPDATE]


def test_rule_written_by_one_store_applies_to_another_process_store(tmp_path):
    # Prepare: the runtime enables events; a worker opens its own store on the same folder later
    LocalStore(tmp_path).enable_events(suffix=".safetensors")
    worker_store = LocalStore(tmp_path)
    reader = EventReader(tmp_path / ".fedkeeper" / "events")
    # Execute
    worker_store.put_json(keys.running(0, "p-000"), {"attempt": 1})
    worker_store.put(UPDATE, b"update")
    # Assert
    assert [e["key"] for e in reader.drain()] == [UPDATE]


def test_each_event_is_read_once(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    reader = EventReader(store.enable_events())
    store.put(UPDATE, b"a")
    # Execute
    first, second = reader.drain(), reader.drain()
    store.put(keys.update(0, "p-001"), b"b")
    third = reader.drain()
    # Assert
    assert [e["key"] for e in first] == [UPDATE]
    assert second == []
    assert [e["key"] for e in third] == [keys.update(0, "p-001")]


def test_a_line_still_being_written_waits_for_its_end(tmp_path):
    # Prepare: a log of a live writer (this process) whose last line is incomplete
    folder = LocalStore(tmp_path).enable_events()
    log = folder / f"{os.getpid()}-feed{EVENT_LOG}"
    whole = json.dumps({"key": UPDATE, "time": 1.0}) + "\n"
    torn = json.dumps({"key": keys.update(0, "p-001"), "time": 2.0})
    log.write_text(whole + torn[:10])
    reader = EventReader(folder)
    # Execute
    before = reader.drain()
    with open(log, "a") as fh:
        fh.write(torn[10:] + "\n")
    after = reader.drain()
    # Assert
    assert [e["key"] for e in before] == [UPDATE]
    assert [e["key"] for e in after] == [keys.update(0, "p-001")]


def test_log_of_an_exited_writer_is_read_then_removed(tmp_path):
    # Prepare: a worker process writes an update and exits
    folder = LocalStore(tmp_path).enable_events(suffix=".safetensors")
    proc = mp.get_context("spawn").Process(target=_write_update_in_child, args=(str(tmp_path), UPDATE))
    proc.start()
    proc.join(timeout=60)
    reader = EventReader(folder)
    # Execute
    events = reader.drain()
    # Assert
    assert proc.exitcode == 0
    assert [e["key"] for e in events] == [UPDATE]
    assert [n for n in os.listdir(folder) if n.endswith(EVENT_LOG)] == []


def test_undelivered_events_are_kept_for_the_next_reader(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    folder = store.enable_events()
    store.put(UPDATE, b"a")
    # Execute: the first reader stops before delivering; a second one starts on the same folder
    left = EventReader(folder).close()
    store.close()
    later = EventReader(folder).drain()
    # Assert
    assert [e["key"] for e in left] == [UPDATE]
    assert UPDATE in [e["key"] for e in later]


def test_events_of_an_older_version_one_file_each_are_still_read(tmp_path):
    # Prepare
    folder = LocalStore(tmp_path).enable_events()
    (folder / "00000000000000000001-abcd1234.json").write_text(json.dumps({"key": UPDATE, "time": 1.0}))
    reader = EventReader(folder)
    # Execute
    events = reader.drain()
    # Assert
    assert [e["key"] for e in events] == [UPDATE]
    assert not (folder / "00000000000000000001-abcd1234.json").exists()


def test_a_removed_log_is_replaced_so_later_events_are_not_lost(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    folder = store.enable_events()
    store.put(UPDATE, b"a")
    for name in os.listdir(folder):
        if name.endswith(EVENT_LOG):
            os.unlink(folder / name)
    # Execute
    store.put(keys.update(0, "p-001"), b"b")
    events = EventReader(folder).drain()
    # Assert
    assert [e["key"] for e in events] == [keys.update(0, "p-001")]


def test_an_unreadable_rule_names_the_file_and_the_fix(tmp_path):
    # Prepare
    folder = LocalStore(tmp_path).enable_events()
    (folder / ".rule.json").write_text("{not json")
    store = LocalStore(tmp_path)
    # Execute / Assert
    with pytest.raises(StoreError, match=r"\.rule\.json is unreadable.*start the runtime again"):
        store.put(UPDATE, b"a")


def test_a_prefix_outside_rounds_is_refused(tmp_path):
    # Execute / Assert
    with pytest.raises(ValueError, match="must lie under rounds/"):
        LocalStore(tmp_path).enable_events(prefix="models/")


class _PipeWorker:
    """Stands in for a worker process: the runtime reads its end of a real pipe."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.tasks: dict = {}
        self.started_at: dict = {}
        self.slots = 1
        self.kill_at = None
        self.sent = self.done = 1
        self.proc = self

    def is_alive(self) -> bool:
        return True


def test_runtime_handles_every_message_a_worker_has_queued_in_one_turn(tmp_path):
    # Prepare: a worker (a trigger) has asked for three client invocations at once
    cfg = config.from_dict({"rounds": 1, "platforms": [{"name": "p", "clients": 3, "concurrency": 1}]})
    rt = LocalRuntime(cfg, LocalStore(tmp_path))
    ours, theirs = mp.Pipe()
    rt.pools["control"].workers.append(_PipeWorker(ours))
    for i in range(3):
        theirs.send(("invoke", "client", {"round": 0, "client": f"p-00{i}"}, "p"))
    rt._last_tick = float("inf")  # no timer tick in this turn
    rt._dispatch = lambda: None  # nothing is started: this test is about reading the worker's messages
    # Execute
    rt.step(timeout=1.0)
    # Assert
    clients = sorted(inv.payload["client"] for inv in rt.invocations.values() if inv.function == "client")
    assert clients == ["p-000", "p-001", "p-002"]
    ours.close()
    theirs.close()


def test_store_objects_of_one_process_share_one_log(tmp_path):
    # Prepare
    folder = LocalStore(tmp_path).enable_events()
    # Execute: many short-lived store objects, as handlers open them, each write an update
    for i in range(5):
        LocalStore(tmp_path).put(keys.update(0, f"p-00{i}"), b"u")
    logs = [n for n in os.listdir(folder) if n.endswith(EVENT_LOG)]
    events = EventReader(folder).drain()
    # Assert
    assert len(logs) == 1
    assert sorted(e["key"] for e in events) == [keys.update(0, f"p-00{i}") for i in range(5)]


def test_a_folder_removed_under_the_folder_store_is_made_again_by_the_next_write(tmp_path):
    # Prepare: the store remembers the folders it made, so a write skips the mkdir; someone then removes one
    import shutil

    from fedkeeper.store.local import LocalStore

    store = LocalStore(tmp_path / "s")
    store.put("rounds/000001/updates/a.safetensors", b"one")
    shutil.rmtree(tmp_path / "s" / "rounds" / "000001")
    # Execute
    store.put("rounds/000001/updates/a.safetensors", b"two")
    created = store.put_if_absent("rounds/000001/claim.json", b"{}")
    # Assert
    assert store.get("rounds/000001/updates/a.safetensors") == b"two" and created
    assert not [p for p in (tmp_path / "s" / "rounds" / "000001" / "updates").iterdir() if p.name.startswith(".tmp-")]
