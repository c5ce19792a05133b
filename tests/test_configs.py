"""Every option of every config group composes, and the composed values are what the code expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from partial_lora.config import register_resolvers
from partial_lora.masks import NEEDS_DERIVATION
from partial_lora.methods.base import Method
from partial_lora.results import config_hash
from partial_lora.settings import derives_counts, method_of
from tests.conftest import CONF, compose_config, methods, options

GROUPS = ["dataset", "backbone", "method", "importance", "strategy", "trainer", "logger", "experiment"]


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


def test_masked_methods_derive_with_svd_unless_told_otherwise():
    masks = {method: compose_config(f"method={method}").method.get("mask") for method in options("method")}
    derived = [method for method, mask in masks.items() if mask and mask.mode in NEEDS_DERIVATION]
    assert {"partial_lora", "targeted_lora", "inverted_lora", "stochastic_lora", "partial_adalora"} <= set(derived)
    for method in derived:
        default = compose_config(f"method={method}")
        assert default.importance.name == "svd"
        # Records made with importance=svd typed out keep their run ids.
        explicit = compose_config(f"method={method}", "importance=svd")
        assert config_hash(OmegaConf.to_container(default, resolve=True)) == config_hash(
            OmegaConf.to_container(explicit, resolve=True))
        assert compose_config(f"method={method}", "importance=snip").importance.name == "snip"
        assert compose_config("importance=imp", f"method={method}").importance.name == "imp"
        assert compose_config(f"method={method}", "importance=none").importance.name == "none"
    for method in methods(derive=False):
        assert compose_config(f"method={method}").importance.name == "none"


def test_vision_datasets_pick_the_paper_image_backbone_unless_told_otherwise():
    for dataset in options("dataset"):
        cfg = compose_config(f"dataset={dataset}")
        assert cfg.backbone.name == ("clip_vit_b16" if cfg.dataset.kind == "vision" else "minilm")
    assert compose_config("dataset=cifar10_fewshot", "backbone=clip_tiny").backbone.name == "clip_tiny"
    assert compose_config("backbone=clip_tiny", "dataset=fgvc").backbone.name == "clip_tiny"


@pytest.mark.parametrize("method", options("method"))
def test_every_method_names_its_class_and_the_class_stays_out_of_the_run_id(method):
    cfg = compose_config(f"method={method}")
    plugin = method_of(cfg)
    assert isinstance(plugin, Method) and plugin.derives_counts == derives_counts(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    without = resolved | {"method": {key: value for key, value in resolved["method"].items() if key != "plugin"}}
    assert config_hash(resolved) == config_hash(without)


def test_a_run_has_one_id_on_any_device_but_not_at_another_precision_or_device_count():
    """A GPU session fills the cells a CPU plan names: the device and its determinism flag leave the id as the
    CPU's, while bf16 and data parallelism over several devices, which compute another model, change it."""
    def run_id(*overrides: str) -> str:
        return config_hash(OmegaConf.to_container(compose_config("scale=cpu", "method=partial_lora", *overrides),
                                                  resolve=True))

    on_cpu = run_id()
    assert run_id("trainer=gpu", "trainer.precision=32-true") == on_cpu
    assert run_id("trainer.deterministic=false") == on_cpu
    assert run_id("trainer=gpu") != on_cpu  # bf16-mixed
    assert run_id("trainer=ddp", "trainer.precision=32-true") != on_cpu  # every visible GPU, one batch split
    assert run_id("trainer=gpu", "trainer.precision=32-true", "seed=1") != on_cpu
