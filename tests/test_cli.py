"""The command line: inclusive ranges become Hydra sweeps of integers; bad seeds fail with one sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from partial_lora.cli import check_added_keys, expand_ranges, hydra_order
from partial_lora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_inclusive_range_becomes_hydra_range():
    assert expand_ranges(["-m", "seed=0..19", "rank=8"]) == ["-m", "seed=range(0,20)", "rank=8"]
    assert expand_ranges(["+trainer.x=-2..1"]) == ["+trainer.x=range(-2,2)"]


def test_flags_go_first_and_overrides_keep_their_order():
    typed = ["dataset=mrpc", "method=lora", "-m", "seed=range(0,20)", "--cfg", "job", "rank=8"]
    assert hydra_order(typed) == ["-m", "--cfg", "job", "dataset=mrpc", "method=lora", "seed=range(0,20)", "rank=8"]
    assert hydra_order(["-m", "seed=1,2"]) == ["-m", "seed=1,2"]


@pytest.mark.parametrize("arg", ["seed=a..3", "seed=0..x", "seed=1.5..3"])
def test_non_integer_range_is_rejected(arg):
    with pytest.raises(ConfigError, match="not an integer range"):
        expand_ranges([arg])


@pytest.mark.parametrize("arg", ["data_dir=../x/shared/data", "results_dir=..", "data_dir=a/../b", "x=..5"])
def test_a_path_with_dots_is_no_range(arg):
    assert expand_ranges([arg]) == [arg]


def test_a_key_added_that_no_run_reads_is_refused_before_hydra(tmp_path):
    result = run_cli("+train.lr=0.5", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: +train.lr=0.5 adds train.lr, a setting no run reads (train holds batch_size, epochs, weight_decay, "
        "num_workers): drop it, or set an existing one without the + (python run.py --cfg job lists them).")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("arg", ["+method.mask.mode=partial", "+trainer.gradient_clip_val=1", "+experiment=demo",
                                 "++ratios.step=2", "+hydra.job.name=x"])
def test_keys_added_where_runs_read_them_pass(arg):
    check_added_keys([arg], ROOT / "conf")


def test_reversed_range_is_rejected():
    with pytest.raises(ConfigError, match="empty range"):
        expand_ranges(["seed=5..1"])


def test_multirun_seed_range_launches_twenty_integer_jobs(tmp_path):
    result = run_cli("-m", "seed=0..19", "dry_run=true", "backbone=tiny_bert", "logger=none",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trainable adapter parameters") == 20
    seeds = []
    for job in sorted((tmp_path / "sweep").iterdir()):
        if job.is_dir():
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            seeds += [yaml.safe_load(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")]
    assert sorted(seeds) == list(range(20))
    assert all(type(seed) is int for seed in seeds)


def test_overrides_before_and_after_multirun_flag_launch_every_job(tmp_path):
    result = run_cli("dataset=sst2", "method=lora", "backbone=tiny_bert", "-m", "seed=0..2", "dry_run=true",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trainable adapter parameters") == 3
    jobs = sorted(path for path in (tmp_path / "multirun").glob("*/*/*") if path.is_dir())
    overrides = [yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs]
    assert sorted(o for job in overrides for o in job if o.startswith("seed=")) == ["seed=0", "seed=1", "seed=2"]
    assert all({"dataset=sst2", "method=lora", "backbone=tiny_bert", "dry_run=True"} <= set(job) for job in overrides)


@pytest.mark.parametrize("seed, message", [("abc", "seed must be an integer"), ("1.5", "seed must be an integer"),
                                           ("a..3", "not an integer range")])
def test_bad_seed_fails_with_one_clear_sentence(tmp_path, seed, message):
    result = run_cli(f"seed={seed}", "dry_run=true", "backbone=tiny_bert", "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_cfg_job_work(tmp_path):
    help_result = run_cli("--help", cwd=tmp_path)
    assert help_result.returncode == 0
    method_line = next(line for line in help_result.stdout.splitlines() if line.startswith("method: "))
    assert {"lora", "full_ft", "partial_lora"} <= set(method_line.removeprefix("method: ").split(", "))
    cfg_result = run_cli("--cfg", "job", "method=full_ft", cwd=tmp_path)
    assert cfg_result.returncode == 0 and "name: full_ft" in cfg_result.stdout
