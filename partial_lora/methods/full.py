"""Full fine-tuning: every backbone weight trains, no adapter."""

from __future__ import annotations

import torch

from partial_lora.methods.base import Method
from partial_lora.ratios import DerivedCounts


class FullFineTuning(Method):
    adapts_layers = False

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        return model.requires_grad_(True)
