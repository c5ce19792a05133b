"""Random element masking (Xu & Zhang, 2024; the paper's "Masking" baseline): a fixed random share of the
pretrained entries trains directly (the layers: ``partial_lora.adapters.sparse_delta``)."""

from __future__ import annotations

import torch

from partial_lora.adapters.sparse_delta import apply_random_masking
from partial_lora.config import share
from partial_lora.methods.base import Method, train_head
from partial_lora.ratios import DerivedCounts


class RandomMasking(Method):
    """A random sparse delta of ``method.sparse_delta.trainable_fraction`` of the model on its targeted layers."""

    settings = (("method.sparse_delta.trainable_fraction", share(True, False), "a number in (0, 1]"),)

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        apply_random_masking(model, self.cfg.backbone.target_modules, self.config.sparse_delta.trainable_fraction,
                             self.cfg.seed)
        return train_head(model, self.cfg.backbone.head_modules)
