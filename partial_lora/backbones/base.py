"""What every backbone builder returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Backbone:
    """A classifier whose ``head_modules`` are trained by every method and excluded from adapter counts."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None  # text backbones
    head_modules: list[str]


def in_head(name: str, head_modules: list[str]) -> bool:
    """Whether the dotted module or parameter ``name`` lies under one of the backbone's head modules."""
    parts = name.split(".")
    return any(head in parts for head in head_modules)
