"""On-disk cache of derived counts, keyed by everything they depend on.

One JSON file (a :class:`DerivedCounts` document) per key, so no derivation is repeated across the mask modes
sharing an importance measure, across relaunches, or (with a zero-shot head, which no seed changes) across the
seeds of a sweep. Runs launched side by side derive one key in turn
(:meth:`RatioCache.deriving`): the first derives and saves, the others wait and read its entry. Without it
both derive, and the cache keeps the last writer's entry. The key is a digest of the derivation's inputs:
its settings (every field of :class:`DerivationSettings` that can change the counts), the caller's
description of the model, and a fingerprint of the derivation batches.

An entry that is unreadable (truncated, not an entry), has no checksum or one that does not match, was
recorded for other inputs, or whose layers and shapes are not the model's (from another backbone) is
reported and derived again; figures skip it (reported once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from partial_lora.ratios.counts import DerivedCounts, damage, digest
from partial_lora.files import LOCKS, file_lock, read_json, valid_files

log = logging.getLogger(__name__)


def cache_key(inputs: dict[str, Any]) -> str:
    return digest(inputs)[:16]


class RatioCache:
    """Read and write ``<directory>/<importance>_<key>.json`` entries."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, inputs: dict[str, Any]) -> Path:
        return self.directory / f"{inputs['settings']['importance']}_{cache_key(inputs)}.json"

    def load(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> DerivedCounts | None:
        """The entry for ``inputs`` if there is a valid one for layers of these ``shapes`` (m x n), else ``None``."""
        path = self.path(inputs)
        if not path.is_file():
            return None
        derived = None
        entry, problem = read_json(path)
        problem = problem or damage(entry)
        if problem is None and entry["inputs"] != inputs:
            problem = "it was derived for other inputs"
        if problem is None:
            derived = DerivedCounts.from_json(entry)
            problem = derived.mismatch(shapes)
        if problem is not None:
            log.warning("ratio cache %s is not usable: %s; deriving the ratios again.", path, problem)
            return None
        derived.path, derived.cache_hit = path, True
        return derived

    def load_any(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> list[DerivedCounts]:
        """Every valid entry derived with the settings and for the model of ``inputs``, from whatever data (a dry
        run reads none), as :meth:`load` returns them."""
        found = []
        for path in sorted(self.directory.glob(f"{inputs['settings']['importance']}_*.json")):
            entry, problem = read_json(path)
            if problem or damage(entry) or any(entry["inputs"].get(key) != inputs[key] for key in ("settings", "source")):
                continue  # a damaged entry is reported when a run loads it
            if self.path(entry["inputs"]) == path and (derived := self.load(entry["inputs"], shapes)) is not None:
                found.append(derived)
        return found

    @contextmanager
    def deriving(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Hold the entry's lock (``.locks/`` beside the entries) for a load-or-derive-and-save block."""
        with file_lock(self.directory / LOCKS / f"{self.path(inputs).stem}.lock", wait=True):
            yield

    def save(self, derived: DerivedCounts) -> Path:
        return derived.save(self.path(derived.inputs))


def load_entries(directory: str | Path) -> list[dict[str, Any]]:
    """Every intact cache entry under ``directory`` with its settings and model description flattened beside it
    (for figures; ``backbone`` is the backbone's name); other files are reported and skipped."""
    entries = []
    for path, entry in valid_files(sorted(Path(directory).glob("*.json")), damage, "ratio cache"):
        inputs = entry["inputs"]
        source = inputs.get("source") or {}
        entries.append({**inputs["settings"], **source, "backbone": source.get("backbone", {}).get("name"),
                        "layers": entry["layers"], "path": str(path), "modified": path.stat().st_mtime})
    return entries
