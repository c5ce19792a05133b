"""Partial-LoRA: sparse low-rank adapters whose per-layer sparsity comes from the pretrained model.

The library API, with no Hydra in it (the harness in ``run.py`` uses the same functions)::

    from partial_lora import DerivationSettings, PartialLoraConfig, derive_counts, get_partial_lora_model

    counts = derive_counts(model, batches, DerivationSettings(target_modules=..., importance="svd"))
    model = get_partial_lora_model(model, PartialLoraConfig(r=8, target_modules=..., counts=counts, seed=0))
"""

from importlib import import_module
from typing import Any

from partial_lora.errors import ConfigError, DataError, PartialLoraError

# Loaded on first use: ``import partial_lora.config`` (run.py's settings checks) must not import torch and PEFT.
_LAZY = {
    "DerivationSettings": "partial_lora.ratios",
    "DerivedCounts": "partial_lora.ratios",
    "derive_counts": "partial_lora.ratios",
    "PartialLoraConfig": "partial_lora.adapters",
    "PartialAdaLoraConfig": "partial_lora.adapters",
    "get_partial_lora_model": "partial_lora.adapters",
    "load_partial_lora": "partial_lora.adapters",
    "save_partial_lora": "partial_lora.adapters",
    "convert_to_peft": "partial_lora.adapters",
    "merge_and_unload": "partial_lora.adapters",
}

__all__ = ["ConfigError", "DataError", "PartialLoraError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'partial_lora' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
