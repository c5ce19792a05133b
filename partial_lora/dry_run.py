"""``dry_run=true``: what a run would train, counted in seconds from shapes alone.

The adapted model is built on the meta device (``build_backbone(..., shapes_only=True)``): no weights, no
tokenizer, no data and no network, so LLaMA-2-7B is counted, not allocated. What only the data decides is
said, not guessed: a masked method's kept rows and columns come from a matching ratio cache when one exists,
and AdaLoRA's schedule, whose length is the run's step count, is built on an assumed one.
"""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from partial_lora.adapters import count_parameters
from partial_lora.adapters.masked import base_weights
from partial_lora.backbones import build_backbone
from partial_lora.config import validate, validate_max_length, validate_rank
from partial_lora.masks import NEEDS_DERIVATION, make_masks
from partial_lora.ratios import RatioCache, derivation_inputs
from partial_lora.settings import adapt, derivation_settings, mask_settings, uses_rank_allocation


def dry_run(cfg: DictConfig) -> None:
    """Check ``cfg`` and print the adapter's and the head's trainable parameter counts (the adapter's before and
    after masking)."""
    validate(cfg)
    backbone = build_backbone(cfg.backbone, cfg.dataset.num_labels, shapes_only=True)
    validate_rank(cfg, backbone.model)  # what a run refuses, a dry run refuses too
    validate_max_length(cfg, backbone.model)
    total_steps = None
    if uses_rank_allocation(cfg.method):
        # Steps per epoch follow from the training split's size; no count at the start depends on them.
        total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else cfg.train.epochs
    unmasked = cfg.copy()  # the masks are drawn below from shapes alone (a meta-device model holds no values)
    with open_dict(unmasked):
        unmasked.method.mask = None
    model = adapt(backbone.model, unmasked, total_steps)
    # PEFT moves AdaLoRA's constant rank (``ranknum``) to the base layer's device; onto meta, the move re-wraps it
    # as a new, trainable Parameter, where a run's stays frozen.
    for name, parameter in model.named_parameters():
        if ".ranknum." in name:
            parameter.requires_grad_(False)
    counts = count_parameters(model, backbone.head_modules)
    if not cfg.method.get("mask"):
        print(f"trainable adapter parameters: {counts.adapter:,}")
    else:
        shapes = {name: tuple(weight.shape) for name, weight in base_weights(model).items()}
        if cfg.method.mask.mode not in NEEDS_DERIVATION:
            masked = count_parameters(model, backbone.head_modules, make_masks(shapes=shapes, **mask_settings(cfg)))
            print(f"trainable adapter parameters: {masked.adapter:,} (masks of seed {cfg.seed})")
        else:
            entries = RatioCache(cfg.ratios.cache_dir).load_any(derivation_inputs(*derivation_settings(cfg)), shapes)
            for derived in entries:
                masks = make_masks(shapes=shapes, counts=derived, **mask_settings(cfg))
                masked = count_parameters(model, backbone.head_modules, masks)
                print(f"trainable adapter parameters: {masked.adapter:,} (masks of seed {cfg.seed}, ratios cached in "
                      f"{derived.path})")
            if not entries:
                print(f"trainable adapter parameters: decided by the ratio derivation on the data (importance "
                      f"{cfg.importance.name}, no matching cache in {cfg.ratios.cache_dir} yet)")
        print(f"the unmasked adapter would train: {counts.unmasked_adapter:,}")
    print(f"classifier head parameters: {counts.head:,}")
    if total_steps is not None:
        peft_config = cfg.method.peft_config
        print(f"{cfg.method.name} is counted at its initial rank {peft_config.init_r}; training prunes it to an "
              f"average rank of {peft_config.target_r} on a schedule as long as the run, whose step count the data "
              f"decides (this dry run assumed {total_steps} steps)")
