"""Build the trainable model of a method from its config.

A method's config holds an instantiable PEFT config (``peft_config``) or ``null`` for full fine-tuning.
The classifier head (``head_modules`` of the backbone) is trained by every method and counted apart:
the paper's parameter counts are adapters only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model

from partial_lora.adapters.losia import apply_losia
from partial_lora.adapters.compact import COL_MASK, ROW_MASK
from partial_lora.adapters.masked import factor, lora_layers
from partial_lora.adapters.partial import get_partial_lora_model, partial_config
from partial_lora.adapters.sparse_delta import apply_random_masking
from partial_lora.adapters.targets import ADAPTER
from partial_lora.backbones.base import in_head
from partial_lora.masks import LayerMask

if TYPE_CHECKING:  # the derivation package builds on the adapters
    from partial_lora.ratios import DerivationSettings, DerivedCounts


@dataclass(frozen=True)
class ParameterCounts:
    adapter: int  # the paper's count: masked-out entries of masked adapters excluded
    head: int
    unmasked_adapter: int  # the same adapter without masks, e.g. dense LoRA at the same rank and layers

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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
    from partial_lora.ratios import DerivationSettings  # the derivation package builds on the adapters

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


def _alive_rank(model: torch.nn.Module, layer: torch.nn.Module) -> int:
    """Rank a layer still uses. Once AdaLoRA has allocated its budget (a rank pattern exists), pruned
    triplets are those whose singular value it zeroed: counting non-zero ``lora_E`` entries describes the
    weights at hand, e.g. a checkpoint from before the final allocation, not just the last step."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if hasattr(layer, "lora_E") and getattr(config, "rank_pattern", None):
        return int(torch.count_nonzero(layer.lora_E[ADAPTER]))
    return layer.r[ADAPTER]


def count_parameters(model: torch.nn.Module, head_modules: list[str],
                     masks: dict[str, LayerMask] | None = None) -> ParameterCounts:
    """Trainable parameters, split into adapter (everything outside the head) and classifier head.

    Low-rank factors are counted by formula: ``rank * (kept rows + kept columns)`` per layer (SPEC 1),
    plus AdaLoRA's singular values, with the rank AdaLoRA has left after pruning. Every other trainable
    tensor (DoRA magnitudes, VeRA scalings, sparse deltas, LoSiA's subnet deltas, full fine-tuning) counts
    whole. A layer's kept rows and columns are its masks', or those of ``masks`` where given: masks not
    applied to ``model`` (a dry run counts a meta-device model, whose buffers hold no values).
    """
    adapter = unmasked = 0
    counted_by_formula = set()
    for name, layer in lora_layers(model).items():
        rank = _alive_rank(model, layer)
        mask = (masks or {}).get(name)
        if mask is None and hasattr(layer, ROW_MASK):
            mask = LayerMask(getattr(layer, ROW_MASK), getattr(layer, COL_MASK))
        rows = layer.out_features if mask is None else int(mask.row.sum())
        cols = layer.in_features if mask is None else int(mask.col.sum())
        singular_values = rank if hasattr(layer, "lora_E") else 0
        adapter += rank * (rows + cols) + singular_values
        unmasked += rank * (layer.out_features + layer.in_features) + singular_values
        counted_by_formula |= {id(factor(layer, "lora_A")), id(factor(layer, "lora_B"))}
        if hasattr(layer, "lora_E"):
            counted_by_formula.add(id(layer.lora_E[ADAPTER]))
    head = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in counted_by_formula:
            continue
        if in_head(name, head_modules):
            head += parameter.numel()
        else:
            adapter += parameter.numel()
            unmasked += parameter.numel()
    return ParameterCounts(adapter=adapter, head=head, unmasked_adapter=unmasked)
