"""Text classifiers from transformers: MiniLM (offline default), DeBERTa-v3, LLaMA-2, tiny test models."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from partial_lora.backbones.base import Backbone, fetching

# A fresh classification head is expected here; transformers' per-weight load report is noise in run logs.
transformers_logging.set_verbosity_error()
_WITHOUT_WEIGHTS = ("set backbone.pretrained=false (the same architecture, random weights) or point "
                    "backbone.name_or_path at a local copy")


def build_text_backbone(cfg: DictConfig, num_labels: int, shapes_only: bool = False) -> Backbone:
    """Load ``cfg.name_or_path`` with pretrained weights, or build its architecture randomly initialised.

    ``pretrained=false`` keeps the real (or overridden, for tests) shapes without any weight file, which
    is how paper-scale backbones are exercised on machines that cannot download them: the shapes come
    from ``cfg.architecture`` (a transformers config written out) when given, else from the model's
    own config file. ``shapes_only`` (a dry run) builds those shapes on the meta device, with no weights
    and no tokenizer: a 7B model is counted, not allocated.
    """
    overrides = OmegaConf.to_container(cfg.config_overrides, resolve=True) if cfg.config_overrides else {}
    architecture = cfg.get("architecture")
    if architecture and (shapes_only or not cfg.pretrained):
        spec = OmegaConf.to_container(architecture, resolve=True)
        model_config = AutoConfig.for_model(spec.pop("model_type"), num_labels=num_labels, **(spec | overrides))
    else:  # with an architecture written out, only pretrained weights send us to the hub
        remedy = _WITHOUT_WEIGHTS if architecture else ("write its config.json out as backbone.architecture or point "
                                                        "backbone.name_or_path at a local copy")
        with fetching(f"the config of {cfg.name_or_path}", remedy):
            model_config = AutoConfig.from_pretrained(cfg.name_or_path, num_labels=num_labels, **overrides)
    dtype = getattr(torch, cfg.dtype) if cfg.get("dtype") else None
    if shapes_only:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(model_config, dtype=dtype)
        return Backbone(model=model, tokenizer=None, head_modules=list(cfg.head_modules))
    if cfg.pretrained:
        with fetching(f"the pretrained weights of {cfg.name_or_path}", _WITHOUT_WEIGHTS):
            model = AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, config=model_config,
                                                                       dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_config(model_config, dtype=dtype)
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    tokenizer_path = cfg.get("tokenizer") or cfg.name_or_path
    with fetching(f"the tokenizer {tokenizer_path}", "set backbone.tokenizer to a local tokenizer folder"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if model.config.pad_token_id is None:
        # Decoder-only models (LLaMA) have no pad token; the classifier needs one to find the last token.
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(model=model, tokenizer=tokenizer, head_modules=list(cfg.head_modules))
