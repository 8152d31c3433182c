"""Validation of anything a client or an HTTP caller writes: bounded JSON, and the schema of update metadata."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

MAX_JSON_DEPTH = 32
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_META_KEYS = 64
MAX_NAME = 64
MAX_TEXT = 512
# Strings are removed before brackets are counted, so a bracket inside a string never counts.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


class InputError(ValueError):
    """Input from outside (a client's blob, a request body) is malformed; the message says what is wrong."""


class NotJSON(InputError):
    """The text is not JSON at all (as opposed to JSON that breaks a bound)."""


def _no_constants(name: str) -> Any:
    raise InputError(f"JSON holds {name}, which is not a number; write finite numbers only")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise InputError(f"JSON object repeats the key {k[:40]!r}")
        out[k] = v
    return out


_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text (0 for a scalar), found without parsing it."""
    depth = best = 0
    # Strings removed first (a bracket in a string does not nest), then all but brackets: the loop is short.
    for ch in _NOT_BRACKETS.sub("", _STRINGS.sub('""', text)):
        if ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def loads(data: bytes | bytearray | memoryview | str, max_bytes: int = 1 << 20, max_depth: int = MAX_JSON_DEPTH,
          what: str = "JSON", lenient: bool = False) -> Any:
    """Parse untrusted JSON: bounded size and nesting, no NaN/Infinity, no repeated keys; raises InputError.

    lenient (for readers of records): NaN and Infinity read as None and a repeated key keeps its last value.
    """
    if len(data) > max_bytes:
        raise InputError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    if not isinstance(data, str):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "[" in data or "{" in data:
        depth = json_depth(data)
        if depth > max_depth:
            raise InputError(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        if lenient:
            return json.loads(data, parse_constant=lambda _: None)
        return json.loads(data, parse_constant=_no_constants, object_pairs_hook=_unique_pairs)
    except InputError:
        raise
    except json.JSONDecodeError as exc:
        raise NotJSON(f"{what} is not valid JSON ({str(exc)[:120]})") from None
    except (ValueError, RecursionError) as exc:
        # ValueError here is an integer longer than Python converts (thousands of digits).
        raise InputError(f"{what} holds a value that cannot be read ({str(exc)[:120]})") from None


def finite_number(v: Any) -> bool:
    """True for an int or float (not a bool) that is finite."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def short_text(v: Any, limit: int = MAX_NAME) -> bool:
    """True for a string of at most `limit` characters."""
    return isinstance(v, str) and len(v) <= limit


def _flat_numbers(field: str, value: Any, allow: tuple[type, ...] = (), non_negative: bool = False) -> str | None:
    if not isinstance(value, dict):
        return f"update metadata '{field}' must be a flat map of numbers, got {type(value).__name__}"
    if len(value) > MAX_META_KEYS:
        return f"update metadata '{field}' has {len(value)} entries, over the limit of {MAX_META_KEYS}"
    for k, v in value.items():
        if not short_text(k):
            return f"update metadata '{field}' has a key that is not a short string"
        if isinstance(v, allow) and (not isinstance(v, str) or len(v) <= MAX_TEXT):
            continue
        if not finite_number(v):
            return f"update metadata '{field}.{k[:40]}' must be a finite number, got {type(v).__name__}"
        if non_negative and v < 0:
            return f"update metadata '{field}.{k[:40]}' must not be negative, got {v!r}"
    return None


def update_meta(meta: Mapping) -> str | None:
    """Why an update's metadata breaks the schema, or None: the fields anything downstream reads are checked."""
    if meta.get("kind") != "update":
        return f"blob kind is {str(meta.get('kind'))[:40]!r}, not 'update'"
    r = meta.get("round")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        return f"update metadata 'round' must be a non-negative integer, got {str(r)[:40]!r}"
    client = meta.get("client")
    if not isinstance(client, str) or not CLIENT_ID.match(client):
        return f"update metadata 'client' must be a client id, got {str(client)[:70]!r}"
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples {str(n)[:40]!r} is not a positive whole count"
    if "platform" in meta and meta["platform"] is not None and not short_text(meta["platform"]):
        return "update metadata 'platform' must be a short string"
    reason = _flat_numbers("metrics", meta.get("metrics", {}))
    if reason:
        return reason
    # Timings are non-negative numbers; the client also notes flags (cold start) and a short XLA message.
    return _flat_numbers("timings", meta.get("timings", {}), allow=(bool, str), non_negative=True)


def clean_record(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a record for readers: non-finite numbers become None, deep nesting is cut."""
    if depth > 8:
        return None
    if isinstance(value, dict):
        return {str(k)[:MAX_NAME]: clean_record(v, depth + 1) for k, v in list(value.items())[:256]}
    if isinstance(value, (list, tuple)):
        return [clean_record(v, depth + 1) for v in list(value)[:10000]]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)[:MAX_TEXT]
