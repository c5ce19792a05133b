"""Runs keyed by their config hash: recorded runs are skipped, killed runs and sweeps resume, concurrent
launches train each run once, a diverging run leaves a failed record, and runs are deterministic."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from partial_lora.pipeline import run
from partial_lora.results import RunSlot
from tests.conftest import NEGATIVE, POSITIVE, ROOT, compose_config, write_jsonl

TINY = ["backbone=tiny_bert", "logger=none", "dataset.val_size=8", "dataset.max_length=16", "train.batch_size=8",
        "trainer.enable_progress_bar=false", "lr=5e-3"]


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


def trainable_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_a_killed_run_resumes_to_the_same_weights_and_metrics(longer_glue_dir: Path, tmp_path: Path, one_thread):
    overrides = [*TINY, f"data_dir={longer_glue_dir}", "train.epochs=3", "checkpoint.keep=true"]
    killed = tmp_path / "killed"
    process = launch([*overrides, *store_overrides(killed), f"hydra.run.dir={killed / 'out'}"], cwd=tmp_path)
    kill_when(process, lambda: any((killed / "checkpoints").glob("*/last.ckpt")))
    assert not (killed / "runs").exists()  # no half-written record

    output = finish(launch([*overrides, *store_overrides(killed), f"hydra.run.dir={killed / 'out2'}"], cwd=tmp_path))
    assert "resuming run" in output
    (resumed_file,) = (killed / "runs").iterdir()
    resumed = json.loads(resumed_file.read_text())

    cfg = compose_config(*overrides, *store_overrides(tmp_path / "whole"))
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "whole" / "out")
    whole = run(cfg)
    assert whole["run_id"] == resumed["run_id"]  # where files and checkpoints live is not part of the id
    assert whole["steps"] == resumed["steps"] == 60
    assert (whole["best_val"], whole["test"]) == (resumed["best_val"], resumed["test"])
    expected = trainable_state(tmp_path / "whole" / "checkpoints" / whole["run_id"] / "last.ckpt")
    actual = trainable_state(killed / "checkpoints" / resumed["run_id"] / "last.ckpt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
