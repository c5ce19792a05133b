"""The paper's claims as paired comparisons over seeds, each with an effect, its 95% interval and a verdict.

``conf/experiment/claims.yaml`` names the arms (settings a run is launched with), the claims (which arm
is compared with which, by which test and margin) and the pilot that picks one learning rate per arm:
each piloted arm trains once per learning rate at a pilot seed kept apart from the claim seeds, and the
learning rate with the best validation score is the one its claim runs use. Arms that only change which
rows and columns a masked adapter keeps take the learning rate of the arm they are a variant of
(``lr_from``), and Balanced takes the sparsity that matches its reference arm's derived parameter count
(``match_sparsity``).

Runs are found by their run id (the hash of the config they are launched with), never by a loose match
of settings, so a record of another preset or another learning rate can never enter a comparison. Both
arms of a claim run on the same seeds (and data seed), so the comparison is paired by seed: the effect
is the mean of per-seed differences (treatment - control, in metric points), and its interval is
Student's t over those differences.

Verdicts, for an interval ``[low, high]`` and margin ``m``:

- ``noninferior`` (the treatment is at most ``m`` below the control): supported if ``low > -m``,
  contradicted if ``high < -m``;
- ``equivalent`` (within ``m`` either way): supported if the interval lies inside ``(-m, m)``,
  contradicted if it lies wholly beyond ``m`` or below ``-m``;
- ``superior`` (the treatment beats the control): supported if ``low > 0``, contradicted if ``high < 0``;
- ``shrinking`` (the control's lead over the treatment shrinks from the smallest to the largest value
  of the swept setting): the per-seed change of that lead, supported if ``low > 0``, contradicted if
  ``high < 0``;

and inconclusive otherwise (at this scale the interval spans the margin). A claim that also requires a
parameter reduction (``min_param_reduction``) is contradicted when the measured reduction falls short.
Until every planned seed has both arms, a claim gets no verdict ("missing runs"), though its partial effect
is shown: a sweep still running must not read as evidence, and its first seeds are no random sample.

A task that LoRA did not learn at this budget (``results.aggregate.learning_status`` over
:meth:`ClaimPlan.budget_records`) gets no verdict either ("not learned", with the reason): its comparisons are
between models at chance. Beside each claim the report shows the treatment arm's adapter parameters as a share
of LoRA's next to the paper's Partial-LoRA share (``results/paper/tables.csv``), the arms' validation-test gaps,
and, where the interval is too wide to decide, how many seeds would decide it (:func:`seeds_to_decide`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from partial_lora.config import register_resolvers
from partial_lora.errors import ConfigError
from partial_lora.protocol.sweep import ROOT, command, launched_run_id, run_multirun
from partial_lora.results.aggregate import (REFERENCE_METHOD, VAL_TEST_GAP, Learning, describe_rule,
                                            fill_majority_rates, large_gap, learning_status, load_records)
from partial_lora.results.tables import load_paper, paper_kept_share, parameter_count

TESTS = ("noninferior", "equivalent", "superior", "shrinking")
SUPPORTED, CONTRADICTED, INCONCLUSIVE, MISSING = "supported", "contradicted", "inconclusive", "missing runs"
NOT_LEARNED = "not learned"
MAX_SEEDS = 1000  # beyond this many seeds a claim is reported as undecidable at the measured spread


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


# --- planning: which runs a claim needs, under which run id ------------------------------------------------

def compose_claims(scale: str, overrides: list[str] = ()) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=claims", f"scale={scale}", *overrides])


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

    def __init__(self, cfg: DictConfig, scale: str, extra: list[str] = ()) -> None:
        self.cfg, self.scale, self.extra = cfg, scale, list(extra)
        self.claims = claims_of(cfg)
        self.arms = OmegaConf.to_container(cfg.claims.arms, resolve=True)
        self.pilot = OmegaConf.to_container(cfg.claims.pilot, resolve=True)
        self.seeds = list(cfg.claims.seeds)
        self.datasets = list(cfg.scale.domains[cfg.claims.domain].datasets)
        self._ids: dict[tuple[str, ...], str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Index the finished records of the store by run id (failed runs have no metric to compare)."""
        frame = load_records(self.cfg.results_dir)
        self.records = {} if frame.empty else {row["run_id"]: row for row in frame.to_dict("records")}

    # settings ---------------------------------------------------------------------------------------------
    def arm_overrides(self, arm: str, dataset: str) -> list[str]:
        """The Hydra overrides of ``arm``, with a matched sparsity filled in (needs the reference's records)."""
        settings = {key: value for key, value in self.arms[arm].items() if key not in ("lr_from", "match_sparsity")}
        overrides = [f"{key}={value}" for key, value in settings.items()]
        reference = self.arms[arm].get("match_sparsity")
        if reference:
            sparsity = self.matched_sparsity(reference, dataset)
            if sparsity is None:
                return []
            overrides.append(f"method.mask.sparsity={sparsity}")
        return overrides

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
        key = (dataset, str(seed), repr(lr), *overrides)
        if key not in self._ids:
            self._ids[key] = launched_run_id("claims", self.scale, [f"dataset={dataset}", f"seed={seed}", f"lr={lr}",
                                                                    *overrides, *self.extra])
        return self._ids[key]

    def record(self, run: PlannedRun) -> dict[str, Any] | None:
        return self.records.get(self.run_id(run.dataset, run.seed, run.lr, run.overrides))

    # pilot ------------------------------------------------------------------------------------------------
    def pilot_runs(self, arm: str, dataset: str) -> list[PlannedRun]:
        overrides = tuple(self.arm_overrides(arm, dataset))
        return [PlannedRun(arm, dataset, self.pilot["seed"], float(lr), overrides) for lr in self.pilot["lrs"]]

    def lr_source(self, arm: str) -> str:
        """The arm whose pilot sets ``arm``'s learning rate: its ``lr_from`` or ``match_sparsity`` arm, or itself."""
        return self.arms[arm].get("lr_from") or self.arms[arm].get("match_sparsity") or arm

    def chosen_lr(self, arm: str, dataset: str) -> float | None:
        """The pilot learning rate with the best validation score (``None`` until every pilot run finished)."""
        source = self.lr_source(arm)
        if self.lr_source(source) != source:
            raise ConfigError(f"claims.arms.{arm}: its lr_from arm {source} must run its own pilot.")
        scores = {}
        for run in self.pilot_runs(source, dataset):
            record = self.record(run)
            if record is None:
                return None
            scores[run.lr] = record["val"]
        return max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the smaller learning rate

    def matched_sparsity(self, reference: str, dataset: str) -> float | None:
        """One sparsity for every layer whose expected parameter count equals ``reference``'s derived counts,
        ``1 - sum(k_row + k_col) / sum(m + n)``, as a finished run of it recorded (``masks.derived_fraction``)."""
        lr = self.chosen_lr(reference, dataset)
        if lr is None:
            return None
        overrides = tuple(self.arm_overrides(reference, dataset))
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
            if any(lr is None for lr in lrs.values()) or any(
                    self.arms[arm].get("match_sparsity") and not overrides[arm] for arm in lrs):
                continue
            for variant in self.variants(claim):
                for seed in self.seeds_of(claim):
                    treatment, control = (PlannedRun(arm, dataset, seed, lrs[arm], tuple(overrides[arm]) + variant)
                                          for arm in (claim.treatment, claim.control))
                    pairs.append((treatment, control, variant))
        return pairs

    def planned_runs(self, swept: bool = True) -> list[PlannedRun]:
        """Every run the records present let the plan name: each arm's pilots, then each claim's runs (with
        ``swept=False``, not those at the values a claim sweeps, such as C7's larger training sets)."""
        runs = []
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
        return OmegaConf.load(ROOT / "conf" / "scale" / "paper.yaml").scale.domains[self.cfg.claims.domain].backbone

    # launching --------------------------------------------------------------------------------------------
    def commands(self, launcher: str = "local") -> list[list[str]]:
        """The multirun commands still to run that the records present let us plan, claim by claim: the
        pilots of its arms, then its runs once their learning rates (and matched sparsities) are decided.
        Run the first, reload, and ask again until nothing is pending (:func:`run_claims`)."""
        commands: dict[tuple, list[str]] = {}
        missing: dict[tuple, list[int]] = {}  # per multirun of claim runs, its seeds (claims differ in theirs)
        for claim in self.claims:
            for arm in (claim.treatment, claim.control):
                source = self.lr_source(arm)
                for dataset in self.datasets_of(claim):
                    if any(self.record(run) is None for run in self.pilot_runs(source, dataset)):
                        overrides = tuple(self.arm_overrides(source, dataset))
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
        return command("claims", self.scale, settings, launcher, [*overrides, *self.extra])


