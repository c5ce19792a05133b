"""The training budget rule: one ladder of budgets for every task of a scale, no per-task entry (issue 32).

A task trains at the first budget of ``scale.budget.ladder`` where the reference method's pilot (LoRA, at the
rule's seed, once per learning rate of ``protocol.lrs``) clears chance on the validation split by the rule's margin;
where no budget does, at the last one, and the learning rule (``results.aggregate.learning_status``) then reports
the task as not learned. A budget is settled as soon as one of its pilots clears the margin (the others cannot
undo that); the next is tried once all of its pilots are finished below it. The decision reads only validation
scores, so no test metric chooses a budget.

The claims and the table targets plan every run of a task with its budget's overrides (``dataset.train_size``,
``train.epochs``); a single ``run.py`` command trains at the first budget unless told otherwise. A budget given on
the command line (claim C7's larger training sets) still wins over the rule's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from partial_lora.errors import ConfigError
from partial_lora.results.aggregate import REFERENCE_METHOD, Learning, fill_majority_rates, learning_status


BUDGET_KEYS = ("dataset.train_size", "train.epochs")  # what a budget sets; the rest of a run's config is its setting's


@dataclass(frozen=True)
class Budget:
    """Training examples (``None``: the whole train split left after the validation part) and epochs."""

    train_size: int | None
    epochs: int

    def overrides(self) -> tuple[str, ...]:
        size = "null" if self.train_size is None else str(self.train_size)
        return tuple(f"{key}={value}" for key, value in zip(BUDGET_KEYS, (size, self.epochs)))

    def describe(self) -> str:
        size = "the whole train split" if self.train_size is None else f"{self.train_size:,} examples"
        return f"{size} x {self.epochs} epochs"


@dataclass(frozen=True)
class Trial:
    """One budget's pilot: how many of its runs finished, of how many, and what the learning rule found on them."""

    budget: Budget
    finished: int
    planned: int
    learning: Learning | None

    @property
    def cleared(self) -> bool:
        # No learning status from finished runs: a metric without a stated chance level, which the rule cannot judge.
        return self.finished > 0 and (self.learning is None or self.learning.learned)


@dataclass(frozen=True)
class BudgetDecision:
    """A task's budget (``chosen``), or the budget whose pilot must run next (``pending``), and the trials so far."""

    dataset: str
    chosen: Budget | None
    pending: Budget | None
    trials: tuple[Trial, ...]


@dataclass(frozen=True)
class BudgetRule:
    ladder: tuple[Budget, ...]
    margins: Mapping[str, float]  # metric -> points above chance on the validation split
    seed: int
    lrs: tuple[float, ...]
    domains: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: DictConfig, extra: list[str] | tuple[str, ...] = ()) -> BudgetRule | None:
        """The scale's rule (``scale.budget``), or ``None`` where the scale trains every task at its configs' own
        budget (the paper scale) or the overrides ``extra`` every run is launched with set a budget key."""
        spec = cfg.scale.get("budget")
        if spec is None or any(override.partition("=")[0].lstrip("+") in BUDGET_KEYS for override in extra):
            return None
        spec = OmegaConf.to_container(spec, resolve=True)
        try:
            ladder = tuple(Budget(step["train_size"], int(step["epochs"])) for step in spec["ladder"])
            rule = cls(ladder, dict(spec["margins"]), int(spec["seed"]), tuple(float(lr) for lr in cfg.protocol.lrs),
                       tuple(spec["domains"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError("scale.budget needs ladder (a list of {train_size, epochs}), margins (metric: points), "
                              f"seed and domains: {error}") from error
        if not ladder or any(budget.epochs < 1 or budget.train_size is not None and budget.train_size < 1
                             for budget in ladder):
            raise ConfigError(f"scale.budget.ladder must list budgets with epochs >= 1 and train_size >= 1 or null, "
                              f"got {spec['ladder']}.")
        return rule

    def pilot_overrides(self, budget: Budget) -> list[tuple[str, ...]]:
        """The overrides of each pilot run at ``budget``, beside the dataset (and the backbone a target names)."""
        return [(f"seed={self.seed}", f"lr={lr}", f"method={REFERENCE_METHOD}", *budget.overrides()) for lr in self.lrs]

    def decide(self, dataset: str, records_of: Callable[[tuple[str, ...]], dict[str, Any] | None],
               data_dir: str | None) -> BudgetDecision:
        """``dataset``'s budget from the pilot records ``records_of(overrides)`` returns (``None``: not run yet);
        majority rates that older records lack are read from ``data_dir``."""
        trials = []
        for index, budget in enumerate(self.ladder):
            found = [record for overrides in self.pilot_overrides(budget)
                     if (record := records_of(overrides)) is not None]
            learning = learning_status(fill_majority_rates(pd.DataFrame(found), data_dir), self.margins).get(dataset) \
                if found else None
            trials.append(Trial(budget, len(found), len(self.lrs), learning))
            if trials[-1].cleared or (len(found) == len(self.lrs) and index == len(self.ladder) - 1):
                return BudgetDecision(dataset, budget, None, tuple(trials))
            if len(found) < len(self.lrs):
                return BudgetDecision(dataset, None, budget, tuple(trials))
        raise AssertionError("unreachable: the last budget is chosen once its pilot finished")

    def describe(self) -> str:
        """The rule in one sentence, for captions and reports."""
        margins = " / ".join(f"{points:g} points ({metric})" for metric, points in self.margins.items())
        ladder = ", then ".join(budget.describe() for budget in self.ladder)
        return (f"Each task trains at the first of these budgets where {REFERENCE_METHOD}'s pilot (seed {self.seed}, "
                f"learning rates {', '.join(f'{lr:g}' for lr in self.lrs)}) clears chance on the validation split by "
                f"{margins}: {ladder}; where none does, at the last.")


def merged(*groups: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Overrides with one value per key, a later group's winning (Hydra refuses a key given twice): a claim's swept
    training size over the budget's."""
    by_key: dict[str, str] = {}
    for group in groups:
        for override in group:
            by_key[override.partition("=")[0]] = override
    return tuple(by_key.values())
