"""One run's place in the results store: its record, its lock and its resumable checkpoints.

A run is identified by :func:`config_hash` of its resolved config, so relaunching a sweep finds
what each run left behind:

- a record in ``results_dir`` (finished or failed): the run is skipped; delete the record to run it again;
- checkpoints in ``<checkpoint.dir>/<run_id>/``: training resumes from ``last.ckpt``;
- nothing: the run starts from scratch.

A file in ``results_dir`` that is not a valid record (truncated, foreign JSON) is reported and skipped: it
never stops a launch, and a run it was meant to record is trained again and its record written anew.

Concurrent launches of one run (two sweeps sharing a store) are serialised by an advisory
``fcntl.flock`` on ``<results_dir>/.locks/<run_id>.lock``, beside the record it guards, so launches that
would write the same record exclude each other whatever their checkpoint folders. The kernel drops the
lock when its holder dies, SIGKILL included, so no stale lock outlives a crash, and the loser skips the
run instead of training it twice. The record is looked up only after the lock is held and written before
it is released, so a run is trained once however launches interleave. ``flock`` is advisory and per host
unless the filesystem forwards it (Linux NFS clients map it onto NFS byte-range locks).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partial_lora.config import is_int, is_number
from partial_lora.files import LOCKS, file_lock, valid_files
from partial_lora.results.record import config_hash

LAST_CHECKPOINT = "last.ckpt"
STATUSES = ("finished", "failed")


TEXT = (lambda value: isinstance(value, str), "a string")
NUMBER = (is_number, "a finite number")  # json reads NaN and Infinity, which would enter every mean
OBJECT = (lambda value: value is None or isinstance(value, dict), "an object or null")
# What the code reads from a finished record beside its config (aggregation, claims, tables, figures), and what
# each must be; the optional fields last.
FINISHED_FIELDS = {"backbone": TEXT, "dataset": TEXT, "method": TEXT, "seed": (is_int, "an integer"),
                   "rank": (lambda value: value is None or is_int(value), "an integer or null"), "lr": NUMBER,
                   "best_val": NUMBER, "test": NUMBER}
# What a fit cost (``training.TrainingCost``, the adapter file's size), recorded since the leaderboard: older
# records lack them. ``None`` where there is nothing to measure: no training step (a fit resumed after its last
# one), no adapter file (the head alone trains).
MEMORY_KINDS = ("cuda_max_allocated", "cpu_max_rss")
BYTES = (lambda value: value is None or (is_int(value) and value >= 0), "a count of bytes or null")
OPTIONAL_FIELDS = {"wall_time_s": NUMBER, "masks": OBJECT, "residual_norms": OBJECT,
                   "step_time_s": (lambda value: value is None or (is_number(value) and value > 0),
                                   "a positive number of seconds or null"),
                   "peak_memory_bytes": BYTES, "peak_memory_kind": (lambda value: value in MEMORY_KINDS,
                                                                    f"one of {', '.join(MEMORY_KINDS)}"),
                   "adapter_bytes": BYTES}
# The config's blocks that run ids (derives_counts), aggregation and figures read, each with a ``name``.
CONFIG_BLOCKS = ("backbone", "dataset", "method", "importance", "scale")


def record_problem(record: Any) -> str | None:
    """Why ``record`` (a parsed JSON file) is not a run record the store can use, or ``None`` when it is."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    if record.get("status") not in STATUSES:
        return f"its status is {record.get('status')!r}, not {' or '.join(STATUSES)}"
    config = record.get("config")
    if not isinstance(config, dict):
        return "it has no config object"
    for block in CONFIG_BLOCKS:
        if block in config and not (isinstance(config[block], dict) and isinstance(config[block].get("name"), str)):
            return f"its config's {block} is {config[block]!r}, not a block with a name"
    if record["status"] == "failed":
        return None
    if "importance" not in config:
        return "its config has no importance block"
    for key, (accepts, description) in (FINISHED_FIELDS | OPTIONAL_FIELDS).items():
        if key not in record:
            if key in FINISHED_FIELDS:
                return f"it is finished but lacks {key}"
        elif not accepts(record[key]):
            return f"its {key} is {record[key]!r}, not {description}"
    if not (isinstance(record.get("params"), dict) and all(is_int(record["params"].get(key))
                                                           for key in ("adapter", "unmasked_adapter"))):
        return "its params lack the adapter or unmasked_adapter count"
    return None


def read_records(paths: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` for every valid run record of ``paths``; other files are reported and skipped."""
    return valid_files(paths, record_problem, "run record")


@dataclass(frozen=True)
class RunSlot:
    """Where run ``run_id`` keeps its record (``results_dir``) and checkpoints (``checkpoint_root``)."""

    run_id: str
    results_dir: Path
    checkpoint_root: Path

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_root / self.run_id

    @property
    def lock_file(self) -> Path:
        return self.results_dir / LOCKS / f"{self.run_id}.lock"

    def record(self) -> dict[str, Any] | None:
        """This run's record, if one was written.

        Matched on the hash of each record's stored config, recomputed, not on its file name or stored id:
        records written before a setting joined ``NON_SEMANTIC_KEYS`` are still found.
        """
        for path, record in read_records(sorted(self.results_dir.glob("*.json"))):
            if config_hash(record["config"]) == self.run_id:
                return record | {"path": str(path)}
        return None

    @contextmanager
    def claim(self) -> Iterator[bool]:
        """Hold this run's lock for the block; yields ``False`` when another process holds it."""
        with file_lock(self.lock_file, wait=False) as held:
            yield held

    def resume_from(self, trainable: dict[str, Any]) -> Path | None:
        """``last.ckpt`` when it loads and holds this model's ``trainable`` tensors (name -> shape), else ``None``:
        the run starts over.

        Lightning writes checkpoints through a temporary file, but a copied or half-synced folder can hold a
        truncated one, another run's (other shapes), or one whose pickle ``weights_only`` loading refuses. Such
        a file is set aside as ``<checkpoint.dir>/<run id>-unloadable-<time>.ckpt`` (reported once: the next launch
        no longer finds it), so nothing is deleted and the fresh run's checkpoints take its name.
        """
        import torch

        last = self.checkpoints / LAST_CHECKPOINT
        if not last.is_file():
            return None
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True)
            held = {name: tensor.shape for name, tensor in saved["state_dict"].items()}
        except Exception as error:  # truncated zip, refused pickle, foreign content: torch raises many types
            first_sentence = next(iter(str(error).splitlines()), "").split(". ")[0]  # torch adds pages of advice
            reason = f"it does not load ({type(error).__name__}: {first_sentence})"
        else:
            wrong = sorted(name for name in set(held) | set(trainable) if held.get(name) != trainable.get(name))
            if not wrong:
                return last
            reason = (f"its tensors are not this run's ({wrong[0]}: {list(held.get(wrong[0], []))} in the file, "
                      f"{list(trainable.get(wrong[0], []))} in the model)")
        # Beside the run's folder, which is deleted once the run is recorded.
        aside = self.checkpoint_root / f"{self.run_id}-unloadable-{time.strftime('%Y%m%d-%H%M%S')}.ckpt"
        try:
            last.rename(aside)
        except FileNotFoundError:  # a DDP worker set it aside first
            return None
        print(f"checkpoint {last} cannot resume run {self.run_id}: {reason}; set aside as {aside}, the run starts "
              "over")
        return None

    def discard_checkpoints(self) -> None:
        """Delete the checkpoints (and the lock file: whoever takes a fresh lock next finds the record)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.lock_file.unlink(missing_ok=True)
