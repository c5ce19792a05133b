"""The claims report: the verdict table, per-claim detail, pilot choices, learning, derivations and compute
(Markdown), and the forest plot of effects (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from partial_lora.protocol.claims_plan import ClaimPlan
from partial_lora.protocol.claims_statistics import INCONCLUSIVE, MAX_SEEDS, NO_CONTRAST, NOT_LEARNED, paired_interval
from partial_lora.results.aggregate import (REFERENCE_METHOD, VAL_TEST_GAP, Learning, describe_rule, large_gap,
                                            learning_status)
from partial_lora.results.tables import parameter_count


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
    if row["verdict"] in (NOT_LEARNED, NO_CONTRAST):
        return f"{cell}: {row['reason']}"
    if row["verdict"] == INCONCLUSIVE:
        seeds = row.get("seeds_to_decide")
        cell += "; " + (f"{seeds:.0f} seeds would decide it" if seeds is not None and np.isfinite(seeds)
                        else f"no number of seeds up to {MAX_SEEDS} would decide it")
    at_chance = row.get("at_chance")
    if isinstance(at_chance, list) and at_chance:
        cell += f"; not clear of chance on validation: {', '.join(at_chance)}"
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
    lines = ["", "## Learned at this budget", "", f"{describe_rule()} Over the plan's runs at each task's budget "
             f"(pilots included); chance is unknown where neither the records nor the local data give the validation "
             f"split's majority rate; such a task is not judged.", "",
             f"| dataset | metric | {REFERENCE_METHOD}'s best validation | chance on validation | margin | learned |",
             "|---|---|---|---|---|---|"]
    for dataset, status in learning.items():
        learned = "unknown" if not status.known else "yes" if status.learned else "**no**"
        lines.append(f"| {dataset} | {status.metric} | {status.best_val:.2f} | {status.chance:.2f} | "
                     f"{status.margin:g} | {learned} |")
    return lines


def _budget_lines(plan: ClaimPlan) -> list[str]:
    """Per task, the budget the rule chose (or the one under trial) and each budget's pilot result."""
    if plan.budget_rule is None:
        return []
    lines = ["", "## Training budget", "", f"{plan.budget_rule.describe()} Pilot runs finished of planned, and the "
             f"best validation score among them against chance on the validation split.", "",
             f"| dataset | budget | pilot runs | {REFERENCE_METHOD}'s best validation | chance on validation | "
             f"clears the margin | trains at |", "|---|---|---|---|---|---|---|"]
    for dataset in plan.datasets:
        decision = plan.budget(dataset)
        for trial in decision.trials:
            best, chance = (("-", "-") if trial.learning is None else
                            (f"{trial.learning.best_val:.2f}", f"{trial.learning.chance:.2f}"))
            clears = "yes" if trial.cleared else "no" if trial.finished == trial.planned else "not yet"
            state = ("**this budget**" if trial.budget == decision.chosen else
                     "pilot pending" if trial.budget == decision.pending else "")
            lines.append(f"| {dataset} | {trial.budget.describe()} | {trial.finished} of {trial.planned} | {best} | "
                         f"{chance} | {clears} | {state} |")
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
             f"both arms, no contrast where neither arm trains an adapter parameter, and not learned on a task "
             f"{REFERENCE_METHOD} did not learn (see "
             f"`partial_lora/protocol/claims.py` and Learned at this budget below). {describe_rule()} A single run "
             f"whose validation score does not clear chance by the same margin (a head that does not learn the task "
             f"alone, a rate that diverged on one seed) stays in its claim, as every planned run does, and is named "
             f"beside the verdict with that score. Kept: the "
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
            cells = cells or ["-"] * len(plan.pilot["lrs"])  # the task's budget is not decided yet
            lines.append(f"| {arm} | {dataset} | " + " | ".join(cells) + " |")
    lines += _budget_lines(plan)
    lines += _learning_lines(learning_status(plan.budget_records()))
    lines += _derivation_lines(plan)
    lines += _compute_lines(plan)
    image = directory / f"{stem}.png"
    lines += ["", f"![claims]({image.name})", ""]
    report = directory / f"{stem}.md"
    report.write_text("\n".join(lines))
    figures.save(figures.claims_forest(verdicts, f"Claims at scale {plan.scale}: effect and 95% interval"), image)
    return [report, image]
