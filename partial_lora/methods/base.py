"""The interface every method implements (``method.plugin`` of ``conf/method/*.yaml`` names the class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from partial_lora.adapters import ParameterCounts
from partial_lora.errors import ConfigError
from partial_lora.layers import in_head
from partial_lora.ratios import DerivedCounts

# A setting a method reads: (dotted key, accepts, description); ``partial_lora.config.validate`` checks it.
Setting = tuple[str, Callable[[object], bool], str]


class Method:
    """A fine-tuning method of a run config ``cfg``: the model it trains, its optimiser and its callbacks.

    Subclasses set the class attributes that differ and override :meth:`adapt`.
    """

    settings: tuple[Setting, ...] = ()  # its own keys, checked with the run's (an absent key is skipped)
    adapts_layers = True  # trains something in backbone.target_modules
    peft_adapter = False  # PEFT tuner layers: CoTo switches them, and the run saves them as an adapter file
    # Its schedule is set from the run's step count (AdaLoRA's); such a method's ``schedule_note(total_steps)`` says
    # what the dry run, which counts before any step, leaves out.
    needs_total_steps = False

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.config = cfg, cfg.method

    @property
    def derives_counts(self) -> bool:
        """Whether per-layer counts are derived on the backbone before :meth:`adapt` (SPEC 4)."""
        return False

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def validate(self) -> None:
        """Refuse, with one sentence, a config this method cannot run (beyond :attr:`settings`)."""

    def validate_model(self, model: torch.nn.Module) -> None:
        """Refuse what the built backbone's shapes rule out (they are not in the config); called before the
        training data is read, counts derived or a step trained."""

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        """``model`` made ready to train: frozen but for what the method trains and the classifier head."""
        raise NotImplementedError

    def adapt_shapes(self, model: torch.nn.Module, total_steps: int | None) -> torch.nn.Module:
        """What :meth:`adapt` makes of a meta-device ``model`` for the dry run (no derived counts)."""
        return self.adapt(model, total_steps)

    def optimizer(self) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
        return instantiate(self.config.optimizer)

    def callbacks(self) -> list[L.Callback]:
        """Its training callbacks, in order (methods with their own schedule name one in ``method.callback``)."""
        return [instantiate(self.config.callback)] if self.config.get("callback") else []

    def mask_summary(self, model: torch.nn.Module, derived: DerivedCounts | None) -> dict[str, Any] | None:
        """The run record's ``masks``: what masks keep, for masked methods."""
        return None

    def dry_run_lines(self, model: torch.nn.Module, counts: ParameterCounts, head_modules: list[str]) -> list[str]:
        """The dry run's adapter lines for ``model`` from :meth:`adapt_shapes` (``counts``: its trainables)."""
        return [f"trainable adapter parameters: {counts.adapter:,}"]


def train_head(model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
    """Unfreeze the classifier head of ``model`` (methods outside PEFT, whose ``modules_to_save`` does it)."""
    for name, module in model.named_modules():
        if in_head(name, head_modules):
            module.requires_grad_(True)
    return model
