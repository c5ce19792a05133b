"""A whole run on a tiny random BERT and a few dozen local examples writes a complete, atomic record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from partial_lora.pipeline import run
from partial_lora.results import write_record

RECORD_KEYS = {"run_id", "status", "config", "seed", "backbone", "dataset", "method", "rank", "lr", "params",
               "metric", "best_val", "test", "epochs", "steps", "wall_time_s", "wall_time_carried_s",
               "step_time_s", "peak_memory_bytes", "peak_memory_kind", "adapter_bytes", "environment"}


def test_fit_writes_a_complete_record(tiny_cfg, tmp_path: Path):
    record = run(tiny_cfg)
    files = [path for path in (tmp_path / "runs").iterdir() if path.is_file()]  # the lock folder aside
    assert [f.suffix for f in files] == [".json"]  # no temporary file left behind
    saved = json.loads(files[0].read_text())
    assert RECORD_KEYS <= set(saved)
    assert saved["status"] == "finished" and saved["seed"] == 0 and saved["method"] == "lora"
    assert saved["params"]["adapter"] > 0 and saved["params"]["head"] == 32 * 2 + 2
    assert 0 <= saved["test"] <= 100 and 0 <= saved["best_val"] <= 100
    assert saved["steps"] == 5  # 40 training rows / batch 8, one epoch
    assert saved["wall_time_s"] > 0 and saved["wall_time_carried_s"] == 0  # never resumed
    # What the fit cost: a step takes time, but less than the whole run; the process holds at least the model
    # (CPU: its peak resident set); the adapter file's size is the one on disk.
    assert 0 < saved["step_time_s"] < saved["wall_time_s"] / saved["steps"]
    assert saved["peak_memory_kind"] == "cpu_max_rss" and saved["peak_memory_bytes"] > 10 * 2**20
    assert saved["adapter_bytes"] == Path(saved["adapter_file"]).stat().st_size > 0
    assert set(saved["environment"]) == {"torch", "transformers", "peft", "git_commit"}
    assert saved["config"]["dataset"]["name"] == "sst2"
    assert saved["majority_rates"]["test"] == 50.0 and 50.0 <= saved["majority_rates"]["val"] <= 100.0  # chance
    assert record["path"] == str(files[0])


def test_dry_run_prints_counts_and_writes_nothing(tiny_cfg, tmp_path: Path, capsys):
    with open_dict(tiny_cfg):
        tiny_cfg.dry_run = True
    assert run(tiny_cfg) is None
    out = capsys.readouterr().out
    assert "trainable adapter parameters: " in out and "classifier head parameters: 66" in out
    assert not (tmp_path / "runs").exists()


def test_a_failed_write_keeps_the_previous_record(tmp_path: Path, monkeypatch):
    path = write_record({"test": 1.0}, tmp_path, "run")
    monkeypatch.setattr(json, "dump", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_record({"test": 2.0}, tmp_path, "run")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"test": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_wandb_offline_logs_the_run(tiny_cfg, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from tests.conftest import compose_config

    with open_dict(tiny_cfg):
        tiny_cfg.logger = compose_config("logger=wandb").logger
        tiny_cfg.logger.save_dir = str(tmp_path / "wandb")
    record = run(tiny_cfg)
    assert record["status"] == "finished"
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
