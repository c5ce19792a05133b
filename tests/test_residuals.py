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


@pytest.mark.parametrize("method", ["random_masking", "losia"])
def test_layers_written_here_merge_unmerge_and_unload_like_peft_layers(method):
    from partial_lora.adapters.losia import subnet_layers
    from partial_lora.adapters.targets import merge_and_unload, weight_delta_layers

    torch.manual_seed(0)
    model = adapted(method).eval()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "classifier" not in name:
            torch.nn.init.normal_(parameter, std=0.05)
    if method == "losia":  # a folded subnet too: dW spans it and the current one
        layer = next(iter(subnet_layers(model).values()))
        layer.recording = True
        layer(torch.randn(3, layer.base_layer.in_features)).sum().backward()
        assert layer.relocalize()
        torch.nn.init.normal_(layer.delta_block, std=0.05)
    inputs = {"input_ids": torch.randint(1, 1000, (2, 7), generator=torch.Generator().manual_seed(0))}
    expected = model(**inputs).logits
    name, layer = next(iter(weight_delta_layers(model).items()))
    before = layer.base_layer.weight.detach().clone()
    norms = residual_norms(model)
    assert set(norms) == set(weight_delta_layers(model)) and norms[name]["delta"] > 0
    layer.merge()
    assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, before, atol=1e-6)
    merged = merge_and_unload(model)
    assert not weight_delta_layers(merged)
    assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)
