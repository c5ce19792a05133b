"""LoSiA: only the subnet of W trains, counts are p^2 * m * n, greedy localisation, slot-by-slot re-localisation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict

from partial_lora.adapters import count_parameters
from partial_lora.adapters.losia import SubnetLinear, greedy_subnet, subnet_layers, subnet_size
from partial_lora.backbones import build_backbone
from partial_lora.errors import ConfigError
from partial_lora.pipeline import run
from partial_lora.settings import adapt
from partial_lora.training.callbacks import SubnetRelocalization
from tests.conftest import compose_config


def test_counts_are_p_squared_m_n_per_layer():
    cfg = compose_config("backbone=tiny_bert", "method=losia")
    backbone = build_backbone(cfg.backbone, num_labels=2)
    model = adapt(backbone.model, cfg)
    layers = subnet_layers(model)
    assert len(layers) == 2 * 6
    p = cfg.method.losia.rank_factor
    for layer in layers.values():
        m, n = layer.base_layer.weight.shape
        assert layer.delta_block.numel() == p * p * m * n  # 32 and 64 wide: p * size is whole at p = 1/8
    counts = count_parameters(model, backbone.head_modules)
    assert counts.adapter == sum(p * p * layer.base_layer.weight.numel() for layer in layers.values())
    assert counts.head == sum(parameter.numel() for parameter in model.classifier.parameters())


def test_subnet_size_rounds_half_up_and_keeps_one():
    assert subnet_size(768, 0.125) == 96
    assert subnet_size(12, 0.125) == 2     # 1.5 -> 2
    assert subnet_size(10, 0.125) == 1     # 1.25 -> 1
    assert subnet_size(3, 0.1) == 1        # 0.3 -> at least one


def test_only_the_selected_block_of_w_changes_and_outputs_match_the_dense_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    start = base.weight.detach().clone()
    rows, cols = torch.tensor([1, 5, 20]), torch.tensor([0, 7])
    layer = SubnetLinear(base, rows, cols, beta=0.85)
    layer.base_layer.requires_grad_(False)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["delta_block"]
    optimizer = torch.optim.AdamW([layer.delta_block], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        inputs = torch.randn(4, 5, 16)
        loss = layer(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert layer.delta_block.grad.shape == (3, 2) and base.weight.grad is None
        optimizer.step()
    changed = (layer.weight() != start).nonzero().tolist()
    block = {(row, col) for row in rows.tolist() for col in cols.tolist()}
    assert changed and {tuple(index) for index in changed} <= block
    assert len(changed) == len(block)
    inputs = torch.randn(2, 16)
    torch.testing.assert_close(layer(inputs), torch.nn.functional.linear(inputs, layer.weight(), base.bias))


def test_relocalisation_folds_the_delta_into_w_and_moves_to_the_sensitive_block():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8)
    base.requires_grad_(False)
    layer = SubnetLinear(base, torch.tensor([0, 1]), torch.tensor([0, 1]), beta=0.85)
    with torch.no_grad():
        layer.delta_block.fill_(0.5)
    applied = layer.weight()
    assert not layer.relocalize()  # nothing recorded yet: the subnet stays
    layer.recording = True
    inputs = torch.zeros(4, 8)
    inputs[:, 6] = 1.0  # only input column 6 carries signal, and the loss reads output row 3 only
    layer(inputs)[:, 3].sum().backward()
    assert layer.relocalize()
    torch.testing.assert_close(base.weight, applied)
    assert torch.count_nonzero(layer.delta_block) == 0
    assert 3 in layer.rows.tolist() and 6 in layer.cols.tolist()


def test_greedy_subnet_takes_the_best_of_its_three_orders():
    score = torch.tensor([[0.0, 0.0, 5.0, 0.0],
                          [4.0, 0.0, 0.0, 3.5],
                          [0.0, 4.0, 0.0, 3.0]])
    # top row 1 and top column 3 (3.5); row 1 then its best column 0 (4.0); column 3 then its best row 1 (3.5)
    rows, cols = greedy_subnet(score, 1, 1)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    planted = torch.rand(10, 12) * 0.1
    planted[torch.tensor([2, 7])[:, None], torch.tensor([3, 4, 9])] += 5
    rows, cols = greedy_subnet(planted, 2, 3)
    assert rows.tolist() == [2, 7] and cols.tolist() == [3, 4, 9]


def test_warm_factor_rises_over_a_period_after_relocalisation():
    callback = SubnetRelocalization(period=4, blocks="bert.encoder.layer")
    parameter = torch.nn.Parameter(torch.zeros(1))
    assert callback.warm_factor(parameter, 10) == 1.0
    callback.relocalized_at[id(parameter)] = 8
    assert [callback.warm_factor(parameter, step) for step in (8, 9, 10, 11, 12)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ConfigError):
        SubnetRelocalization(period=0, blocks=None)


def test_blocks_relocalise_in_turn_on_schedule_with_optimiser_state_reset(tiny_cfg, monkeypatch):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=losia", "method.losia.period=2").method
    events = []
    original = SubnetLinear.relocalize

    def spy(layer):
        moved = original(layer)
        events.append((layer.block, moved))
        return moved

    monkeypatch.setattr(SubnetLinear, "relocalize", spy)
    original_setup = SubnetRelocalization.setup

    def setup(callback, trainer, pl_module, stage):
        original_setup(callback, trainer, pl_module, stage)
        for index, group in enumerate(callback.groups):
            for layer in group:
                layer.block = index

    monkeypatch.setattr(SubnetRelocalization, "setup", setup)
    adam_steps = []
    original_end = SubnetRelocalization.on_train_end

    def on_train_end(callback, trainer, pl_module):
        state = trainer.optimizers[0].state
        adam_steps.append([{int(state[layer.delta_block]["step"]) for layer in group} for group in callback.groups])
        original_end(callback, trainer, pl_module)

    monkeypatch.setattr(SubnetRelocalization, "on_train_end", on_train_end)
    warmed = []
    original_unwarm = SubnetRelocalization._unwarm

    def unwarm(callback, optimizer, args, kwargs):
        warmed.extend((callback.trainer.global_step, group["lr"] / group["unwarmed_lr"])
                      for group in optimizer.param_groups if "unwarmed_lr" in group)
        original_unwarm(callback, optimizer, args, kwargs)

    monkeypatch.setattr(SubnetRelocalization, "_unwarm", unwarm)
    record = run(tiny_cfg)
    # 40 training examples / 8 per batch = 5 steps; slots of 2 steps: block 0 ends its slot at step 2 and
    # block 1 at step 4 (step 5 is mid-slot). Six adapted layers per block, each re-localised once.
    assert record["steps"] == 5
    assert events == [(0, True)] * 6 + [(1, True)] * 6
    # The learning rate re-warms over a period (2 steps) after each re-localisation: half of it on the first step.
    assert warmed == [(2, 0.5)] * 6 + [(4, 0.5)] * 6
    # AdamW's state restarted at each re-localisation: block 0 has stepped 3 times since (steps 3-5), block 1 once.
    assert adam_steps == [[{3}, {1}]]
    assert record["method"] == "losia" and record["params"]["adapter"] == 2 * (4 * 16 + 2 * 32)


def test_checkpoints_restore_the_merged_weights_and_subnets_they_were_scored_with():
    cfg = compose_config("backbone=tiny_bert", "method=losia")
    model = adapt(build_backbone(cfg.backbone, num_labels=2).model, cfg)
    module = SimpleNamespace(model=model)
    callback = SubnetRelocalization(period=1, blocks=cfg.backbone.blocks)
    callback.setup(None, module, "fit")
    checkpoint = {}
    callback.on_save_checkpoint(None, module, checkpoint)
    layer = next(iter(subnet_layers(model).values()))
    saved = layer.base_layer.weight.detach().clone(), layer.rows.clone(), layer.cols.clone()
    with torch.no_grad():
        layer.delta_block.fill_(1.0)
    layer.recording = True
    layer(torch.randn(2, layer.base_layer.in_features)).sum().backward()
    assert layer.relocalize() and not torch.equal(layer.base_layer.weight, saved[0])
    callback.on_load_checkpoint(None, module, checkpoint)
    assert all(torch.equal(now, then) for now, then in zip((layer.base_layer.weight, layer.rows, layer.cols), saved))


def test_deberta_count_on_real_shapes():
    cfg = compose_config("backbone=deberta_v3_base", "method=losia")
    built = build_backbone(cfg.backbone, num_labels=2, shapes_only=True)
    counts = count_parameters(adapt(built.model, cfg), built.head_modules)
    # p = 1/8 of 768 and 3072: 96 x 96 for the four attention matrices, 384 x 96 and 96 x 384 for the MLP
    assert counts.adapter == 12 * (4 * 96 * 96 + 2 * 96 * 384)
