"""PEFT's adapters as they are: LoRA, DoRA, LoRA+ (its optimiser), VeRA, any ``method.peft_config._target_``."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from peft import PeftConfig, get_peft_model

from omegaconf import OmegaConf

from partial_lora.adapters.targets import targeted_linears
from partial_lora.methods.base import Method
from partial_lora.ratios import DerivedCounts

LOW_RANK_CONFIGS = ("peft.LoraConfig", "peft.AdaLoraConfig")  # the adapters with low-rank factors (and masks)


class PeftLora(Method):
    """The PEFT adapter of ``method.peft_config``, with the classifier head trainable too."""

    peft_adapter = True
    reads_mask = False  # row / column masks (``method.mask``) on its low-rank factors: see ``methods.masked``

    def validate(self) -> None:
        config = self.config
        self.require(config.peft_config is not None,
                     f"method {config.name} trains the PEFT adapter of method.peft_config, which is null: set it, or "
                     "pick method=full_ft to train every weight.")
        if config.get("mask"):
            self.require(config.peft_config._target_ in LOW_RANK_CONFIGS,
                         f"method {config.name} puts row/column masks on low-rank factors, which only LoRA and "
                         "AdaLoRA adapters have (peft.LoraConfig or peft.AdaLoraConfig).")
            self.require(self.reads_mask, f"method {config.name} sets method.mask, which its plugin {config.plugin} "
                                          "does not read: pick a masked method (partial_lora, balanced, ...) or set "
                                          "method.plugin=partial_lora.methods.masked.MaskedLora.")

    def validate_model(self, model: torch.nn.Module) -> None:
        """A low-rank adapter's rank is at most the smaller side of every layer it adapts: a larger rank trains
        more parameters than the layer has."""
        peft = self.config.peft_config
        if peft._target_ not in LOW_RANK_CONFIGS:
            return
        sides = {name: min(layer.in_features, layer.out_features)
                 for name, layer in targeted_linears(model, self.cfg.backbone.target_modules).items()}
        smallest = min(sides, key=sides.get)
        layer = model.get_submodule(smallest)
        for key in ("r", "init_r", "target_r"):
            rank = peft.get(key)
            if rank is None:
                continue
            setting = "rank" if OmegaConf.is_interpolation(peft, key) else f"method.peft_config.{key}"
            self.require(rank <= sides[smallest],
                         f"{setting}={rank} is larger than the smallest layer it adapts, {smallest} "
                         f"({layer.out_features} x {layer.in_features}): choose {setting} <= {sides[smallest]}.")

    def schedule(self, total_steps: int | None) -> dict[str, Any]:
        """PEFT config settings that follow from the run's step count."""
        return {}

    def peft_config(self, total_steps: int | None) -> PeftConfig:
        # Plain Python values (not OmegaConf containers): PEFT writes the config to adapter_config.json.
        return instantiate(self.config.peft_config, modules_to_save=list(self.cfg.backbone.head_modules),
                           _convert_="all", **self.schedule(total_steps))

    def peft_model(self, model: torch.nn.Module, total_steps: int | None) -> torch.nn.Module:
        return get_peft_model(model, self.peft_config(total_steps))

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        return self.peft_model(model, total_steps)
