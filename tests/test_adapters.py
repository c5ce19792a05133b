"""Adapter construction and the parameter counts every table reports (adapters only, head apart)."""

from __future__ import annotations

import pytest
import torch

from partial_lora.adapters import count_parameters
from partial_lora.backbones import build_backbone
from partial_lora.settings import adapt
from tests.conftest import compose_config


def adapted(*overrides: str):
    cfg = compose_config(*overrides)
    backbone = build_backbone(cfg.backbone, num_labels=cfg.dataset.num_labels)
    return cfg, backbone, adapt(backbone.model, cfg)


def lora_formula(model: torch.nn.Module) -> tuple[int, int]:
    """rank * (in + out) over the layers PEFT adapted, and how many layers those are."""
    total = layers = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            rank = module.lora_A["default"].out_features
            total += rank * (module.in_features + module.out_features)
            layers += 1
    return total, layers


@pytest.mark.parametrize("backbone, rank, layers", [("tiny_bert", 4, 12), ("minilm", 8, 36)])
def test_lora_count_is_rank_times_in_plus_out(backbone, rank, layers):
    cfg, built, model = adapted(f"backbone={backbone}", f"rank={rank}")
    counts = count_parameters(model, built.head_modules)
    expected, adapted_layers = lora_formula(model)
    assert adapted_layers == layers  # six linear layers per block, no pooler
    assert counts.adapter == expected
    hidden = built.model.config.hidden_size
    assert counts.head == hidden * cfg.dataset.num_labels + cfg.dataset.num_labels


def test_minilm_lora_rank8_matches_hand_count():
    _, built, model = adapted("backbone=minilm", "rank=8")
    per_block = 4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)
    assert count_parameters(model, built.head_modules).adapter == 6 * per_block == 331_776


def test_only_adapters_and_head_train_under_lora():
    _, built, model = adapted("backbone=tiny_bert")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)


def test_full_fine_tuning_trains_every_weight():
    _, built, model = adapted("backbone=tiny_bert", "method=full_ft")
    counts = count_parameters(model, built.head_modules)
    assert counts.adapter + counts.head == sum(p.numel() for p in model.parameters())
