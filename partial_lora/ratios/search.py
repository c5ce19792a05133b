"""Algorithm 1: how many of a layer's lowest-scored rows (columns) can be zeroed at tau x baseline accuracy.

For one layer at a time, all others untouched, rows of the pretrained ``W`` are zeroed in order of
increasing importance; the largest count removed with accuracy ``>= tau * mu`` gives
``k_row = m - removed`` (then the same for columns).

``linear`` is the literal algorithm: one evaluation per ``step`` more indices, stopping at the first
failure. ``binary`` assumes accuracy falls monotonically as more is removed and needs O(log m)
evaluations; both return the same count wherever that holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from partial_lora.errors import ConfigError
from partial_lora.importance import LayerScores

SEARCHES = ("linear", "binary")


@dataclass
class LayerCounts:
    k_row: int
    k_col: int
    evaluations: int


def largest_removable(size: int, passes: Callable[[int], bool], search: str, step: int = 1) -> tuple[int, int]:
    """Largest multiple of ``step`` in ``[0, size]`` (or ``size`` itself) that ``passes``; returns (count, calls).

    ``passes(0)`` is taken as true: removing nothing is the baseline itself.
    """
    if search not in SEARCHES:
        raise ConfigError(f"ratios.search must be one of {', '.join(SEARCHES)}, got {search!r}.")
    if step < 1:
        raise ConfigError(f"ratios.step must be an integer >= 1, got {step!r}.")
    candidates = list(range(step, size, step)) + [size]
    calls = 0
    if search == "linear":
        removed = 0
        for count in candidates:
            calls += 1
            if not passes(count):
                break
            removed = count
        return removed, calls
    low, high = -1, len(candidates)  # candidates[low] passes (-1: nothing removed), candidates[high] fails
    while high - low > 1:
        middle = (low + high) // 2
        calls += 1
        if passes(candidates[middle]):
            low = middle
        else:
            high = middle
    return (0 if low < 0 else candidates[low]), calls


@torch.no_grad()
def derive_counts(weights: dict[str, torch.Tensor], scores: dict[str, LayerScores],
                  accuracy: Callable[[str | None, float | None], float], tau: float, search: str = "binary",
                  step: int = 1, progress: bool = True) -> tuple[float, dict[str, LayerCounts]]:
    """Run Algorithm 1 on every weight; returns the baseline accuracy and each layer's kept counts.

    ``accuracy(name, target)`` evaluates the model while layer ``name`` is modified (``None``: the
    baseline), which lets it skip work that layer cannot affect; it may return early with any value on
    the same side of ``target``. Each evaluation zeroes the chosen rows
    (columns) of the weight in place and restores them after.
    """
    if not 0 < tau <= 1:
        raise ConfigError(f"ratios.threshold must lie in (0, 1], got {tau!r}.")
    baseline = accuracy(None, None)
    target = tau * baseline
    counts: dict[str, LayerCounts] = {}
    total_calls = 1
    bar = tqdm(weights.items(), desc="ratio derivation", unit="layer", disable=not progress)
    for name, weight in bar:
        kept = {}
        calls = 0
        for axis, score in (("row", scores[name].row), ("col", scores[name].col)):
            order = torch.argsort(score, stable=True)  # least important first
            view = weight if axis == "row" else weight.T

            def passes(count: int) -> bool:
                chosen = order[:count]
                saved = view[chosen].clone()
                view[chosen] = 0
                try:
                    return accuracy(name, target) >= target
                finally:
                    view[chosen] = saved

            removed, axis_calls = largest_removable(score.numel(), passes, search, step)
            kept[axis] = score.numel() - removed
            calls += axis_calls
        counts[name] = LayerCounts(k_row=kept["row"], k_col=kept["col"], evaluations=calls)
        total_calls += calls
        bar.set_postfix(evaluations=total_calls)
    return baseline, counts
