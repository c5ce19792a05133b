"""Deriving per-layer kept counts from the pretrained model (paper Sec. 4, Algorithm 1, SPEC 3-4), in one package.

:func:`derive_counts` (``derive.py``) runs importance scoring (``partial_lora.importance``) and the search
under an acceptance rule (``search.py``) with a linear probe as head (``probe.py``) and replayed block
prefixes (``replay.py``), and caches the resulting :class:`DerivedCounts` (``counts.py``) on disk
(``cache.py``).
"""

from partial_lora.ratios.cache import RatioCache, cache_key
from partial_lora.ratios.counts import DerivedCounts
from partial_lora.ratios.derive import (DerivationMetric, DerivationSettings, derivation_inputs, derivation_warnings,
                                        derive_counts, fingerprint, majority_rate)
from partial_lora.ratios.replay import PrefixReplay
from partial_lora.ratios.search import AcceptanceRule, LayerCounts, largest_removable, search_counts, ticket_metric

__all__ = ["AcceptanceRule", "DerivationMetric", "DerivationSettings", "DerivedCounts", "LayerCounts", "PrefixReplay", "RatioCache",
           "cache_key", "derivation_inputs", "derivation_warnings", "derive_counts", "fingerprint", "largest_removable",
           "majority_rate", "search_counts", "ticket_metric"]
