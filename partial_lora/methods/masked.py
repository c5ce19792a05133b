"""Partial-LoRA and its mask modes (SPEC 2): PEFT's LoRA or AdaLoRA with row / column masks on the factors,
kept counts derived from the pretrained model (Algorithm 1) where the mode reads them."""

from __future__ import annotations

from typing import Any

import torch

from partial_lora.adapters import (ParameterCounts, count_parameters, get_partial_lora_model, kept_fractions,
                                   partial_config)
from partial_lora.adapters.masked import base_weights
from partial_lora.config import positive, share
from partial_lora.masks import NEEDS_DERIVATION, make_masks
from partial_lora.methods.adalora import AdaLora
from partial_lora.methods.lora import PeftLora
from partial_lora.ratios import DerivedCounts, RatioCache, derivation_inputs
from partial_lora.settings import derivation_settings, derives_counts, mask_settings


class MaskedLora(PeftLora):
    """LoRA masked per ``method.mask`` (``mode`` and its settings); with ``mask: null``, plain LoRA."""

    settings = (("method.mask.temperature", positive, "a number > 0"),
                ("method.mask.sparsity", share(False, False), "a number in [0, 1] (1: every row and column masked)"))

    reads_mask = True

    @property
    def derives_counts(self) -> bool:
        return derives_counts(self.cfg)

    def validate(self) -> None:
        super().validate()
        self.require(not self.derives_counts or self.cfg.importance.name != "none",
                     f"method={self.config.name} derives its masks from importance scores, which importance=none "
                     "does not give: set importance=svd (the default), snip or imp.")

    def adapt(self, model: torch.nn.Module, total_steps: int | None = None,
              counts: DerivedCounts | None = None) -> torch.nn.Module:
        """Masks from ``counts`` where the mode reads them (:attr:`derives_counts`), from the seed otherwise."""
        if not self.config.get("mask"):
            return super().adapt(model, total_steps, counts)
        return get_partial_lora_model(model, partial_config(self.peft_config(total_steps), counts=counts,
                                                            compact=self.cfg.adapter.compact,
                                                            **mask_settings(self.cfg)))

    def adapt_shapes(self, model: torch.nn.Module, total_steps: int | None) -> torch.nn.Module:
        # Unmasked: the dry run draws the masks from shapes alone (a meta-device model holds no values).
        return self.peft_model(model, total_steps)

    def mask_summary(self, model: torch.nn.Module, derived: DerivedCounts | None) -> dict[str, Any] | None:
        if not self.config.get("mask"):
            return None
        summary = {"mode": self.config.mask.mode, "kept_fraction": kept_fractions(model)}
        if derived is not None:
            # derived_fraction: what the counts keep of the adapter's rows and columns (Balanced matches it, claim C4).
            summary |= {"cache_hit": derived.cache_hit, "evaluations": derived.evaluations,
                        "wall_time_s": derived.wall_time_s, "baseline_accuracy": derived.baseline_accuracy,
                        "majority_rate": derived.majority_rate, "warnings": derived.warnings,
                        "cache_file": str(derived.path), "derived_fraction": derived.kept_fraction}
        return summary

    def dry_run_lines(self, model: torch.nn.Module, counts: ParameterCounts, head_modules: list[str]) -> list[str]:
        """The masked counts where masks follow from the seed or a matching ratio cache, and the unmasked one."""
        if not self.config.get("mask"):
            return super().dry_run_lines(model, counts, head_modules)
        cfg = self.cfg
        shapes = {name: tuple(weight.shape) for name, weight in base_weights(model).items()}
        lines = []
        if not self.derives_counts:
            masked = count_parameters(model, head_modules, make_masks(shapes=shapes, **mask_settings(cfg)))
            lines.append(f"trainable adapter parameters: {masked.adapter:,} (masks of seed {cfg.seed})")
        else:
            entries = RatioCache(cfg.ratios.cache_dir).load_any(derivation_inputs(*derivation_settings(cfg)), shapes)
            for derived in entries:
                masks = make_masks(shapes=shapes, counts=derived, **mask_settings(cfg))
                masked = count_parameters(model, head_modules, masks)
                lines.append(f"trainable adapter parameters: {masked.adapter:,} (masks of seed {cfg.seed}, ratios "
                             f"cached in {derived.path})")
            if not entries:
                lines.append(f"trainable adapter parameters: decided by the ratio derivation on the data (importance "
                             f"{cfg.importance.name}, no matching cache in {cfg.ratios.cache_dir} yet)")
        return [*lines, f"the unmasked adapter would train: {counts.unmasked_adapter:,}"]


class PartialAdaLora(MaskedLora, AdaLora):
    """AdaLoRA whose P (rows of B) and Q (columns of A) carry the masks; its schedule and callback are AdaLoRA's."""
