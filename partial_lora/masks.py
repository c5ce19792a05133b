"""Mask modes (SPEC 2): which rows of B and columns of A a masked adapter trains.

Every draw uses a generator seeded by the run's seed and the layer's name, so one seed gives the same
masks on any machine and in any layer order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from partial_lora.errors import ConfigError, SettingError
from partial_lora.layers import block_of

if TYPE_CHECKING:  # the derivation package builds on the adapters, which build on this module
    from partial_lora.ratios import DerivedCounts

MODES = ("partial", "targeted", "inverted", "stochastic", "balanced", "pyramidal")
NEEDS_DERIVATION = ("partial", "targeted", "inverted", "stochastic")


@dataclass
class LayerMask:
    row: torch.Tensor  # bool, length m: rows of B that train
    col: torch.Tensor  # bool, length n: columns of A that train


def layer_generator(seed: int, layer: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def block_depth(layer: str) -> int:
    """1-based index of the block holding ``layer`` (the first number in its dotted name)."""
    block = block_of(layer)
    if block is None:
        raise ConfigError(f"pyramidal masks need a block index in the layer name, found none in {layer!r}.")
    return block + 1


def _bernoulli(size: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(size, generator=generator) < keep


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return mask


def _softmax_draw(scores: torch.Tensor, k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """k indices without replacement from softmax(scores / T), by the Gumbel-top-k trick.

    Sequential multinomial draws underflow at small T (probabilities of exactly 0 are then taken in
    arbitrary order); perturbed logits keep their order, so T -> 0 tends to plain top-k.
    """
    uniform = torch.rand(scores.numel(), generator=generator, dtype=torch.float64).clamp_min(1e-300)
    keys = scores.double() / temperature - torch.log(-torch.log(uniform))
    return _top(keys, k)


def make_mask(mode: str, layer: str, seed: int, shape: tuple[int, int], *, k_row: int | None = None,
              k_col: int | None = None, row_scores: torch.Tensor | None = None,
              col_scores: torch.Tensor | None = None, temperature: float = 1.0,
              sparsity: float | None = None) -> LayerMask:
    """Draw one layer's row and column masks for ``mode`` (see the table in SPEC 2).

    Bad settings are named as fields of ``MaskSettings``, where library users set them (``PartialLoraConfig``).
    """
    m, n = shape
    generator = layer_generator(seed, layer)
    if mode == "partial":
        return LayerMask(_bernoulli(m, k_row / m, generator), _bernoulli(n, k_col / n, generator))
    if mode in ("targeted", "inverted"):
        mask = LayerMask(_top(row_scores, k_row), _top(col_scores, k_col))
        return mask if mode == "targeted" else LayerMask(~mask.row, ~mask.col)
    if mode == "stochastic":
        if temperature <= 0:
            raise SettingError("MaskSettings", "temperature", "must be > 0", temperature)
        return LayerMask(_softmax_draw(row_scores, k_row, temperature, generator),
                         _softmax_draw(col_scores, k_col, temperature, generator))
    if mode in ("balanced", "pyramidal"):
        if sparsity is None or not 0 <= sparsity <= 1:
            raise SettingError("MaskSettings", "sparsity", f"must lie in [0, 1] for {mode} masks", sparsity)
        keep = 1 - sparsity if mode == "balanced" else 1 - sparsity ** block_depth(layer)
        return LayerMask(_bernoulli(m, keep, generator), _bernoulli(n, keep, generator))
    raise SettingError("MaskSettings", "mode", f"must be one of {', '.join(MODES)}", mode)


def make_masks(mode: str, shapes: dict[str, tuple[int, int]], seed: int, *, counts: DerivedCounts | None = None,
               temperature: float = 1.0, sparsity: float | None = None) -> dict[str, LayerMask]:
    """Every layer's masks (layers by name, weights ``m x n``); modes that need derived counts (and, but for
    ``partial``, their scores) read them from ``counts``."""
    if mode in NEEDS_DERIVATION:
        if counts is None:
            raise ConfigError(f"mask mode {mode!r} needs derived counts: pass counts=derive_counts(...).")
        problem = counts.mismatch(shapes)
        if problem is not None:
            raise ConfigError(f"the derived counts do not fit this model: {problem}.")
    else:
        counts = None  # fixed-sparsity modes draw from the seed alone
    masks = {}
    for name, shape in shapes.items():
        layer_counts = None if counts is None else counts.counts[name]
        layer_scores = None if counts is None else counts.scores[name]
        masks[name] = make_mask(
            mode, name, seed, shape,
            k_row=None if layer_counts is None else layer_counts.k_row,
            k_col=None if layer_counts is None else layer_counts.k_col,
            row_scores=None if layer_scores is None else layer_scores.row,
            col_scores=None if layer_scores is None else layer_scores.col,
            temperature=temperature, sparsity=sparsity)
    return masks
