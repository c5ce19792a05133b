"""AdaLoRA (PEFT): starts at ``init_r`` and prunes ranks while training, on a schedule as long as the run."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from partial_lora.methods.lora import PeftLora


class AdaLora(PeftLora):
    """PEFT's AdaLoRA, its warm-up and final phases set as fractions (``method.schedule``) of the run's steps,
    its rank reallocated after every step (:class:`AdaLoraBudget`)."""

    needs_total_steps = True

    def schedule(self, total_steps: int | None) -> dict[str, Any]:
        schedule = self.config.schedule
        return {"total_step": total_steps, "tinit": int(schedule.tinit * total_steps),
                "tfinal": int(schedule.tfinal * total_steps)}

    def peft_model(self, model: torch.nn.Module, total_steps: int | None) -> torch.nn.Module:
        model = super().peft_model(model, total_steps)
        # PEFT moves AdaLoRA's constant rank (``ranknum``) to the base layer's device; onto meta (a dry run), the
        # move re-wraps it as a new, trainable Parameter, where a run's stays frozen.
        for name, parameter in model.named_parameters():
            if ".ranknum." in name:
                parameter.requires_grad_(False)
        return model

    def callbacks(self) -> list[L.Callback]:
        return [*super().callbacks(), AdaLoraBudget()]

    def schedule_note(self, total_steps: int) -> str:
        """What the dry run, which counts before any step, says of the ranks that training prunes."""
        peft_config = self.config.peft_config
        return (f"{self.config.name} is counted at its initial rank {peft_config.init_r}; training prunes it to an "
                f"average rank of {peft_config.target_r} on a schedule as long as the run, whose step count the data "
                f"decides (this dry run assumed {total_steps} steps)")


class AdaLoraBudget(L.Callback):
    """AdaLoRA's rank reallocation after every optimiser step, while gradients are still there.

    Lightning zeroes gradients at the start of the next step, so the end of a training batch sits
    between ``optimizer.step()`` and ``zero_grad()`` as PEFT's ``update_and_allocate`` requires.

    The allocator's importance averages and the final rank pattern live outside the model's state dict,
    so they travel in the checkpoint as this callback's state: a resumed run allocates as an
    uninterrupted one would, and one resumed after its last step counts its pruned ranks as one would.
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
        # The rank pattern tells the parameter count that ranks were pruned. It is set at once: a fit resumed
        # after its last step never calls on_train_start, and a test of the best checkpoint loads its own.
        self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]
        self.restored = state  # the allocator's tensors go where the model will be: in on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is None:
            return
        allocator = self.adalora.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {name: value.to(pl_module.device) for name, value in self.restored[key].items()})
        self.restored = None
