"""What a run, a sweep and a store survive: SIGTERM (preemption) mid-epoch, jobs refused inside a sweep, an
unloadable checkpoint, a full disk, foreign and hostile files in a shared store."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from partial_lora.errors import INTERRUPTED_EXIT, SIGTERM_PENDING, RunInterrupted, StorageError
from partial_lora.pipeline import run
from partial_lora.training import FiniteLoss
from tests.conftest import ROOT, compose_config, run_py
from tests.test_store import TINY, final_state, launch, longer_glue_dir, one_thread, records, store_overrides  # noqa: F401

STEPS_PER_EPOCH = 20  # longer_glue_dir: 160 training rows in batches of 8


def tiny_run(data: Path, store: Path, *overrides: str):
    cfg = compose_config(*TINY, f"data_dir={data}", *store_overrides(store), "checkpoint.keep=true", *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(store / "out")
    return cfg


def sigterm_at(monkeypatch, step: int) -> None:
    """Send this process SIGTERM while it trains optimiser step ``step`` (0-based), as a scheduler would."""
    original = FiniteLoss.on_before_backward

    def on_before_backward(self, trainer, pl_module, loss):
        original(self, trainer, pl_module, loss)
        if trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FiniteLoss, "on_before_backward", on_before_backward)


# Compact Partial-LoRA layers hold the kept rows / columns only, while their checkpoints hold full-shaped factors.
@pytest.mark.parametrize("method", [[], ["method=partial_lora", "importance=svd", "ratios.progress=false"]],
                         ids=["lora", "compact_partial_lora"])
def test_a_run_stopped_by_sigterm_mid_epoch_resumes_to_the_uninterrupted_record(longer_glue_dir: Path, tmp_path: Path,
                                                                               monkeypatch, one_thread, method, capsys):
    method = [*method, f"ratios.cache_dir={tmp_path / 'ratios'}"]
    stopped = tiny_run(longer_glue_dir, tmp_path / "stopped", "train.epochs=3", *method)
    with monkeypatch.context() as patch:
        sigterm_at(patch, 27)  # in the second epoch (steps 20..39)
        with pytest.raises(RunInterrupted, match=r"was stopped by SIGTERM at step 28 \(epoch 1\); its checkpoint "
                                                 r".*last.ckpt resumes it"):
            run(stopped)
    assert not list((tmp_path / "stopped" / "runs").glob("*.json"))
    (checkpoint,) = (tmp_path / "stopped" / "checkpoints").glob("*/last.ckpt")
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 28

    resumed = run(stopped)
    assert "resuming run" in capsys.readouterr().out
    whole = run(tiny_run(longer_glue_dir, tmp_path / "whole", "train.epochs=3", *method))
    assert resumed["run_id"] == whole["run_id"] and resumed["steps"] == whole["steps"] == 60
    assert (resumed["best_val"], resumed["test"], resumed["params"]) == (whole["best_val"], whole["test"],
                                                                          whole["params"])
    expected = final_state(tmp_path / "whole" / "checkpoints" / whole["run_id"] / "last.ckpt")
    actual = final_state(checkpoint)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.slow
def test_a_local_sweep_stopped_by_sigterm_exits_143_names_the_jobs_left_and_resumes(longer_glue_dir: Path,
                                                                                    tmp_path: Path):
    sweep = ["-m", "seed=0,1", *TINY, f"data_dir={longer_glue_dir}", "train.epochs=2", *store_overrides(tmp_path),
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process = launch(sweep, cwd=tmp_path)
    while not list((tmp_path / "checkpoints").glob("*/last.ckpt")):  # the first job's first epoch is done
        assert process.poll() is None, process.stdout.read()[-3000:]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == INTERRUPTED_EXIT, output[-3000:]
    stopped, summary = output.strip().splitlines()[-2:]
    assert stopped.startswith("error: run ") and " was stopped by SIGTERM at step " in stopped
    assert summary == ("error: the sweep stopped at job #0 of 2 (SIGTERM); 2 jobs did not run to the end: #0 seed=0, "
                       "#1 seed=1; launching the same command again resumes them (finished runs are skipped).")
    assert not records(tmp_path / "runs")

    process = launch(sweep, cwd=tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert output.count("resuming run") == 1
    assert sorted((record["seed"], record["steps"]) for record in records(tmp_path / "runs")) == [(0, 40), (1, 40)]


def test_a_sweep_runs_every_job_and_counts_the_refused_ones(tmp_path: Path):
    result = run_py("-m", "rank=4,64,2", "backbone=tiny_bert", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: rank=64 is larger than the smallest layer it adapts" in result.stderr
    assert "#2 : rank=2" in result.stdout and result.stdout.count("trainable adapter parameters") == 2
    assert result.stderr.splitlines()[-1] == ("error: 1 of 3 runs were refused, see their errors above (#1 rank=64), "
                                              "and 0 failed; the other runs ran.")


def foreign_pickle(path: Path) -> None:
    torch.save({"state_dict": {}, "payload": Path("/")}, path)  # weights_only loading refuses a PosixPath


def other_shapes(path: Path) -> None:
    torch.save({"state_dict": {"model.classifier.weight": torch.zeros(7, 3)}}, path)


@pytest.mark.parametrize("damage, reason", [
    (foreign_pickle, "it does not load (UnpicklingError: Weights only load failed"),
    (other_shapes, "its tensors are not this run's"),
    (lambda path: path.write_bytes(b"PK\x03\x04 truncated"), "it does not load"),
])
def test_an_unloadable_last_checkpoint_is_set_aside_once_and_the_run_starts_over(tiny_cfg, tmp_path: Path, capsys,
                                                                                damage, reason):
    run_id = config_hash_of(tiny_cfg)
    last = tmp_path / "checkpoints" / run_id / "last.ckpt"
    last.parent.mkdir(parents=True)
    damage(last)
    original = last.read_bytes()
    record = run(tiny_cfg)
    output = capsys.readouterr().out
    assert record["status"] == "finished" and f"checkpoint {last} cannot resume run {run_id}: {reason}" in output
    assert "resuming run" not in output
    (aside,) = last.parent.parent.glob(f"{run_id}-unloadable-*.ckpt")
    assert aside.read_bytes() == original  # set aside, not deleted
    assert run(tiny_cfg) == record  # the second launch finds the record, and reports nothing again
    assert reason not in capsys.readouterr().out


def config_hash_of(cfg) -> str:
    from omegaconf import OmegaConf

    from partial_lora.results import config_hash

    return config_hash(OmegaConf.to_container(cfg, resolve=True))


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_the_record_is_one_sentence_and_the_relaunch_resumes(tiny_cfg, tmp_path: Path,
                                                                                      monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", no_space)
        with pytest.raises(StorageError) as error:
            run(tiny_cfg)
    assert str(error.value).startswith(f"no space is left on the device to write {tmp_path / 'runs'}/tiny_bert_sst2")
    assert str(error.value).count(". ") == 0
    assert not list((tmp_path / "runs").glob("*.json")) and not list((tmp_path / "runs").glob(".*.tmp"))
    assert list((tmp_path / "checkpoints").glob("*/last.ckpt"))  # the trained epoch is kept
    assert run(tiny_cfg)["status"] == "finished"
    assert "resuming run" in capsys.readouterr().out


def test_a_full_disk_while_writing_a_checkpoint_is_one_sentence(tiny_cfg, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", no_space)
    with pytest.raises(StorageError, match=r"^no space is left on the device to write the run's checkpoints "):
        run(tiny_cfg)
    assert not list((tmp_path / "runs").glob("*.json"))


def test_names_from_the_config_stay_inside_results_dir(tiny_cfg, tmp_path: Path):
    with open_dict(tiny_cfg):
        tiny_cfg.backbone.name = "./../../ESCAPED"
        tiny_cfg.method.name = "lo/ra"
    record = run(tiny_cfg)
    path = Path(record["path"])
    assert path.parent == tmp_path / "runs" and path.name.startswith("-..-..-ESCAPED_sst2_lo-ra_r8_s0_")
    assert not list(tmp_path.parent.glob("ESCAPED*"))  # where runs/./../../ESCAPED... would have landed
    assert json.loads(path.read_text())["backbone"] == "./../../ESCAPED"


def test_a_planted_lock_symlink_is_not_followed(tiny_cfg, tmp_path: Path):
    locks = tmp_path / "runs" / ".locks"
    locks.mkdir(parents=True)
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    (locks / f"{config_hash_of(tiny_cfg)}.lock").symlink_to(target)
    with pytest.raises(StorageError, match=r"lock file .*\.lock is a symbolic link: remove it"):
        run(tiny_cfg)
    assert not target.exists()


def test_a_max_length_beyond_the_position_embeddings_is_refused_before_training(tiny_cfg, tmp_path: Path):
    from partial_lora.errors import ConfigError

    with open_dict(tiny_cfg):
        tiny_cfg.dataset.max_length = 100000
    with pytest.raises(ConfigError, match=r"^dataset.max_length=100000 is more than the 512 positions backbone "
                                          r"tiny_bert embeds: choose dataset.max_length <= 512\.$"):
        run(tiny_cfg)
    assert not (tmp_path / "checkpoints").exists()


def finished_record(tmp_path: Path) -> dict:
    """A valid finished record of the shape ``run`` writes (a dict to break field by field)."""
    return {"status": "finished", "config": {"backbone": {"name": "tiny_bert"}, "dataset": {"name": "sst2"},
                                            "method": {"name": "lora"}, "importance": {"name": "none"}},
            "backbone": "tiny_bert", "dataset": "sst2", "method": "lora", "rank": 8, "seed": 0, "lr": 5e-4,
            "best_val": 80.0, "test": 75.0, "params": {"adapter": 10, "unmasked_adapter": 10}}


FOREIGN = [
    ({"config": {"method": "sgd", "importance": {}}}, "its config's method is 'sgd', not a block with a name"),
    ({"best_val": float("nan")}, "its best_val is nan, not a finite number"),
    ({"test": float("inf")}, "its test is inf, not a finite number"),
    ({"rank": "8"}, "its rank is '8', not an integer or null"),
    ({"config": {"importance": {"name": "svd"}, "scale": "cpu"}}, "its config's scale is 'cpu'"),
    ({"wall_time_s": "long"}, "its wall_time_s is 'long', not a finite number"),
    # the fit's cost, absent from older records (finished_record has none), is checked where present
    ({"step_time_s": 0}, "its step_time_s is 0, not a positive number of seconds or null"),
    ({"peak_memory_bytes": 1.5e9}, "its peak_memory_bytes is 1500000000.0, not a count of bytes or null"),
    ({"peak_memory_kind": "rss"}, "its peak_memory_kind is 'rss', not one of cuda_max_allocated, cpu_max_rss"),
    ({"adapter_bytes": -1}, "its adapter_bytes is -1, not a count of bytes or null"),
]


def test_foreign_records_never_stop_a_launch_or_the_summary(tiny_cfg, tmp_path: Path, caplog):
    import subprocess
    import sys

    from partial_lora.files import write_record
    from partial_lora.results.store import read_records
    from tests.conftest import ROOT

    foreign = [write_record(finished_record(tmp_path) | change, tmp_path / "runs", f"foreign{index}")
               for index, (change, _) in enumerate(FOREIGN)]
    good = write_record(finished_record(tmp_path), tmp_path / "runs", "good")
    assert [path for path, _ in read_records([*foreign, good])] == [good]
    for path, (_, reason) in zip(foreign, FOREIGN):
        assert f"run record {path} is skipped: {reason}" in caplog.text
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path / "runs")],
                             capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert summary.returncode == 0 and "Traceback" not in summary.stderr, summary.stderr[-3000:]
    row = summary.stdout.splitlines()[-1]  # the good record alone: its test metric, no NaN or inf mean
    assert "tiny_bert" in row and "75.00" in row and "nan" not in row and "inf" not in row
    assert run(tiny_cfg)["status"] == "finished"


def test_a_data_file_edited_in_place_with_its_size_and_time_kept_is_read_anew(glue_dir: Path):
    from partial_lora.data.glue import load_glue_splits

    train = glue_dir / "glue" / "sst2" / "train.jsonl"
    assert load_glue_splits("sst2", str(glue_dir))["train"][0]["label"] == 0
    kept = train.stat()
    rows = train.read_text().splitlines()
    first = json.loads(rows[0])
    rows[0] = json.dumps(first | {"label": 1 - first["label"]})  # same size: one digit for another
    train.write_text("\n".join(rows) + "\n")
    os.utime(train, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert train.stat().st_size == kept.st_size
    assert load_glue_splits("sst2", str(glue_dir))["train"][0]["label"] == 1


@pytest.fixture(scope="module")
def tiny_model():
    from partial_lora.backbones import build_backbone

    return build_backbone(compose_config("backbone=tiny_bert").backbone, num_labels=2).model


def batch(labels: list[int]) -> dict:
    return {"input_ids": torch.ones(len(labels), 4, dtype=torch.long), "attention_mask": torch.ones(len(labels), 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


@pytest.mark.parametrize("batches, message", [
    ([{"input_ids": torch.ones(2, 4, dtype=torch.long)}], "derivation batch 1 has no labels: each batch is a dict of "
                                                          "the model's inputs plus `labels`, the class of each row."),
    ([batch([0, 1]), batch([])], "derivation batch 2 has no rows: leave empty batches out."),
    ([batch([0, 5])], "derivation batch 1 has label 5, outside the head's classes 0..1: fix the labels or build the "
                      "head with more classes."),
    ([batch([-1, 0])], "derivation batch 1 has label -1, outside the head's classes 0..1"),
])
def test_derive_counts_refuses_batches_it_cannot_use_with_one_sentence(tiny_model, batches, message):
    from partial_lora import DerivationSettings, derive_counts
    from partial_lora.errors import DataError

    with pytest.raises(DataError) as error:
        derive_counts(tiny_model, batches, DerivationSettings(target_modules=["query", "value"]))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("k_row, k_col", [(1000, 2), (3, -3), (5.5, 2), (True, 2)])
def test_cached_counts_outside_the_layers_shape_are_refused_even_with_a_recomputed_checksum(tmp_path: Path, caplog,
                                                                                        k_row, k_col):
    from partial_lora.errors import ConfigError
    from partial_lora.importance import LayerScores
    from partial_lora.masks import make_masks
    from partial_lora.ratios import DerivedCounts, RatioCache
    from partial_lora.ratios.counts import digest
    from partial_lora.ratios.search import LayerCounts

    inputs = {"settings": {"importance": "svd"}, "source": {}}
    derived = DerivedCounts(counts={"layer": LayerCounts(k_row=3, k_col=2, evaluations=1)},
                            scores={"layer": LayerScores(row=torch.rand(32), col=torch.rand(16))}, inputs=inputs)
    cache = RatioCache(tmp_path)
    path = cache.save(derived)
    entry = json.loads(path.read_text())
    entry["layers"]["layer"] |= {"k_row": k_row, "k_col": k_col}
    entry["checksum"] = digest(entry["layers"])  # anyone can recompute it
    path.write_text(json.dumps(entry))
    assert cache.load(inputs, {"layer": (32, 16)}) is None
    bad = "k_row" if k_row != 3 else "k_col"
    assert f"ratio cache {path} is not usable: layer layer has {bad}" in caplog.text
    with pytest.raises(ConfigError, match=f"layer layer has {bad} .*, not an integer in 0..(32|16)"):
        make_masks("partial", {"layer": (32, 16)}, seed=0, counts=DerivedCounts.load(path))


def test_under_submitit_its_signal_checkpoints_at_the_next_batch_then_hands_over_to_submitit(
        longer_glue_dir: Path, tmp_path: Path, monkeypatch):
    """On SLURM, submitit's signal (USR2) arrives before the time limit: the fit stops at a batch boundary with
    a checkpoint, then submitit's handler (here a stand-in that records what it found) requeues the job."""
    cfg = tiny_run(longer_glue_dir, tmp_path, "train.epochs=2")
    seen = []

    def submitit_requeue(signum, frame):  # submitit's checkpoint_and_try_requeue ends with sys.exit(-1)
        seen.append([torch.load(path, map_location="cpu", weights_only=True)["global_step"]
                     for path in (tmp_path / "checkpoints").glob("*/last.ckpt")])
        raise SystemExit(-1)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    original = FiniteLoss.on_before_backward

    def on_before_backward(self, trainer, pl_module, loss):
        original(self, trainer, pl_module, loss)
        if trainer.global_step == 24:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(FiniteLoss, "on_before_backward", on_before_backward)
    try:
        with pytest.raises(SystemExit):
            run(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [[25]]  # requeued once, after the checkpoint of the step it stopped at
    assert not records(tmp_path / "runs")


def test_sigterm_outside_a_fit_stops_the_run_and_inside_one_leaves_it_to_lightning():
    import run as entry_point

    previous = signal.signal(signal.SIGTERM, entry_point.stop_on_sigterm)
    try:
        with pytest.raises(RunInterrupted, match="stopped by SIGTERM before training began or after it ended"):
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: entry_point.stop_on_sigterm(signum, frame))
        os.kill(os.getpid(), signal.SIGTERM)  # as Lightning's handler calls it: nothing raised
    finally:
        signal.signal(signal.SIGTERM, previous)
        SIGTERM_PENDING.clear()  # set by the first stop; a later fit in this process would honour it


