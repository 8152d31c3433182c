"""Coordinate blocks over every accepted update, for strategies that need all updates per coordinate.

A robust fold keeps only client ids while the protocol streams updates; in finish it re-opens the
updates through the reader one coordinate block at a time, so peak memory is O(N × block + model)
rather than O(N × model). Krum's pairwise distances come from a Gram matrix summed block by block.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fedkeeper.core.aggregate import RunningSum, Weights
from fedkeeper.core.strategy.base import Fold, Param, Reader, Strategy

# Bytes each coordinate of a block costs per update: the float32 block and a float32 working copy
# (sorting, partitioning), with room for numpy's temporaries.
BYTES_PER_COORD = 12
MIN_BLOCK = 1024

BLOCK_PARAM = Param(float, 64.0, lo=1.0, help="memory budget of one coordinate block over all updates, in MB")

Segment = tuple[str, int, int]  # tensor name, first and past-last flat index


def plan(shapes: Mapping[str, tuple[int, ...]], block: int) -> list[list[Segment]]:
    """Split the flattened tensors (sorted by name) into blocks of at most `block` coordinates."""
    blocks: list[list[Segment]] = []
    cur: list[Segment] = []
    size = 0
    for name in sorted(shapes):
        total = int(np.prod(shapes[name], dtype=np.int64))
        lo = 0
        while lo < total:
            take = min(total - lo, block - size)
            cur.append((name, lo, lo + take))
            size += take
            lo += take
            if size == block:
                blocks.append(cur)
                cur, size = [], 0
    if cur:
        blocks.append(cur)
    return blocks


def block_size(rows: int, budget_mb: float, bytes_per_coord: int = BYTES_PER_COORD) -> int:
    """Coordinates per block so that `rows` updates, at bytes_per_coord each, fit the budget."""
    return max(MIN_BLOCK, int(budget_mb * 1024 * 1024) // (bytes_per_coord * max(1, rows)))


class BlockFold(Fold):
    """Records which updates were accepted (and that they are finite); reads them back in blocks."""

    def __init__(self, reader: Reader | None, budget_mb: float, bytes_per_coord: int = BYTES_PER_COORD) -> None:
        if reader is None:
            raise ValueError("this strategy reads updates block by block and needs a reader")
        self.reader = reader
        self.budget_mb = budget_mb
        self.bytes_per_coord = bytes_per_coord
        self.ids: list[str] = []
        self.examples: list[int] = []
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self._finite = True

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Remember the client; check its shapes and that every value is finite."""
        shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError("update tensor names or shapes differ from the first update's")
        for t in tensors.values():
            # A float64 sum is finite iff every float32 value is, and allocates nothing.
            if not np.isfinite(np.asarray(t).sum(dtype=np.float64)):
                self._finite = False
        self.ids.append(client)
        self.examples.append(int(num_examples))

    def finite(self) -> bool:
        """False once a non-finite update was added."""
        return self._finite

    def _read(self, client: str) -> Mapping[str, np.ndarray]:
        tensors = self.reader(client)
        if {k: tuple(np.shape(v)) for k, v in tensors.items()} != self.shapes:
            raise ValueError(f"update of {client} changed between reads (tensor names or shapes differ)")
        return tensors

    def blocks(self, rows: Sequence[int]) -> Iterator[tuple[list[Segment], np.ndarray]]:
        """(segments, X) per block, X[i] holding client rows[i]'s coordinates of those segments (float32)."""
        assert self.shapes is not None
        for segs in plan(self.shapes, block_size(len(rows), self.budget_mb, self.bytes_per_coord)):
            width = sum(hi - lo for _, lo, hi in segs)
            x = np.empty((len(rows), width), dtype=np.float32)
            for i, row in enumerate(rows):
                tensors = self._read(self.ids[row])
                off = 0
                for name, lo, hi in segs:
                    x[i, off:off + hi - lo] = np.asarray(tensors[name]).reshape(-1)[lo:hi]
                    off += hi - lo
                del tensors  # drop the mapping before the next update is opened
            yield segs, x

    def empty_model(self) -> Weights:
        """A float32 model to write block results into."""
        assert self.shapes is not None
        return {name: np.empty(shape, dtype=np.float32) for name, shape in self.shapes.items()}

    def coordinatewise(self, rows: Sequence[int], fn: Any) -> Weights:
        """The model whose every block is fn(X) over the given rows."""
        out = self.empty_model()
        for segs, x in self.blocks(rows):
            put(out, segs, fn(x))
        return out

    def gram(self) -> np.ndarray:
        """A Gram matrix whose distances diag[i] + diag[j] − 2·G[i, j] are the squared distances between updates.

        Each block is centred on its own mean over the updates before its float32 product is taken:
        distances do not change under a shift, and centring removes the common part of the updates,
        so little is lost to cancellation; the blocks' products are summed in float64.
        """
        n = len(self.ids)
        g = np.zeros((n, n), dtype=np.float64)
        for _, x in self.blocks(range(n)):
            x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
            g += (x @ x.T).astype(np.float64)
        # Exact symmetry makes dist[a, b] == dist[b, a], so mutual nearest neighbours tie exactly.
        return (g + g.T) / 2

    def mean_of(self, rows: Sequence[int]) -> Weights:
        """Example-weighted mean of the given updates, re-read one at a time (O(model))."""
        acc = RunningSum(np.float32)
        for row in rows:
            acc.add(self._read(self.ids[row]), self.examples[row])
        return acc.result(in_place=True)

    def copy_of(self, row: int) -> Weights:
        """A float32 copy of one update."""
        return {k: np.array(v, dtype=np.float32) for k, v in self._read(self.ids[row]).items()}


def put(out: Weights, segs: list[Segment], values: np.ndarray) -> None:
    """Write a block's values back into the model's tensors."""
    off = 0
    for name, lo, hi in segs:
        out[name].reshape(-1)[lo:hi] = values[off:off + hi - lo]
        off += hi - lo


def distances(gram: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances from a Gram matrix (clamped at 0 against rounding)."""
    diag = np.diag(gram)
    d = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def krum_scores(dist: np.ndarray, rows: Sequence[int], f: int) -> np.ndarray:
    """Krum's score of each row: the sum of squared distances to its n − f − 2 nearest other rows (at least 1)."""
    rows = list(rows)
    if len(rows) < 2:
        return np.zeros(len(rows), dtype=np.float64)
    k = max(1, len(rows) - f - 2)
    sub = dist[np.ix_(rows, rows)]
    np.fill_diagonal(sub, np.inf)  # a row is not its own neighbour
    return np.sort(sub, axis=1)[:, :k].sum(axis=1)


def ranked(scores: np.ndarray, ids: Sequence[str]) -> list[int]:
    """Positions by ascending score, ties broken by client id, so the arrival order never matters."""
    return sorted(range(len(scores)), key=lambda i: (float(scores[i]), ids[i]))


class RobustStrategy(Strategy):
    """A strategy over coordinate blocks of every accepted update."""

    composes = False  # its fold is not a plain sum: tree mode folds it in one place
    # Working memory per coordinate and update while a block is reduced (see BYTES_PER_COORD).
    bytes_per_coord: int = BYTES_PER_COORD

    def begin(self, global_weights: Mapping[str, np.ndarray] | None, state: Weights | None,
              dtype: type = np.float32, reader: Reader | None = None) -> Fold:
        """A fold that keeps ids and reads blocks in finish."""
        return BlockFold(reader, float(self.params["block_mb"]), self.bytes_per_coord)