def run_claims(plan: ClaimPlan, launcher: str = "local") -> int:
    """Launch what the claims need, one multirun at a time in claim order (finished runs skip themselves),
    planning again after each: a pilot's records decide the learning rate of the runs after it. Returns how
    many multiruns exited non-zero (their failed runs are recorded and left out of the comparisons)."""
    launched: set[tuple[str, ...]] = set()
    failures = 0
    while True:
        plan.reload()
        pending = [argv for argv in plan.commands(launcher) if tuple(argv) not in launched]
        if not pending:
            return failures
        launched.add(tuple(pending[0]))
        print("+", " ".join(pending[0][1:]), flush=True)
        failures += run_multirun(pending[0]) != 0


# --- verdicts -----------------------------------------------------------------------------------------------

def evaluate_claims(plan: ClaimPlan) -> pd.DataFrame:
    """One row per (claim, dataset): the effect, its interval, parameter counts, kept shares, validation-test
    gaps and the verdict (none on a task not learned; the seeds that would decide an inconclusive one)."""
    budget = plan.budget_records()
    learning, paper, backbone = learning_status(budget), load_paper(), plan.paper_backbone()
    reference = budget[budget["method"] == REFERENCE_METHOD] if not budget.empty else budget
    reference_params = {} if reference.empty else reference.groupby("dataset")["params"].mean()
    rows = []
    for claim in plan.claims:
        pairs = plan.claim_runs(claim)
        for dataset in plan.datasets_of(claim):
            row = {"claim": claim.id, "text": claim.text, "dataset": dataset, "test": claim.test,
                   "treatment": claim.treatment, "control": claim.control, "margin": claim.margin}
            chosen = [(t, c, v) for t, c, v in pairs if t.dataset == dataset]
            found = [(plan.record(t), plan.record(c), v) for t, c, v in chosen]
            found = [(t, c, v) for t, c, v in found if t is not None and c is not None]
            row |= {"lr_treatment": chosen[0][0].lr if chosen else None,
                    "lr_control": chosen[0][1].lr if chosen else None,
                    "runs": 2 * len(found), "planned_runs": 2 * len(plan.seeds_of(claim)) * len(plan.variants(claim))}
            if claim.test == "shrinking":
                variants = plan.variants(claim)
                first, last = variants[0], variants[-1]
                # kept per seed: one diverged run widens an interval, and the report shows which seed it was
                leads = {v: {t["seed"]: c["test"] - t["test"] for t, c, w in found if w == v} for v in variants}
                seeds = [seed for seed in plan.seeds_of(claim) if seed in leads[first] and seed in leads[last]]
                differences = [leads[first][seed] - leads[last][seed] for seed in seeds]
                row["leads"] = {" ".join(v): by_seed for v, by_seed in leads.items()}
            else:
                differences = [t["test"] - c["test"] for t, c, _ in found]
            interval = paired_interval(differences)
            row |= {"effect": interval.mean, "low": interval.low, "high": interval.high, "pairs": interval.n,
                    "paper_kept": paper_kept_share(paper, backbone, dataset)}
            outcome = verdict(claim.test, interval, claim.margin, pairs_needed=len(plan.seeds_of(claim)))
            if found:
                treatment_params = np.mean([t["params"] for t, _, _ in found])
                control_params = np.mean([c["params"] for _, c, _ in found])
                row |= {"params_treatment": treatment_params, "params_control": control_params,
                        # none against a control that trains no adapter (head_only)
                        "param_reduction": 1 - treatment_params / control_params if control_params else np.nan}
                if claim.min_param_reduction is not None and outcome != MISSING:
                    if row["param_reduction"] < claim.min_param_reduction:
                        outcome = CONTRADICTED
                row |= {"mean_treatment": np.mean([t["test"] for t, _, _ in found]),
                        "mean_control": np.mean([c["test"] for _, c, _ in found]),
                        "val_treatment": np.mean([t["val"] for t, _, _ in found]),
                        "val_control": np.mean([c["val"] for _, c, _ in found]),
                        "kept_treatment": treatment_params / reference_params.get(dataset, np.nan)}
            row["verdict"] = outcome if chosen else MISSING
            if row["verdict"] == INCONCLUSIVE:
                row["seeds_to_decide"] = seeds_to_decide(claim.test, interval, claim.margin)
            status = learning.get(dataset)
            if status is not None and not status.learned:
                row |= {"verdict": NOT_LEARNED, "reason": status.reason()}
            rows.append(row)
    return pd.DataFrame(rows)


