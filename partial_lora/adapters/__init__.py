"""Adapters: turn a backbone into the model a method trains, and count what it trains."""

from partial_lora.adapters.build import ParameterCounts, adapt, count_parameters

__all__ = ["ParameterCounts", "adapt", "count_parameters"]
