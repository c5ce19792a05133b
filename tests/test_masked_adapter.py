"""Masked adapters on PEFT LoRA: frozen masked entries, the paper's count, caching, saving and merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors import safe_open

from partial_lora.adapters import count_parameters, load_adapter
from partial_lora.adapters.files import COMPACT_LAYOUT, LAYOUT_KEY, read_tensors
from partial_lora.adapters.masked import ADAPTER, COL_MASK, ROW_MASK, factor, is_compact, lora_layers
from partial_lora.backbones import build_backbone
from partial_lora.masks import LayerMask, make_mask
from partial_lora.pipeline import run
from partial_lora.settings import adapt
from tests.conftest import compose_config


def masked_tiny_model(seed: int = 0, mode: str = "balanced", compact: bool = False, init_b: bool = False):
    """A tiny BERT under a masked method; ``init_b`` gives B random kept rows so that the adapter is not zero."""
    cfg = compose_config("backbone=tiny_bert", f"method={mode}", "rank=4", f"seed={seed}",
                         f"adapter.compact={str(compact).lower()}")
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.backbone, num_labels=2)
    model = adapt(backbone.model, cfg)
    if init_b:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                lora_b = torch.nn.init.normal_(factor(layer, "lora_B"))
                if not is_compact(layer):
                    lora_b.mul_(getattr(layer, ROW_MASK)[:, None])
    return cfg, backbone, model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 1000, (8, 12), generator=generator),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=generator)}


def test_masked_entries_stay_exactly_zero_through_training_with_weight_decay():
    _, _, model = masked_tiny_model(init_b=True)  # B with non-zero kept rows, so both factors move
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    start = {name: (layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone())
             for name, layer in lora_layers(model).items()}
    for step in range(5):
        data = batch(step)
        loss = torch.nn.functional.cross_entropy(model(input_ids=data["input_ids"],
                                                       attention_mask=data["attention_mask"]).logits, data["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, layer in lora_layers(model).items():
        row, col = getattr(layer, ROW_MASK), getattr(layer, COL_MASK)
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        assert (~row).any() and (~col).any()
        assert torch.count_nonzero(b[~row]) == 0 and torch.count_nonzero(a[:, ~col]) == 0
        assert not torch.equal(a[:, col], start[name][0][:, col])  # kept entries do train
        assert not torch.equal(b[row], start[name][1][row])


def test_count_is_rank_times_kept_rows_plus_columns():
    _, backbone, model = masked_tiny_model()
    counts = count_parameters(model, backbone.head_modules)
    expected = dense = 0
    for layer in lora_layers(model).values():
        expected += 4 * (int(getattr(layer, ROW_MASK).sum()) + int(getattr(layer, COL_MASK).sum()))
        dense += 4 * (layer.in_features + layer.out_features)
    assert counts.adapter == expected < dense == counts.unmasked_adapter


def test_same_seed_same_masks_different_seed_different_masks():
    def masks(seed):
        return {name: getattr(layer, ROW_MASK).clone() for name, layer in lora_layers(masked_tiny_model(seed)[2]).items()}

    first, again, other = masks(0), masks(0), masks(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def write_legacy_adapter(model: torch.nn.Module, path: Path, head_modules: list[str]) -> Path:
    """A ``partial-lora/1`` file as runs wrote them before adapters took PEFT's layout: full-shaped factors, masks
    and the trained head, flat keys."""
    from safetensors.torch import save_file

    from partial_lora.adapters.compact import full_factors
    from partial_lora.layers import in_head

    tensors = {}
    for name, layer in lora_layers(model).items():
        lora_a, lora_b = full_factors(layer, ADAPTER) if is_compact(layer) else (factor(layer, "lora_A"),
                                                                                 factor(layer, "lora_B"))
        tensors |= {f"{name}.lora_A": lora_a.detach().contiguous(), f"{name}.lora_B": lora_b.detach().contiguous()}
        if hasattr(layer, ROW_MASK):
            tensors |= {f"{name}.row_mask": getattr(layer, ROW_MASK), f"{name}.col_mask": getattr(layer, COL_MASK)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and in_head(name, head_modules):
            tensors[f"head::{name}"] = parameter.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "partial-lora/1", "rank": "4"})
    return path


def test_legacy_adapter_file_loads_to_the_same_outputs_and_merges(tmp_path: Path):
    _, backbone, model = masked_tiny_model(seed=0, init_b=True)
    model.eval()
    data = batch()
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    expected = model(**inputs).logits
    path = write_legacy_adapter(model, tmp_path / "adapter.safetensors", backbone.head_modules)

    cfg = compose_config("backbone=tiny_bert", "method=lora", "rank=4")
    torch.manual_seed(0)  # same random backbone weights as the saved model's base
    fresh = build_backbone(cfg.backbone, num_labels=2)
    reloaded = adapt(fresh.model, cfg)
    assert load_adapter(reloaded, path)["rank"] == "4"
    reloaded.eval()
    assert all(is_compact(layer) for layer in lora_layers(reloaded).values())
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-6)
    assert count_parameters(reloaded, fresh.head_modules).adapter == count_parameters(model, backbone.head_modules).adapter
    merged = reloaded.merge_and_unload()
    assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)


def test_partial_lora_run_derives_once_then_hits_the_cache(tiny_cfg, tmp_path: Path):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=partial_lora").method
        tiny_cfg.importance = compose_config("importance=svd").importance
        tiny_cfg.ratios.cache_dir = str(tmp_path / "ratios")
        tiny_cfg.ratios.progress = False
    first = run(tiny_cfg)
    assert first["masks"]["cache_hit"] is False and first["masks"]["evaluations"] > 1
    cache = json.loads(Path(first["masks"]["cache_file"]).read_text())
    layer = next(iter(cache["layers"].values()))
    assert {"k_row", "k_col", "top_rows", "top_cols", "row_scores", "kept_fraction_row"} <= set(layer)
    assert len(layer["top_rows"]) == layer["k_row"]
    with open_dict(tiny_cfg):  # another mask mode on the same counts: read, not derived
        tiny_cfg.method = compose_config("method=targeted_lora").method
    second = run(tiny_cfg)
    assert second["masks"]["cache_hit"] is True
    assert second["masks"]["cache_file"] == first["masks"]["cache_file"]
    assert second["params"]["unmasked_adapter"] == first["params"]["unmasked_adapter"]
    assert Path(second["adapter_file"]).is_file() and Path(second["adapter_file"]).name == "adapter_model.safetensors"
    with safe_open(second["adapter_file"], framework="pt") as handle:  # runs write the compact layout
        assert handle.metadata()[LAYOUT_KEY] == COMPACT_LAYOUT
    with open_dict(tiny_cfg):  # the probe starts from the seed's random head: another seed derives its own
        tiny_cfg.seed = 1
    third = run(tiny_cfg)
    assert third["masks"]["cache_hit"] is False and third["masks"]["cache_file"] != first["masks"]["cache_file"]


def test_masked_method_without_importance_fails_clearly(tiny_cfg):
    from partial_lora.errors import ConfigError

    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=targeted_lora").method
        tiny_cfg.dry_run = True
    with pytest.raises(ConfigError, match="derives its masks from importance scores"):
        run(tiny_cfg)


def test_make_mask_matches_what_the_layer_holds():
    cfg, _, model = masked_tiny_model(seed=3)
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer().weight
        expected = make_mask("balanced", name, 3, tuple(base.shape), sparsity=cfg.method.mask.sparsity)
        assert torch.equal(getattr(layer, ROW_MASK), expected.row)
        assert isinstance(expected, LayerMask)


def test_partial_adalora_trains_with_rank_allocation_and_keeps_masks(tiny_cfg, tmp_path: Path):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=partial_adalora").method
        tiny_cfg.method.mask.mode = "balanced"  # no derivation needed: the random tiny model passes no rows
        tiny_cfg.method.mask.sparsity = 0.5
        tiny_cfg.train.epochs = 2
    record = run(tiny_cfg)
    assert record["steps"] == 10
    assert 0 < record["params"]["adapter"] < record["params"]["unmasked_adapter"]
    tensors = read_tensors(Path(record["adapter_file"]).parent)  # in PEFT's layout
    layers = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(f".{ROW_MASK}")}
    assert layers
    trained = 0
    for layer in layers:  # PEFT saves AdaLoRA's P and Q as <layer>.lora_A / .lora_B, down to the rank left
        row, col = tensors[f"{layer}.{ROW_MASK}"], tensors[f"{layer}.{COL_MASK}"]
        assert torch.count_nonzero(tensors[f"{layer}.lora_B"][~row]) == 0
        assert torch.count_nonzero(tensors[f"{layer}.lora_A"][:, ~col]) == 0
        trained += int(torch.count_nonzero(tensors[f"{layer}.lora_A"][:, col]))
    assert trained > 0


@pytest.mark.parametrize("compact", [False, True])
def test_head_only_trains_the_head_and_no_adapter_entry(tiny_cfg, compact):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=head_only").method
        tiny_cfg.adapter.compact = compact
    record = run(tiny_cfg)
    assert record["steps"] > 0 and record["params"]["adapter"] == 0 and record["params"]["head"] > 0
    from safetensors.torch import load_file

    tensors = load_file(record["adapter_file"])
    factors = [tensor for key, tensor in tensors.items() if key.endswith((".lora_A", ".lora_B", ".lora_A.weight",
                                                                          ".lora_B.weight"))]
    assert all(torch.count_nonzero(tensor) == 0 for tensor in factors if tensor.shape[0] and tensor.shape[1])
    import lightning as L

    L.seed_everything(tiny_cfg.seed)  # the run's head before training: same seed, same draw
    initial = build_backbone(tiny_cfg.backbone, num_labels=2).model.classifier.weight
    trained = [tensor for key, tensor in tensors.items() if key.endswith("classifier.weight")]
    assert len(trained) == 1 and trained[0].shape == initial.shape and not torch.allclose(trained[0], initial)