# --- the report -----------------------------------------------------------------------------------------------

def _points(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:+.2f}"


def _gaps(row: dict[str, Any]) -> str:
    """Mean validation minus test metric of each arm, marked where it is large (``aggregate.VAL_TEST_GAP``)."""
    if not np.isfinite(row.get("val_treatment", np.nan)):
        return "-"
    return " / ".join(_points(val - test) + (" (large)" if large_gap(val, test) else "")
                      for val, test in ((row["val_treatment"], row["mean_treatment"]),
                                        (row["val_control"], row["mean_control"])))


def _kept(row: dict[str, Any]) -> str:
    share = lambda value: "-" if value is None or not np.isfinite(value) else f"{value:.1%}"  # noqa: E731
    return f"{share(row.get('kept_treatment', np.nan))} ({share(row['paper_kept'])})"


def _verdict(row: dict[str, Any]) -> str:
    cell = f"**{row['verdict']}**"
    if row["verdict"] == NOT_LEARNED:
        return f"{cell}: {row['reason']}"
    if row["verdict"] == INCONCLUSIVE:
        seeds = row.get("seeds_to_decide")
        return f"{cell}; " + (f"{seeds:.0f} seeds would decide it" if seeds is not None and np.isfinite(seeds)
                               else f"no number of seeds up to {MAX_SEEDS} would decide it")
    return cell