def test_a_sigterm_a_library_swallows_before_the_fit_still_stops_the_run_at_its_first_batch(
        longer_glue_dir: Path, tmp_path: Path, monkeypatch, one_thread):
    import run as entry_point
    from partial_lora.data.glue import GlueDataModule

    original = GlueDataModule.setup

    def setup(self, stage):
        try:  # as datasets' fingerprinting does around dill, where a sweep's SIGTERM once went unheeded
            os.kill(os.getpid(), signal.SIGTERM)
        except:  # noqa: E722
            pass
        original(self, stage)

    monkeypatch.setattr(GlueDataModule, "setup", setup)
    previous = signal.signal(signal.SIGTERM, entry_point.stop_on_sigterm)
    try:
        with pytest.raises(RunInterrupted, match=r"was stopped by SIGTERM at step 0 \(epoch 0\); its checkpoint "
                                                 r".*last.ckpt resumes it"):
            run(tiny_run(longer_glue_dir, tmp_path, "train.epochs=1"))
    finally:
        signal.signal(signal.SIGTERM, previous)
        SIGTERM_PENDING.clear()
    assert not records(tmp_path / "runs")


def test_a_plan_passes_sigterm_on_to_its_multirun_and_stops_with_it():
    import sys
    import threading

    from partial_lora.protocol.sweep import run_multirun

    before = signal.getsignal(signal.SIGTERM)
    assert run_multirun([sys.executable, "-c", "raise SystemExit(2)"], ROOT) == 2  # refused runs: the plan goes on
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); time.sleep(60)"
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # a scheduler stopping the launcher
    with pytest.raises(RunInterrupted, match="SIGTERM stopped the multirun .* launching the same command again "
                                             "resumes it"):
        run_multirun([sys.executable, "-c", child], ROOT)
    assert signal.getsignal(signal.SIGTERM) == before  # this process's own handling is back


