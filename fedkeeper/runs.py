"""Federations kept in folder stores: find them under a root, size them, and remove old ones."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "./fedkeeper-data"
DEFAULT_OUT_ROOT = "./fedkeeper-runs"


@dataclass
class RunInfo:
    """One federation in a folder store, described from its files alone."""

    path: Path
    name: str
    status: str
    rounds_done: int
    rounds: int
    model: str
    dataset: str
    created: float
    size: int
    results: Path | None = None

    def row(self) -> tuple[str, ...]:
        """The columns `fedkeeper runs` prints."""
        when = dt.datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M")
        return (self.path.name, when, self.status, f"{self.rounds_done}/{self.rounds}", f"{self.model} on {self.dataset}",
                human_size(self.size + (folder_size(self.results) if self.results else 0)))


def human_size(n: float) -> str:
    """Bytes as B, KB, MB or GB with one decimal."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def folder_size(path: Path) -> int:
    """Total bytes of the files below path (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _created(path: Path) -> float:
    """When setup wrote the run: the initial model is never rewritten (federation.json is, by --resume --rounds)."""
    for key in ("models/000000.safetensors", "federation.json"):
        try:
            return (path / key).stat().st_mtime
        except OSError:
            continue
    return 0.0


def describe(path: Path, out_root: Path | None = None) -> RunInfo | None:
    """The run in folder `path`, or None if it holds no federation.json."""
    fed_path = path / "federation.json"
    if not fed_path.is_file():
        return None
    fed, state = _read_json(fed_path), _read_json(path / "state.json")
    model = fed.get("model") if isinstance(fed.get("model"), dict) else {}
    data = fed.get("data") if isinstance(fed.get("data"), dict) else {}
    results = out_root / path.name if out_root is not None and (out_root / path.name).is_dir() else None
    return RunInfo(path=path, name=str(fed.get("name", "?")), status=str(state.get("status", "set up")),
                   rounds_done=int(state.get("rounds_done", 0) or 0), rounds=int(fed.get("rounds", 0) or 0),
                   model=str(model.get("name", "?")), dataset=str(data.get("dataset", "?")),
                   created=_created(path), size=folder_size(path), results=results)


def find(root: str | os.PathLike, out_root: str | os.PathLike | None = DEFAULT_OUT_ROOT) -> list[RunInfo]:
    """Every federation directly below root, oldest first (root itself is never one of them, so never removed)."""
    base = Path(root).expanduser()
    outs = Path(out_root).expanduser() if out_root else None
    if not base.is_dir():
        return []
    found = [describe(p, outs) for p in sorted(base.iterdir()) if p.is_dir()]
    return sorted((r for r in found if r is not None), key=lambda r: r.created)


def table(runs: list[RunInfo]) -> str:
    """Aligned text table of runs with a total size line."""
    rows = [("run", "created", "status", "rounds", "model", "size")] + [r.row() for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    total = sum(r.size + (folder_size(r.results) if r.results else 0) for r in runs)
    lines.append(f"{len(runs)} run(s), {human_size(total)} in total")
    return "\n".join(lines)


def remove(run: RunInfo) -> None:
    """Delete a run's store folder and its results folder."""
    shutil.rmtree(run.path)
    if run.results is not None:
        shutil.rmtree(run.results, ignore_errors=True)
