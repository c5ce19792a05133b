"""Shared fixtures: a tiny local GLUE folder and Hydra composition of the project's configs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from partial_lora.config import register_resolvers
from partial_lora.protocol import Checkout

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CHECKOUT = Checkout(ROOT)  # the protocol runs this checkout's configs and run.py

POSITIVE = ["a great and moving film", "wonderful acting , lovely story", "brilliant , funny and warm",
            "an absolute delight", "superb direction and a fine cast"]
NEGATIVE = ["a dull and tedious mess", "boring , flat and far too long", "awful script , weak acting",
            "a tiresome , lifeless bore", "painfully bad and empty"]


# A run of the tiny random BERT on the tiny local SST-2 (data_dir, store and epochs are the test's).
TINY_ANY_LR = ["backbone=tiny_bert", "logger=none", "dataset.val_size=8", "dataset.max_length=16", "train.batch_size=8",
               "trainer.enable_progress_bar=false"]


def run_py(*args: str, cwd: Path, **options) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` exactly as typed, from ``cwd``, on one thread (cores are shared)."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"}, **options)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    """``glue/sst2/{train,validation}.jsonl`` with a few dozen easy sentences, in the HF glue schema."""
    rng = random.Random(0)

    def rows(count: int) -> list[dict]:
        out = []
        for idx in range(count):
            label = idx % 2
            out.append({"sentence": rng.choice(POSITIVE if label else NEGATIVE) + " ", "label": label, "idx": idx})
        return out

    root = tmp_path / "data"
    write_jsonl(root / "glue" / "sst2" / "train.jsonl", rows(48))
    write_jsonl(root / "glue" / "sst2" / "validation.jsonl", rows(16))
    return root


def compose_config(*overrides: str) -> DictConfig:
    """The config ``run.py`` would see for these overrides, with Hydra's runtime values filled in."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = "outputs/test"
    return cfg


def options(group: str) -> list[str]:
    """The options of config group ``group``: the files of ``conf/<group>/``, so a new one is tested unasked."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def methods(derive: bool) -> list[str]:
    """The methods of ``conf/method/`` that derive per-layer counts before training (``derive``) or do not."""
    from partial_lora.settings import derives_counts

    return [method for method in options("method") if derives_counts(compose_config(f"method={method}")) == derive]


@pytest.fixture
def tiny_cfg(glue_dir: Path, tmp_path: Path) -> DictConfig:
    """Tiny random BERT on the tiny local SST-2, one short epoch, records under ``tmp_path``."""
    cfg = compose_config(*TINY_ANY_LR, f"data_dir={glue_dir}", f"results_dir={tmp_path / 'runs'}",
                         f"checkpoint.dir={tmp_path / 'checkpoints'}", "train.epochs=1")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
    return cfg