@pytest.mark.parametrize("exit_status, goes_on", [(0, True), (2, True), ("failed", True), (1, False), (137, False)])
def test_table_and_claims_plans_share_one_failure_rule(monkeypatch, exit_status, goes_on):
    """Failed or refused runs are counted and the plan goes on; any other non-zero exit (a crash) stops a table's
    plan and the claims' alike."""
    import subprocess
    import sys

    from partial_lora.errors import RUNS_FAILED_EXIT
    from partial_lora.protocol import sweep
    from partial_lora.protocol.claims_plan import run_claims

    status = RUNS_FAILED_EXIT if exit_status == "failed" else exit_status
    argv = [sys.executable, "-c", f"raise SystemExit({status})"]

    class OneCommandPlan:  # the claims plan's interface as run_claims uses it: one pending multirun
        checkout = sweep.Checkout(ROOT)

        def reload(self):
            pass

        def commands(self, launcher):
            return [argv]

    monkeypatch.setattr(sweep, "command", lambda *args, **kwargs: argv)
    plans = {"table": lambda: sweep.launch(sweep.Checkout(ROOT), "table6", "cpu", [{"seed": [0]}]),
             "claims": lambda: run_claims(OneCommandPlan())}
    for name, plan in plans.items():
        if goes_on:
            assert plan() == (status != 0), name
        else:
            with pytest.raises(subprocess.CalledProcessError):
                plan()
