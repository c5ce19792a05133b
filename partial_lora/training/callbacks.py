"""Callbacks that adapters need from the training loop."""

from __future__ import annotations

from typing import Any

import lightning as L


class AdaLoraBudget(L.Callback):
    """AdaLoRA's rank reallocation after every optimiser step, while gradients are still there.

    Lightning zeroes gradients at the start of the next step, so the end of a training batch sits
    between ``optimizer.step()`` and ``zero_grad()`` as PEFT's ``update_and_allocate`` requires.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.model.base_model.update_and_allocate(trainer.global_step)
