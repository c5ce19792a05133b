"""The targeted linear layers of a backbone, for adapters written here that wrap them in place
(random masking's sparse delta, LoSiA's subnet)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from partial_lora.errors import ConfigError


def targeted_linears(model: torch.nn.Module, target_modules: str) -> dict[str, torch.nn.Linear]:
    """Linear layers whose dotted name fully matches the backbone's ``target_modules`` regex."""
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(target_modules, name)}
    if not targets:
        raise ConfigError(f"no linear layer matches the backbone's target_modules {target_modules!r}.")
    return targets


def wrap_linears(model: torch.nn.Module, targets: dict[str, torch.nn.Linear],
                 wrap: Callable[[str, torch.nn.Linear], torch.nn.Module]) -> None:
    """Freeze ``model`` and replace each of ``targets`` by ``wrap(name, layer)``."""
    model.requires_grad_(False)
    for name, module in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrap(name, module))
