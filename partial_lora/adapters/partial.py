"""Partial-LoRA as a library: masked LoRA on any model PEFT adapts, returned as a ``peft.PeftModel``.

``PartialLoraConfig`` is PEFT's ``LoraConfig`` plus where the masks come from; ``get_partial_lora_model``
builds PEFT's LoRA model from the plain ``LoraConfig`` and masks its layers (compact by default). Its
``save_pretrained`` writes PEFT's own layout: ``adapter_config.json`` says plain ``LORA`` and
``adapter_model.safetensors`` holds full-shaped factors with zeros outside the masks, plus the masks, which
plain PEFT ignores. PEFT accepts new method types only from inside PEFT (``register_peft_method`` takes names
of its ``PeftType`` enum), so a masked LoRA exported as plain LoRA is what every PEFT install reads.
``save_partial_lora`` writes the compact layout instead (kept rows and columns only, ``adapters/files.py``);
``load_partial_lora`` reads either, masks too, and makes the layers masked (compact, trainable) again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

from partial_lora.adapters.files import first_line, read_config, read_tensors
from partial_lora.adapters.masked import apply_masks, base_weights, check_adapter_state, load_masked_state
from partial_lora.errors import PartialLoraError
from partial_lora.masks import make_masks

if TYPE_CHECKING:  # the derivation package builds on the adapters
    from partial_lora.ratios import DerivedCounts


@dataclass
class MaskSettings:
    """Where a masked adapter's row / column masks come from (SPEC 2)."""

    mode: str = "partial"  # partial | targeted | inverted | stochastic | balanced | pyramidal
    counts: DerivedCounts | None = None  # derive_counts(...): needed by every mode but balanced and pyramidal
    seed: int = 0  # masks are drawn from (seed, layer name)
    temperature: float = 1.0  # stochastic masks
    sparsity: float | None = None  # balanced and pyramidal masks
    compact: bool = True  # store and compute the kept rows of B / columns of A only (LoRA layers)


@dataclass
class PartialLoraConfig(MaskSettings, LoraConfig):
    """PEFT's ``LoraConfig`` (every LoRA setting) plus :class:`MaskSettings`."""


@dataclass
class PartialAdaLoraConfig(MaskSettings, AdaLoraConfig):
    """PEFT's ``AdaLoraConfig`` plus :class:`MaskSettings` (the masks on P and Q; its layers stay dense)."""


def partial_config(peft_config: LoraConfig, **mask: object) -> PartialLoraConfig | PartialAdaLoraConfig:
    """The masked counterpart of a PEFT LoRA or AdaLoRA config, with the mask settings ``mask``."""
    kind = PartialAdaLoraConfig if isinstance(peft_config, AdaLoraConfig) else PartialLoraConfig
    return kind(**_peft_fields(peft_config, type(peft_config)), **mask)


def _peft_fields(config: LoraConfig, kind: type) -> dict:
    return {field.name: getattr(config, field.name) for field in fields(kind) if field.init}


def get_partial_lora_model(model: torch.nn.Module, config: PartialLoraConfig | PartialAdaLoraConfig) -> PeftModel:
    """PEFT's LoRA (or AdaLoRA) model of ``model`` under the plain PEFT config, its layers masked per ``config``."""
    peft_class = next(kind for kind in (AdaLoraConfig, LoraConfig) if isinstance(config, kind))
    peft_model = get_peft_model(model, peft_class(**_peft_fields(config, peft_class)))
    shapes = {name: tuple(weight.shape) for name, weight in base_weights(peft_model).items()}
    masks = make_masks(config.mode, shapes, config.seed, counts=config.counts, temperature=config.temperature,
                       sparsity=config.sparsity)
    apply_masks(peft_model, masks, compact=config.compact)
    return peft_model


def skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no weights copied): what PEFT
    makes of ``model`` is checked on it, since ``get_peft_model`` changes the model it wraps in place."""
    memo = {id(tensor): torch.nn.Parameter(tensor.to("meta"), tensor.requires_grad)
            for tensor in model.parameters()}
    memo |= {id(tensor): tensor.to("meta") for tensor in model.buffers()}
    return copy.deepcopy(model, memo)


def load_partial_lora(model: torch.nn.Module, directory: str | Path, is_trainable: bool = True,
                      compact: bool = True) -> PeftModel:
    """Load an adapter folder that ``save_partial_lora`` (compact layout) or ``save_pretrained`` (PEFT's) wrote
    onto ``model`` (the same base model), masks and all: the layers come back masked (compact unless
    ``compact=False``) and, with ``is_trainable``, ready to train on.

    Files are read and checked against a meta-device copy of ``model`` first: a missing, truncated or damaged
    file, or one of another model, raises :class:`PartialLoraError` and leaves ``model`` as it was.
    """
    config = read_config(directory)
    config.inference_mode = not is_trainable
    state_dict = read_tensors(directory)
    try:
        trial = get_peft_model(skeleton(model), copy.deepcopy(config))
    except (ValueError, TypeError, KeyError, RuntimeError) as error:  # PEFT's refusals of a config for a model
        raise PartialLoraError(f"the adapter config in {directory} does not apply to this model "
                               f"({first_line(error)}); pass the base model it was trained on.") from error
    check_adapter_state(trial, state_dict, f"{directory}")
    peft_model = get_peft_model(model, config)
    load_masked_state(peft_model, state_dict, f"{directory}", compact)
    return peft_model
