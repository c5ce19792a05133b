"""The claims report: paired intervals, verdicts, run identity, and rendering from records alone."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from partial_lora.errors import ConfigError
from partial_lora.protocol.claims import (CONTRADICTED, INCONCLUSIVE, MISSING, NO_CONTRAST, NOT_LEARNED, SUPPORTED,
                                          Claim, ClaimPlan, Interval, PlannedRun, compose_claims, evaluate_claims, paired_interval,
                                          render_report, seeds_to_decide, verdict)
from partial_lora.protocol.sweep import compose_target
from partial_lora.protocol.targets import render_target
from partial_lora.results import write_record
from tests.conftest import CHECKOUT, CONF, write_jsonl


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


@pytest.mark.parametrize("test, differences", [
    ("noninferior", [-3.0, 0.5, -2.0, 1.0, 0.5]),   # mean -0.6: 0.4 above the margin's -1
    ("equivalent", [0.2, -0.9, 1.1, 0.4, -0.3]),    # mean 0.1: 0.9 inside +-1
    ("superior", [0.5, -0.2, 1.5, 0.1, 0.9]),       # mean 0.56 above 0
])
def test_seeds_to_decide_are_the_fewest_at_which_the_measured_spread_decides(test, differences):
    """A sample with the measured mean and standard deviation decides the claim at that many seeds, not one fewer."""
    measured = paired_interval(differences)
    assert verdict(test, measured, 1.0) == INCONCLUSIVE
    needed = seeds_to_decide(test, measured, 1.0)
    assert needed > len(differences)

    def sample(size: int) -> list[float]:  # exactly the measured mean and standard deviation
        spread = np.linspace(-1.0, 1.0, size)
        return list(measured.mean + measured.sd * (spread - spread.mean()) / spread.std(ddof=1))

    assert verdict(test, paired_interval(sample(needed)), 1.0) != INCONCLUSIVE
    assert verdict(test, paired_interval(sample(needed - 1)), 1.0) == INCONCLUSIVE
    # An effect on the boundary never decides, however many seeds.
    assert seeds_to_decide("superior", Interval(0.0, -1.0, 1.0, 5, 1.0), 1.0) is None


# Two rates for the pilots and the budget rule alike (the claims follow protocol.lrs); six models keep the protocol valid.
SMALL = ["claims.seeds=[0,1]", "claims.headline_seeds=[0,1]", "protocol.lrs=[0.001,0.003]", "protocol.models=6"]
MAJORITY = {"val": 50.0, "test": 50.0}


ADAPTER_PARAMS = {"lora": 1000, "adalora": 1200, "partial_adalora": 300, "head_only": 0}  # any other arm: 200


def fake_records(plan: ClaimPlan, store: Path, test_of, majority_of=lambda dataset: MAJORITY,
                 params_of=lambda arm, dataset: ADAPTER_PARAMS.get(arm, 200)) -> int:
    """A finished record, under the id run.py would give it, for every run the plan asks for (pilots first),
    with the metrics ``test_of(arm, dataset, seed, lr, overrides)``, the majority rates ``majority_of(dataset)``
    and the adapter parameters ``params_of(arm, dataset)`` (see :func:`fake_record`). Returns how many were written."""
    written = 0
    while True:
        plan.reload()
        new = {plan.run_id(run.dataset, run.seed, run.lr, run.overrides): run for run in plan.planned_runs()
               if plan.record(run) is None}
        if not new:
            return written
        for run in new.values():
            fake_record(plan, store, run, test_of(run.arm, run.dataset, run.seed, run.lr, run.overrides), written,
                        majority_of(run.dataset), params_of(run.arm, run.dataset))
            written += 1


def fake_record(plan: ClaimPlan, store: Path, run: PlannedRun, score: float | tuple[float, float], index: int,
                majority_rates: dict[str, float] | None = MAJORITY, adapter_params: int | None = None) -> None:
    """A finished record of ``run`` under the id run.py would give it, scoring ``score`` on validation and test
    (or ``(validation, test)``); without ``majority_rates``, as records written before they were recorded."""
    val, test = score if isinstance(score, tuple) else (score, score)
    overrides = [f"dataset={run.dataset}", f"seed={run.seed}", f"lr={run.lr}", *run.overrides, *plan.extra]
    cfg = compose_claims(CHECKOUT, plan.scale, overrides)
    cfg.output_dir = None
    params = ADAPTER_PARAMS.get(run.arm, 200) if adapter_params is None else adapter_params
    record = {"status": "finished", "config": OmegaConf.to_container(cfg, resolve=True), "backbone": "minilm",
              "dataset": run.dataset, "method": cfg.method.name, "rank": 8, "seed": run.seed, "lr": run.lr,
              "best_val": val, "test": test, "params": {"adapter": params, "unmasked_adapter": 1000},
              "masks": {"derived_fraction": 0.2}, "wall_time_s": 90.0}
    if majority_rates is not None:
        record["majority_rates"] = majority_rates
    write_record(record, store, f"{run.arm}_{run.dataset}_{run.seed}_{index}")


def test_one_datasets_unfinished_pilot_does_not_hold_back_another_datasets_claim_runs(tmp_path: Path):
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra)
    c6 = next(claim for claim in plan.claims if claim.id == "C6")
    assert plan.claim_runs(c6) == [] and plan.pilot_runs("adalora", "sst2") == []  # no budget decided yet
    budget_pilot = "seed=100 lr=0.001,0.003 method=lora dataset.train_size=2000 train.epochs=2"
    assert [" ".join(argv[6:12]) for argv in plan.commands()[:2]] == [f"dataset={name} {budget_pilot}"
                                                                      for name in ("sst2", "mrpc")]
    for index, run in enumerate(plan.budget_pilot_runs("sst2")):
        fake_record(plan, store, run, 80.0, index)  # LoRA clears chance (50) by 30 points at the first budget
    plan.reload()
    for index, run in enumerate(plan.pilot_runs("adalora", "sst2") + plan.pilot_runs("partial_adalora", "sst2")):
        fake_record(plan, store, run, 80.0 + index, index)  # 3e-3 wins both pilots
    plan.reload()
    runs = plan.claim_runs(c6)
    assert {(t.dataset, t.arm, c.arm, t.lr, c.lr) for t, c, _ in runs} == {("sst2", "partial_adalora", "adalora",
                                                                           0.003, 0.003)}
    assert [t.seed for t, _, _ in runs] == [0, 1]
    pending = [" ".join(argv) for argv in plan.commands()]
    assert any("dataset=sst2 seed=0,1 lr=0.003 dataset.train_size=2000 train.epochs=2 method=adalora" in argv
               for argv in pending)
    assert any(f"dataset=mrpc {budget_pilot}" in argv for argv in pending)  # MRPC's budget first, then its pilots
    assert not any("dataset=mrpc" in argv and "method=adalora" in argv for argv in pending)


def test_report_renders_verdicts_from_records_alone(tmp_path: Path):
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra)

    def test_of(arm, dataset, seed, lr, overrides):
        noise = 0.1 * seed  # the same in both arms: a paired comparison removes it
        base = {"lora": 80.0, "partial": 79.9, "targeted": 79.8, "inverted": 79.85, "balanced": 75.0,
                "partial_snip": 79.9, "partial_imp": 70.0 + seed, "adalora": 80.0, "partial_adalora": 79.9,
                "head_only": 79.0, "partial_512": 78.0, "partial_cumulative": 79.5}[arm]
        if "dataset.train_size=16000" in overrides and arm == "lora":
            base -= 0.05
        return base + noise + (1.0 if lr == 0.001 else 0.0)  # 1e-3 wins every pilot

    written = fake_records(plan, store, test_of)
    # pilots: partial, lora, adalora, partial_adalora x 2 datasets x 2 lrs; claims: 10 arms x 2 datasets x 2 seeds,
    # plus C7's two larger sizes x 2 arms x 2 seeds and C9's 512-example derivation x 2 seeds, on SST-2, and
    # C10's cumulative derivation x 2 datasets x 2 seeds
    assert written == 16 + 40 + 8 + 2 + 4
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
    # C8: no reduction against a control without an adapter; the treatment keeps 200 of LoRA's 1,000 parameters
    assert "| C8 | mrpc |" in text and "| 0 | 200 / 0 | 20.0% (10.5%) | +0.00 / +0.00 | **supported** |" in text
    assert "| mrpc | snip | 2 | nan | nan | 20.00% (20.00%-20.00%) | 0 of 2 |" in text  # seeds 0, 1; no pilot
    # C9's derivation on more examples is its own row, not another seed of the preset's SVD derivation
    assert "| sst2 | svd | 2 |" in text and "| sst2 | svd, ratios.max_examples=512 | 2 |" in text
    assert "| all | 70 | 1.75 | 90 |" in text  # every record once, though C1's runs serve C2-C8 too
    assert image.stat().st_size > 0

    # The same records against a plan of three seeds: every claim lacks seed 2, so none has a verdict yet,
    # though C1's effect over the two seeds present is still reported.
    more_seeds = [*extra, "claims.seeds=[0,1,2]", "claims.headline_seeds=[0,1,2]"]
    unfinished = evaluate_claims(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", more_seeds), "cpu", more_seeds))
    assert set(unfinished["verdict"]) == {MISSING}
    c1 = unfinished.set_index(["claim", "dataset"]).loc[("C1", "sst2")]
    assert (c1["runs"], c1["planned_runs"], c1["pairs"]) == (4, 6, 2) and c1["effect"] == pytest.approx(-0.1)


def test_planned_run_ids_are_the_ids_run_py_gives(tmp_path: Path, glue_dir: Path, monkeypatch):
    """A run launched as the sweep launches it is found by the plan (and so skipped on relaunch)."""
    import subprocess

    from tests.conftest import ROOT

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = ["backbone=tiny_bert", f"data_dir={glue_dir}", f"results_dir={tmp_path / 'runs'}",
             f"checkpoint.dir={tmp_path / 'ckpt'}", f"ratios.cache_dir={tmp_path / 'ratios'}", "dataset.val_size=8",
             "dataset.max_length=16", "dataset.train_size=16", "train.batch_size=8", "train.epochs=1", "logger=none",
             "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path / 'multirun'}", "protocol.lrs=[0.001,0.003]"]
    plan = ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra)
    assert plan.budget_rule is None  # the command line's budget wins over the scale's rule
    pilot = plan.commands()[0]
    assert "seed=100" in pilot and "lr=0.001,0.003" in pilot
    subprocess.run(pilot, cwd=ROOT, check=True, capture_output=True, timeout=600)
    plan.reload()
    runs = plan.pilot_runs("partial", "sst2")
    assert all(plan.record(run) is not None for run in runs)
    assert all(0 <= plan.record(run)["masks"]["derived_fraction"] <= 1 for run in runs)
    assert plan.chosen_lr("partial", "sst2") in (0.001, 0.003)
    assert plan.commands()[0] != pilot  # the finished pilot is no longer pending


def only_claims(plan: ClaimPlan, *ids: str) -> ClaimPlan:
    """The plan restricted to claims ``ids`` (fewer fake records to write)."""
    plan.claims = [claim for claim in plan.claims if claim.id in ids]
    return plan


def report_row(text: str, claim: str, dataset: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {claim} | {dataset} |"))


def test_a_task_lora_did_not_learn_gets_no_verdict(tmp_path: Path):
    """MRPC's records sit at chance (LoRA's best validation 63.8 against a majority rate of 60): its claims read
    "not learned" with the reason; SST-2's keep their verdicts, kept shares beside the paper's, the seeds that would
    decide an inconclusive one, and the large validation-test gap of one arm."""
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = only_claims(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra), "C1", "C2")

    def test_of(arm, dataset, seed, lr, overrides):
        if dataset == "mrpc":
            return 63.0 + 100 * lr + 0.5 * (seed == 1)  # at most 63.8
        if arm == "partial":
            return 87.5, 79.5  # validation 8 points above test
        return {"lora": 80.0, "targeted": 78.5 + seed}[arm]  # C2 on SST-2: differences +1 and 0

    fake_records(plan, store, test_of, lambda dataset: {"val": 60.0, "test": 68.4})
    plan.reload()
    verdicts = evaluate_claims(plan).set_index(["claim", "dataset"])
    assert set(verdicts.xs("mrpc", level="dataset")["verdict"]) == {NOT_LEARNED}
    assert verdicts.loc[("C1", "sst2"), "verdict"] == SUPPORTED  # -0.5 on both seeds
    assert verdicts.loc[("C2", "sst2"), "verdict"] == INCONCLUSIVE
    text = render_report(plan, evaluate_claims(plan), tmp_path / "claims")[0].read_text()
    reason = ("**not learned**: lora's best validation accuracy 63.80 is within 5 points of the majority rate on the "
              "validation split (60.00) |")
    assert report_row(text, "C1", "mrpc").endswith(reason) and report_row(text, "C2", "mrpc").endswith(reason)
    assert "| mrpc | accuracy | 63.80 | 60.00 | 5 | **no** |" in text and "| sst2 | accuracy | 80.00 | 60.00 | 5 | yes |" in text
    # The budget rule: MRPC's pilot stays under chance + 10 on both budgets, so it trains on the last; SST-2 the first.
    assert "| mrpc | 2,000 examples x 2 epochs | 2 of 2 | 63.30 | 60.00 | no |  |" in text
    assert "| mrpc | the whole train split x 3 epochs | 2 of 2 | 63.30 | 60.00 | no | **this budget** |" in text
    assert "| sst2 | 2,000 examples x 2 epochs | 2 of 2 | 80.00 | 60.00 | yes | **this budget** |" in text
    assert all("dataset.train_size=null" in run.overrides for run in plan.planned_runs(swept=False)
               if run.dataset == "mrpc")
    # partial keeps 200 of LoRA's 1,000 parameters; the paper's Partial-LoRA keeps 0.18M of 1.33M on SST-2
    assert "| 20.0% (13.5%) | +8.00 (large) / +0.00 | **supported** |" in report_row(text, "C1", "sst2")
    needed = seeds_to_decide("equivalent", paired_interval([1.0, 0.0]), 1.0)
    assert needed == 11  # t(0.975, n - 1) x 0.707 / sqrt(n): 0.506 at n = 10, 0.475 at n = 11, below 0.5
    assert report_row(text, "C2", "sst2").endswith(f"**inconclusive**; {needed} seeds would decide it |")


def test_a_run_at_chance_stays_in_its_claim_and_is_named_beside_the_verdict(tmp_path: Path):
    """LoRA diverges on one seed at C7's largest training set (validation at the majority rate, 50): the pair
    stays, so C7's interval widens, and the verdict names that run; C1's runs of the same seed learned. On MRPC
    every Partial-LoRA run stays within 5 points of chance: named once, with the range of their scores."""
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = only_claims(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra), "C1", "C7")

    def test_of(arm, dataset, seed, lr, overrides):
        if arm == "lora" and seed == 1 and "dataset.train_size=16000" in overrides:
            return 50.0
        if arm == "partial" and dataset == "mrpc":
            return 52.0 + 0.5 * seed
        return {"lora": 80.0, "partial": 79.5}[arm] + 0.1 * seed

    fake_records(plan, store, test_of)
    plan.reload()
    verdicts = evaluate_claims(plan).set_index(["claim", "dataset"])
    assert verdicts.loc[("C7", "sst2"), "at_chance"] == ["lora at dataset.train_size=16000: seed 1 (50.00)"]
    assert verdicts.loc[("C1", "sst2"), "at_chance"] == []
    assert verdicts.loc[("C1", "mrpc"), "at_chance"] == ["partial: 2 of 2 seeds (52.00-52.50)"]
    assert verdicts.loc[("C7", "sst2"), "verdict"] == INCONCLUSIVE  # leads +0.5 and +0.5, then +0.5 and -29.6
    text = render_report(plan, evaluate_claims(plan), tmp_path / "claims")[0].read_text()
    assert report_row(text, "C7", "sst2").endswith(
        "; not clear of chance on validation: lora at dataset.train_size=16000: seed 1 (50.00) |")
    assert "chance" not in report_row(text, "C1", "sst2")


def test_comparisons_between_arms_without_adapter_parameters_get_no_verdict(tmp_path: Path):
    """SST-2 under the cpu preset: every derived ticket is empty. C1 (an empty ticket against LoRA) is still judged;
    C2 (two empty tickets) and C8 (an empty ticket against the head alone) read "no contrast", although their
    differences alone would give a verdict; MRPC, whose tickets are not empty, keeps its verdicts."""
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    plan = only_claims(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra), "C1", "C2", "C8")

    def test_of(arm, dataset, seed, lr, overrides):
        return {"lora": 80.0, "partial": 76.0, "targeted": 76.0, "head_only": 72.0}[arm] + 0.1 * seed

    ticket = {"sst2": 0, "mrpc": 150}
    fake_records(plan, store, test_of,
                 params_of=lambda arm, dataset: {"lora": 1000, "head_only": 0}.get(arm, ticket[dataset]))
    plan.reload()
    verdicts = evaluate_claims(plan).set_index(["claim", "dataset"])["verdict"]
    assert verdicts[("C1", "sst2")] == CONTRADICTED  # 4 points below LoRA
    assert verdicts[("C2", "sst2")] == verdicts[("C8", "sst2")] == NO_CONTRAST
    assert verdicts[("C2", "mrpc")] == SUPPORTED and verdicts[("C8", "mrpc")] == SUPPORTED
    text = render_report(plan, evaluate_claims(plan), tmp_path / "claims")[0].read_text()
    assert report_row(text, "C8", "sst2").endswith("| **no contrast**: neither arm trains an adapter parameter (the "
                                                   "classifier head alone), so the runs differ only by seed noise |")


def test_a_glue_task_added_to_the_data_folder_and_the_scale_joins_the_claims_and_the_tables(tmp_path: Path):
    """The promise of docs/protocol.md ("A new task"): a GLUE-schema task in the data folder, its dataset config
    beside the project's (here through Hydra's search path) and its name in the scale's language datasets, and the claims plan, the claims
    report and Table 6 take it up with no other edit (MRPC is left out for speed). Its records carry no majority rates (as records written
    before they were recorded): the learning rule reads them from its data, and finds LoRA at chance there."""
    data, conf, store = tmp_path / "data", tmp_path / "conf", tmp_path / "runs"
    pairs = [{"sentence1": f"premise {idx}", "sentence2": f"hypothesis {idx}", "label": int(idx % 5 < 2), "idx": idx}
             for idx in range(300)]
    write_jsonl(data / "glue" / "wnli" / "train.jsonl", pairs[:260])
    write_jsonl(data / "glue" / "wnli" / "validation.jsonl", pairs[260:])
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "wnli.yaml").write_text((CONF / "dataset" / "mrpc.yaml").read_text().replace("mrpc", "wnli"))
    task = [f"results_dir={store}", f"data_dir={data}", f"hydra.searchpath=[file://{conf}]",
            "scale.domains.language.datasets=[sst2,wnli]"]
    extra = [*SMALL, *task]
    plan = only_claims(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra), "C1")
    assert plan.datasets == ["sst2", "wnli"]
    pending = [" ".join(argv) for argv in plan.commands()]
    assert any("dataset=wnli seed=100 lr=0.001,0.003 method=lora" in argv and f"file://{conf}" in argv
               for argv in pending)

    from datasets import load_dataset  # the oracle: the held-out part of the train split, as the run draws it

    held_out = load_dataset("json", data_files=str(data / "glue" / "wnli" / "train.jsonl"))["train"].train_test_split(
        test_size=plan.cfg.dataset.val_size, seed=plan.cfg.data_seed)["test"]
    chance = 100 * max(Counter(held_out["label"]).values()) / len(held_out)
    fake_records(plan, store, lambda arm, dataset, *_: chance + 2 if dataset == "wnli" else 80.0,
                 lambda dataset: None if dataset == "wnli" else MAJORITY)
    plan.reload()
    text = render_report(plan, evaluate_claims(plan), tmp_path / "claims")[0].read_text()
    assert f"lora's best validation accuracy {chance + 2:.2f} is within 5 points of the majority rate on the " \
           f"validation split ({chance:.2f}) |" in report_row(text, "C1", "wnli")
    assert f"| wnli | accuracy | {chance + 2:.2f} | {chance:.2f} | 5 | **no** |" in text
    assert report_row(text, "C1", "sst2").endswith("**supported** |")
    assert "| sst2 | accuracy | 80.00 | 50.00 | 5 | yes |" in text  # from its records

    # the claim runs serve Table 6 (same settings, same ids)
    task += SMALL[2:]  # the table's protocol at the claims' two rates
    table_cfg = compose_target(CHECKOUT, "table6", "cpu", task)
    markdown, _ = render_target(CHECKOUT, table_cfg, tmp_path / "tables", tmp_path / "figures", extra=task)
    table = markdown.read_text()
    wnli = [line for line in table.splitlines() if "| wnli " in line and "| 0 of 6 " not in line]  # cells with runs
    assert len(wnli) == 2 and all(f"{chance + 2:.2f} ± 0.00 (not learned)" in line for line in wnli)  # LoRA, Partial
    assert "(not learned)" not in "".join(line for line in table.splitlines() if "| sst2 " in line)
    assert f"(not learned) wnli: not learned at this budget: lora's best validation accuracy {chance + 2:.2f}" in table


def test_a_claim_with_its_own_seeds_plans_and_judges_on_them_alone(tmp_path: Path):
    store = tmp_path / "runs"
    extra = [*SMALL, f"results_dir={store}"]
    fake_records(ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", extra), "cpu", extra), store, lambda arm, *_: 80.0)
    c1_on_three = [*extra, "claims.items.0.seeds=[0,1,2]"]
    plan = ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, "cpu", c1_on_three), "cpu", c1_on_three)
    c1 = next(claim for claim in plan.claims if claim.id == "C1")
    assert plan.seeds_of(c1) == [0, 1, 2] and {t.seed for t, _, _ in plan.claim_runs(c1)} == {0, 1, 2}
    verdicts = evaluate_claims(plan).set_index(["claim", "dataset"])
    assert verdicts.loc[("C1", "sst2"), "verdict"] == MISSING and verdicts.loc[("C1", "sst2"), "planned_runs"] == 6
    assert verdicts.loc[("C2", "sst2"), "verdict"] != MISSING  # C2 shares the partial arm, on its own two seeds
    pending = [" ".join(argv) for argv in plan.commands()]
    # only seed 2 is missing, and only for C1's arms, though the partial arm serves C2-C8 on seeds 0-1 as well
    assert len(pending) == 4 and all(" seed=2 " in argv for argv in pending)
    assert {argv.split("method=")[1].split()[0] for argv in pending} == {"lora", "partial_lora"}
