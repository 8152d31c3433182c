"""Skip tests whose optional extra is not installed, naming the extra to install."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

# Modules that stand for each setup.cfg extra.
EXTRAS = {
    "tf": ("tensorflow", "sklearn", "matplotlib"),
    "aws": ("boto3",),
    "gcp": ("google.cloud.storage",),
    "mlflow": ("mlflow",),
}


def missing(extra: str, *modules: str) -> str | None:
    """The first module of the extra that is not installed, or None when all are (found, not imported: cheap)."""
    for name in modules or EXTRAS[extra]:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def needs(extra: str, *modules: str) -> None:
    """Skip the calling test (or, at import time, the whole module) unless the extra is installed."""
    gone = missing(extra, *modules)
    if gone:
        pytest.skip(f"needs the '{extra}' extra: pip install -e '.[{extra}]' ({gone} is not installed)",
                    allow_module_level=True)


def mark(extra: str, *modules: str) -> pytest.MarkDecorator:
    """A skipif marker for one test or a module's pytestmark, naming the extra."""
    gone = missing(extra, *modules)
    return pytest.mark.skipif(gone is not None, reason=f"needs the '{extra}' extra: pip install -e '.[{extra}]' "
                                                       f"({gone} is not installed)")
