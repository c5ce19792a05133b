"""Compact masked LoRA: the dense masked layer's function and gradients at the kept entries' cost."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from partial_lora.adapters import count_parameters, load_partial_lora
from partial_lora.adapters.compact import full_factors, kept
from partial_lora.adapters.masked import ADAPTER, COL_MASK, ROW_MASK, apply_mask, factor, load_masked_state, lora_layers
from partial_lora.backbones import build_backbone
from partial_lora.errors import PartialLoraError
from partial_lora.masks import LayerMask
from tests.conftest import compose_config
from tests.test_masked_adapter import batch, masked_tiny_model


def peft_linear(dropout: float, seed: int = 0) -> torch.nn.Module:
    """One 12 -> 10 linear layer under PEFT LoRA (rank 4) with random, non-zero A and B."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(12, 10)))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["fc"]))
    torch.nn.init.normal_(lora_layers(model)["fc"].lora_B[ADAPTER].weight)
    return model


def dense_and_compact(mask: LayerMask, dropout: float = 0.0):
    dense = peft_linear(dropout)
    compact = copy.deepcopy(dense)
    apply_mask(lora_layers(dense)["fc"], mask, compact=False)
    apply_mask(lora_layers(compact)["fc"], mask, compact=True)
    return dense, compact


MASKS = {
    "some rows and columns": LayerMask(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool),
                                       torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)),
    # Under GATHER_BELOW of a side kept, that side gathers (x's columns) or index_adds (the output's rows).
    "few rows and columns": LayerMask(torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool),
                                      torch.tensor([0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)),
    "few rows, most columns": LayerMask(torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool),
                                        torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)),
    "most rows, few columns": LayerMask(torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
                                        torch.tensor([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)),
    "no rows": LayerMask(torch.zeros(10, dtype=torch.bool), torch.ones(12, dtype=torch.bool)),
    "all": LayerMask(torch.ones(10, dtype=torch.bool), torch.ones(12, dtype=torch.bool)),
}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compact_gives_the_dense_masked_outputs_and_gradients(mask, dropout):
    dense, compact = dense_and_compact(mask, dropout)
    dense.train(), compact.train()
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for model in (dense, compact):
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout draws for both
        output = model(inputs)
        (output * torch.linspace(-1, 1, 10)).sum().backward()
        layer = lora_layers(model)["fc"]
        outputs.append(output)
        grads.append((inputs.grad, factor(layer, "lora_A").grad, factor(layer, "lora_B").grad))
    (dense_x, dense_a, dense_b), (compact_x, compact_a, compact_b) = grads
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    assert torch.allclose(dense_x, compact_x, atol=1e-6)
    layer = lora_layers(compact)["fc"]
    assert factor(layer, "lora_A").shape == (4, int(mask.col.sum()))
    assert factor(layer, "lora_B").shape == (int(mask.row.sum()), 4)
    if mask.row.any():
        assert torch.allclose(dense_a[:, mask.col], compact_a, atol=1e-6)
        assert torch.allclose(dense_b[mask.row], compact_b, atol=1e-6)
    else:  # no kept row: the adapter is no part of the graph
        assert compact_a is None and compact_b is None
        assert torch.equal(outputs[1], lora_layers(compact)["fc"].get_base_layer()(x))


def test_compact_merges_to_the_function_it_computes():
    _, compact = dense_and_compact(MASKS["some rows and columns"])
    x = torch.randn(4, 12)
    expected = compact(x)
    merged = compact.merge_and_unload()
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_compact_refuses_factors_with_entries_outside_the_masks():
    layer = lora_layers(peft_linear(0.0))["fc"]
    with pytest.raises(PartialLoraError, match="outside the masks"):
        from partial_lora.adapters.compact import make_compact

        make_compact(layer, ADAPTER, MASKS["some rows and columns"].row, MASKS["some rows and columns"].col)


