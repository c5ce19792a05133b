"""Every option of every config group composes, and the composed values are what the code expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from partial_lora.config import register_resolvers
from tests.conftest import CONF, compose_config

GROUPS = ["dataset", "backbone", "method", "importance", "strategy", "trainer", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(group, option) for group in GROUPS for option in options(group)])
def test_every_group_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg.seed == 0 and cfg.rank >= 1
    if group not in ("experiment", "logger"):
        assert cfg[group].get("name", option) == option or group == "trainer"


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_every_launcher_preset_composes(launcher):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra")


def test_dataset_configs_name_their_task_fields():
    expected = {"sst2": ["sentence"], "mrpc": ["sentence1", "sentence2"], "qnli": ["question", "sentence"],
                "cola": ["sentence"], "rte": ["sentence1", "sentence2"]}
    for name, fields in expected.items():
        cfg = compose_config(f"dataset={name}")
        assert list(cfg.dataset.text_fields) == fields
    assert compose_config("dataset=cola").dataset.metric == "matthews"


def test_data_dir_comes_from_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PARTIAL_LORA_DATA", str(tmp_path))
    assert compose_config().data_dir == str(tmp_path)
    monkeypatch.delenv("PARTIAL_LORA_DATA")
    assert compose_config().data_dir is None
