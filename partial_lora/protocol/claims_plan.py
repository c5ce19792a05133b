"""Planning the claims: which runs each needs (pilots, then claim runs at the chosen learning rates), under
which run id, and launching them in turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from partial_lora.errors import ConfigError
from partial_lora.protocol.budget import BudgetDecision, BudgetRule, merged
from partial_lora.protocol.claims_statistics import TESTS
from partial_lora.protocol.sweep import Checkout, command, compose, launch_multirun, launched_run_id
from partial_lora.results.aggregate import REFERENCE_METHOD, fill_majority_rates, load_records


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    test: str
    treatment: str
    control: str
    margin: float = 1.0
    min_param_reduction: float | None = None
    datasets: tuple[str, ...] | None = None
    over: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # test=shrinking: one swept setting
    seeds: tuple[int, ...] | None = None  # the claim's own seeds (None: claims.seeds)

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ConfigError(f"claim {self.id}: test must be one of {', '.join(TESTS)}, got {self.test!r}.")
        if (self.test == "shrinking") != (len(self.over) == 1):
            raise ConfigError(f"claim {self.id}: test=shrinking needs exactly one swept setting under `over`, "
                              f"and only it may have one.")



def compose_claims(checkout: Checkout, scale: str, overrides: list[str] = ()) -> DictConfig:
    return compose(checkout.conf, ["experiment=claims", f"scale={scale}", *overrides])


def claims_of(cfg: DictConfig) -> list[Claim]:
    claims = []
    for item in cfg.claims["items"]:
        item = OmegaConf.to_container(item, resolve=True)
        item["datasets"] = tuple(item["datasets"]) if item.get("datasets") else None
        item["over"] = {key: tuple(values) for key, values in (item.get("over") or {}).items()}
        item["seeds"] = tuple(item["seeds"]) if item.get("seeds") else None
        unknown = {item["treatment"], item["control"]} - set(cfg.claims.arms)
        if unknown:
            raise ConfigError(f"claim {item['id']} compares arms {sorted(unknown)} that claims.arms does not define.")
        claims.append(Claim(**item))
    return claims


@dataclass(frozen=True)
class PlannedRun:
    arm: str
    dataset: str
    seed: int
    lr: float
    overrides: tuple[str, ...]  # beyond experiment / scale / dataset / seed / lr


class ClaimPlan:
    """Every run the claims of one scale need, and their records once present."""

    def __init__(self, checkout: Checkout, cfg: DictConfig, scale: str, extra: list[str] = ()) -> None:
        self.checkout, self.cfg, self.scale, self.extra = checkout, cfg, scale, list(extra)
        self.claims = claims_of(cfg)
        self.arms = OmegaConf.to_container(cfg.claims.arms, resolve=True)
        self.pilot = OmegaConf.to_container(cfg.claims.pilot, resolve=True)
        self.seeds = list(cfg.claims.seeds)
        self.datasets = list(cfg.scale.domains[cfg.claims.domain].datasets)
        rule = BudgetRule.from_config(cfg, self.extra)
        self.budget_rule = rule if rule is not None and cfg.claims.domain in rule.domains else None
        self._budgets: dict[str, BudgetDecision] = {}
        self._ids: dict[tuple[str, ...], str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Index the finished records of the store by run id (failed runs have no metric to compare)."""
        frame = load_records(self.cfg.results_dir)
        self.records = {} if frame.empty else {row["run_id"]: row for row in frame.to_dict("records")}
        self._budgets = {}

    # budget -----------------------------------------------------------------------------------------------
    def budget(self, dataset: str) -> BudgetDecision | None:
        """``dataset``'s training budget under the scale's rule (``None``: the scale has no rule for the domain)."""
        if self.budget_rule is None:
            return None
        if dataset not in self._budgets:
            self._budgets[dataset] = self.budget_rule.decide(
                dataset, lambda overrides: self.records.get(self._launched_id((f"dataset={dataset}", *overrides))),
                self.cfg.data_dir)
        return self._budgets[dataset]

    def budget_overrides(self, dataset: str) -> tuple[str, ...] | None:
        """The overrides of ``dataset``'s budget for every run of it (``None`` until the budget is decided)."""
        decision = self.budget(dataset)
        if decision is None:
            return ()
        return None if decision.chosen is None else decision.chosen.overrides()

    def budget_pilot_runs(self, dataset: str) -> list[PlannedRun]:
        """The budget rule's pilot runs of ``dataset`` so far: every budget tried, the one under trial included."""
        decision = self.budget(dataset)
        if decision is None:
            return []
        return [PlannedRun(REFERENCE_METHOD, dataset, self.budget_rule.seed, lr, (f"method={REFERENCE_METHOD}",
                                                                                  *trial.budget.overrides()))
                for trial in decision.trials for lr in self.budget_rule.lrs]

    # settings ---------------------------------------------------------------------------------------------
    def arm_overrides(self, arm: str, dataset: str) -> list[str] | None:
        """The Hydra overrides of ``arm`` on ``dataset``: the dataset's budget, the arm's settings and a matched
        sparsity (``None`` until the budget and the matched sparsity are decided by the records present)."""
        budget = self.budget_overrides(dataset)
        if budget is None:
            return None
        settings = {key: value for key, value in self.arms[arm].items() if key not in ("lr_from", "match_sparsity")}
        overrides = [f"{key}={value}" for key, value in settings.items()]
        reference = self.arms[arm].get("match_sparsity")
        if reference:
            sparsity = self.matched_sparsity(reference, dataset)
            if sparsity is None:
                return None
            overrides.append(f"method.mask.sparsity={sparsity}")
        return list(merged(budget, overrides))

    def seeds_of(self, claim: Claim) -> list[int]:
        return list(claim.seeds or self.seeds)

    def datasets_of(self, claim: Claim) -> list[str]:
        return [name for name in self.datasets if claim.datasets is None or name in claim.datasets]

    def variants(self, claim: Claim) -> list[tuple[str, ...]]:
        """Extra overrides per value of the claim's swept setting (one empty variant when it sweeps nothing)."""
        if not claim.over:
            return [()]
        (key, values), = claim.over.items()
        return [(f"{key}={value}",) for value in values]

    def run_id(self, dataset: str, seed: int, lr: float, overrides: tuple[str, ...] | list[str]) -> str:
        """The id ``run.py`` gives this run: the hash of its resolved config (see ``RunSlot``)."""
        return self._launched_id((f"dataset={dataset}", f"seed={seed}", f"lr={lr}", *overrides))

    def _launched_id(self, overrides: tuple[str, ...]) -> str:
        if overrides not in self._ids:
            self._ids[overrides] = launched_run_id(self.checkout, "claims", self.scale, [*overrides, *self.extra])
        return self._ids[overrides]

    def record(self, run: PlannedRun) -> dict[str, Any] | None:
        return self.records.get(self.run_id(run.dataset, run.seed, run.lr, run.overrides))

    # pilot ------------------------------------------------------------------------------------------------
    def pilot_runs(self, arm: str, dataset: str) -> list[PlannedRun]:
        """``arm``'s pilot on ``dataset``, one run per rate (none until the dataset's budget is decided)."""
        overrides = self.arm_overrides(arm, dataset)
        if overrides is None:
            return []
        return [PlannedRun(arm, dataset, self.pilot["seed"], float(lr), tuple(overrides)) for lr in self.pilot["lrs"]]

    def lr_source(self, arm: str) -> str:
        """The arm whose pilot sets ``arm``'s learning rate: its ``lr_from`` or ``match_sparsity`` arm, or itself."""
        return self.arms[arm].get("lr_from") or self.arms[arm].get("match_sparsity") or arm

    def chosen_lr(self, arm: str, dataset: str) -> float | None:
        """The pilot learning rate with the best validation score (``None`` until every pilot run finished)."""
        source = self.lr_source(arm)
        if self.lr_source(source) != source:
            raise ConfigError(f"claims.arms.{arm}: its lr_from arm {source} must run its own pilot.")
        scores = {}
        runs = self.pilot_runs(source, dataset)
        for run in runs:
            record = self.record(run)
            if record is None:
                return None
            scores[run.lr] = record["val"]
        if not runs:
            return None
        return max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the smaller learning rate

    def matched_sparsity(self, reference: str, dataset: str) -> float | None:
        """One sparsity for every layer whose expected parameter count equals ``reference``'s derived counts,
        ``1 - sum(k_row + k_col) / sum(m + n)``, as a finished run of it recorded (``masks.derived_fraction``)."""
        lr = self.chosen_lr(reference, dataset)
        if lr is None:
            return None
        overrides = tuple(self.arm_overrides(reference, dataset))  # decided: its pilot chose a rate
        for seed in self.seeds:
            record = self.record(PlannedRun(reference, dataset, seed, lr, overrides))
            if record is not None:
                return round(1 - record["masks"]["derived_fraction"], 4)
        return None

    def claim_runs(self, claim: Claim) -> list[tuple[PlannedRun, PlannedRun, tuple[str, ...]]]:
        """(treatment, control, variant) pairs of planned runs, for each dataset whose pilots (and matched
        sparsities) are decided: one dataset's unfinished pilot does not hold back another's claim runs."""
        pairs = []
        for dataset in self.datasets_of(claim):
            lrs = {arm: self.chosen_lr(arm, dataset) for arm in (claim.treatment, claim.control)}
            overrides = {arm: self.arm_overrides(arm, dataset) for arm in lrs}
            if any(lr is None for lr in lrs.values()) or any(overrides[arm] is None for arm in lrs):
                continue
            for variant in self.variants(claim):
                for seed in self.seeds_of(claim):
                    treatment, control = (PlannedRun(arm, dataset, seed, lrs[arm], merged(overrides[arm], variant))
                                          for arm in (claim.treatment, claim.control))
                    pairs.append((treatment, control, variant))
        return pairs

    def planned_runs(self, swept: bool = True) -> list[PlannedRun]:
        """Every run the records present let the plan name: the budget rule's pilots, each arm's pilots, then each
        claim's runs (with ``swept=False``, only the runs at each task's budget: not the pilots of budgets the rule
        passed over, nor those at the values a claim sweeps, such as C7's larger training sets)."""
        runs = []
        for dataset in self.datasets:
            decision = self.budget(dataset)
            at_budget = None if decision is None else (decision.chosen or decision.pending).overrides()
            runs += [run for run in self.budget_pilot_runs(dataset) if swept or run.overrides[1:] == at_budget]
        for claim in self.claims:
            for arm in (claim.treatment, claim.control):
                for dataset in self.datasets_of(claim):
                    runs += self.pilot_runs(self.lr_source(arm), dataset)
            runs += [run for treatment, control, variant in self.claim_runs(claim) if swept or not variant
                     for run in (treatment, control)]
        return runs

    def planned_records(self, swept: bool = True) -> dict[str, dict[str, Any]]:
        """The finished records the plan uses, pilots included, by run id (a run shared by claims once)."""
        records = (self.record(run) for run in self.planned_runs(swept))
        return {record["run_id"]: record for record in records if record is not None}

    def budget_records(self) -> pd.DataFrame:
        """The plan's finished runs at the preset's budget (the pilots and the claim runs outside a swept setting),
        with the majority rates that older records lack read from the local data (``fill_majority_rates``)."""
        return fill_majority_rates(pd.DataFrame(self.planned_records(swept=False).values()), self.cfg.data_dir)

    def paper_backbone(self) -> str:
        """The paper's backbone for the claims' domain (``conf/scale/paper.yaml``), whose shares the report cites."""
        paper = OmegaConf.load(self.checkout.conf / "scale" / "paper.yaml")
        return paper.scale.domains[self.cfg.claims.domain].backbone

    # launching --------------------------------------------------------------------------------------------
    def commands(self, launcher: str = "local") -> list[list[str]]:
        """The multirun commands still to run that the records present let us plan, claim by claim: the
        pilots of its arms, then its runs once their learning rates (and matched sparsities) are decided.
        Run the first, reload, and ask again until nothing is pending (:func:`run_claims`)."""
        commands: dict[tuple, list[str]] = {}
        missing: dict[tuple, list[int]] = {}  # per multirun of claim runs, its seeds (claims differ in theirs)
        for dataset in self.datasets:
            decision = self.budget(dataset)
            if decision is not None and decision.pending is not None:
                commands[("budget", dataset)] = self._multirun(
                    dataset, [self.budget_rule.seed], list(self.budget_rule.lrs),
                    (f"method={REFERENCE_METHOD}", *decision.pending.overrides()), "local")
        for claim in self.claims:
            for arm in (claim.treatment, claim.control):
                source = self.lr_source(arm)
                for dataset in self.datasets_of(claim):
                    if any(self.record(run) is None for run in self.pilot_runs(source, dataset)):
                        overrides = tuple(self.arm_overrides(source, dataset))  # the budget is decided
                        # In turn, not in parallel: the first run derives the ratios, the next reads the cache.
                        commands.setdefault(("pilot", source, dataset), self._multirun(
                            dataset, [self.pilot["seed"]], list(self.pilot["lrs"]), overrides, "local"))
            for treatment, control, _ in self.claim_runs(claim):
                for run in (treatment, control):
                    key = (run.dataset, run.lr, run.overrides)
                    if self.record(run) is None and run.seed not in missing.setdefault(key, []):
                        missing[key].append(run.seed)
                        commands[key] = self._multirun(run.dataset, missing[key], [run.lr], run.overrides, launcher)
        return list(commands.values())

    def _multirun(self, dataset: str, seeds: list[int], lrs: list[float], overrides: tuple[str, ...],
                  launcher: str) -> list[str]:
        settings = {"dataset": [dataset], "seed": seeds, "lr": lrs}
        return command(self.checkout, "claims", self.scale, settings, launcher, [*overrides, *self.extra])


def run_claims(plan: ClaimPlan, launcher: str = "local") -> int:
    """Launch what the claims need, one multirun at a time in claim order (finished runs skip themselves),
    planning again after each: a pilot's records decide the learning rate of the runs after it. Returns how
    many multiruns had failed or refused runs (recorded, and left out of the comparisons); the tables' failure rule
    (:func:`launch_multirun`) applies."""
    launched: set[tuple[str, ...]] = set()
    failures = 0
    while True:
        plan.reload()
        pending = [argv for argv in plan.commands(launcher) if tuple(argv) not in launched]
        if not pending:
            return failures
        launched.add(tuple(pending[0]))
        print("+", " ".join(pending[0][1:]), flush=True)
        failures += launch_multirun(pending[0], plan.checkout.root)

