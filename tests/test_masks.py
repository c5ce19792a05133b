"""Mask modes (SPEC 2): each draws what its row of the table says, reproducibly per (seed, layer)."""

from __future__ import annotations

import pytest
import torch

from partial_lora.errors import SettingError
from partial_lora.masks import block_depth, make_mask

SHAPE = (400, 300)
ROW_SCORES = torch.linspace(0, 1, 400)
COL_SCORES = torch.linspace(1, 0, 300)


def draw(mode: str, seed: int = 0, layer: str = "encoder.layer.0.query", **kwargs):
    arguments = dict(k_row=100, k_col=200, row_scores=ROW_SCORES, col_scores=COL_SCORES) | kwargs
    return make_mask(mode, layer, seed, SHAPE, **arguments)


def test_same_seed_and_layer_give_identical_masks_and_others_differ():
    for mode in ("partial", "stochastic"):
        first, again = draw(mode), draw(mode)
        assert torch.equal(first.row, again.row) and torch.equal(first.col, again.col)
        assert not torch.equal(first.row, draw(mode, seed=1).row)
        assert not torch.equal(first.row, draw(mode, layer="encoder.layer.1.query").row)


def test_partial_keeps_rows_and_columns_at_the_derived_rates():
    mask = draw("partial")
    assert abs(mask.row.float().mean() - 100 / 400) < 0.06
    assert abs(mask.col.float().mean() - 200 / 300) < 0.06


def test_targeted_keeps_the_top_scored_indices_and_inverted_the_rest():
    targeted, inverted = draw("targeted"), draw("inverted")
    assert torch.equal(targeted.row.nonzero().flatten(), torch.arange(300, 400))
    assert torch.equal(targeted.col.nonzero().flatten(), torch.arange(0, 200))
    assert torch.equal(inverted.row, ~targeted.row) and torch.equal(inverted.col, ~targeted.col)


def test_stochastic_draws_exactly_k_and_concentrates_as_temperature_falls():
    mask = draw("stochastic", temperature=1.0)
    assert int(mask.row.sum()) == 100 and int(mask.col.sum()) == 200
    cold = draw("stochastic", temperature=1e-3, row_scores=torch.arange(400.0))
    assert torch.equal(cold.row.nonzero().flatten(), torch.arange(300, 400))


def test_balanced_and_pyramidal_rates():
    balanced = make_mask("balanced", "encoder.layer.3.query", 0, SHAPE, sparsity=0.75)
    assert abs(balanced.row.float().mean() - 0.25) < 0.06
    deep = make_mask("pyramidal", "encoder.layer.3.query", 0, SHAPE, sparsity=0.5)  # depth 4: keep 1 - 0.5**4
    assert abs(deep.col.float().mean() - (1 - 0.5 ** 4)) < 0.06
    assert block_depth("base_model.model.bert.encoder.layer.11.output.dense") == 12
    empty = make_mask("balanced", "encoder.layer.3.query", 0, SHAPE, sparsity=1.0)  # head_only: nothing kept
    assert not empty.row.any() and not empty.col.any()


def test_bad_mask_settings_are_refused():
    with pytest.raises(SettingError, match="^MaskSettings.mode must be one of partial, .*, got 'diagonal'"):
        draw("diagonal")
    with pytest.raises(SettingError, match=r"^MaskSettings.temperature must be > 0, got 0\.0\.$"):
        draw("stochastic", temperature=0.0)
    with pytest.raises(SettingError, match=r"^MaskSettings.sparsity must lie in \[0, 1\] for balanced masks, got 1\.5"):
        make_mask("balanced", "layer.0.x", 0, SHAPE, sparsity=1.5)


def test_one_rule_numbers_blocks_for_masks_replay_and_figures():
    from partial_lora.layers import block_of

    name = "bert.encoder.layer.11.attention.self.query"
    assert block_of(name) == block_of(name, "bert.encoder.layer") == 11 == block_depth(name) - 1
    assert block_of("bert.pooler.dense", "bert.encoder.layer") is None and block_of("classifier") is None
    assert block_of("visual.transformer.resblocks.2.attn.out_proj", "visual.transformer.resblocks") == 2
