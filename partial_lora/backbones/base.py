"""What every backbone builder returns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from partial_lora.errors import ConfigError


@dataclass
class Backbone:
    """A classifier whose ``head_modules`` are trained by every method and excluded from adapter counts."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None  # text backbones
    head_modules: list[str]


@contextmanager
def fetching(what: str, remedy: str, errors: tuple[type[Exception], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failure to fetch ``what`` (hub unreachable or offline, no local copy) into one sentence naming
    ``remedy``, the setting that avoids the hub; transformers raises ``OSError`` for it, open_clip ``RuntimeError``."""
    try:
        yield
    except errors as error:
        raise ConfigError(f"{what} could not be loaded ({type(error).__name__}): {remedy}.") from error
