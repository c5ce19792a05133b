"""Residual norms ||dW|| per adapted layer, written into run records for Figures 7-10."""

from __future__ import annotations

import pytest
import torch

from partial_lora.adapters import adapt, residual_norms
from partial_lora.adapters.masked import factor, lora_layers
from partial_lora.backbones import build_backbone
from tests.conftest import compose_config


def adapted(method: str):
    cfg = compose_config("backbone=tiny_bert", f"method={method}")
    backbone = build_backbone(cfg.backbone, num_labels=2)
    return adapt(backbone.model, cfg, total_steps=10)


def test_lora_residual_is_scaled_b_times_a_and_zero_at_initialisation():
    model = adapted("lora")
    layers = lora_layers(model)
    norms = residual_norms(model)
    assert set(norms) == set(layers)  # every adapted layer, nothing from the classifier head
    assert all(norm["delta"] == 0.0 and norm["weight"] > 0 for norm in norms.values())
    name, layer = next(iter(layers.items()))
    with torch.no_grad():
        factor(layer, "lora_B").normal_()
    expected = (layer.scaling["default"] * factor(layer, "lora_B") @ factor(layer, "lora_A")).norm()
    assert residual_norms(model)[name]["delta"] == pytest.approx(float(expected), rel=1e-5)


def test_random_masking_residual_is_its_sparse_delta():
    model = adapted("random_masking")
    norms = residual_norms(model)
    assert norms and all(norm["delta"] == 0.0 for norm in norms.values())
    values = next(parameter for name, parameter in model.named_parameters() if name.endswith("values"))
    with torch.no_grad():
        values.fill_(2.0)
    assert max(norm["delta"] for norm in residual_norms(model).values()) == pytest.approx(2.0 * values.numel() ** 0.5)
