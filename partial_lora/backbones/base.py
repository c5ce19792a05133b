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


def in_head(name: str, head_modules: list[str]) -> bool:
    """Whether the dotted module or parameter ``name`` lies under one of the backbone's head modules."""
    parts = name.split(".")
    return any(head in parts for head in head_modules)


def block_of(name: str, blocks_path: str) -> int | None:
    """Index of the transformer block (``backbone.blocks``, e.g. ``bert.encoder.layer``) holding the dotted
    module ``name``, or ``None`` when it lies outside every block."""
    prefix = f"{blocks_path}."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def group_by_block(names: list[str], blocks_path: str) -> list[list[str]]:
    """``names`` grouped per transformer block, in block order; names outside every block form a last group."""
    groups: dict[int, list[str]] = {}
    for name in names:
        block = block_of(name, blocks_path)
        groups.setdefault(-1 if block is None else block, []).append(name)
    return [groups[key] for key in sorted(groups, key=lambda key: (key < 0, key))]
