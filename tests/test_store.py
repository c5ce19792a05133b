"""Runs keyed by their config hash: recorded runs are skipped, killed runs and sweeps resume, concurrent
launches train each run once, a diverging run leaves a failed record, and runs are deterministic."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from partial_lora.adapters.files import read_tensors
from partial_lora.errors import RUNS_FAILED_EXIT
from partial_lora.pipeline import run
from partial_lora.results import RunSlot, config_hash, write_record
from partial_lora.results.aggregate import load_records
from partial_lora.results.store import read_records
from partial_lora.training import FiniteLoss
from tests.conftest import NEGATIVE, POSITIVE, ROOT, TINY_ANY_LR, compose_config, run_py, write_jsonl

TINY = [*TINY_ANY_LR, "lr=5e-3"]  # a rate at which the tiny model learns the tiny task: metrics differ by path


def store_overrides(root: Path) -> list[str]:
    return [f"results_dir={root / 'runs'}", f"checkpoint.dir={root / 'checkpoints'}"]


@pytest.fixture
def longer_glue_dir(tmp_path: Path) -> Path:
    """160 training rows (20 steps of 8 per epoch), so a killed run has epochs left after its first checkpoint."""
    rng = random.Random(0)

    def rows(count: int) -> list[dict]:
        return [{"sentence": rng.choice(POSITIVE if idx % 2 else NEGATIVE), "label": idx % 2, "idx": idx}
                for idx in range(count)]

    root = tmp_path / "data"
    write_jsonl(root / "glue" / "sst2" / "train.jsonl", rows(168))
    write_jsonl(root / "glue" / "sst2" / "validation.jsonl", rows(16))
    return root


@pytest.fixture
def one_thread():
    """Runs in this process use one thread, as ``launch`` gives subprocesses: float reductions then add up
    in the same order everywhere (and several processes do not oversubscribe shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended before it could be killed:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill the process"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def final_state(checkpoint: Path, steps: int = 60) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``checkpoint``, which must hold the end of training (not an earlier epoch)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == steps
    return saved["state_dict"]


def test_a_killed_run_resumes_to_the_same_weights_and_metrics(longer_glue_dir: Path, tmp_path: Path, one_thread):
    overrides = [*TINY, f"data_dir={longer_glue_dir}", "train.epochs=3", "checkpoint.keep=true"]
    killed = tmp_path / "killed"
    process = launch([*overrides, *store_overrides(killed), f"hydra.run.dir={killed / 'out'}"], cwd=tmp_path)
    kill_when(process, lambda: any((killed / "checkpoints").glob("*/last.ckpt")))
    assert not list((killed / "runs").glob("*.json"))  # no half-written record
    (interrupted,) = (killed / "checkpoints").glob("*/last.ckpt")
    spent = torch.load(interrupted, map_location="cpu", weights_only=True)["callbacks"]["RunClock"]["elapsed_s"]

    output = finish(launch([*overrides, *store_overrides(killed), f"hydra.run.dir={killed / 'out2'}"], cwd=tmp_path))
    assert "resuming run" in output
    (resumed_file,) = (killed / "runs").glob("*.json")
    resumed = json.loads(resumed_file.read_text())
    # the record's time includes the killed segment's, up to the checkpoint it resumed from
    assert resumed["wall_time_carried_s"] == spent > 0 and resumed["wall_time_s"] > spent

    cfg = compose_config(*overrides, *store_overrides(tmp_path / "whole"))
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "whole" / "out")
    whole = run(cfg)
    assert whole["run_id"] == resumed["run_id"]  # where files and checkpoints live is not part of the id
    assert whole["steps"] == resumed["steps"] == 60
    assert (whole["best_val"], whole["test"]) == (resumed["best_val"], resumed["test"])
    expected = final_state(tmp_path / "whole" / "checkpoints" / whole["run_id"] / "last.ckpt")
    actual = final_state(killed / "checkpoints" / resumed["run_id"] / "last.ckpt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_recorded_run_is_skipped_and_a_locked_one_left_to_its_owner(tiny_cfg, tmp_path: Path, capsys):
    """The lock sits beside the record: a launch with other checkpoint folders is excluded too."""
    first = run(tiny_cfg)
    assert not any((tmp_path / "checkpoints").iterdir())  # checkpoint.keep=false: cleaned once recorded
    again = run(tiny_cfg)
    assert again == first
    assert f"run {first['run_id']} already has a finished record" in capsys.readouterr().out

    with open_dict(tiny_cfg):
        tiny_cfg.seed = 1
    slot = RunSlot(config_hash(OmegaConf.to_container(tiny_cfg, resolve=True)), tmp_path / "runs",
                   tmp_path / "another launch's checkpoints")
    with slot.claim() as claimed:
        assert claimed
        assert run(tiny_cfg) is None
    assert f"is being trained by another process (lock {tmp_path / 'runs' / '.locks'}" in capsys.readouterr().out
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1


def test_a_diverging_run_writes_a_failed_record_with_its_step(tiny_cfg, tmp_path: Path):
    with open_dict(tiny_cfg):
        tiny_cfg.lr = 1e30
    record = run(tiny_cfg)
    assert record["status"] == "failed" and record["step"] >= 1
    assert "the training loss became nan at step" in record["reason"]
    saved = json.loads(Path(record["path"]).read_text())
    assert saved["status"] == "failed" and saved["step"] == record["step"] and "best_val" not in saved


def test_a_step_limit_inside_the_first_epoch_validates_at_the_limit_and_tests(tiny_cfg):
    """``trainer.max_steps=1`` as typed: training stops before the epoch ends, yet the run is validated, its
    checkpoint tested and recorded (before, testing the best checkpoint failed: none had been saved)."""
    with open_dict(tiny_cfg):
        tiny_cfg.trainer.max_steps = 1
    record = run(tiny_cfg)
    assert record["status"] == "finished" and record["steps"] == 1 and 0 <= record["best_val"] <= 100


def records(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def test_a_diverging_run_exits_non_zero_after_writing_its_failed_record(glue_dir: Path, tmp_path: Path):
    result = run_py(*TINY_ANY_LR, "lr=1e30", f"data_dir={glue_dir}", "train.epochs=1", *store_overrides(tmp_path),
                    f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == RUNS_FAILED_EXIT, result.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*.json")
    assert json.loads(path.read_text())["status"] == "failed"
    assert result.stderr.splitlines()[-1] == (f"error: 1 of 1 runs failed, their records say why ({path}); deleting "
                                              "a failed record runs it again.")


@pytest.mark.slow
def test_a_sweep_goes_on_after_a_diverging_run(glue_dir: Path, tmp_path: Path):
    process = launch(["-m", "lr=1e30,5e-3", *TINY_ANY_LR, f"data_dir={glue_dir}", "train.epochs=1",
                      *store_overrides(tmp_path), f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == RUNS_FAILED_EXIT, output[-3000:]
    assert "failed: the training loss became nan" in output
    assert sorted(record["status"] for record in records(tmp_path / "runs")) == ["failed", "finished"]
    (failed,) = [path for path in (tmp_path / "runs").glob("*.json")
                 if json.loads(path.read_text())["status"] == "failed"]
    assert f"error: 1 of 2 runs failed, their records say why ({failed})" in output.splitlines()[-1]


@pytest.mark.slow
def test_a_killed_sweep_relaunched_finishes_every_run_once(longer_glue_dir: Path, tmp_path: Path):
    sweep = ["-m", "seed=0,1,2", *TINY, f"data_dir={longer_glue_dir}", "train.epochs=2", *store_overrides(tmp_path),
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process = launch(sweep, cwd=tmp_path)
    # Killed while the second run trains, after its first checkpoint: one finished, one half-finished, one to go.
    # The first run's own checkpoint outlives its record for a moment (the record is written first), so only
    # a checkpoint of a run without a record counts.
    def second_run_checkpointed() -> bool:
        finished = {record["run_id"] for record in records(tmp_path / "runs")}
        checkpointed = {path.parent.name for path in (tmp_path / "checkpoints").glob("*/last.ckpt")}
        return len(finished) == 1 and bool(checkpointed - finished)

    kill_when(process, second_run_checkpointed)
    (first,) = records(tmp_path / "runs")

    output = finish(launch(sweep, cwd=tmp_path))
    assert output.count("(skipped)") == 1 and output.count("resuming run") == 1
    done = records(tmp_path / "runs")
    assert len(done) == 3 and len({record["run_id"] for record in done}) == 3
    assert sorted(record["seed"] for record in done) == [0, 1, 2]
    assert all(record["status"] == "finished" and record["steps"] == 40 for record in done)
    assert first in done  # the finished run was not trained again
    assert not list((tmp_path / "runs").glob(".*.tmp"))  # no temporary files


@pytest.mark.slow
def test_two_sweeps_on_one_store_train_each_run_once(glue_dir: Path, tmp_path: Path):
    sweep = ["-m", "seed=0,1,2,3", *TINY, f"data_dir={glue_dir}", "train.epochs=1", *store_overrides(tmp_path)]
    processes = [launch([*sweep, f"hydra.sweep.dir={tmp_path / f'sweep{index}'}"], cwd=tmp_path) for index in (0, 1)]
    outputs = [finish(process) for process in processes]
    assert sum(output.count("run record: ") for output in outputs) == 4  # each run trained by one sweep
    done = records(tmp_path / "runs")
    assert sorted(record["seed"] for record in done) == [0, 1, 2, 3]
    assert all(record["status"] == "finished" for record in done)


def test_same_config_and_seed_give_identical_masks_caches_and_metrics(tiny_cfg, tmp_path: Path, one_thread):
    outcomes = []
    for copy in ("a", "b"):
        with open_dict(tiny_cfg):
            tiny_cfg.method = compose_config("method=partial_lora").method
            tiny_cfg.importance = compose_config("importance=svd").importance
            tiny_cfg.ratios.progress = False
            tiny_cfg.ratios.cache_dir = str(tmp_path / copy / "ratios")
            tiny_cfg.results_dir = str(tmp_path / copy / "runs")
            tiny_cfg.output_dir = str(tmp_path / copy / "out")
        record = run(tiny_cfg)
        cache = json.loads(Path(record["masks"]["cache_file"]).read_text())
        del cache["wall_time_s"]
        outcomes.append((record, cache, read_tensors(Path(record["adapter_file"]).parent)))  # in PEFT's layout
    (first, first_cache, first_adapter), (second, second_cache, second_adapter) = outcomes
    assert first_cache == second_cache and first_cache["checksum"]
    assert first_adapter.keys() == second_adapter.keys() and any(key.endswith("row_mask") for key in first_adapter)
    assert all(torch.equal(first_adapter[key], second_adapter[key]) for key in first_adapter)  # masks and weights
    assert (first["best_val"], first["test"], first["params"]) == (second["best_val"], second["test"], second["params"])


def adalora_in(root: Path, data_dir: Path):
    cfg = compose_config(*TINY, f"data_dir={data_dir}", "train.epochs=3", "checkpoint.keep=true", "method=adalora",
                         *store_overrides(root))
    with open_dict(cfg):
        cfg.output_dir = str(root / "out")
    return cfg


def test_a_crashed_adalora_run_resumes_like_an_uninterrupted_one(longer_glue_dir: Path, tmp_path: Path, monkeypatch,
                                                                 one_thread):
    """The SIGKILL test's contract, in process, for AdaLoRA: its allocator's state travels in the checkpoint."""
    def crash_in_second_epoch(self, trainer, pl_module, loss):
        if trainer.global_step == 27:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(FiniteLoss, "on_before_backward", crash_in_second_epoch)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(adalora_in(tmp_path / "crashed", longer_glue_dir))
    resumed = run(adalora_in(tmp_path / "crashed", longer_glue_dir))
    whole = run(adalora_in(tmp_path / "whole", longer_glue_dir))
    assert (whole["best_val"], whole["test"], whole["params"]) == (resumed["best_val"], resumed["test"],
                                                                  resumed["params"])
    expected = final_state(tmp_path / "whole" / "checkpoints" / whole["run_id"] / "last.ckpt")
    actual = final_state(tmp_path / "crashed" / "checkpoints" / resumed["run_id"] / "last.ckpt")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_an_adalora_run_stopped_after_its_last_step_counts_its_pruned_ranks(longer_glue_dir: Path, tmp_path: Path,
                                                                          monkeypatch, one_thread):
    """Stopped between training and test, a run resumes with nothing left to train: the rank pattern comes from
    the checkpoint alone, and without it every pruned rank would count again."""
    def stop_before_testing(*args, **kwargs):
        raise RuntimeError("simulated kill before the test")

    with monkeypatch.context() as patch:
        patch.setattr(L.Trainer, "test", stop_before_testing)
        with pytest.raises(RuntimeError, match="simulated kill"):
            run(adalora_in(tmp_path / "stopped", longer_glue_dir))
    (last,) = (tmp_path / "stopped" / "checkpoints").glob("*/last.ckpt")
    spent = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["RunClock"]["elapsed_s"]
    resumed = run(adalora_in(tmp_path / "stopped", longer_glue_dir))
    assert resumed["wall_time_carried_s"] == spent  # the fit's restore, not the best checkpoint's for the test
    whole = run(adalora_in(tmp_path / "whole", longer_glue_dir))
    assert resumed["steps"] == whole["steps"] == 60
    assert resumed["params"]["unmasked_adapter"] < resumed["params_initial"]["unmasked_adapter"]  # ranks were pruned
    assert (whole["best_val"], whole["test"], whole["params"]) == (resumed["best_val"], resumed["test"],
                                                                  resumed["params"])


def test_a_record_is_found_by_its_configs_hash_wherever_it_was_written(tiny_cfg, tmp_path: Path):
    """Records of runs launched elsewhere (other data, output and model folders; ids hashed before a
    setting became non-semantic) are recognised from their stored config."""
    config = OmegaConf.to_container(tiny_cfg, resolve=True)
    moved = config | {"data_dir": "/elsewhere/data", "output_dir": "/elsewhere/out",
                      "backbone": config["backbone"] | {"name_or_path": "/other/venv/minilm"}}
    write_record(finished_record(moved) | {"run_id": "written-by-an-older-hash"}, tmp_path / "runs", "any_name")
    write_record(finished_record(moved | {"seed": 1}), tmp_path / "runs", "another_run")
    slot = RunSlot(config_hash(config), tmp_path / "runs", tmp_path / "checkpoints")
    assert slot.record()["path"] == str(tmp_path / "runs" / "any_name.json")
    assert RunSlot(config_hash(config | {"lr": 1.0}), tmp_path / "runs", tmp_path / "checkpoints").record() is None


def finished_record(config: dict) -> dict:
    """A finished record as the pipeline writes it, with what the store and aggregation read."""
    return {"status": "finished", "config": config, "backbone": "tiny_bert", "dataset": "sst2", "method": "lora",
            "rank": 8, "seed": config["seed"], "lr": 5e-4, "best_val": 60.0, "test": 50.0,
            "params": {"adapter": 7168, "unmasked_adapter": 7168, "head": 66}}


def test_files_that_are_not_records_are_reported_once_and_skipped(tiny_cfg, tmp_path: Path, caplog):
    config = OmegaConf.to_container(tiny_cfg, resolve=True)
    runs = tmp_path / "runs"
    good = write_record(finished_record(config), runs, "good")
    broken = {"truncated.json": good.read_text()[:300], "list.json": "[]", "latin1.json": b'{"status": "\xe9"}',
              "no_config.json": json.dumps({"status": "finished"}), "no_metrics.json": json.dumps({
                  "status": "finished", "config": config | {"seed": 1}})}
    for name, content in broken.items():
        (runs / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (runs / "folder.json").mkdir()
    slot = RunSlot(config_hash(config), runs, tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING):
        assert slot.record()["path"] == str(good)
        assert slot.record()["path"] == str(good)  # a sweep looks again at every run
        assert list(load_records(runs)["path"]) == [str(good)]
    reasons = {"truncated.json": "it is unreadable (JSONDecodeError: ",
               "list.json": "it is not a JSON object.", "latin1.json": "it is unreadable (UnicodeDecodeError:",
               "no_config.json": "it has no config object.", "no_metrics.json": "it is finished but lacks backbone",
               "folder.json": "it is unreadable (IsADirectoryError:"}
    for name, reason in reasons.items():
        reports = [message for message in caplog.messages if str(runs / name) in message]
        assert len(reports) == 1 and f"run record {runs / name} is skipped: {reason}" in reports[0], caplog.messages


def test_a_store_holding_broken_files_still_runs(glue_dir: Path, tmp_path: Path):
    """As typed: a truncated record and a file holding ``[]`` are reported and skipped, never fatal; the run's
    own record is still found (so nothing trains: the test stays fast)."""
    overrides = [*TINY_ANY_LR, f"data_dir={glue_dir}", "train.epochs=1", *store_overrides(tmp_path)]
    runs = tmp_path / "runs"
    recorded = write_record(finished_record(OmegaConf.to_container(compose_config(*overrides), resolve=True)), runs,
                            "z_recorded")  # read after the broken files
    (runs / "truncated.json").write_text('{"status": "finished", "config": {"seed"')
    (runs / "list.json").write_text("[]")
    result = run_py(*overrides, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"run record {runs / 'list.json'} is skipped: it is not a JSON object.") == 1
    assert result.stdout.count(f"run record {runs / 'truncated.json'} is skipped: it is unreadable") == 1
    assert f"already has a finished record: {recorded} (skipped)" in result.stdout


def test_every_committed_record_is_read_as_a_record():
    paths = sorted((ROOT / "results" / "runs").glob("*.json"))
    assert len(list(read_records(paths))) == len(paths)


# The claims' first LoRA pilots, written while LoRA's id still held the ratio settings (it derives nothing): the
# store finds them by the id recomputed from their config, as every reader does.
WRITTEN_UNDER_AN_OLDER_ID = {"021dd76b1c5f": "22103865b463", "708a7fa50060": "f85b4453f3ff",
                             "e45a4313096d": "3b3d75b2e454"}


def test_every_committed_records_id_recomputes_unchanged():
    """Tables, claims and the leaderboard find records by the id recomputed from their config: a change to what the
    id hashes would orphan committed runs. Fields added to records (the fit's cost) stay out of the config."""
    paths = sorted((ROOT / "results" / "runs").glob("*.json"))
    recomputed = {record["run_id"]: config_hash(record["config"]) for _, record in read_records(paths)}
    assert len(recomputed) == len(paths)
    assert {written: now for written, now in recomputed.items() if written != now} == WRITTEN_UNDER_AN_OLDER_ID


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_records_are_readable_by_the_group_sharing_the_store(tmp_path: Path, umask):
    previous = os.umask(umask)
    try:
        path = write_record({"status": "failed"}, tmp_path, "run")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as any file the user writes (mkstemp's is 0600)
