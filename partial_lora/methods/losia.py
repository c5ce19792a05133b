"""LoSiA (Wang et al., 2025): each targeted pretrained weight trains a sensitivity-chosen sub-block directly (the
layers: ``partial_lora.adapters.losia``), re-localised block by block every ``method.losia.period`` steps."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from partial_lora.adapters.losia import SubnetLinear, apply_losia, subnet_layers
from partial_lora.config import at_least, share
from partial_lora.errors import ConfigError
from partial_lora.layers import group_by_block
from partial_lora.methods.base import Method, train_head
from partial_lora.ratios import DerivedCounts


class LoSiA(Method):
    """LoSiA's subnets on ``backbone.target_modules`` and a trainable head; its optimiser keeps a parameter group
    per tensor (``partial_lora.training.optim.adamw_per_tensor``) for :class:`SubnetRelocalization`, its callback."""

    settings = (("method.losia.rank_factor", share(True, False), "a number in (0, 1]"),
                ("method.losia.beta", share(False, True), "a number in [0, 1)"),
                ("method.losia.period", at_least(1), "an integer >= 1"))

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        losia = self.config.losia
        apply_losia(model, self.cfg.backbone.target_modules, losia.rank_factor, losia.beta, self.cfg.seed)
        return train_head(model, self.cfg.backbone.head_modules)


class SubnetRelocalization(L.Callback):
    """LoSiA's asynchronous, periodic subnet re-localisation, one transformer block at a time.

    Training is cut into time slots of ``period`` steps; slot ``s`` belongs to block ``s mod B`` (``B``
    blocks of ``backbone.blocks``; adapted layers outside every block form one more group). During its
    slot a block's layers record sensitivity; at the slot's end they re-localise their subnets, their
    AdamW state is dropped (the old moments belong to other weights) and their learning rate re-warms
    linearly over the next ``period`` steps, on top of the run's cosine schedule. Each layer has its own
    parameter group for this (``partial_lora.training.optim.adamw_per_tensor``).

    Checkpoints keep the merged weights, subnet indices and folded changes of every layer (under ``"losia"``)
    next to the trainable deltas, so that testing the best checkpoint restores the weights it was scored with.
    """

    def __init__(self, period: int, blocks: str | None) -> None:
        if not isinstance(period, int) or period < 1:
            raise ConfigError(f"method.losia.period must be an integer >= 1, got {period!r}.")
        self.period, self.blocks = period, blocks or ""
        self.layers: dict[str, SubnetLinear] = {}
        self.groups: list[list[SubnetLinear]] = []
        self.relocalized_at: dict[int, int] = {}  # id(layer.delta_block) -> global step of its last re-localisation
        self.trainer: L.Trainer | None = None
        self._hooks: list[Any] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.layers = subnet_layers(pl_module.model)
        if not self.layers:
            raise ConfigError("the LoSiA callback needs LoSiA layers (method=losia).")
        self.groups = [[self.layers[name] for name in names]
                       for names in group_by_block(list(self.layers), self.blocks)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = trainer
        optimizer = trainer.optimizers[0]
        self._hooks = [optimizer.register_step_pre_hook(self._warm), optimizer.register_step_post_hook(self._unwarm)]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        recording = self.recording_group(trainer.global_step)
        for index, group in enumerate(self.groups):
            for layer in group:
                layer.recording = index == recording

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # steps taken so far
        if step % self.period:
            return
        optimizer = trainer.optimizers[0]
        for layer in self.groups[self.recording_group(step - 1)]:
            if layer.relocalize():
                optimizer.state.pop(layer.delta_block, None)
                self.relocalized_at[id(layer.delta_block)] = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in self.layers.values():
            layer.recording = False
        for hook in self._hooks:
            hook.remove()

    def recording_group(self, step: int) -> int:
        """The group whose slot holds ``step`` (0-based)."""
        return (step // self.period) % len(self.groups)

    def warm_factor(self, parameter: torch.Tensor, step: int) -> float:
        """Learning-rate factor at ``step`` for a layer's delta: ``(steps since re-localisation + 1) / period``,
        at most 1."""
        since = self.relocalized_at.get(id(parameter))
        return 1.0 if since is None else min(1.0, (step - since + 1) / self.period)

    def _warm(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            factor = self.warm_factor(group["params"][0], self.trainer.global_step)
            if factor < 1:
                group["unwarmed_lr"] = group["lr"]
                group["lr"] = group["lr"] * factor

    def _unwarm(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The cosine scheduler updates each group's lr from its previous value: hand it the unwarmed one.
        for group in optimizer.param_groups:
            if "unwarmed_lr" in group:
                group["lr"] = group.pop("unwarmed_lr")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["losia"] = {name: {"weight": layer.base_layer.weight.detach().clone(), "rows": layer.rows.clone(),
                                      "cols": layer.cols.clone(), "folded_indices": layer.folded.indices().clone(),
                                      "folded_values": layer.folded.values().clone()}
                               for name, layer in self.layers.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        with torch.no_grad():
            for name, state in checkpoint.get("losia", {}).items():
                layer = self.layers[name]
                layer.base_layer.weight.copy_(state["weight"])
                layer.rows.copy_(state["rows"])
                layer.cols.copy_(state["cols"])
                layer.folded = torch.sparse_coo_tensor(state["folded_indices"], state["folded_values"],
                                                       layer.folded.shape, check_invariants=True).coalesce()
