"""CoTo: the activation schedule, block switching that leaves exactly the base layers, and no effect at p = 1."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from partial_lora.backbones import build_backbone
from partial_lora.errors import ConfigError
from partial_lora.pipeline import run
from partial_lora.settings import adapt
from partial_lora.training.coto import CoTo, activation_probability, sample_active_blocks, tuner_layers
from tests.conftest import compose_config


def test_activation_probability_rises_linearly_then_stays_one():
    schedule = [activation_probability(step, 100, 0.1, 0.75) for step in range(100)]
    assert schedule[0] == pytest.approx(0.1)
    assert schedule[30] == pytest.approx(0.1 + 0.9 * 30 / 75)
    assert all(later > earlier for earlier, later in zip(schedule[:75], schedule[1:75]))
    assert schedule[74] < 1 and all(p == 1.0 for p in schedule[75:])
    assert activation_probability(0, 100, 1.0, 0.75) == 1.0


def test_at_least_one_block_is_active_at_every_step():
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_active_blocks(0.05, 6, generator) for _ in range(2000)])
    assert draws.any(dim=1).all()
    assert (draws.sum(dim=1) == 1).float().mean() > 0.5  # mostly the forced single block at p = 0.05
    assert draws.any(dim=0).all()  # the forced block is drawn among all blocks
    dense = torch.stack([sample_active_blocks(0.6, 6, generator) for _ in range(2000)])
    assert dense.float().mean() == pytest.approx(0.6, abs=0.03)


def adapted_tiny_model(method: str):
    cfg = compose_config("backbone=tiny_bert", f"method={method}", "rank=4")
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone, num_labels=2)
    model = adapt(backbone.model, cfg, total_steps=100)
    for name, parameter in model.named_parameters():  # make every adapter change its layer's output
        if parameter.requires_grad and ("lora_B" in name or "lora_E" in name):
            torch.nn.init.normal_(parameter)
    return cfg, model


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "balanced"])
def test_switched_off_blocks_give_exactly_the_base_layer_output(method):
    cfg, model = adapted_tiny_model(method)
    callback = CoTo(initial_p=1e-6, stage1_ratio=0.75, seed=0, blocks=cfg.backbone.blocks)
    module = SimpleNamespace(model=model)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100)
    callback.on_train_start(trainer, module)
    assert len(callback.groups) == 2
    callback.on_train_batch_start(trainer, module, None, 0)
    assert len(callback.off) == 6  # one of the two blocks: never both
    for layer in tuner_layers(model).values():
        inputs = torch.randn(3, 5, layer.in_features)
        assert torch.equal(layer(inputs), layer.get_base_layer()(inputs)) == (layer in callback.off)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert not any(layer.disable_adapters for layer in tuner_layers(model).values())
    assert all(parameter.requires_grad for name, parameter in model.named_parameters() if "lora_" in name)


def test_coto_needs_blocks_and_a_peft_method():
    with pytest.raises(ConfigError):
        CoTo(initial_p=0.1, stage1_ratio=0.75, seed=0, blocks=None)
    with pytest.raises(ConfigError):
        CoTo(initial_p=0.0, stage1_ratio=0.75, seed=0, blocks="bert.encoder.layer")
    from partial_lora.config import validate
    with pytest.raises(ConfigError, match="strategy=coto"):
        validate(compose_config("method=losia", "strategy=coto"))


def with_strategy(cfg, *overrides: str):
    with open_dict(cfg):
        cfg.strategy = compose_config(*overrides).strategy
    return cfg


def test_initial_p_one_trains_exactly_as_plain_training(tiny_cfg, tmp_path: Path):
    plain = run(tiny_cfg)
    with open_dict(tiny_cfg):
        tiny_cfg.output_dir = str(tmp_path / "coto")
    coto = run(with_strategy(tiny_cfg, "strategy=coto", "strategy.initial_p=1"))
    assert (plain["method"], coto["method"]) == ("lora", "lora+coto")
    assert (coto["best_val"], coto["test"]) == (plain["best_val"], plain["test"])
    plain_weights, coto_weights = load_file(plain["adapter_file"]), load_file(coto["adapter_file"])
    assert plain_weights.keys() == coto_weights.keys()
    assert all(torch.equal(coto_weights[key], plain_weights[key]) for key in plain_weights)  # bit for bit


def test_coto_composes_with_adalora_rank_allocation(tiny_cfg):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=adalora").method
    record = run(with_strategy(tiny_cfg, "strategy=coto", "strategy.stage1_ratio=1"))
    assert record["method"] == "adalora+coto" and record["steps"] == 5
