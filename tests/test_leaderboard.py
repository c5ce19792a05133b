"""The leaderboard: the runs Table 6's and the claims' plans name, one row per setting, Student-t intervals over seeds,
the Pareto front of metric against parameters, the fit's costs where records hold them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from partial_lora.protocol.sweep import compose_target
from partial_lora.protocol.targets import render_index, render_target
from partial_lora.results.leaderboard import pareto_front, render_leaderboard
from partial_lora.results.tables import AT_CHANCE_NOTE
from tests.conftest import CHECKOUT
from tests.test_protocol import PARTIAL, TWO_RATES, fake_record

LRS = (1e-3, 3e-3)
SEEDS = (0, 1, 2, 100)  # Table 6's seeds and the claims' pilot seed
COSTS = {"adapter_bytes": 1_234_567, "step_time_s": 0.25, "peak_memory_bytes": 2_500_000_000,
         "peak_memory_kind": "cpu_max_rss"}


def test_metric(seed: int, lr: float) -> float:
    return 70 + 3 * (seed % 7) + (lr == 3e-3)


test_metric.__test__ = False  # a helper, not a test


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, list[str]]:
    """LoRA (records from before costs were measured), Partial-LoRA (with costs, fewer parameters) and AdaLoRA (more
    parameters, a lower metric than LoRA's) on SST-2 at Table 6's seeds and the claims' pilot seed; the claims' C9 arm
    (counts from 512 examples) at one seed; LoRA on MRPC at chance; and records of settings no plan names."""
    store = tmp_path / "runs"
    for seed in SEEDS:
        for lr in LRS:
            run = ["dataset=sst2", f"seed={seed}", f"lr={lr}"]
            val = 80 + seed % 7 + 1000 * lr  # lr 3e-3 wins validation at every seed
            fake_record(store, f"lora_{seed}_{lr}", [*run, "method=lora"], val, test_metric(seed, lr), 331_776,
                        majority_rates={"val": 50.0, "test": 50.0})
            fake_record(store, f"partial_{seed}_{lr}", [*run, *PARTIAL], val, test_metric(seed, lr) - 2, 30_000,
                        masks={"derived_fraction": 0.1}, **COSTS)
            fake_record(store, f"adalora_{seed}_{lr}", [*run, "method=adalora"], val, test_metric(seed, lr) - 1,
                        398_340)
    fake_record(store, "partial_512", ["dataset=sst2", "seed=0", "lr=0.003", *PARTIAL, "ratios.max_examples=512"],
                85, 60, 43_700)
    fake_record(store, "lora_mrpc", ["dataset=mrpc", "seed=0", "lr=0.001", "method=lora"], 70, 68, 331_776,
                majority_rates={"val": 68.0, "test": 68.0})
    # On SST-2, which LoRA learned: VeRA at chance (its best validation 52, 2 points above the majority rate) and
    # Partial-AdaLoRA with counts that keep no adapter entry (the head alone).
    for lr, val in ((1e-3, 51.0), (3e-3, 52.0)):
        fake_record(store, f"vera_{lr}", ["dataset=sst2", "seed=0", f"lr={lr}", "method=vera"], val, 50.5, 30_000,
                    majority_rates={"val": 50.0, "test": 50.0})
    fake_record(store, "partial_adalora", ["dataset=sst2", "seed=0", "lr=0.003", "method=partial_adalora",
                                           "importance=svd"], 84, 60, 0, majority_rates={"val": 50.0, "test": 50.0})
    foreign = {"rank_4": ["dataset=sst2", "seed=0", "lr=0.003", "method=lora", "rank=4"],
               "larger_training_set": ["dataset=sst2", "seed=0", "lr=0.003", "method=lora", "dataset.train_size=16000"],
               "other_learning_rate": ["dataset=sst2", "seed=0", "lr=0.002", "method=lora"]}
    for name, overrides in foreign.items():
        fake_record(store, name, overrides, 99, 99, 1_000)
    return tmp_path, [f"results_dir={store}", f"data_dir={tmp_path / 'no data'}", *TWO_RATES]


def rows_of(markdown: str) -> dict[tuple[str, str], list[str]]:
    return {(cells[1], cells[2]): cells[3:-1] for line in markdown.splitlines() if line.startswith("| sst2 ")
            or line.startswith("| mrpc ") for cells in [[cell.strip() for cell in line.split("|")]]}


def test_the_leaderboard_renders_the_plans_runs_with_intervals_costs_and_the_front(store):
    tmp_path, extra = store
    report, image = render_leaderboard(CHECKOUT, "cpu", extra, tmp_path / "results")
    assert image.is_file() and image.stat().st_size > 0
    text = report.read_text()
    rows = rows_of(text)
    # One row per setting: a setting both plans name is one row under both labels; C9's arm is a row of its own.
    lora = rows[("sst2", "table6: lora; claims: lora")]
    partial = rows[("sst2", "table6: partial_lora / svd; claims: partial")]
    adalora = rows[("sst2", "table6: adalora; claims: adalora")]
    assert rows[("sst2", "claims: partial_512")][:2] == ["60.00", "1"]  # one seed: no interval
    # Per seed the best-validation run (lr 3e-3), over seeds 0, 1, 2 and the pilot's 100: Student's t.
    tests = np.array([test_metric(seed, 3e-3) for seed in SEEDS])
    low, high = stats.t.interval(0.95, len(tests) - 1, loc=tests.mean(), scale=stats.sem(tests))
    assert lora[0] == f"{tests.mean():.2f} [{low:.2f}, {high:.2f}]"
    assert lora[1:4] == ["4", "8 of 15", "331.8K"]  # claims plan seeds 0-9 at the pilot's rate
    assert partial[0] == f"{tests.mean() - 2:.2f} [{low - 2:.2f}, {high - 2:.2f}]" and partial[3] == "30.0K"
    # Costs where the records hold them (the per-seed runs' median), "-" where they predate them.
    assert partial[4:7] == ["1.2 MB", "250 ms", "2.50 GB (RSS)"]
    assert lora[4:7] == ["-", "-", "-"]
    # The Pareto front: Partial-LoRA (fewest parameters) and LoRA (best metric); AdaLoRA, with more parameters and a
    # lower metric than LoRA, is dominated; C9's arm has more parameters than Partial-LoRA's and a lower metric.
    assert [partial[-1], lora[-1], adalora[-1], rows[("sst2", "claims: partial_512")][-1]] == [
        "**front**", "**front**", "", ""]
    # Records of settings no plan names (rank 4, C7's 16,000 examples, a learning rate outside the plan) never enter,
    # though they score 99; planned cells without runs keep their rows.
    assert "99.00" not in text and "1.0K" not in text
    assert rows[("sst2", "table6: dora")][:3] == ["-", "0", "0 of 6"]
    # The task LoRA did not learn is marked, as in the tables, and the caption says why.
    assert rows[("mrpc", "table6: lora; claims: lora")][0] == "68.00 (not learned)"
    assert "(not learned) mrpc: not learned at this budget" in text
    # The index of results links it under its scale.
    index = render_index(CHECKOUT, report.parent / "README.md", tmp_path / "tables", tmp_path / "figures", extra,
                         targets=["table6"]).read_text()
    assert "[leaderboard_cpu.md](leaderboard_cpu.md)" in index.split("## Scale `cpu`")[1].split("## Scale")[0]
    assert "leaderboard_paper" not in index


def test_a_setting_the_learning_rule_finds_at_chance_on_a_learned_task_is_marked_in_the_table_and_the_leaderboard(
        store):
    """LoRA learned SST-2, so the task is not marked; VeRA's own runs there do not clear chance by the rule's margin,
    so its cell and row are, and the captions say what the mark means; a cell with no adapter entry says so."""
    tmp_path, extra = store
    board = render_leaderboard(CHECKOUT, "cpu", extra, tmp_path / "results")[0].read_text()
    rows = rows_of(board)
    assert rows[("sst2", "table6: vera")][:2] == ["50.50 (at chance)", "1"]
    assert not any("(at chance)" in row[0] or "(not learned)" in row[0] for (task, setting), row in rows.items()
                   if task == "sst2" and setting != "table6: vera")
    assert f"{AT_CHANCE_NOTE} Rendered by" in board
    markdown = render_target(CHECKOUT, compose_target(CHECKOUT, "table6", "cpu", extra), tmp_path / "tables",
                             tmp_path / "figures", extra=extra)[0].read_text()
    sst2 = {(cells[1], cells[3]): cells for line in markdown.splitlines() if "| sst2 " in line
            for cells in [[cell.strip() for cell in line.split("|")]]}
    assert sst2[("vera", "none")][5] == "50.50 ± 0.00 (at chance)"
    assert [sst2[key][5].endswith("(at chance)") for key in (("lora", "none"), ("partial_lora", "none"))] == [
        False, False]
    assert sst2[("partial_adalora", "none")][8] == "0"
    assert AT_CHANCE_NOTE in markdown and "params 0: the derived ratios keep no adapter entry" in markdown
    # Rate 3e-3 wins validation at every seed for LoRA and Partial-LoRA on SST-2: their cells sit at the grid's top
    # rate; VeRA's selected runs span both rates; LoRA's one MRPC run trained at the bottom one (1e-3 of this grid).
    assert "score them higher): at the top rate 0.003: " in markdown
    top, bottom = markdown.split("at the top rate 0.003: ")[1].split(". ")[0].split("; at the bottom rate 0.001: ")
    assert {"lora / sst2", "partial_lora / svd / sst2"} <= set(top.split(", ")) and "vera" not in top
    assert bottom == "lora / mrpc"


def test_the_pareto_front_keeps_exactly_the_undominated_settings():
    rows = pd.DataFrame({"dataset": ["a"] * 5 + ["b"],
                         "mean": [80.0, 78.0, 79.0, 80.0, math.nan, 50.0],
                         "params": [100.0, 10.0, 200.0, 150.0, 1.0, 1000.0]})
    # 79 at 200 is beaten by 80 at 100; 80 at 150 ties the metric with more parameters; a row without runs is no
    # point; each task has its own front.
    assert list(pareto_front(rows)) == [True, True, False, False, False, True]
