"""Adapters: turn a backbone into the model a method trains, and count what it trains (no Hydra: a run's config
reaches them through ``partial_lora.settings``)."""

from partial_lora.adapters.counting import ParameterCounts, count_parameters
from partial_lora.adapters.files import convert_to_peft, save_partial_lora
from partial_lora.adapters.masked import apply_masks, kept_fractions, load_adapter
from partial_lora.adapters.partial import (
    PartialAdaLoraConfig,
    PartialLoraConfig,
    get_partial_lora_model,
    load_partial_lora,
    partial_config,
)
from partial_lora.adapters.residuals import residual_norms
from partial_lora.adapters.targets import merge_and_unload

__all__ = ["ParameterCounts", "PartialAdaLoraConfig", "PartialLoraConfig", "apply_masks", "convert_to_peft",
           "count_parameters", "get_partial_lora_model", "kept_fractions", "load_adapter", "load_partial_lora",
           "merge_and_unload", "partial_config", "residual_norms", "save_partial_lora"]
