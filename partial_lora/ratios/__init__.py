"""Per-layer kept counts from the pretrained model (paper Algorithm 1, SPEC 4), cached on disk."""

from partial_lora.ratios.cache import RatioCache, cache_key
from partial_lora.ratios.replay import PrefixReplay
from partial_lora.ratios.search import AcceptanceRule, LayerCounts, derive_counts, largest_removable

__all__ = ["AcceptanceRule", "LayerCounts", "PrefixReplay", "RatioCache", "cache_key", "derive_counts", "largest_removable"]
