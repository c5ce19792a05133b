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
    unmasked_adapter: int  # the same adapter without masks, e.g. dense LoRA at the same rank and layers

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def uses_rank_allocation(method: DictConfig) -> bool:
    """AdaLoRA-style methods: their schedule needs the run's total step count and a per-step callback."""
    return method.peft_config is not None and "total_step" in method.peft_config


def adapt(model: torch.nn.Module, method: DictConfig, head_modules: list[str],
          total_steps: int | None = None) -> torch.nn.Module:
    """Wrap ``model`` with the method's PEFT adapter (head trainable too), or unfreeze it all for ``full_ft``.

    AdaLoRA's warm-up and final phases are configured as fractions of ``total_steps``.
    """
    if method.peft_config is None:
        model.requires_grad_(True)
        return model
    schedule = {}
    if uses_rank_allocation(method):
        schedule = {"total_step": total_steps, "tinit": int(method.schedule.tinit * total_steps),
                    "tfinal": int(method.schedule.tfinal * total_steps)}
    peft_config = instantiate(method.peft_config, modules_to_save=list(head_modules), **schedule)
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
    return ParameterCounts(adapter=adapter - masked_out, head=head, unmasked_adapter=adapter)
