"""The folder store: atomic files, O_EXCL-style create-only via link(), flock'd compare-and-swap, and local events."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import stat
import time
import uuid
from pathlib import Path

from fedkeeper.store.base import InvalidKey, NotFound, Store, StoreError, check_key

INTERNAL = ".fedkeeper"
EVENTS_DIR = f"{INTERNAL}/events"
EVENTS_RULE = ".rule.json"  # a dot file: the runtime's event reader skips it
EVENT_LOG = ".log"  # each writing process appends its events, one JSON line each, to <pid>-<id>.log
_EVENT_LOGS: dict[tuple[int, str], int] = {}  # (pid, events folder) -> the log's descriptor
_TMP = ".tmp-"


class LocalStore(Store):
    """A federation rooted at a folder; when `<root>/.fedkeeper/events/` exists, writes under `rounds/` emit events there."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)
        self._root = str(self.root)
        self._dirs: set[str] = set()  # folders this object has made or found, so a write skips the mkdir
        self._events = self.root / EVENTS_DIR
        self._rule: tuple[str, str] | None = None

    def _path(self, key: str) -> str:
        check_key(key)
        if key.split("/", 1)[0] == INTERNAL:
            raise InvalidKey(f"invalid store key {key!r}: {INTERNAL}/ is reserved for the store itself")
        # Plain strings, not Path objects: every store call builds one, and pathlib's parsing cost more than
        # the stat or open it was built for.
        return self._root + "/" + key

    def _write_tmp(self, path: str, data: bytes) -> str:
        parent = os.path.dirname(path)
        tmp = f"{parent}/{_TMP}{uuid.uuid4().hex}"
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        try:
            fh = open(tmp, "wb")
        except FileNotFoundError:  # the folder was removed since (e.g. a run's cleanup): make it again
            os.makedirs(parent, exist_ok=True)
            fh = open(tmp, "wb")
        with fh:
            fh.write(data)
        return tmp

    def get(self, key: str) -> bytes:
        """Bytes at key."""
        try:
            with open(self._path(key), "rb") as fh:
                buf = bytearray(os.fstat(fh.fileno()).st_size)
                fh.readinto(buf)
                return buf
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def _stat(self, key: str) -> os.stat_result:
        """The stat of the regular file at key; a folder (a prefix) is not an object."""
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(key)
        return st

    def size(self, key: str) -> int:
        """The file's size from stat."""
        return self._stat(key).st_size

    def get_view(self, key: str, max_bytes: int | None = None) -> bytes | memoryview:
        """The file mapped read-only: the aggregator streams updates without copying them into fresh memory.

        Safe because objects are only ever replaced by rename, never rewritten in place.
        """
        try:
            with open(self._path(key), "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return b""
                return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def put(self, key: str, data: bytes) -> None:
        """Write through a temp file and rename, so readers never see a partial object."""
        path = self._path(key)
        tmp = self._write_tmp(path, data)
        os.replace(tmp, path)
        self._emit(key, len(data), "update")

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """link() fails if the target exists, which makes create-only atomic with full content."""
        path = self._path(key)
        tmp = self._write_tmp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._emit(key, len(data), "create")
        return True

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

    def version(self, key: str) -> str:
        """The inode/mtime/size version from a stat (objects are replaced by rename, so a new object is a new inode)."""
        return self._version(self._stat(key))

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Bytes and the inode/mtime version of key."""
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                return fh.read(), self._version(st)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        """Swap under an exclusive flock so two takeovers cannot both pass the version check."""
        path = self._path(key)
        lock_dir = self.root / INTERNAL / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_dir / hashlib.sha1(key.encode()).hexdigest()
        with open(lock, "a+b") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                current = self._version(os.stat(path))
            except FileNotFoundError:
                return False
            if current != version:
                return False
            tmp = self._write_tmp(path, data)
            os.replace(tmp, path)
        self._emit(key, len(data), "update")
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Keys under prefix, sorted; temp files and the internal folder are skipped."""
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base_dir if base_dir else self.root
        if not start.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if rel_dir == "":
                dirnames[:] = [d for d in dirnames if d != INTERNAL]
            for name in filenames:
                if name.startswith(_TMP):
                    continue
                key = rel_dir + name
                if key.startswith(prefix):
                    out.append(key)
        out.sort()
        return out

    def delete(self, key: str) -> None:
        """Remove key if present."""
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def exists(self, key: str) -> bool:
        """True if key is a file."""
        return os.path.isfile(self._path(key))

    def enable_events(self, prefix: str = "rounds/", suffix: str = "") -> Path:
        """Start emitting object events for keys under prefix that end with suffix (the local runtime's event
        source), like a bucket notification's prefix and suffix filter rules."""
        if not prefix.startswith("rounds/"):
            raise ValueError(f"event prefix {prefix!r} must lie under rounds/: only round objects emit events")
        self._events.mkdir(parents=True, exist_ok=True)
        # The rule lives beside the events, so every process writing to this folder applies the same filter.
        rule = self._events / EVENTS_RULE
        tmp = self._events / f"{_TMP}{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"prefix": prefix, "suffix": suffix}))
        os.replace(tmp, rule)
        self._rule = (prefix, suffix)
        return self._events

    def _event_rule(self) -> tuple[str, str] | None:
        """(prefix, suffix) of the events to emit, or None while events are off (the rule is read once, then kept)."""
        if not self._events.is_dir():
            return None
        if self._rule is None:
            try:
                raw = json.loads((self._events / EVENTS_RULE).read_text())
                self._rule = (str(raw["prefix"]), str(raw["suffix"]))
            except FileNotFoundError:
                self._rule = ("rounds/", "")  # a folder enabled without a rule: every round object
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"{self._events / EVENTS_RULE} is unreadable ({exc}); delete it and start the "
                                 "runtime again, which writes it anew") from None
        return self._rule

    def _emit(self, key: str, size: int, kind: str) -> None:
        if not key.startswith("rounds/"):
            return
        rule = self._event_rule()
        if rule is None or not key.startswith(rule[0]) or not key.endswith(rule[1]):
            return
        event = {"key": key, "size": size, "type": kind, "time": time.time(), "store": self.url}
        line = (json.dumps(event) + "\n").encode()
        try:
            # One append to this process's own log, not a file per event: creating a file costs an inode,
            # which on a busy disk takes about a millisecond, and there is one event for every update.
            os.write(self._event_log(), line)
        except OSError as exc:  # the object is written; a lost event is recovered by the deadline tick
            raise StoreError(f"wrote {key} but could not record its event: {exc}") from exc

    def _event_log(self) -> int:
        """This process's event log for this folder, shared by its store objects (opened on first use, and
        again in a forked child or if it was removed)."""
        slot = (os.getpid(), str(self._events))
        fd = _EVENT_LOGS.get(slot)
        if fd is not None:
            if os.fstat(fd).st_nlink > 0:
                return fd
            os.close(fd)  # removed by someone, so it will not be read: start a new one
        fd = os.open(self._events / f"{slot[0]}-{uuid.uuid4().hex[:8]}{EVENT_LOG}",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _EVENT_LOGS[slot] = fd
        return fd

    def close(self) -> None:
        """Close this process's event log for this folder, if one is open (the next event opens a new one)."""
        fd = _EVENT_LOGS.pop((os.getpid(), str(self._events)), None)
        if fd is not None:
            os.close(fd)


def _writer_alive(name: str) -> bool:
    """True if the process whose pid starts the log's name may still append to it."""
    head = name.split("-", 1)[0]
    if not head.isdigit() or int(head) <= 0:
        return False
    try:
        os.kill(int(head), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _event_time(event: object) -> float:
    t = event.get("time") if isinstance(event, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0


class EventReader:
    """Reads the events that writers append to their logs in a folder store's events folder, each once.

    Each log is read on from where the last read stopped; a line still being written is left for the next
    read. A log read to its end whose writer has exited is removed. Events from an older store version (one
    JSON file per event) are read and removed as before.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._read: dict[str, int] = {}  # log name -> bytes consumed
        self._fds: dict[str, int] = {}   # log name -> open descriptor: a read that finds nothing new costs one fstat

    def drain(self) -> list[dict]:
        """Every complete event appended since the last call, oldest first."""
        out: list[dict] = []
        try:
            names = sorted(n for n in os.listdir(self.folder) if not n.startswith("."))
        except FileNotFoundError:
            return out
        for name in names:
            path = self.folder / name
            if name.endswith(EVENT_LOG):
                out.extend(self._read_log(name, path))
            elif name.endswith(".json"):
                try:
                    out.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    pass
                path.unlink(missing_ok=True)
        for gone in set(self._fds) - set(names):  # removed by someone else: its writer has moved to a new log
            self._forget(gone)
        out.sort(key=_event_time)  # logs of several writers interleave: deliver roughly in time order
        return out

    def _forget(self, name: str) -> None:
        self._read.pop(name, None)
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _read_log(self, name: str, path: Path) -> list[dict]:
        done = self._read.get(name, 0)
        # Asked before reading: once the writer is gone, this read sees everything it wrote.
        alive = _writer_alive(name)
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = self._fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._forget(name)
                return []
        size = os.fstat(fd).st_size
        data = os.pread(fd, size - done, done) if size > done else b""
        cut = data.rfind(b"\n") + 1
        events = []
        for line in data[:cut].splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
        self._read[name] = done + cut
        if not alive:  # nothing more can come; a torn last line of a killed writer is not an event
            path.unlink(missing_ok=True)
            self._forget(name)
        return events

    def close(self) -> list[dict]:
        """Stop reading: events appended since the last drain are kept for the next reader, and returned."""
        left = self.drain()
        for name in list(self._read) + list(self._fds):
            # Logs of live writers (not this runtime's workers) stay; the next reader starts them from 0,
            # so their events may come again, which every handler tolerates.
            self._forget(name)
        if left:
            keep = self.folder / f"x-{uuid.uuid4().hex[:8]}{EVENT_LOG}"
            tmp = self.folder / f"{_TMP}{uuid.uuid4().hex}"
            tmp.write_bytes(b"".join((json.dumps(e) + "\n").encode() for e in left))
            os.replace(tmp, keep)
        return left
