"""The one registry of functions and their entries, used by every platform adapter and the local worker."""

from __future__ import annotations

import importlib
from typing import Callable

from fedkeeper.functions.context import AGGREGATOR, CLIENT, TRIGGER, Context

# function name -> (module, entries it accepts); the first entry is the default.
FUNCTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    TRIGGER: ("fedkeeper.functions.trigger", ("handle", "tick")),
    CLIENT: ("fedkeeper.functions.client", ("handle",)),
    AGGREGATOR: ("fedkeeper.functions.aggregator", ("handle",)),
}

Handler = Callable[[dict, Context], dict]


def resolve(function: str, entry: str | None = None) -> Handler:
    """The handler for `function` (and an optional entry such as the trigger's tick); KeyError if unknown."""
    module_name, entries = FUNCTIONS[function]
    name = entry or entries[0]
    if name not in entries:
        raise KeyError(f"function {function} has no entry {name!r}; use one of {', '.join(entries)}")
    return getattr(importlib.import_module(module_name), name)
