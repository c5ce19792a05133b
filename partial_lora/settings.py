"""The door between Hydra and the core: a run's config mapped onto the core's plain settings and calls.

The core (targets, importance, ratios, masks, adapters) takes typed Python settings (``DerivationSettings``,
``MaskSettings``, PEFT configs) and never sees a ``DictConfig``; this module is the one place that reads a
run config for it. ``partial_lora.config`` checks the same config once, before anything loads. The core names a
bad setting as its caller wrote it (``SettingError``: ``DerivationSettings.search``); :func:`yaml_terms` names it
by the key a run sets instead (``ratios.search``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from partial_lora.errors import ConfigError, SettingError
from partial_lora.masks import NEEDS_DERIVATION
from partial_lora.methods.base import Method
from partial_lora.ratios import DerivationSettings, DerivedCounts


# The run config key of every (owner, setting) that the core's SettingError can name: each setting the core checks
# is read from one of these keys here (tests/test_validation.py checks that none is missing).
YAML_KEYS: dict[tuple[str, str], str] = {
    ("DerivationSettings", "importance"): "importance.name",
    ("DerivationSettings", "flow"): "importance.flow",
    ("DerivationSettings", "search"): "ratios.search",
    ("DerivationSettings", "step"): "ratios.step",
    ("DerivationSettings", "probe"): "ratios.probe",
    ("DerivationSettings", "scope"): "ratios.scope",
    ("DerivationSettings", "rule"): "ratios.rule",
    ("DerivationSettings", "threshold"): "ratios.threshold",
    ("DerivationSettings", "max_loss_increase"): "ratios.max_loss_increase",
    ("AcceptanceRule", "name"): "ratios.rule",
    ("AcceptanceRule", "tau"): "ratios.threshold",
    ("AcceptanceRule", "max_loss_increase"): "ratios.max_loss_increase",
    ("largest_removable", "search"): "ratios.search",
    ("largest_removable", "step"): "ratios.step",
    ("search_counts", "scope"): "ratios.scope",
    ("compute_importance", "measure"): "importance.name",
    ("preserve_flow", "flow"): "importance.flow",
    ("MaskSettings", "mode"): "method.mask.mode",
    ("MaskSettings", "temperature"): "method.mask.temperature",
    ("MaskSettings", "sparsity"): "method.mask.sparsity",
    ("MaskSettings", "compact"): "adapter.compact",
    ("apply_losia", "rank_factor"): "method.losia.rank_factor",
    ("apply_losia", "beta"): "method.losia.beta",
    ("apply_random_masking", "trainable_fraction"): "method.sparse_delta.trainable_fraction",
    ("targeted_linears", "target_modules"): "backbone.target_modules",
}


@contextmanager
def yaml_terms() -> Iterator[None]:
    """Around the harness's calls into the core: a :class:`SettingError` becomes a ``ConfigError`` with the same
    sentence about the run config's key, which is what a run's user set (``ratios.search must be one of ...``)."""
    try:
        yield
    except SettingError as error:
        raise ConfigError(error.naming(YAML_KEYS[error.owner, error.setting])) from error


def derives_counts(config: Mapping[str, Any]) -> bool:
    """Whether a run of ``config`` (a resolved dict or a DictConfig) derives per-layer counts before training."""
    mask = (config.get("method") or {}).get("mask")
    return isinstance(mask, Mapping) and mask.get("mode") in NEEDS_DERIVATION


def method_of(cfg: DictConfig) -> Method:
    """The method object of a run config: ``method.plugin`` names its class (``conf/method/*.yaml``)."""
    plugin = cfg.method.get("plugin")
    module, _, name = plugin.rpartition(".") if isinstance(plugin, str) else ("", "", "")
    try:
        kind = getattr(import_module(module), name, None)
    except (ImportError, ValueError):  # ValueError: an empty module name (no dot in the plugin)
        kind = None
    if not (isinstance(kind, type) and issubclass(kind, Method)):
        raise ConfigError(f"method.plugin must name a method class (a partial_lora.methods.base.Method), got "
                          f"{plugin!r}.")
    return kind(cfg)


def adapt(model: torch.nn.Module, cfg: DictConfig, total_steps: int | None = None,
          counts: DerivedCounts | None = None) -> torch.nn.Module:
    """``model`` as the run's method trains it (:meth:`Method.adapt`); ``total_steps`` sets AdaLoRA's schedule,
    ``counts`` a masked method's masks where its mode reads them."""
    with yaml_terms():
        return method_of(cfg).adapt(model, total_steps, counts)


def mask_settings(cfg: DictConfig) -> dict[str, Any]:
    """The masked method's mask settings (fields of ``MaskSettings`` but the counts and the execution)."""
    mask = cfg.method.mask
    return {"mode": mask.mode, "seed": cfg.seed, "temperature": mask.get("temperature", 1.0),
            "sparsity": mask.get("sparsity")}


def derivation_settings(cfg: DictConfig) -> tuple[DerivationSettings, dict[str, Any]]:
    """A masked run's derivation settings (``ratios``, ``importance``, ``backbone``) and the description of its
    backbone and data that names its cache entries (Figures 12-15 and 17 group caches by it)."""
    ratios = cfg.ratios
    with yaml_terms():
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