def _shrinking_lines(row: pd.Series) -> list[str]:
    lines = []
    for variant, leads in row["leads"].items():
        interval = paired_interval(list(leads.values()))
        per_seed = ", ".join(f"{seed}: {_points(lead)}" for seed, lead in leads.items())
        lines.append(f"  - {variant}: {row['control']}'s lead {_points(interval.mean)} "
                     f"[{_points(interval.low)}, {_points(interval.high)}], {interval.n} seeds (by seed {per_seed})")
    return lines


def _learning_lines(learning: dict[str, Learning]) -> list[str]:
    """Per task, the learning rule's numbers: a task LoRA did not learn gets no verdict."""
    lines = ["", "## Learned at this budget", "", f"{describe_rule()} Over the plan's runs at the preset's budget "
             f"(pilots included); chance is unknown where neither the records nor the local data give the validation "
             f"split's majority rate; such a task is not judged.", "",
             f"| dataset | metric | {REFERENCE_METHOD}'s best validation | chance on validation | margin | learned |",
             "|---|---|---|---|---|---|"]
    for dataset, status in learning.items():
        learned = "unknown" if not status.known else "yes" if status.learned else "**no**"
        lines.append(f"| {dataset} | {status.metric} | {status.best_val:.2f} | {status.chance:.2f} | "
                     f"{status.margin:g} | {learned} |")
    return lines


