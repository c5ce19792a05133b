"""Adapters: turn a backbone into the model a method trains, and count what it trains."""

from partial_lora.adapters.build import ParameterCounts, adapt, count_parameters, uses_rank_allocation
from partial_lora.adapters.masked import apply_masks, kept_fractions, load_adapter, save_adapter
from partial_lora.adapters.partial import derive_masks
from partial_lora.adapters.residuals import residual_norms

__all__ = ["ParameterCounts", "adapt", "apply_masks", "count_parameters", "derive_masks", "kept_fractions",
           "load_adapter", "residual_norms", "save_adapter", "uses_rank_allocation"]
