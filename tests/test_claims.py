"""The claims report: paired intervals, verdicts, run identity, and rendering from records alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from partial_lora.errors import ConfigError
from partial_lora.protocol.claims import (CONTRADICTED, INCONCLUSIVE, MISSING, SUPPORTED, Claim, ClaimPlan, Interval,
                                          PlannedRun, compose_claims, evaluate_claims, paired_interval, render_report,
                                          verdict)
from partial_lora.results import write_record


def test_paired_interval_is_students_t_over_the_differences():
    interval = paired_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2 df) = 4.3027: half-width 4.3027 / sqrt(3)
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.low == pytest.approx(2 - 2.48417, abs=1e-4) and interval.high == pytest.approx(2 + 2.48417, abs=1e-4)
    single = paired_interval([0.5])
    assert single.n == 1 and math.isinf(single.low) and math.isinf(single.high)


@pytest.mark.parametrize("test, low, high, margin, expected", [
    ("noninferior", -0.5, 2.0, 1.0, SUPPORTED),      # at most 0.5 worse: within the margin
    ("noninferior", -4.0, -1.5, 1.0, CONTRADICTED),  # surely more than 1 point worse
    ("noninferior", -2.0, 0.5, 1.0, INCONCLUSIVE),   # could be either
    ("equivalent", -0.8, 0.9, 1.0, SUPPORTED),
    ("equivalent", 1.2, 3.0, 1.0, CONTRADICTED),      # surely better by more than the margin
    ("equivalent", -3.0, -1.1, 1.0, CONTRADICTED),
    ("equivalent", 0.5, 1.5, 1.0, INCONCLUSIVE),
    ("superior", 0.1, 2.0, 1.0, SUPPORTED),
    ("superior", -2.0, -0.1, 1.0, CONTRADICTED),
    ("superior", -0.5, 1.0, 1.0, INCONCLUSIVE),
    ("shrinking", 0.2, 3.0, 1.0, SUPPORTED),
])
def test_verdicts(test, low, high, margin, expected):
    assert verdict(test, Interval((low + high) / 2, low, high, 5), margin) == expected


def test_too_few_pairs_give_no_verdict_and_bad_claims_are_refused():
    assert verdict("equivalent", Interval(0.0, -math.inf, math.inf, 1), 1.0) == MISSING
    with pytest.raises(ConfigError, match="test must be one of"):
        Claim("C9", "x", "better", "a", "b")
    with pytest.raises(ConfigError, match="exactly one swept setting"):
        Claim("C9", "x", "shrinking", "a", "b")


SMALL = ["claims.seeds=[0,1]", "claims.pilot.lrs=[0.001,0.003]"]


def fake_records(plan: ClaimPlan, store: Path, test_of) -> int:
    """A finished record, under the id run.py would give it, for every run the plan asks for (pilots first),
    with the test metric ``test_of(arm, dataset, seed, lr, overrides)``. Returns how many were written."""
    written = 0
    while True:
        plan.reload()
        new = {plan.run_id(run.dataset, run.seed, run.lr, run.overrides): run for run in plan.planned_runs()
               if plan.record(run) is None}
        if not new:
            return written
        for run in new.values():
            fake_record(plan, store, run, test_of(run.arm, run.dataset, run.seed, run.lr, run.overrides), written)
            written += 1


def fake_record(plan: ClaimPlan, store: Path, run: PlannedRun, score: float, index: int) -> None:
    """A finished record of ``run`` under the id run.py would give it."""
    overrides = [f"dataset={run.dataset}", f"seed={run.seed}", f"lr={run.lr}", *run.overrides, *plan.extra]
    cfg = compose_claims(plan.scale, overrides)
    cfg.output_dir = None
    params = {"lora": 1000, "adalora": 1200, "partial_adalora": 300, "head_only": 0}.get(run.arm, 200)
    record = {"status": "finished", "config": OmegaConf.to_container(cfg, resolve=True), "backbone": "minilm",
              "dataset": run.dataset, "method": cfg.method.name, "rank": 8, "seed": run.seed, "lr": run.lr,
              "best_val": score, "test": score, "params": {"adapter": params, "unmasked_adapter": 1000},
              "masks": {"derived_fraction": 0.2}, "wall_time_s": 90.0}
    write_record(record, store, f"{run.arm}_{run.dataset}_{run.seed}_{index}")


def test_one_datasets_unfinished_pilot_does_not_hold_back_another_datasets_claim_runs(tmp_path: Path):
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = ClaimPlan(compose_claims("cpu", extra), "cpu", extra)
    c6 = next(claim for claim in plan.claims if claim.id == "C6")
    assert plan.claim_runs(c6) == []
    for index, run in enumerate(plan.pilot_runs("adalora", "sst2") + plan.pilot_runs("partial_adalora", "sst2")):
        fake_record(plan, store, run, 80.0 + index, index)  # 3e-3 wins both pilots
    plan.reload()
    runs = plan.claim_runs(c6)
    assert {(t.dataset, t.arm, c.arm, t.lr, c.lr) for t, c, _ in runs} == {("sst2", "partial_adalora", "adalora",
                                                                           0.003, 0.003)}
    assert [t.seed for t, _, _ in runs] == [0, 1]
    pending = [" ".join(argv) for argv in plan.commands()]
    assert any("dataset=sst2 seed=0,1 lr=0.003 method=adalora" in argv for argv in pending)
    assert any("dataset=mrpc seed=100 lr=0.001,0.003 method=adalora" in argv for argv in pending)


def test_report_renders_verdicts_from_records_alone(tmp_path: Path):
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = ClaimPlan(compose_claims("cpu", extra), "cpu", extra)

    def test_of(arm, dataset, seed, lr, overrides):
        noise = 0.1 * seed  # the same in both arms: a paired comparison removes it
        base = {"lora": 80.0, "partial": 79.9, "targeted": 79.8, "inverted": 79.85, "balanced": 75.0,
                "partial_snip": 79.9, "partial_imp": 70.0 + seed, "adalora": 80.0, "partial_adalora": 79.9,
                "head_only": 79.0, "partial_512": 78.0}[arm]
        if "dataset.train_size=16000" in overrides and arm == "lora":
            base -= 0.05
        return base + noise + (1.0 if lr == 0.001 else 0.0)  # 1e-3 wins every pilot

    written = fake_records(plan, store, test_of)
    # pilots: partial, lora, adalora, partial_adalora x 2 datasets x 2 lrs; claims: 10 arms x 2 datasets x 2 seeds,
    # plus C7's two larger sizes x 2 arms x 2 seeds and C9's 512-example derivation x 2 seeds, on SST-2
    assert written == 16 + 40 + 8 + 2
    plan.reload()
    verdicts = evaluate_claims(plan).set_index(["claim", "dataset"])
    assert plan.chosen_lr("lora", "sst2") == 0.001 and plan.chosen_lr("targeted", "mrpc") == 0.001
    assert plan.matched_sparsity("partial", "sst2") == 0.8
    assert verdicts.loc[("C1", "sst2"), "verdict"] == SUPPORTED  # -0.1 exactly, 80% fewer parameters
    assert verdicts.loc[("C1", "sst2"), "param_reduction"] == pytest.approx(0.8)
    assert verdicts.loc[("C4", "mrpc"), "verdict"] == SUPPORTED  # +4.9 over Balanced
    assert verdicts.loc[("C5b", "sst2"), "verdict"] == CONTRADICTED  # IMP ~9 points below SVD
    assert verdicts.loc[("C6", "mrpc"), "verdict"] == SUPPORTED
    assert verdicts.loc[("C7", "sst2"), "verdict"] == SUPPORTED  # LoRA's lead: 0.1 at 2,000 examples, 0.05 at 16,000
    assert verdicts.loc[("C8", "mrpc"), "verdict"] == SUPPORTED  # the masked adapter adds 0.9 to the head alone
    assert verdicts.loc[("C9", "sst2"), "verdict"] == CONTRADICTED and ("C9", "mrpc") not in verdicts.index
    report, image = render_report(plan, evaluate_claims(plan), tmp_path / "claims")
    text = report.read_text()
    assert "| C1 | sst2 | partial vs lora | 0.001 / 0.001 | 4/4 |" in text and "**supported**" in text
    assert "dataset.train_size=16000: lora's lead +0.05 [+0.05, +0.05], 2 seeds (by seed 0: +0.05, 1: +0.05)" in text
    assert "| 0 | 200 / 0 | **supported** |" in text  # C8: no reduction against a control without an adapter
    assert "| mrpc | snip | 2 | nan | nan | 20.00% (20.00%-20.00%) | 0 of 2 |" in text  # seeds 0, 1; no pilot
    # C9's derivation on more examples is its own row, not another seed of the preset's SVD derivation
    assert "| sst2 | svd | 2 |" in text and "| sst2 | svd, ratios.max_examples=512 | 2 |" in text
    assert "| all | 66 | 1.65 | 90 |" in text  # every record once, though C1's runs serve C2-C8 too
    assert image.stat().st_size > 0

    # The same records against a plan of three seeds: every claim lacks seed 2, so none has a verdict yet,
    # though C1's effect over the two seeds present is still reported.
    more_seeds = [*extra, "claims.seeds=[0,1,2]"]
    unfinished = evaluate_claims(ClaimPlan(compose_claims("cpu", more_seeds), "cpu", more_seeds))
    assert set(unfinished["verdict"]) == {MISSING}
    c1 = unfinished.set_index(["claim", "dataset"]).loc[("C1", "sst2")]
    assert (c1["runs"], c1["planned_runs"], c1["pairs"]) == (4, 6, 2) and c1["effect"] == pytest.approx(-0.1)


def test_planned_run_ids_are_the_ids_run_py_gives(tmp_path: Path, glue_dir: Path, monkeypatch):
    """A run launched as the sweep launches it is found by the plan (and so skipped on relaunch)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = ["backbone=tiny_bert", f"data_dir={glue_dir}", f"results_dir={tmp_path / 'runs'}",
             f"checkpoint.dir={tmp_path / 'ckpt'}", f"ratios.cache_dir={tmp_path / 'ratios'}", "dataset.val_size=8",
             "dataset.max_length=16", "dataset.train_size=16", "train.batch_size=8", "train.epochs=1", "logger=none",
             "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    plan = ClaimPlan(compose_claims("cpu", extra), "cpu", extra)
    pilot = plan.commands()[0]
    assert "seed=100" in pilot and "lr=0.001,0.003" in pilot
    subprocess.run(pilot, cwd=ROOT, check=True, capture_output=True, timeout=600)
    plan.reload()
    runs = plan.pilot_runs("partial", "sst2")
    assert all(plan.record(run) is not None for run in runs)
    assert all(0 <= plan.record(run)["masks"]["derived_fraction"] <= 1 for run in runs)
    assert plan.chosen_lr("partial", "sst2") in (0.001, 0.003)
    assert plan.commands()[0] != pilot  # the finished pilot is no longer pending