def _compute_lines(plan: ClaimPlan) -> list[str]:
    """What the records behind the report cost: their count and summed run wall time (what one worker would
    take to run them all in turn; concurrent workers on shared cores make each run slower), per dataset."""
    frame = pd.DataFrame(plan.planned_records().values())
    lines = ["", "## Compute", "",
             "The finished runs this report uses (pilots included, a run shared by claims counted once) and the sum "
             "of their wall times as recorded, including each masked run's ratio derivation when it was not cached.",
             "", "| dataset | runs | summed wall time (h) | median per run (s) |", "|---|---|---|---|"]
    if frame.empty:
        return lines
    for dataset, group in [*frame.groupby("dataset"), ("all", frame)]:
        lines.append(f"| {dataset} | {len(group)} | {group['wall_time_s'].sum() / 3600:.2f} | "
                     f"{group['wall_time_s'].median():.0f} |")
    return lines


def _derivation_lines(plan: ClaimPlan) -> list[str]:
    """The derivations behind the claim runs, per dataset and importance measure, over the claim seeds: a probed
    head starts from each seed's random head, so each seed derives its own counts (mask modes and training sizes
    at one seed share them)."""
    lines = ["", "## Derivations", "",
             f"Rule `{plan.cfg.ratios.rule}`, threshold {plan.cfg.ratios.threshold:g}, one derivation per claim seed: "
             f"the pretrained model's accuracy on the derivation set (its head fitted there as a probe), the set's "
             f"majority-class rate, the share of the adapter's rows and columns the derived counts keep (mean and "
             f"range over seeds), and how many seeds' derivations were flagged (near chance, or under 1% kept).", "",
             "| dataset | importance (ratio settings) | seeds | baseline accuracy | majority rate | kept, mean (range) "
             "| flagged |",
             "|---|---|---|---|---|---|---|"]
    derivations = {}
    for run in plan.planned_runs():
        record = plan.record(run)
        masks = None if record is None else record.get("masks")
        if run.seed != plan.pilot["seed"] and isinstance(masks, dict) and "derived_fraction" in masks:
            # an arm that derives under other ratio settings (C9's larger set) is a derivation of its own
            setting = ", ".join([record["importance"], *(item for item in run.overrides if item.startswith("ratios."))])
            derivations.setdefault((run.dataset, setting), {})[run.seed] = masks
    for (dataset, importance), by_seed in sorted(derivations.items(), key=lambda item: (plan.datasets.index(item[0][0]),
                                                                                        item[0][1])):
        kept = [masks["derived_fraction"] for masks in by_seed.values()]
        flagged = sum(bool(masks.get("warnings")) for masks in by_seed.values())
        lines.append(f"| {dataset} | {importance} | {len(by_seed)} | "
                     f"{np.mean([masks.get('baseline_accuracy', math.nan) for masks in by_seed.values()]):.3f} | "
                     f"{np.mean([masks.get('majority_rate', math.nan) for masks in by_seed.values()]):.3f} | "
                     f"{np.mean(kept):.2%} ({min(kept):.2%}-{max(kept):.2%}) | {flagged} of {len(by_seed)} |")
    return lines


