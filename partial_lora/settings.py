"""The door between Hydra and the core: a run's config mapped onto the core's plain settings and calls.

The core (targets, importance, ratios, masks, adapters) takes typed Python settings (``DerivationSettings``,
``MaskSettings``, PEFT configs) and never sees a ``DictConfig``; this module is the one place that reads a
run config for it. ``partial_lora.config`` checks the same config once, before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model

from partial_lora.adapters.losia import apply_losia
from partial_lora.adapters.partial import get_partial_lora_model, partial_config
from partial_lora.adapters.sparse_delta import apply_random_masking
from partial_lora.layers import in_head
from partial_lora.masks import NEEDS_DERIVATION
from partial_lora.ratios import DerivationSettings, DerivedCounts


def derives_counts(config: Mapping[str, Any]) -> bool:
    """Whether a run of ``config`` (a resolved dict or a DictConfig) derives per-layer counts before training."""
    mask = (config.get("method") or {}).get("mask")
    return isinstance(mask, Mapping) and mask.get("mode") in NEEDS_DERIVATION


def uses_rank_allocation(method: DictConfig) -> bool:
    """AdaLoRA-style methods: their schedule needs the run's total step count and a per-step callback."""
    return method.peft_config is not None and "total_step" in method.peft_config


def adapt(model: torch.nn.Module, cfg: DictConfig, total_steps: int | None = None,
          counts: DerivedCounts | None = None) -> torch.nn.Module:
    """Wrap ``model`` with the method's PEFT adapter (head trainable too), masked for masked methods (by
    :func:`get_partial_lora_model`, from ``counts`` where the mask mode needs them), a random sparse delta
    (``random_masking``), LoSiA's subnets (``losia``), or unfreeze it all for ``full_ft``.

    AdaLoRA's warm-up and final phases are configured as fractions of ``total_steps``.
    """
    method, head_modules = cfg.method, list(cfg.backbone.head_modules)
    if method.get("sparse_delta") or method.get("losia"):
        if method.get("sparse_delta"):
            apply_random_masking(model, cfg.backbone.target_modules, method.sparse_delta.trainable_fraction,
                                 cfg.seed)
        else:
            apply_losia(model, cfg.backbone.target_modules, method.losia.rank_factor, method.losia.beta, cfg.seed)
        for name, module in model.named_modules():
            if in_head(name, head_modules):
                module.requires_grad_(True)
        return model
    if method.peft_config is None:
        model.requires_grad_(True)
        return model
    schedule = {}
    if uses_rank_allocation(method):
        schedule = {"total_step": total_steps, "tinit": int(method.schedule.tinit * total_steps),
                    "tfinal": int(method.schedule.tfinal * total_steps)}
    # Plain Python values (not OmegaConf containers): PEFT writes the config to adapter_config.json.
    peft_config = instantiate(method.peft_config, modules_to_save=head_modules, _convert_="all", **schedule)
    if not method.get("mask"):
        return get_peft_model(model, peft_config)
    return get_partial_lora_model(model, partial_config(peft_config, counts=counts, compact=cfg.adapter.compact,
                                                        **mask_settings(cfg)))


def mask_settings(cfg: DictConfig) -> dict[str, Any]:
    """The masked method's mask settings (fields of ``MaskSettings`` but the counts and the execution)."""
    mask = cfg.method.mask
    return {"mode": mask.mode, "seed": cfg.seed, "temperature": mask.get("temperature", 1.0),
            "sparsity": mask.get("sparsity")}


def derivation_settings(cfg: DictConfig) -> tuple[DerivationSettings, dict[str, Any]]:
    """A masked run's derivation settings (``ratios``, ``importance``, ``backbone``) and the description of its
    backbone and data that names its cache entries (Figures 12-15 and 17 group caches by it)."""
    ratios = cfg.ratios
    settings = DerivationSettings(
        target_modules=cfg.backbone.target_modules, importance=cfg.importance.name, threshold=ratios.threshold,
        rule=ratios.rule, max_loss_increase=ratios.max_loss_increase, search=ratios.search, step=ratios.step,
        top_k=cfg.importance.get("top_k"), flow=cfg.importance.flow, head_modules=tuple(cfg.backbone.head_modules),
        probe_head_steps=0 if cfg.backbone.get("zero_shot_head") else ratios.probe_head_steps,
        probe="in_sample" if cfg.backbone.get("zero_shot_head") else ratios.probe, scope=ratios.scope,
        blocks=cfg.backbone.get("blocks") if ratios.replay_prefix else None, progress=ratios.progress)
    source = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True) | {"name_or_path": cfg.backbone.name},
              "dataset": cfg.dataset.name, "data_seed": cfg.data_seed}
    if settings.probe_head_steps:
        # The probe starts from the run's randomly initialised head, so the counts depend on the seed (MiniLM,
        # MRPC, SVD: 1.02% of the adapter kept at seed 0, 0.88% at seed 100). A zero-shot head is the same for all.
        source["seed"] = cfg.seed
    return settings, source
