"""Algorithm 1: how many of a layer's lowest-scored rows (columns) can be zeroed at tau x baseline accuracy.

For one layer at a time, all others untouched, rows of the pretrained ``W`` are zeroed in order of
increasing importance; the largest count removed with accuracy ``>= tau * mu`` gives
``k_row = m - removed`` (then the same for columns).

``linear`` is the literal algorithm: one evaluation per ``step`` more indices, stopping at the first
failure. ``binary`` assumes accuracy falls monotonically as more is removed and needs O(log m)
evaluations; both return the same count wherever that holds. ``whole_first`` (the default) makes the
same assumption and first tries removing everything: removing all rows and all columns both give
``W = 0``, so one evaluation settles both axes of a matrix that can go entirely, and it costs one
extra evaluation otherwise. Where accuracy is not monotone the three can differ: if ``W = 0`` passes
but some smaller removal fails, ``whole_first`` removes everything (the largest removal that passes),
where ``binary`` stops at whichever pass-to-fail step its probes happen to meet and ``linear`` at the
first failure.

Why ``whole_first`` is the default: on MiniLM/SST-2 (SVD, paper rule, 256 examples; ``make bench``) most
matrices can go entirely, which costs ``binary`` some 18 passing evaluations each and ``whole_first`` one:
55 evaluations in 28.7 s against 638 in 319.3 s, measured in one run. The counts differ only in layers where
accuracy is not monotone (``make bench`` lists them); ``binary`` and ``linear`` stay as references.

The scope says what the other layers hold while one is searched. ``isolated`` is the paper's text: every
other layer untouched, so each layer's removal is bounded alone and the ticket as a whole (every layer's
removal at once) is never evaluated. ``cumulative`` keeps each searched layer's removals applied while later
layers (and a layer's columns after its rows) are searched, against the same target: every accepted state is
the ticket so far, so the whole ticket meets the bound. :func:`ticket_metric` measures the whole ticket under
either scope.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from partial_lora.errors import SettingError, check_choice
from partial_lora.importance import LayerScores

SEARCHES = ("linear", "binary", "whole_first")
SCOPES = ("isolated", "cumulative")


@dataclass
class LayerCounts:
    k_row: int
    k_col: int
    evaluations: int


def _candidates(size: int, step: int) -> list[int]:
    return list(range(step, size, step)) + [size]


def literal_evaluations(size: int, removed: int, step: int = 1) -> int:
    """Evaluations the literal (linear) search spends to find ``removed`` of ``size`` (one per candidate
    up to it, plus the first failing one), assuming monotone accuracy: the baseline of the speed-up."""
    candidates = _candidates(size, step)
    passed = 0 if removed == 0 else candidates.index(removed) + 1
    return passed + (removed < size)


def largest_removable(size: int, passes: Callable[[int], bool], search: str, step: int = 1) -> tuple[int, int]:
    """Largest multiple of ``step`` in ``[0, size]`` (or ``size`` itself) that ``passes``; returns (count, calls).

    ``passes(0)`` is taken as true: removing nothing is the baseline itself. ``whole_first`` asks
    about ``size`` first (see the module docstring).
    """
    check_choice("largest_removable", "search", search, SEARCHES)
    if step < 1:
        raise SettingError("largest_removable", "step", "must be an integer >= 1", step)
    candidates = _candidates(size, step)
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
    if search == "whole_first":
        calls += 1
        if passes(size):
            return size, calls
        high -= 1
    while high - low > 1:
        middle = (low + high) // 2
        calls += 1
        if passes(candidates[middle]):
            low = middle
        else:
            high = middle
    return (0 if low < 0 else candidates[low]), calls


RULES = ("paper", "above_chance", "loss")


@dataclass(frozen=True)
class AcceptanceRule:
    """When Algorithm 1 accepts a removal: a bound that one evaluation on the derivation set must meet.

    - ``paper``: accuracy >= ``tau`` x ``mu`` (Algorithm 1 as written). Where ``tau`` x ``mu`` is at or
      below the majority-class rate ``chance``, a model that predicts one class passes, so zeroing a whole
      matrix passes and the search empties it: a hard task, a small model or a few-shot head is enough.
    - ``above_chance``: accuracy - ``chance`` >= ``tau`` x (``mu`` - ``chance``): a share ``tau`` of the
      pretrained model's margin over the majority class must stay. Equal to ``paper`` when ``chance`` = 0.
    - ``loss`` (beyond the paper): the mean cross-entropy may rise by at most ``max_loss_increase`` (a
      fraction) over the pretrained model's; it needs no accuracy, so it also serves tasks without one.
    """

    name: str
    tau: float
    chance: float = 0.0
    max_loss_increase: float = 0.1

    def __post_init__(self) -> None:
        check_choice("AcceptanceRule", "name", self.name, RULES)
        if not 0 < self.tau <= 1:
            raise SettingError("AcceptanceRule", "tau", "must lie in (0, 1]", self.tau)
        if not self.max_loss_increase > 0:
            raise SettingError("AcceptanceRule", "max_loss_increase", "must be a number > 0", self.max_loss_increase)

    @property
    def metric(self) -> str:
        """What each evaluation measures: ``accuracy`` (higher is better) or ``loss`` (lower is better)."""
        return "loss" if self.name == "loss" else "accuracy"

    def target(self, baseline: float) -> float:
        if self.name == "loss":
            return baseline * (1 + self.max_loss_increase)
        floor = self.chance if self.name == "above_chance" else 0.0
        return floor + self.tau * (baseline - floor)

    def passes(self, value: float, target: float) -> bool:
        return value <= target if self.metric == "loss" else value >= target


def removed_indices(score: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``len(score) - kept`` least important indices: what Algorithm 1 zeroes to keep ``kept``."""
    return torch.argsort(score, stable=True)[: score.numel() - kept]