def render_report(plan: ClaimPlan, verdicts: pd.DataFrame, directory: str | Path = "results/claims") -> list[Path]:
    """Write ``claims_<scale>.md`` (verdict table, per-claim detail, pilot choices) and ``claims_<scale>.png``;
    ``claims_<scale>_<name>`` for a plan under other settings named by ``claims.name``."""
    from partial_lora.results import figures

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = plan.cfg.claims.get("name")
    stem = f"claims_{plan.scale}" + (f"_{name}" if name else "")
    domain = plan.cfg.scale.domains[plan.cfg.claims.domain]
    settings = " under `" + " ".join(o for o in plan.extra if not o.startswith("claims.")) + "`" if name else ""
    lines = [f"# The paper's claims at scale `{plan.scale}`{settings}", "",
             f"Backbone `{domain.backbone}`; datasets {', '.join(plan.datasets)}; seeds {plan.seeds} for both arms of "
             f"every claim (paired by seed) but those whose verdict names more; effect = treatment - control in metric points (x100), mean of the "
             f"per-seed differences with a 95% Student-t interval. Verdicts: supported / contradicted when the "
             f"interval clears the claim's margin, inconclusive when it spans it (with the seeds that would decide it "
             f"if the mean and spread of the paired differences stayed as measured), missing runs until every seed has "
             f"both arms, and not learned on a task {REFERENCE_METHOD} did not learn (see "
             f"`partial_lora/protocol/claims.py` and Learned at this budget below). {describe_rule()} Kept: the "
             f"treatment's adapter parameters over {REFERENCE_METHOD}'s on the task, beside the paper's Partial-LoRA "
             f"share ({plan.paper_backbone()}, `results/paper/tables.csv`). val - test: each arm's mean validation "
             f"minus test metric, (large) beyond "
             f"{VAL_TEST_GAP:g} points. Rendered from the run records (and, for the majority rates older records "
             f"lack, the local data).", "",
             "| claim | dataset | treatment vs control | lr (T / C) | runs | treatment | control | effect [95% CI] "
             "| margin | params T / C (reduction) | kept T (paper) | val - test T / C | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in verdicts.to_dict("records"):
        params = "-"
        if np.isfinite(row.get("params_treatment", np.nan)):
            params = f"{parameter_count(row['params_treatment'])} / {parameter_count(row['params_control'])}"
            if np.isfinite(row["param_reduction"]):
                params += f" ({row['param_reduction']:.0%})"
        margin = {"noninferior": f"-{row['margin']:g}", "equivalent": f"±{row['margin']:g}"}.get(row["test"], "0")
        lrs = "-" if pd.isna(row["lr_treatment"]) else f"{row['lr_treatment']:g} / {row['lr_control']:g}"
        mean = lambda key: "-" if not np.isfinite(row.get(key, np.nan)) else f"{row[key]:.2f}"  # noqa: E731
        lines.append(f"| {row['claim']} | {row['dataset']} | {row['treatment']} vs {row['control']} | {lrs} | "
                     f"{row['runs']}/{row['planned_runs']} | {mean('mean_treatment')} | {mean('mean_control')} | "
                     f"{_points(row['effect'])} [{_points(row['low'])}, {_points(row['high'])}] | {margin} | "
                     f"{params} | {_kept(row)} | {_gaps(row)} | {_verdict(row)} |")
    lines += ["", "## Claims", ""]
    for claim in plan.claims:
        lines.append(f"- **{claim.id}** ({claim.test}): {claim.text}.")
        for row in verdicts[verdicts["claim"] == claim.id].to_dict("records"):
            if claim.test == "shrinking" and isinstance(row.get("leads"), dict):
                lines += _shrinking_lines(pd.Series(row))
    lines += ["", "## Learning rates (pilot)", "",
              f"Each piloted arm trained once per learning rate at seed {plan.pilot['seed']} (not a claim seed); "
              f"its claim runs use the rate with the best validation score (in bold). Arms with `lr_from` or "
              f"`match_sparsity` use their reference arm's rate.", "",
              "| arm | dataset | " + " | ".join(f"val at lr {lr:g}" for lr in plan.pilot["lrs"]) + " |",
              "|---|---|" + "---|" * len(plan.pilot["lrs"])]
    for arm in dict.fromkeys(plan.lr_source(arm) for arm in plan.arms):
        for dataset in plan.datasets:
            chosen = plan.chosen_lr(arm, dataset)
            cells = []
            for run in plan.pilot_runs(arm, dataset):
                record = plan.record(run)
                cell = "-" if record is None else f"{record['val']:.2f}"
                cells.append(f"**{cell}**" if run.lr == chosen else cell)
            lines.append(f"| {arm} | {dataset} | " + " | ".join(cells) + " |")
    lines += _learning_lines(learning_status(plan.budget_records()))
    lines += _derivation_lines(plan)
    lines += _compute_lines(plan)
    image = directory / f"{stem}.png"
    lines += ["", f"![claims]({image.name})", ""]
    report = directory / f"{stem}.md"
    report.write_text("\n".join(lines))
    figures.save(figures.claims_forest(verdicts, f"Claims at scale {plan.scale}: effect and 95% interval"), image)
    return [report, image]
