"""The store interface every backend implements: get/put, create-only, compare-and-swap, list."""

from __future__ import annotations

import abc
from typing import Any

from fedkeeper.core import rounds


class StoreError(RuntimeError):
    """A store operation failed for a reason other than a missing key."""


class NotFound(KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:
        return f"no object at key {self.args[0]!r}"


class TooLarge(ValueError):
    """An object is larger than the caller allows; `size` is its size in bytes, found without downloading it."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        super().__init__(f"{key} is {size} bytes, over the {limit}-byte limit")
        self.size, self.limit = size, limit


class InvalidKey(ValueError):
    """A key could escape the store's root or is not a key at all; the message shows the form to use."""


class MissingExtra(ImportError):
    """A backend's SDK is not installed; the message names the extra to install."""


class Store(abc.ABC):
    """An object store rooted at a URL; keys are '/'-separated paths below that root."""

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Bytes at key; raises NotFound."""

    def get_view(self, key: str, max_bytes: int | None = None) -> bytes | memoryview:
        """Read-only bytes at key for one pass over them (a store may map them instead of copying); raises NotFound.

        With max_bytes a store reads at most max_bytes + 1 bytes, so an object over the limit shows as longer
        than the limit without being downloaded whole.
        """
        return self.get(key)

    def size(self, key: str) -> int:
        """Size of the object at key in bytes, without downloading it where the store allows; raises NotFound."""
        return len(self.get(key))

    def get_bounded(self, key: str, max_bytes: int) -> bytes | memoryview:
        """The object's bytes if it holds at most max_bytes, as get_view returns them; raises TooLarge, having
        downloaded none of it, if it holds more (its size from a stat or a HEAD first; a store whose read tells
        the size before the body arrives asks once), and NotFound."""
        size = self.size(key)
        if size > max_bytes:
            raise TooLarge(key, size, max_bytes)
        data = self.get_view(key, max_bytes=max_bytes)
        if len(data) > max_bytes:  # replaced by a larger object between the size check and the read
            raise TooLarge(key, len(data), max_bytes)
        return data

    def version(self, key: str) -> str | None:
        """The version token get_versioned would return now, without downloading the object, where the store can
        tell it (a stat, a HEAD); None where it cannot, and the caller reads the bytes instead. Raises NotFound."""
        return None

    def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of the object (fewer at its end); stores with ranged reads fetch only those."""
        return memoryview(self.get_view(key))[start:end]

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) key atomically: readers see the old or the new bytes, never a mix."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create key only if it does not exist; True if this call created it."""

    @abc.abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Bytes and an opaque version token for compare-and-swap; raises NotFound."""

    @abc.abstractmethod
    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        """Overwrite key only if it is still at `version`; True if this call wrote it."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with prefix, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; missing keys are fine."""

    def exists(self, key: str) -> bool:
        """True if key exists."""
        try:
            self.get(key)
            return True
        except NotFound:
            return False

    def get_json(self, key: str) -> Any:
        """Parsed JSON at key; raises NotFound."""
        return rounds.loads(self.get(key))

    def get_json_or(self, key: str, default: Any = None) -> Any:
        """Parsed JSON at key, or default when the key does not exist."""
        try:
            return self.get_json(key)
        except NotFound:
            return default

    def put_json(self, key: str, obj: Any) -> None:
        """Write obj as JSON at key."""
        self.put(key, rounds.dumps(obj))

    def uri(self, key: str) -> str:
        """Full URL of key, for logs and results."""
        return self.url.rstrip("/") + "/" + key

    def close(self) -> None:
        """Release connections; the default has none."""


def check_key(key: str) -> str:
    """Reject keys that could escape the root or collide with internal files."""
    if not isinstance(key, str) or not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise InvalidKey(f"invalid store key {key!r}: use a relative path like rounds/000001/result.json")
    return key
