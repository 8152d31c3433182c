"""FedAvg as a running sum (Σ nᵢ·wᵢ, Σ nᵢ): O(model) memory, and partial sums compose."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]

# Scaling a whole update before adding it would stream it through memory twice; scaling a
# cache-sized slice at a time keeps the product in L2, so each update is read from memory once.
_CHUNK = 32768
_UNSET = object()
_saxpy: Any = _UNSET


def _find_saxpy() -> Any:
    """The saxpy (y += a·x) of the OpenBLAS that numpy's wheels bundle, checked on a small case; None if absent."""
    import ctypes
    import glob
    import os

    here = os.path.dirname(np.__file__)
    paths = []
    for pattern in (here + ".libs/libscipy_openblas*", os.path.join(here, ".dylibs", "libscipy_openblas*")):
        paths += sorted(glob.glob(pattern))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol, int_t in (("scipy_cblas_saxpy64_", ctypes.c_int64), ("scipy_cblas_saxpy", ctypes.c_int)):
            fn = getattr(lib, symbol, None)
            if fn is None:
                continue
            fn.argtypes = [int_t, ctypes.c_float, ctypes.c_void_p, int_t, ctypes.c_void_p, int_t]
            fn.restype = None
            x = np.arange(1, 4097, dtype=np.float32)
            y = np.full(4096, 0.5, dtype=np.float32)
            fn(x.size, np.float32(3.0), x.ctypes.data, 1, y.ctypes.data, 1)
            if np.array_equal(y, np.float32(0.5) + np.float32(3.0) * x):
                # One BLAS thread for the sum: the saxpy is memory-bound, so a second thread gains little on an
                # idle machine, while on busy cores (clients training beside the aggregator, a function's shared
                # vCPU) OpenBLAS's spinning threads made it ten times slower. Set per calling thread only.
                local = getattr(lib, "openblas_set_num_threads_local", None)
                if local is not None:
                    local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
                    _ONE_THREAD["set"] = local
                return fn
    return None


_ONE_THREAD: dict = {}
_THREADS = __import__("threading").local()


def _single_blas_thread() -> None:
    """Make this thread's OpenBLAS calls single-threaded (once per thread)."""
    setter = _ONE_THREAD.get("set")
    if setter is not None and not getattr(_THREADS, "one", False):
        setter(1)
        _THREADS.one = True


def _scaled_add(acc: np.ndarray, w: np.ndarray, n: np.float32, scratch: np.ndarray) -> None:
    """acc += n·w on flat contiguous float32 acc, reading w once (BLAS saxpy where numpy bundles one)."""
    global _saxpy
    if _saxpy is _UNSET:
        _saxpy = _find_saxpy()
    if _saxpy is not None and acc.dtype == np.float32 and w.dtype == np.float32 and w.flags.c_contiguous:
        _single_blas_thread()
        _saxpy(acc.shape[0], n, w.ctypes.data, 1, acc.ctypes.data, 1)
        return
    size = acc.shape[0]
    for start in range(0, size, _CHUNK):
        end = min(size, start + _CHUNK)
        part = scratch[: end - start]
        np.multiply(w[start:end], n, out=part, casting="unsafe")
        np.add(acc[start:end], part, out=acc[start:end])


_NORM_CHUNK = 65536


