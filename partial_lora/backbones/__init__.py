"""Pretrained backbones with a classification head, built from their config group."""

from __future__ import annotations

from omegaconf import DictConfig

from partial_lora.backbones.base import Backbone
from partial_lora.backbones.clip import build_clip_backbone
from partial_lora.backbones.text import build_text_backbone


def build_backbone(cfg: DictConfig, num_labels: int, class_names: list[str] | None = None,
                   shapes_only: bool = False) -> Backbone:
    """Text classifiers (transformers) or CLIP image classifiers (open_clip, head from ``class_names``).

    ``shapes_only``: the architecture on the meta device, without weights, tokenizer, class names or network
    (a dry run's parameter counts)."""
    if cfg.get("kind", "text") == "clip":
        return build_clip_backbone(cfg, class_names, num_labels, shapes_only)
    return build_text_backbone(cfg, num_labels, shapes_only)


__all__ = ["Backbone", "build_backbone"]
