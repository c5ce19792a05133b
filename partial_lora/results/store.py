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

import fcntl
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partial_lora.config import is_int, is_number
from partial_lora.results.record import config_hash, valid_files

LAST_CHECKPOINT = "last.ckpt"
LOCKS = ".locks"  # under results_dir; record readers take *.json files only
STATUSES = ("finished", "failed")
# What aggregation reads from a finished record beside its config.
FINISHED_FIELDS = ("backbone", "dataset", "method", "rank", "seed", "lr", "best_val", "test", "params")


@contextmanager
def file_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block. Yields ``True`` once held;
    with ``wait=False``, ``False`` at once when another process holds it. The kernel releases it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only suffices for flock: anyone who can read the lock file (the group sharing the store) can lock.
    descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # closing releases the lock


def record_problem(record: Any) -> str | None:
    """Why ``record`` (a parsed JSON file) is not a run record the store can use, or ``None`` when it is."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    if record.get("status") not in STATUSES:
        return f"its status is {record.get('status')!r}, not {' or '.join(STATUSES)}"
    if not isinstance(record.get("config"), dict):
        return "it has no config object"
    if record["status"] == "failed":
        return None
    missing = [key for key in FINISHED_FIELDS if key not in record]
    if missing:
        return f"it is finished but lacks {', '.join(missing)}"
    if not (is_number(record["best_val"]) and is_number(record["test"])):
        return "its best_val or test is not a number"
    if not (isinstance(record["params"], dict) and all(is_int(record["params"].get(key))
                                                       for key in ("adapter", "unmasked_adapter"))):
        return "its params lack the adapter or unmasked_adapter count"
    if not isinstance(record["config"].get("importance"), dict):
        return "its config has no importance block"
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

    def resume_from(self) -> Path | None:
        """``last.ckpt`` when it is a complete checkpoint, else ``None``: the run starts over.

        Lightning writes checkpoints through a temporary file, but a copied or half-synced folder can still
        hold a truncated one: torch's zip format then lacks its closing directory, and the file is removed
        so that the fresh run's checkpoints take its name.
        """
        last = self.checkpoints / LAST_CHECKPOINT
        if not last.is_file():
            return None
        if zipfile.is_zipfile(last):
            return last
        print(f"checkpoint {last} is incomplete: run {self.run_id} starts over")
        last.unlink(missing_ok=True)  # DDP workers look too
        return None

    def discard_checkpoints(self) -> None:
        """Delete the checkpoints (and the lock file: whoever takes a fresh lock next finds the record)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.lock_file.unlink(missing_ok=True)
