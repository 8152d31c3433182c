"""The folder store: atomic files, O_EXCL-style create-only via link(), flock'd compare-and-swap, and local events."""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import time
import uuid
from pathlib import Path

from fedkeeper.store.base import InvalidKey, NotFound, Store, StoreError, check_key

INTERNAL = ".fedkeeper"
EVENTS_DIR = f"{INTERNAL}/events"
_TMP = ".tmp-"


class LocalStore(Store):
    """A federation rooted at a folder; when `<root>/.fedkeeper/events/` exists, writes under `rounds/` emit events there."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)
        self._events = self.root / EVENTS_DIR

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == INTERNAL:
            raise InvalidKey(f"invalid store key {key!r}: {INTERNAL}/ is reserved for the store itself")
        return self.root / key

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.parent / f"{_TMP}{uuid.uuid4().hex}"

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        tmp = self._tmp(path)
        with open(tmp, "wb") as fh:
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

    def size(self, key: str) -> int:
        """The file's size from stat."""
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        if not self._path(key).is_file():
            raise NotFound(key)
        return st.st_size

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
            tmp.unlink(missing_ok=True)
        self._emit(key, len(data), "create")
        return True

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

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
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        """True if key is a file."""
        return self._path(key).is_file()

    def enable_events(self) -> Path:
        """Start emitting object events for keys under rounds/ (the local runtime's event source)."""
        self._events.mkdir(parents=True, exist_ok=True)
        return self._events

    def _emit(self, key: str, size: int, kind: str) -> None:
        if not key.startswith("rounds/") or not self._events.is_dir():
            return
        event = {"key": key, "size": size, "type": kind, "time": time.time(), "store": self.url}
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        tmp = self._events / (_TMP + name)
        try:
            tmp.write_text(json.dumps(event))
            os.replace(tmp, self._events / name)
        except OSError as exc:  # the object is written; a lost event is recovered by the deadline tick
            raise StoreError(f"wrote {key} but could not record its event: {exc}") from exc
