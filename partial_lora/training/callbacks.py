"""Callbacks that adapters and reliable runs need from the training loop."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from partial_lora.errors import TrainingDiverged


class AdaLoraBudget(L.Callback):
    """AdaLoRA's rank reallocation after every optimiser step, while gradients are still there.

    Lightning zeroes gradients at the start of the next step, so the end of a training batch sits
    between ``optimizer.step()`` and ``zero_grad()`` as PEFT's ``update_and_allocate`` requires.

    The allocator's importance averages and the final rank pattern live outside the model's state dict,
    so they travel in the checkpoint as this callback's state: a resumed run allocates as an
    uninterrupted one would.
    """

    def __init__(self) -> None:
        self.adalora: Any = None
        self.restored: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.adalora = pl_module.model.base_model

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.adalora.update_and_allocate(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        allocator = self.adalora.rankallocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = state  # the checkpoint is read before training starts: applied in on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is None:
            return
        allocator = self.adalora.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {name: value.to(pl_module.device) for name, value in self.restored[key].items()})
        self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern = self.restored["rank_pattern"]
        self.restored = None


class FiniteLoss(L.Callback):
    """Stop at the first NaN or infinite training loss, before it reaches the weights.

    Lightning's ``EarlyStopping(check_finite=True)`` only looks at epoch ends and stops quietly; a run
    record must say that, and at which step, the run failed.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss).all())
        # Under DDP every process stops at the same step, whichever saw the non-finite loss.
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            became = "became non-finite in another process" if finite else f"became {loss.item()}"
            raise TrainingDiverged(f"the training loss {became} at step {trainer.global_step}; "
                                   "a smaller lr usually avoids it.", step=trainer.global_step)


class RngState(L.Callback):
    """Save the global random generators in every checkpoint and restore them on resume.

    Lightning checkpoints hold model, optimiser, scheduler and loop state but not the generators that
    draw dropout and the next epoch's shuffling, so without this a resumed run takes a different path
    from an uninterrupted one. Stored as tensors and lists so the checkpoint loads with ``weights_only``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
