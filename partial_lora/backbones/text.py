"""Text classifiers from transformers: MiniLM (offline default), DeBERTa-v3, LLaMA-2, tiny test models."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from partial_lora.backbones.base import Backbone

# A fresh classification head is expected here; transformers' per-weight load report is noise in run logs.
transformers_logging.set_verbosity_error()


def build_text_backbone(cfg: DictConfig, num_labels: int) -> Backbone:
    """Load ``cfg.name_or_path`` with pretrained weights, or build its architecture randomly initialised.

    ``pretrained=false`` keeps the real (or overridden, for tests) shapes without any weight file, which
    is how paper-scale backbones are exercised on machines that cannot download them: the shapes come
    from ``cfg.architecture`` (a transformers config written out) when given, else from the model's
    own config file. Build under ``torch.device("meta")`` to count a 7B model without allocating it.
    """
    overrides = OmegaConf.to_container(cfg.config_overrides, resolve=True) if cfg.config_overrides else {}
    architecture = cfg.get("architecture")
    if not cfg.pretrained and architecture:
        spec = OmegaConf.to_container(architecture, resolve=True)
        model_config = AutoConfig.for_model(spec.pop("model_type"), num_labels=num_labels, **(spec | overrides))
    else:
        model_config = AutoConfig.from_pretrained(cfg.name_or_path, num_labels=num_labels, **overrides)
    dtype = getattr(torch, cfg.dtype) if cfg.get("dtype") else None
    if cfg.pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, config=model_config,
                                                                   dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_config(model_config, dtype=dtype)
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    tokenizer = AutoTokenizer.from_pretrained(cfg.get("tokenizer") or cfg.name_or_path)
    if model.config.pad_token_id is None:
        # Decoder-only models (LLaMA) have no pad token; the classifier needs one to find the last token.
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(model=model, tokenizer=tokenizer, head_modules=list(cfg.head_modules))
