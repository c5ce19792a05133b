"""Text classifiers from transformers: MiniLM (offline default), DeBERTa-v3, LLaMA-2, tiny test models."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from partial_lora.backbones.base import Backbone, fetching
from partial_lora.errors import ConfigError

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
    elif cfg.pretrained:
        with fetching(f"the pretrained weights of {cfg.name_or_path}", _WITHOUT_WEIGHTS):
            model = AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, config=model_config,
                                                                       dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_config(model_config, dtype=dtype)
    if cfg.get("pooling", "model") == "mean":
        use_mean_pooling(model, cfg.get("pooler"))
    elif cfg.get("pooling", "model") != "model":
        raise ConfigError(f"backbone.pooling must be 'model' (the model's own head input) or 'mean', "
                          f"got {cfg.pooling!r}.")
    if shapes_only:
        return Backbone(model=model, tokenizer=None, head_modules=list(cfg.head_modules))
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


class MaskedMeanPooler(torch.nn.Module):
    """The mean of the token states under the attention mask, in place of a model's ``[CLS]`` pooler.

    Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to summarise a text by mean
    pooling; their ``[CLS]`` pooler was never trained for it, and reading it through a frozen pooler left
    LoRA at the majority class on MRPC. transformers' poolers are called with the hidden states alone, so
    the mask is handed over by a pre-hook on the whole model (:func:`use_mean_pooling`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return hidden_states.mean(dim=1)
        weights = self.attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def use_mean_pooling(model: torch.nn.Module, pooler_path: str | None) -> None:
    """Replace the submodule at ``pooler_path`` (e.g. ``bert.pooler``) by :class:`MaskedMeanPooler`."""
    if not pooler_path:
        raise ConfigError("backbone.pooling=mean replaces the model's pooler: set backbone.pooler to its dotted "
                          "path (e.g. bert.pooler).")
    parent_path, _, attribute = pooler_path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
        getattr(parent, attribute)
    except AttributeError:
        raise ConfigError(f"backbone.pooler={pooler_path!r} names no module of this model.") from None
    pooler = MaskedMeanPooler()
    setattr(parent, attribute, pooler)

    def hand_over_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.attention_mask = kwargs.get("attention_mask")

    model.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
