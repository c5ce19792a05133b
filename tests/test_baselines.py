"""Paper-scale backbones and baseline methods: the paper's parameter counts, and every method trains."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from partial_lora.adapters import count_parameters
from partial_lora.adapters.sparse_delta import SparseDeltaLinear
from partial_lora.backbones import build_backbone
from partial_lora.errors import ConfigError
from partial_lora.pipeline import run
from partial_lora.settings import adapt
from tests.conftest import compose_config, methods


def count_on_meta(backbone: str, method: str, rank: int):
    cfg = compose_config(f"backbone={backbone}", f"method={method}", f"rank={rank}")
    built = build_backbone(cfg.backbone, num_labels=2, shapes_only=True)  # a 7B model is counted, not allocated
    return count_parameters(adapt(built.model, cfg), built.head_modules)


# Paper Tables 1, 5, 6 (adapters only, head excluded), in millions, to the paper's two decimals.
@pytest.mark.parametrize("backbone, method, rank, paper", [
    ("deberta_v3_base", "lora", 8, 1.33), ("deberta_v3_base", "dora", 8, 1.41),
    ("deberta_v3_base", "vera", 8, 0.10), ("llama2_7b", "lora", 8, 4.2)])
def test_paper_parameter_counts_on_real_shapes(backbone, method, rank, paper):
    counts = count_on_meta(backbone, method, rank)
    assert abs(counts.adapter / 1e6 - paper) <= 0.01 * paper + 0.005
    assert counts.unmasked_adapter == counts.adapter


def test_deberta_lora_count_is_exact():
    per_block = 4 * 8 * (768 + 768) + 2 * 8 * (768 + 3072)
    assert count_on_meta("deberta_v3_base", "lora", 8).adapter == 12 * per_block


def trains_an_adapter(method: str) -> bool:
    mask = compose_config(f"method={method}").method.mask
    return not (mask and mask.get("sparsity") == 1.0)  # head_only masks every row and column: the head alone trains


# Every method of conf/method/ that trains without derived counts (those are trained in test_masked_adapter).
@pytest.mark.parametrize("backbone, method", [
    *(("tiny_bert", method) for method in methods(derive=False) if trains_an_adapter(method)),
    ("tiny_deberta", "lora"), ("tiny_llama", "lora")])
def test_every_method_trains_end_to_end(tiny_cfg, backbone, method):
    with open_dict(tiny_cfg):
        tiny_cfg.backbone = compose_config(f"backbone={backbone}").backbone
        tiny_cfg.method = compose_config(f"method={method}").method
    record = run(tiny_cfg)
    assert record["status"] == "finished" and record["method"] == method
    assert record["params"]["adapter"] > 0


def test_adalora_count_is_the_rank_left_after_pruning():
    cfg = compose_config("backbone=tiny_bert", "method=adalora", "rank=2", "method.schedule.tinit=0",
                         "method.schedule.tfinal=0", "method.peft_config.deltaT=1")
    torch.manual_seed(0)
    built = build_backbone(cfg.backbone, num_labels=2)
    model = adapt(built.model, cfg, total_steps=6)
    initial = count_parameters(model, built.head_modules).adapter
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 7):  # PEFT's loop: backward, step, allocate, zero_grad
        model(input_ids=torch.randint(1, 1000, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    final = count_parameters(model, built.head_modules).adapter
    # 12 layers start at rank 12; the budget is an average rank of 2 (24 triplets of 144).
    alive = sum(int(torch.count_nonzero(m.lora_E["default"])) for m in model.modules() if hasattr(m, "lora_E"))
    assert alive == 24
    assert final < initial / 4


def test_random_masking_trains_only_its_chosen_entries():
    cfg = compose_config("backbone=tiny_bert", "method=random_masking", "method.sparse_delta.trainable_fraction=0.01")
    torch.manual_seed(0)
    built = build_backbone(cfg.backbone, num_labels=2)
    total = sum(p.numel() for p in built.model.parameters())
    model = adapt(built.model, cfg)
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    assert len(layers) == 12
    counts = count_parameters(model, built.head_modules)
    assert abs(counts.adapter - 0.01 * total) <= len(layers)  # rounding per layer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    inputs = torch.randint(1, 1000, (4, 8))
    loss = model(input_ids=inputs, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    optimizer.step()
    for layer in layers:
        delta = layer.delta().detach()
        outside = torch.ones(delta.numel(), dtype=torch.bool)
        outside[layer.indices] = False
        assert torch.count_nonzero(delta.flatten()[outside]) == 0
        assert torch.count_nonzero(delta) > 0
        assert not layer.base_layer.weight.requires_grad


def test_masks_on_an_adapter_without_low_rank_factors_fail_at_config_time(tiny_cfg):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=vera").method
        tiny_cfg.method.mask = {"mode": "balanced", "sparsity": 0.5}
    with pytest.raises(ConfigError, match="only LoRA and AdaLoRA"):
        run(tiny_cfg)
