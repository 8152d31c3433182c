"""Privacy accounting with Google's dp-accounting: ε for a δ after k rounds of the subsampled Gaussian mechanism.

Imported only where accounting runs (the aggregator, the trigger's budget check, the CLI); a client never loads it.
"""

from __future__ import annotations

import logging
import math

MSG_MISSING = ("privacy accounting needs the dp-accounting package, which is not installed; "
               "install the privacy extra: pip install 'fedkeeper[privacy]'")


def _lib():
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(MSG_MISSING) from exc
    return dp_accounting


def event(noise_multiplier: float, sampling_rate: float, rounds: int):
    """The DpEvent of `rounds` rounds, each a Gaussian mechanism on a Poisson sample of rate sampling_rate."""
    dpa = _lib()
    step = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        step = dpa.PoissonSampledDpEvent(sampling_rate, step)
    return dpa.SelfComposedDpEvent(step, rounds)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after `rounds` releases at this δ (inf without noise, 0 before any release)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dpa = _lib()
    if accountant == "pld":
        acc = dpa.pld.PLDAccountant()
    else:
        acc = dpa.rdp.RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the RDP orders that fail to converge are skipped, and it says so per order
    try:
        return float(acc.compose(event(noise_multiplier, sampling_rate, rounds)).get_epsilon(delta))
    finally:
        absl.setLevel(level)