def test_compact_training_trains_kept_entries_only_and_adam_holds_kept_entries_only():
    _, backbone, model = masked_tiny_model(compact=True, init_b=True)
    model.train()
    start = {name: full_factors(layer, ADAPTER) for name, layer in lora_layers(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        data = batch(step)
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, data["labels"]).backward()
        optimizer.step()
    adam_entries = 0
    for name, layer in lora_layers(model).items():
        row, col = getattr(layer, ROW_MASK), getattr(layer, COL_MASK)
        a, b = full_factors(layer, ADAPTER)
        assert (~row).any() and (~col).any()
        assert torch.count_nonzero(b[~row]) == 0 and torch.count_nonzero(a[:, ~col]) == 0
        assert not torch.equal(a[:, col], start[name][0][:, col])
        assert not torch.equal(b[row], start[name][1][row])
        for parameter in (factor(layer, "lora_A"), factor(layer, "lora_B")):
            state = optimizer.state[parameter]
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == parameter.shape
            adam_entries += state["exp_avg"].numel()
    assert adam_entries == count_parameters(model, backbone.head_modules).adapter


def test_counts_do_not_depend_on_the_execution():
    _, backbone, dense = masked_tiny_model(compact=False)
    _, _, compact = masked_tiny_model(compact=True)
    assert count_parameters(dense, backbone.head_modules) == count_parameters(compact, backbone.head_modules)
    stored = sum(p.numel() for name, p in compact.named_parameters() if "lora_" in name)
    assert stored == count_parameters(compact, backbone.head_modules).adapter


def test_state_dicts_hold_full_factors_whatever_the_execution():
    _, _, dense = masked_tiny_model(compact=False, init_b=True)
    _, _, compact = masked_tiny_model(compact=True, init_b=True)
    dense_state, compact_state = dense.state_dict(), compact.state_dict()
    assert dense_state.keys() == compact_state.keys()
    assert any(key.endswith(ROW_MASK) for key in dense_state)
    for key in dense_state:
        assert dense_state[key].shape == compact_state[key].shape
    loaded = masked_tiny_model(compact=True)[2]  # same masks, B zero
    loaded.load_state_dict(compact_state)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), compact_state.values()))


@pytest.mark.parametrize("saved_compact, loaded_compact", [(True, False), (True, True), (False, True)])
def test_saved_adapters_reload_masked_and_trainable_across_executions(tmp_path: Path, saved_compact, loaded_compact):
    _, backbone, model = masked_tiny_model(compact=saved_compact, init_b=True)
    model.eval()
    data = batch()
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    base = build_backbone(compose_config("backbone=tiny_bert").backbone, num_labels=2).model
    fresh = load_partial_lora(base, tmp_path / "adapter", compact=loaded_compact)
    assert torch.allclose(fresh.eval()(**inputs).logits, expected, atol=1e-6)
    layers, saved = lora_layers(fresh), lora_layers(model)
    assert all(hasattr(layer, "partial_rows") == loaded_compact for layer in layers.values())
    assert all(torch.equal(getattr(layers[name], ROW_MASK), getattr(saved[name], ROW_MASK)) for name in layers)
    assert count_parameters(fresh, backbone.head_modules) == count_parameters(model, backbone.head_modules)
    trainable = {name for name, parameter in fresh.named_parameters() if parameter.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)
    if loaded_compact:
        assert all(kept(layer)[0].numel() == int(getattr(layer, ROW_MASK).sum())
                   for layer in lora_layers(fresh).values())


def test_a_masked_model_refuses_an_adapter_with_other_masks(tmp_path: Path):
    _, _, model = masked_tiny_model(seed=0, compact=True)
    model.save_pretrained(tmp_path / "adapter")
    state_dict = load_file(str(tmp_path / "adapter" / SAFETENSORS_WEIGHTS_NAME))
    for compact in (True, False):
        _, _, other = masked_tiny_model(seed=1, compact=compact)
        with pytest.raises(PartialLoraError, match="other masks"):
            load_masked_state(other, state_dict, "saved")
    with pytest.raises(RuntimeError, match="other masks"):  # the compact layer's own check, under any loader
        masked_tiny_model(seed=1, compact=True)[2].load_state_dict(model.state_dict())
