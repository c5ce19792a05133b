"""Row and column importance of pretrained weights ``W`` (m x n, out x in), SPEC section 3.

- ``svd``: rows of ``W`` projected on the top-k right singular directions, weighted by the singular values.
- ``snip``: ``|dL/dW|`` summed over the derivation batches, then over columns (rows) or rows (columns).
- ``imp``: the same with ``|dL/dW * W|`` (Molchanov et al.).
- flow preservation (App. H): ``continuous`` adds the next layer's column scores to this layer's row
  scores where the output of one feeds the input of the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from partial_lora.errors import ConfigError, check_choice

MEASURES = ("svd", "snip", "imp")
FLOWS = ("isolated", "continuous")


@dataclass
class LayerScores:
    row: torch.Tensor  # length m (output features)
    col: torch.Tensor  # length n (input features)


def svd_scores(weight: torch.Tensor, top_k: int | None = None) -> LayerScores:
    """``I_row[i] = ||(W Q_k^T diag(s_k))[i, :]||_2``; column scores are the same computed on ``W^T``."""

    def rows(matrix: torch.Tensor) -> torch.Tensor:
        _, singular, right = torch.linalg.svd(matrix.double(), full_matrices=False)
        k = singular.numel() if top_k is None else min(top_k, singular.numel())
        return (matrix.double() @ right[:k].T * singular[:k]).norm(dim=1).float()

    return LayerScores(row=rows(weight), col=rows(weight.T))


def gradient_scores(weights: dict[str, torch.Tensor], loss_batches: Iterable[Callable[[], torch.Tensor]],
                    measure: str) -> dict[str, LayerScores]:
    """SNIP or IMP scores for every weight at once: one backward pass per batch serves all layers.

    ``loss_batches`` yields closures that run the model on one batch and return its loss; the weights
    are made to require gradients only while scores are accumulated.
    """
    saliency = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
    previous = {name: weight.requires_grad for name, weight in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for loss_of_batch in loss_batches:
            grads = torch.autograd.grad(loss_of_batch(), list(weights.values()))
            for (name, weight), grad in zip(weights.items(), grads):
                term = grad * weight if measure == "imp" else grad
                saliency[name] += term.detach().abs().float()
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(previous[name])
    return {name: LayerScores(row=value.sum(dim=1), col=value.sum(dim=0)) for name, value in saliency.items()}


def preserve_flow(scores: dict[str, LayerScores], flow: str) -> dict[str, LayerScores]:
    """Apply the flow-preservation variant; layers are taken in the model's module order."""
    check_choice("preserve_flow", "flow", flow, FLOWS)
    if flow == "isolated":
        return scores
    names = list(scores)
    chained = {}
    for name, following in zip(names, names[1:] + [None]):
        row = scores[name].row
        if following is not None and scores[following].col.numel() == row.numel():
            row = row + scores[following].col
        chained[name] = LayerScores(row=row, col=scores[name].col)
    return chained


def compute_importance(weights: dict[str, torch.Tensor], measure: str, *, top_k: int | None = None,
                       flow: str = "isolated",
                       loss_batches: Iterable[Callable[[], torch.Tensor]] | None = None) -> dict[str, LayerScores]:
    """Scores for every adapted weight under ``measure`` (``svd``, ``snip`` or ``imp``)."""
    check_choice("compute_importance", "measure", measure, MEASURES)
    if measure == "svd":
        scores = {name: svd_scores(weight.detach(), top_k) for name, weight in weights.items()}
    else:
        if loss_batches is None:
            raise ConfigError(f"measure={measure!r} needs loss_batches (gradients of the loss on labelled data).")
        scores = gradient_scores(weights, loss_batches, measure)
    return preserve_flow(scores, flow)
