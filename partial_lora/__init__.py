"""Partial-LoRA: sparse low-rank adapters whose per-layer sparsity comes from the pretrained model."""

from partial_lora.errors import ConfigError, DataError, PartialLoraError

__all__ = ["ConfigError", "DataError", "PartialLoraError"]
