"""The targeted linear layers of a backbone, and the layer that the adapters written here (random masking's
sparse delta, LoSiA's subnet) wrap them in."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from partial_lora.errors import SettingError

ADAPTER = "default"  # PEFT's default adapter name; layers written here hold one adapter under it


def targeted_linears(model: torch.nn.Module, target_modules: str | Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The linear layers PEFT's LoRA adapts for ``target_modules`` (a regex fully matching a dotted module name, or
    a list of names or name suffixes), found with PEFT's own matching so that every method adapts the same layers."""
    config = LoraConfig(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and check_target_module_exists(config, name)}
    if not targets:
        raise SettingError("targeted_linears", "target_modules", "must match a linear layer of the model",
                           target_modules)
    return targets


def wrap_linears(model: torch.nn.Module, targets: dict[str, torch.nn.Linear],
                 wrap: Callable[[str, torch.nn.Linear], torch.nn.Module]) -> None:
    """Freeze ``model`` and replace each of ``targets`` by ``wrap(name, layer)``."""
    model.requires_grad_(False)
    for name, module in targets.items():
        _replace(model, name, wrap(name, module))


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class WeightDelta(torch.nn.Module):
    """A frozen linear layer plus a trained change ``dW`` of its weight.

    It has the layer interface of PEFT's tuner layers (``get_base_layer``, ``get_delta_weight``, ``merge``,
    ``unmerge``), so that residual norms, merging and unloading treat these layers as PEFT's. Subclasses
    give the change as a weight (:meth:`delta`) and as what it adds to the output (:meth:`add_to`, which may
    be cheaper than a product with the whole ``delta``).
    """

    def __init__(self, base_layer: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    def get_base_layer(self) -> torch.nn.Linear:
        return self.base_layer

    def delta(self) -> torch.Tensor:
        """The trained change (m x n) that :meth:`merge` adds into the base weight."""
        raise NotImplementedError

    def add_to(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``outputs + inputs @ delta().T``."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str = ADAPTER) -> torch.Tensor:
        """Everything this layer changed in the pretrained weight, merged or not (PEFT's meaning)."""
        return self.delta()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta().to(self.base_layer.weight.dtype)
            self.merged = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.base_layer(inputs)
        return outputs if self.merged else self.add_to(outputs, inputs)


def weight_delta_layers(model: torch.nn.Module) -> dict[str, WeightDelta]:
    return {name: module for name, module in model.named_modules() if isinstance(module, WeightDelta)}


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every trained change into its base weight and return the plain model: PEFT's ``merge_and_unload`` for a
    PEFT model, the same for the layers written here (the result is the backbone with trained weights)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    for name, layer in weight_delta_layers(model).items():
        layer.merge()
        _replace(model, name, layer.base_layer)
    return model
