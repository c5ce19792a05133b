"""Importance scores on hand-built matrices match a direct computation (SPEC 3)."""

from __future__ import annotations

import pytest
import torch

from partial_lora.errors import ConfigError, SettingError
from partial_lora.importance import LayerScores, compute_importance, gradient_scores, preserve_flow, svd_scores


def test_svd_scores_of_a_diagonal_matrix_are_squared_singular_values():
    # W = diag(3, 2, 1): P = Q = I, so row i of W Q^T diag(s) is s_i^2 e_i.
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    scores = svd_scores(weight)
    assert torch.allclose(scores.row, torch.tensor([9.0, 4.0, 1.0]), atol=1e-5)
    assert torch.allclose(scores.col, torch.tensor([9.0, 4.0, 1.0]), atol=1e-5)


def test_svd_scores_match_the_formula_on_a_random_rectangular_matrix():
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for top_k in (None, 2):
        p, s, q = torch.linalg.svd(weight.double(), full_matrices=False)
        k = s.numel() if top_k is None else top_k
        expected_row = (weight.double() @ q[:k].T @ torch.diag(s[:k])).norm(dim=1)
        pt, st, qt = torch.linalg.svd(weight.T.double(), full_matrices=False)
        expected_col = (weight.T.double() @ qt[:k].T @ torch.diag(st[:k])).norm(dim=1)
        scores = svd_scores(weight, top_k)
        assert scores.row.shape == (5,) and scores.col.shape == (7,)
        assert torch.allclose(scores.row.double(), expected_row, rtol=1e-5)
        assert torch.allclose(scores.col.double(), expected_col, rtol=1e-5)
    # Fewer directions can only lower the scores.
    assert (svd_scores(weight, 1).row <= svd_scores(weight).row + 1e-6).all()


def test_snip_and_imp_reduce_absolute_gradients_by_rows_and_columns():
    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]), requires_grad=False)
    inputs = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])]
    # L = sum(W x) per batch: dL/dW = 1 x^T, so |grad| summed over batches is [[2, 3], [2, 3]].
    batches = [lambda x=x: (weight @ x).sum() for x in inputs]
    snip = gradient_scores({"w": weight}, batches, "snip")["w"]
    assert torch.allclose(snip.row, torch.tensor([5.0, 5.0])) and torch.allclose(snip.col, torch.tensor([4.0, 6.0]))
    imp = gradient_scores({"w": weight}, batches, "imp")["w"]
    # |x_j * W_ij| summed over the two batches: [[2, 6], [1, 9]].
    assert torch.allclose(imp.row, torch.tensor([8.0, 10.0])) and torch.allclose(imp.col, torch.tensor([3.0, 15.0]))
    assert not weight.requires_grad  # restored


def test_continuous_flow_adds_next_layer_columns_where_shapes_chain():
    scores = {"a": LayerScores(row=torch.ones(3), col=torch.ones(2)),
              "b": LayerScores(row=torch.ones(4), col=torch.arange(3.0)),
              "c": LayerScores(row=torch.ones(2), col=torch.ones(5))}
    chained = preserve_flow(scores, "continuous")
    assert torch.equal(chained["a"].row, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(chained["b"].row, torch.ones(4))  # 4 outputs do not feed 5 inputs
    assert preserve_flow(scores, "isolated") is scores


def test_unknown_measure_and_flow_are_refused():
    with pytest.raises(SettingError, match="^compute_importance.measure must be one of svd, snip, imp, got 'magn"):
        compute_importance({"w": torch.ones(2, 2)}, "magnitude")
    with pytest.raises(SettingError, match="^preserve_flow.flow must be one of isolated, continuous, got 'sideways'"):
        compute_importance({"w": torch.ones(2, 2)}, "svd", flow="sideways")
    with pytest.raises(ConfigError, match="needs loss_batches"):
        compute_importance({"w": torch.ones(2, 2)}, "snip")