@torch.no_grad()
def search_counts(weights: dict[str, torch.Tensor], scores: dict[str, LayerScores],
                  evaluate: Callable[[str | None, float | None], float], rule: AcceptanceRule,
                  search: str = "whole_first", step: int = 1, progress: bool = True, scope: str = "isolated",
                  weights_changed: Callable[[str], None] | None = None) -> tuple[float, dict[str, LayerCounts]]:
    """Run Algorithm 1 on every weight; returns the baseline value of ``rule.metric`` and each layer's counts.

    ``evaluate(name, target)`` measures ``rule.metric`` while layer ``name`` is modified (``None``: the
    baseline), which lets it skip work that layer cannot affect; it may return early with any value on
    the same side of ``target``. Each evaluation zeroes the chosen rows
    (columns) of the weight in place and restores them after. Removing every row and removing every
    column are the same ``W = 0``: it is evaluated once per layer, and counted once.

    Under ``scope="cumulative"`` (module docstring) a layer's accepted removal stays zeroed until the search
    ends, and ``weights_changed(name)`` is told each time one does (an evaluator caching what earlier layers
    compute must recompute it); every weight is restored at the end either way.
    """
    check_choice("search_counts", "scope", scope, SCOPES)
    baseline = evaluate(None, None)
    target = rule.target(baseline)
    counts: dict[str, LayerCounts] = {}
    applied: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (view, indices, saved) to restore
    total_calls = 1
    bar = tqdm(weights.items(), desc="ratio derivation", unit="layer", disable=not progress)
    try:
        for name, weight in bar:
            kept = {}
            decided: dict[str, bool] = {}  # "everything": whether W = 0 passes
            calls = 0
            for axis, score in (("row", scores[name].row), ("col", scores[name].col)):
                order = torch.argsort(score, stable=True)  # least important first
                view = weight if axis == "row" else weight.T

                def passes(count: int) -> bool:
                    nonlocal calls
                    everything = count == len(order)
                    if everything and "everything" in decided:
                        return decided["everything"]
                    chosen = order[:count]
                    saved = view[chosen].clone()
                    view[chosen] = 0
                    try:
                        calls += 1
                        result = rule.passes(evaluate(name, target), target)
                    finally:
                        view[chosen] = saved
                    if everything:
                        decided["everything"] = result
                    return result

                removed, _ = largest_removable(score.numel(), passes, search, step)
                kept[axis] = score.numel() - removed
                if scope == "cumulative" and removed:
                    chosen = order[:removed]
                    applied.append((view, chosen, view[chosen].clone()))
                    view[chosen] = 0
                    if weights_changed is not None:
                        weights_changed(name)
            counts[name] = LayerCounts(k_row=kept["row"], k_col=kept["col"], evaluations=calls)
            total_calls += calls
            bar.set_postfix(evaluations=total_calls)
    finally:
        for view, chosen, saved in reversed(applied):
            view[chosen] = saved
        if applied and weights_changed is not None:  # restored from the first layer on
            weights_changed(next(iter(weights)))
    return baseline, counts


@torch.no_grad()
def ticket_metric(weights: dict[str, torch.Tensor], scores: dict[str, LayerScores], counts: dict[str, LayerCounts],
                  evaluate: Callable[[str | None, float | None], float]) -> float:
    """``evaluate``'s metric with every layer's removal applied at once (the whole ticket), weights restored after.

    ``evaluate`` is called as for the baseline (``None``: nothing replayed), since every layer is modified.
    """
    saved = []
    try:
        for name, weight in weights.items():
            rows = removed_indices(scores[name].row, counts[name].k_row)
            cols = removed_indices(scores[name].col, counts[name].k_col)
            saved.append((weight, weight.detach().clone()))
            weight[rows] = 0
            weight[:, cols] = 0
        return evaluate(None, None)
    finally:
        for weight, original in saved:
            weight.copy_(original)
