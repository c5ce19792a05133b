"""A plan's claims judged from its records: one row per (claim, dataset) with the effect, its interval and the
verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd

from partial_lora.protocol.claims_plan import Claim, ClaimPlan
from partial_lora.protocol.claims_statistics import (CONTRADICTED, INCONCLUSIVE, MISSING, NO_CONTRAST, NOT_LEARNED,
                                                     paired_interval, seeds_to_decide, verdict)
from partial_lora.results.aggregate import REFERENCE_METHOD, learning_status
from partial_lora.results.tables import load_paper, paper_kept_share


def evaluate_claims(plan: ClaimPlan) -> pd.DataFrame:
    """One row per (claim, dataset): the effect, its interval, parameter counts, kept shares, validation-test
    gaps and the verdict (none on a task not learned, nor where neither arm trains an adapter parameter; the seeds
    that would decide an inconclusive one)."""
    budget = plan.budget_records()
    learning, paper, backbone = learning_status(budget), load_paper(plan.checkout.paper_tables), plan.paper_backbone()
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
            if row["verdict"] != MISSING and not any(t["params"] or c["params"] for t, c, _ in found):
                row |= {"verdict": NO_CONTRAST, "reason": "neither arm trains an adapter parameter (the classifier "
                        "head alone), so the runs differ only by seed noise"}
            if row["verdict"] == INCONCLUSIVE:
                row["seeds_to_decide"] = seeds_to_decide(claim.test, interval, claim.margin)
            status = learning.get(dataset)
            if status is not None and status.known:
                row["at_chance"] = _runs_at_chance(claim, found, status.chance + status.margin)
            if status is not None and not status.learned:
                row |= {"verdict": NOT_LEARNED, "reason": status.reason()}
            rows.append(row)
    return pd.DataFrame(rows)


def _runs_at_chance(claim: Claim, found: list[tuple[dict, dict, tuple[str, ...]]], bound: float) -> list[str]:
    """Per arm (and swept setting), the claim's runs whose validation score stays under ``bound``: kept in the
    claim, as every planned run is, but named, since one diverged rate can decide an interval alone."""
    under: dict[str, list[tuple[int, float]]] = {}
    totals: dict[str, int] = {}
    for treatment, control, variant in found:
        for arm, record in ((claim.treatment, treatment), (claim.control, control)):
            label = arm + (f" at {' '.join(variant)}" if variant else "")
            totals[label] = totals.get(label, 0) + 1
            if record["val"] < bound:
                under.setdefault(label, []).append((record["seed"], record["val"]))
    named = []
    for label, runs in under.items():
        scores = [val for _, val in runs]
        named.append(f"{label}: seed {runs[0][0]} ({scores[0]:.2f})" if len(runs) == 1 else
                     f"{label}: {len(runs)} of {totals[label]} seeds ({min(scores):.2f}-{max(scores):.2f})")
    return named
