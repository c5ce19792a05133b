"""Random element masking (Xu & Zhang, 2024; the paper's "Masking" baseline, Table 1).

A sparse trainable update on the pretrained weights themselves: a fixed random set of entries of each
targeted ``W`` trains, the rest never does, with no low-rank factors. Written here because PEFT's
closest method, SHiRA, ties the number of trainable entries to a LoRA rank (``r * (m + n)`` per layer,
at least ``m + n``), which cannot express the paper's 0.001% of a 7B model (68K entries) over 64
matrices of 4096 x 4096; here the budget is a fraction of the whole model, split over the targeted
layers in proportion to their size.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear

from partial_lora.adapters.targets import WeightDelta, targeted_linears, wrap_linears
from partial_lora.errors import SettingError
from partial_lora.masks import layer_generator


class SparseDeltaLinear(WeightDelta):
    """``y = W x + b + D x`` where ``D`` is zero except at ``indices`` (flat positions in ``W``)."""

    def __init__(self, base_layer: torch.nn.Linear, indices: torch.Tensor) -> None:
        super().__init__(base_layer)
        self.register_buffer("indices", indices)
        self.values = torch.nn.Parameter(torch.zeros(indices.numel(), dtype=base_layer.weight.dtype,
                                                     device=base_layer.weight.device))

    def delta(self) -> torch.Tensor:
        weight = self.base_layer.weight
        flat = torch.zeros(weight.numel(), dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.indices,), self.values).view_as(weight)

    def add_to(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return outputs + linear(inputs, self.delta())


def apply_random_masking(model: torch.nn.Module, target_modules: str, trainable_fraction: float,
                         seed: int) -> dict[str, int]:
    """Freeze ``model`` and give each targeted linear layer a random sparse trainable delta.

    ``trainable_fraction`` is relative to all parameters of ``model`` (the paper's "0.001%"); returns
    the number of trainable entries per layer.
    """
    if not 0 < trainable_fraction <= 1:
        raise SettingError("apply_random_masking", "trainable_fraction", "must lie in (0, 1]", trainable_fraction)
    targets = targeted_linears(model, target_modules)
    budget = trainable_fraction * sum(parameter.numel() for parameter in model.parameters())
    targeted = sum(module.weight.numel() for module in targets.values())
    entries = {name: min(module.weight.numel(), max(1, round(budget * module.weight.numel() / targeted)))
               for name, module in targets.items()}

    def wrap(name: str, module: torch.nn.Linear) -> SparseDeltaLinear:
        chosen = torch.randperm(module.weight.numel(), generator=layer_generator(seed, name))[:entries[name]]
        return SparseDeltaLinear(module, chosen.sort().values.to(module.weight.device))

    wrap_linears(model, targets, wrap)
    return entries
