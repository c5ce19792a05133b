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
