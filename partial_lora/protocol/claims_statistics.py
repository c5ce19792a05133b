"""The statistics of a claim: the paired interval of per-seed differences, its verdict, and the seeds that would
decide it (the rules are those of ``partial_lora.protocol.claims``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from partial_lora.errors import ConfigError

TESTS = ("noninferior", "equivalent", "superior", "shrinking")
SUPPORTED, CONTRADICTED, INCONCLUSIVE, MISSING = "supported", "contradicted", "inconclusive", "missing runs"
NOT_LEARNED = "not learned"
# Both arms trained no adapter parameter (each an empty ticket or the head alone): their difference is the head's
# seed noise, whatever the statistics say, so no claim about masks, counts or measures can be judged from it.
NO_CONTRAST = "no contrast"
MAX_SEEDS = 1000  # beyond this many seeds a claim is reported as undecidable at the measured spread


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float = math.nan  # of the paired differences


def half_width(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of Student's t interval of the mean of ``n`` values with standard deviation ``sd``."""
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def paired_interval(differences: list[float], confidence: float = 0.95) -> Interval:
    """Mean of paired differences with Student's t interval (unbounded with fewer than two pairs)."""
    values = np.asarray(differences, dtype=float)
    n = len(values)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0)
    mean = float(values.mean())
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n)
    sd = float(values.std(ddof=1))
    half = half_width(sd, n, confidence)
    return Interval(mean, mean - half, mean + half, n, sd)


def boundaries(test: str, margin: float) -> tuple[float, ...]:
    """The effects whose exclusion from the interval decides a claim (see :func:`verdict`)."""
    return {"noninferior": (-margin,), "equivalent": (-margin, margin)}.get(test, (0.0,))


def seeds_to_decide(test: str, interval: Interval, margin: float, confidence: float = 0.95) -> int | None:
    """How many seeds (pairs) would decide an inconclusive claim if its mean and spread stayed as measured.

    With ``d`` the mean paired difference, ``s`` their standard deviation and ``b`` the nearest deciding
    boundary (``-m`` for noninferior, ``±m`` for equivalent, 0 for superior and shrinking), the claim is decided
    once the interval excludes ``b``: the smallest ``n`` with ``t(1 - (1 - confidence) / 2, n - 1) s / sqrt(n)
    < |d - b|``. ``None`` when no ``n`` up to :data:`MAX_SEEDS` does (an effect on the boundary never decides)
    or the spread is unknown (fewer than two pairs)."""
    if not np.isfinite(interval.sd):
        return None
    distance = min(abs(interval.mean - boundary) for boundary in boundaries(test, margin))
    if interval.sd == 0:
        return 2 if distance > 0 else None
    return next((n for n in range(2, MAX_SEEDS + 1) if half_width(interval.sd, n, confidence) < distance), None)


def verdict(test: str, interval: Interval, margin: float, pairs_needed: int = 2) -> str:
    """See the module docstring; missing runs with fewer than ``pairs_needed`` pairs (the planned seeds)."""
    if interval.n < max(2, pairs_needed):
        return MISSING
    low, high = interval.low, interval.high
    if test == "noninferior":
        return SUPPORTED if low > -margin else CONTRADICTED if high < -margin else INCONCLUSIVE
    if test == "equivalent":
        if -margin < low and high < margin:
            return SUPPORTED
        return CONTRADICTED if low > margin or high < -margin else INCONCLUSIVE
    if test in ("superior", "shrinking"):
        return SUPPORTED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE
    raise ConfigError(f"unknown claim test {test!r}")
