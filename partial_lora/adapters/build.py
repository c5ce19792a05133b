"""Build the trainable model of a method from its config.

A method's config holds an instantiable PEFT config (``peft_config``) or ``null`` for full fine-tuning.
The classifier head (``head_modules`` of the backbone) is trained by every method and counted apart:
the paper's parameter counts are adapters only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model

from partial_lora.adapters.masked import masked_out_parameters


@dataclass(frozen=True)
class ParameterCounts:
    adapter: int  # the paper's count: masked-out entries of masked adapters excluded
    head: int
    lora_same_rank: int  # what dense LoRA at the same rank and layers trains (equals adapter when unmasked)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def adapt(model: torch.nn.Module, method: DictConfig, head_modules: list[str]) -> torch.nn.Module:
    """Wrap ``model`` with the method's PEFT adapter (head trainable too), or unfreeze it all for ``full_ft``."""
    if method.peft_config is None:
        model.requires_grad_(True)
        return model
    peft_config = instantiate(method.peft_config, modules_to_save=list(head_modules))
    return get_peft_model(model, peft_config)


def _is_head(name: str, head_modules: list[str]) -> bool:
    parts = name.split(".")
    return any(head in parts for head in head_modules)


def count_parameters(model: torch.nn.Module, head_modules: list[str]) -> ParameterCounts:
    """Trainable parameters, split into adapter (everything outside the head) and classifier head.

    A masked adapter counts ``rank * (kept rows + kept columns)`` per layer (SPEC 1).
    """
    adapter = head = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if _is_head(name, head_modules):
            head += parameter.numel()
        else:
            adapter += parameter.numel()
    masked_out = masked_out_parameters(model)
    return ParameterCounts(adapter=adapter - masked_out, head=head, lora_same_rank=adapter)