def distance_sq(w: np.ndarray, g: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """‖w − g‖² of two flat float arrays, a slice at a time (no model-sized temporary, no float64 copy)."""
    scratch = scratch if scratch is not None and scratch.shape[0] >= _NORM_CHUNK else np.empty(_NORM_CHUNK, np.float32)
    sq = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here: the update is rejected
        for start in range(0, w.shape[0], _NORM_CHUNK):
            end = min(w.shape[0], start + _NORM_CHUNK)
            d = scratch[: end - start]
            np.subtract(w[start:end], g[start:end], out=d, casting="unsafe")
            sq += float(np.dot(d, d))  # a float32 dot per slice (inf if it overflows); slices add up in float64
    return sq


class RunningSum:
    """Accumulates example-weighted tensors one update at a time; merge() combines partial sums."""

    def __init__(self, dtype: type = np.float32) -> None:
        # float64 sums cannot overflow on float32 inputs; float32 (the default) keeps memory at one model.
        self.dtype = np.dtype(dtype)
        self.sums: Weights = {}
        self.total: float = 0.0
        self.count: int = 0
        self._scratch = np.empty(_CHUNK, dtype=self.dtype)
        self._norm_scratch: np.ndarray | None = None

    def add(self, weights: Mapping[str, np.ndarray], num_examples: float,
            reference: Mapping[str, np.ndarray] | None = None) -> float | None:
        """Add n·w for one update, in one pass over w; raises ValueError if names or shapes differ from earlier updates.

        With a reference (the global model) it also returns ‖w − reference‖², measured in the same pass.
        """
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        n = self.dtype.type(num_examples)
        if self.sums and weights.keys() != self.sums.keys():
            raise ValueError("update tensor names differ from the first update's")
        sq = 0.0
        for name, w in weights.items():
            acc = self.sums.get(name)
            if acc is not None and w.shape != acc.shape:
                raise ValueError(f"tensor {name} has shape {w.shape}, expected {acc.shape}")
            if acc is None:
                acc = self.sums[name] = np.zeros(w.shape, dtype=self.dtype)
            flat_w = np.asarray(w).reshape(-1)
            if reference is not None:
                if self._norm_scratch is None:
                    self._norm_scratch = np.empty(_NORM_CHUNK, dtype=np.float32)
                sq += distance_sq(flat_w, np.asarray(reference[name]).reshape(-1), self._norm_scratch)
            _scaled_add(acc.reshape(-1), flat_w, n, self._scratch)
        self.total += float(num_examples)
        self.count += 1
        return sq if reference is not None else None

    def merge(self, other: "RunningSum") -> None:
        """Fold another partial sum into this one (tree aggregation)."""
        if not other.sums:
            return
        if not self.sums:
            self.sums = {k: v.copy() for k, v in other.sums.items()}
        else:
            if other.sums.keys() != self.sums.keys():
                raise ValueError("partial sums hold different tensors")
            for name, v in other.sums.items():
                self.sums[name] += v
        self.total += other.total
        self.count += other.count

    def finite(self) -> bool:
        """True unless some sum holds NaN or Inf (a float64 reduction: no overflow, no allocation)."""
        return all(np.isfinite(acc.sum(dtype=np.float64)) for acc in self.sums.values())

    def result(self, in_place: bool = False) -> Weights:
        """The weighted mean Σ nᵢ·wᵢ / Σ nᵢ (in_place reuses the sums' memory and ends this accumulator)."""
        if self.total <= 0:
            raise ValueError("no updates were added")
        inv = self.dtype.type(1.0 / self.total)
        if in_place and self.dtype == np.float32:
            for acc in self.sums.values():
                acc *= inv
            return self.sums
        with np.errstate(over="ignore"):
            return {name: (acc * inv).astype(np.float32) for name, acc in self.sums.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Example-weighted mean of (weights, num_examples) pairs."""
    acc = RunningSum()
    for weights, n in updates:
        acc.add(weights, n)
    return acc.result()


def global_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> float:
    """L2 norm of all tensors together, or of their difference from `reference`."""
    total = 0.0
    scratch = np.empty(_NORM_CHUNK, dtype=np.float32)
    for name, w in weights.items():
        flat = np.asarray(w).reshape(-1)
        ref = np.asarray(reference[name]).reshape(-1) if reference is not None else np.zeros(1, np.float32)[:0]
        if reference is None:
            total += float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
        else:
            total += distance_sq(flat, ref, scratch)
    return total ** 0.5
