"""Pretrained backbones with a classification head, built from their config group."""

from partial_lora.backbones.text import Backbone, build_backbone

__all__ = ["Backbone", "build_backbone"]
