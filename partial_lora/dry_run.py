"""``dry_run=true``: what a run would train, counted in seconds from shapes alone.

The adapted model is built on the meta device (``build_backbone(..., shapes_only=True)``): no weights, no
tokenizer, no data and no network, so LLaMA-2-7B is counted, not allocated. What only the data decides is
said, not guessed: a masked method's kept rows and columns come from a matching ratio cache when one exists,
and AdaLoRA's schedule, whose length is the run's step count, is built on an assumed one.
"""

from __future__ import annotations

from omegaconf import DictConfig

from partial_lora.adapters import count_parameters
from partial_lora.backbones import build_backbone
from partial_lora.config import validate, validate_max_length
from partial_lora.settings import method_of, yaml_terms


def dry_run(cfg: DictConfig) -> None:
    """Check ``cfg`` and print the adapter's and the head's trainable parameter counts (the adapter's before and
    after masking)."""
    validate(cfg)
    backbone = build_backbone(cfg.backbone, cfg.dataset.num_labels, shapes_only=True)
    method = method_of(cfg)
    with yaml_terms():  # the core's checks of what it is given, about the keys this run set
        method.validate_model(backbone.model)  # what a run refuses, a dry run refuses too
        validate_max_length(cfg, backbone.model)
        total_steps = None
        if method.needs_total_steps:
            # Steps per epoch follow from the training split's size; no count at the start depends on them.
            total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else cfg.train.epochs
        model = method.adapt_shapes(backbone.model, total_steps)
        counts = count_parameters(model, backbone.head_modules)
        lines = method.dry_run_lines(model, counts, backbone.head_modules)
    for line in lines:
        print(line)
    print(f"classifier head parameters: {counts.head:,}")
    if total_steps is not None:
        print(method.schedule_note(total_steps))
