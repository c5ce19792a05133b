"""Residual norms ||dW|| per adapted layer, written into run records for Figures 7-10."""

from __future__ import annotations

import pytest
import torch

from partial_lora.adapters import residual_norms
from partial_lora.adapters.masked import factor, lora_layers
from partial_lora.backbones import build_backbone
from partial_lora.settings import adapt
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


TABLE6 = [("lora", "none", "none"), ("adalora", "none", "none"), ("dora", "none", "none"),
          ("lora_plus", "none", "none"), ("vera", "none", "none"), ("partial_lora", "svd", "none"),
          ("partial_adalora", "svd", "none"), ("losia", "none", "none"), ("partial_lora", "svd", "coto"),
          ("random_masking", "none", "none")]  # Table 6's methods (conf/experiment/table6.yaml) and Table 1's Masking


@pytest.mark.parametrize("method, importance, strategy", TABLE6, ids=["+".join(s for s in m if s != "none")
                                                                     for m in TABLE6])
def test_every_method_records_non_zero_residual_norms_after_training(tiny_cfg, method, importance, strategy):
    from omegaconf import open_dict

    from partial_lora.pipeline import run

    # The loss rule at a tiny tolerance keeps most rows and columns even of a random tiny model.
    overrides = [f"method={method}", f"importance={importance}", f"strategy={strategy}", "ratios.rule=loss",
                 "ratios.max_loss_increase=1e-6", "ratios.progress=false", "method.losia.period=2" if method == "losia" else "lr=5e-3"]
    composed = compose_config(*overrides)
    with open_dict(tiny_cfg):
        for key in ("method", "importance", "strategy", "ratios"):
            tiny_cfg[key] = composed[key]
        tiny_cfg.ratios.cache_dir = str(tiny_cfg.output_dir) + "/ratios"
        tiny_cfg.lr = 5e-2 if method == "random_masking" else 5e-3
        tiny_cfg.rank = 11 if "adalora" in method else 8  # AdaLoRA prunes 12 of its 144 rank-1 triplets, no layer whole
    record = run(tiny_cfg)
    norms = record["residual_norms"]
    assert len(norms) == 12 and all(norm["weight"] > 0 for norm in norms.values())
    kept = record["masks"]["kept_fraction"] if record["masks"] else {name: {"row": 1, "col": 1} for name in norms}
    trained = [name for name in norms if kept[name]["row"] > 0 and kept[name]["col"] > 0]
    assert trained and all(norms[name]["delta"] > 0 for name in trained)
