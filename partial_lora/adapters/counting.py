"""What an adapted model trains, counted as the paper counts it.

The classifier head (``head_modules`` of the backbone) is trained by every method and counted apart:
the paper's parameter counts are adapters only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft.tuners.adalora import AdaLoraLayer

from partial_lora.adapters.compact import COL_MASK, ROW_MASK
from partial_lora.adapters.masked import factor, lora_layers
from partial_lora.adapters.targets import ADAPTER
from partial_lora.layers import in_head
from partial_lora.masks import LayerMask


@dataclass(frozen=True)
class ParameterCounts:
    adapter: int  # the paper's count: masked-out entries of masked adapters excluded
    head: int
    unmasked_adapter: int  # the same adapter without masks, e.g. dense LoRA at the same rank and layers

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _alive_rank(model: torch.nn.Module, layer: torch.nn.Module) -> int:
    """Rank a layer still uses. Once AdaLoRA has allocated its budget (a rank pattern exists), pruned
    triplets are those whose singular value it zeroed: counting non-zero ``lora_E`` entries describes the
    weights at hand, e.g. a checkpoint from before the final allocation, not just the last step."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if isinstance(layer, AdaLoraLayer) and getattr(config, "rank_pattern", None):
        return int(torch.count_nonzero(layer.lora_E[ADAPTER]))
    return layer.r[ADAPTER]


def count_parameters(model: torch.nn.Module, head_modules: list[str],
                     masks: dict[str, LayerMask] | None = None) -> ParameterCounts:
    """Trainable parameters, split into adapter (everything outside the head) and classifier head.

    Low-rank factors are counted by formula: ``rank * (kept rows + kept columns)`` per layer (SPEC 1),
    plus AdaLoRA's singular values, with the rank AdaLoRA has left after pruning. Every other trainable
    tensor (DoRA magnitudes, VeRA scalings, sparse deltas, LoSiA's subnet deltas, full fine-tuning) counts
    whole. A layer's kept rows and columns are its masks', or those of ``masks`` where given: masks not
    applied to ``model`` (a dry run counts a meta-device model, whose buffers hold no values).
    """
    adapter = unmasked = 0
    counted_by_formula = set()
    for name, layer in lora_layers(model).items():
        rank = _alive_rank(model, layer)
        mask = (masks or {}).get(name)
        if mask is None and hasattr(layer, ROW_MASK):
            mask = LayerMask(getattr(layer, ROW_MASK), getattr(layer, COL_MASK))
        rows = layer.out_features if mask is None else int(mask.row.sum())
        cols = layer.in_features if mask is None else int(mask.col.sum())
        singular_values = rank if isinstance(layer, AdaLoraLayer) else 0
        adapter += rank * (rows + cols) + singular_values
        unmasked += rank * (layer.out_features + layer.in_features) + singular_values
        counted_by_formula |= {id(factor(layer, "lora_A")), id(factor(layer, "lora_B"))}
        if isinstance(layer, AdaLoraLayer):
            counted_by_formula.add(id(layer.lora_E[ADAPTER]))
    head = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in counted_by_formula:
            continue
        if in_head(name, head_modules):
            head += parameter.numel()
        else:
            adapter += parameter.numel()
            unmasked += parameter.numel()
    return ParameterCounts(adapter=adapter, head=head, unmasked_adapter=unmasked)
