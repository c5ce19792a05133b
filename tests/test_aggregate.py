"""The protocol: top-k runs by validation score, mean of their test metric, grouped by setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partial_lora.results import write_record
from partial_lora.results.aggregate import load_records, protocol_summary


def record(method: str, seed: int, val: float, test: float, params: int = 100, status: str = "finished") -> dict:
    return {"status": status, "backbone": "minilm", "dataset": "sst2", "method": method, "rank": 8, "seed": seed,
            "lr": 1e-3, "best_val": val, "test": test, "config": {"importance": {"name": "none"}},
            "params": {"adapter": params, "unmasked_adapter": 2 * params}}


def test_top_k_by_validation_averages_their_test_metric(tmp_path: Path):
    vals = [90, 80, 85, 70, 95]
    tests = [10, 20, 30, 40, 50]
    for seed, (val, test) in enumerate(zip(vals, tests)):
        write_record(record("lora", seed, val, test), tmp_path, f"lora_{seed}")
    write_record(record("partial_lora", 0, 99, 77, params=30), tmp_path, "partial_0")
    write_record(record("lora", 9, 100, 0, status="failed"), tmp_path, "failed")
    summary = protocol_summary(load_records(tmp_path), top_k=3).set_index("method")
    # best validation 95, 90, 85 -> tests 50, 10, 30
    assert summary.loc["lora", "test_mean"] == pytest.approx(30.0)
    assert summary.loc["lora", "runs"] == 5 and summary.loc["lora", "selected"] == 3
    assert summary.loc["partial_lora", "test_mean"] == 77 and summary.loc["partial_lora", "params"] == 30


def test_empty_store_gives_an_empty_summary(tmp_path: Path):
    assert protocol_summary(load_records(tmp_path)).empty
    (tmp_path / "broken.json").write_text(json.dumps({"status": "failed"}))
    assert load_records(tmp_path).empty


def test_parameter_counts_read_the_same_in_tables_claims_and_figure_axes():
    from partial_lora.results.tables import _parameters, parameter_count

    assert [parameter_count(count) for count in (331_776, 2_500_000, 12, None, float("nan"))] == [
        "331.8K", "2.50M", "12", "-", "-"]
    assert [_parameters(count) for count in (150_000, 99_999, float("nan"))] == ["0.15M", "100.0K", ""]
    assert [parameter_count(count, fixed=False) for count in (1e6, 20_000, 5)] == ["1M", "20K", "5"]
