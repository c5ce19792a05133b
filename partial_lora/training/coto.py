"""CoTo (Zhuang et al., 2025, "Come Together, But Not Right Now"): progressive activation of adapters.

A training strategy on top of any PEFT adapter method. During the first ``stage1_ratio`` of the steps,
each transformer block's adapters are switched off together at random; a block is active with a
probability that rises linearly from ``initial_p`` to 1, and at least one block is active at every step.
Afterwards every adapter is on. A switched-off adapter contributes nothing (PEFT's per-layer
``enable_adapters(False)`` returns the base layer's output exactly and freezes the adapter, so it
receives no gradient and AdamW skips it); the active ones are not rescaled.

Written here because PEFT switches adapters per layer or per model, not at random per block on a
schedule; the switch itself is PEFT's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from partial_lora.layers import group_by_block
from partial_lora.errors import ConfigError


def activation_probability(step: int, total_steps: int, initial_p: float, stage1_ratio: float) -> float:
    """Probability that a block's adapters are on at ``step`` (0-based): linear from ``initial_p`` at step 0 to
    1 at ``stage1_ratio * total_steps``, then 1."""
    stage1 = stage1_ratio * total_steps
    if step >= stage1:
        return 1.0
    return initial_p + (1.0 - initial_p) * step / stage1


def sample_active_blocks(probability: float, blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``blocks`` are on: each with ``probability``; if none is, one drawn uniformly is switched on."""
    active = torch.rand(blocks, generator=generator) < probability
    if not active.any():
        active[int(torch.randint(blocks, (1,), generator=generator))] = True
    return active


def tuner_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """PEFT adapter layers (LoRA, DoRA, AdaLoRA, masked LoRA, VeRA, ...) by base-model module name."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)}


class CoTo(L.Callback):
    """Samples the active blocks before each training batch and switches every adapter back on after it, so
    that validation, testing, checkpoints and parameter counts always see the whole adapter.

    ``seed`` seeds the block sampling (the run's seed); ``blocks`` is the backbone's sequence of
    transformer blocks (``backbone.blocks``): adapters outside every block form one more group.
    """

    def __init__(self, initial_p: float, stage1_ratio: float, seed: int, blocks: str | None) -> None:
        if not 0 < initial_p <= 1:
            raise ConfigError(f"strategy.initial_p must lie in (0, 1], got {initial_p!r}.")
        if not 0 < stage1_ratio <= 1:
            raise ConfigError(f"strategy.stage1_ratio must lie in (0, 1], got {stage1_ratio!r}.")
        if not blocks:
            raise ConfigError("strategy=coto switches adapters per transformer block: the backbone config must "
                              "name its sequence of blocks in `blocks`.")
        self.initial_p, self.stage1_ratio, self.blocks = initial_p, stage1_ratio, blocks
        self.generator = torch.Generator().manual_seed(seed)
        self.groups: list[list[BaseTunerLayer]] = []
        self.total_steps = 0
        self.off: list[BaseTunerLayer] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = tuner_layers(pl_module.model)
        if not layers:
            raise ConfigError("strategy=coto switches PEFT adapter layers, and this method has none.")
        self.groups = [[layers[name] for name in names] for names in group_by_block(list(layers), self.blocks)]
        self.total_steps = int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        probability = activation_probability(trainer.global_step, self.total_steps, self.initial_p, self.stage1_ratio)
        if probability >= 1:
            return
        active = sample_active_blocks(probability, len(self.groups), self.generator)
        self.off = [layer for group, on in zip(self.groups, active.tolist()) if not on for layer in group]
        for layer in self.off:
            layer.enable_adapters(False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The optimiser has stepped. Per-step consumers of every adapter's gradient that run next (AdaLoRA's
        # sensitivity in AdaLoraBudget) read a zero gradient, "no contribution", for the switched-off ones.
        for layer in self.off:
            layer.enable_adapters(True)
            for name in layer.adapter_layer_names:
                for parameter in getattr(layer, name).parameters():
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
        self.off = []
