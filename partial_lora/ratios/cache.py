"""On-disk cache of derived counts and scores, keyed by everything they depend on (not the training seed).

One JSON file per key. It also holds the scores and the selected (top-k) indices that Figures 12-15 and
17 plot, and that targeted / inverted / stochastic masks need, so no derivation is repeated across
the seeds of a sweep or across mask modes sharing an importance measure.

An entry that is unreadable (truncated, not an entry), has no checksum or one that does not match, was
recorded for other inputs, or whose layers and shapes are not the model's (from another backbone) is
reported and derived again; figures skip it (reported once).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from partial_lora.importance import LayerScores
from partial_lora.ratios.search import LayerCounts
from partial_lora.results import write_record
from partial_lora.results.record import read_json, valid_files


log = logging.getLogger(__name__)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(inputs: dict[str, Any]) -> str:
    return _digest(inputs)[:16]


def _problem(entry: Any) -> str | None:
    """Why ``entry`` (a parsed cache file) is not an intact cache entry, or ``None`` when it is."""
    if not (isinstance(entry, dict) and isinstance(entry.get("layers"), dict) and isinstance(entry.get("inputs"), dict)
            and isinstance(entry["inputs"].get("backbone"), dict)):
        return "it is not a cache entry (no layers, inputs or backbone)"
    if "checksum" not in entry:
        return "it has no checksum"
    if entry["checksum"] != _digest(entry["layers"]):
        return "its checksum does not match its contents"
    return None


def _mismatch(entry: Any, inputs: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why ``entry`` cannot serve a model whose adapted weights have ``shapes``, or ``None`` when it can."""
    problem = _problem(entry)
    if problem is not None:
        return problem
    layers = entry["layers"]
    if entry["inputs"] != json.loads(json.dumps(inputs, default=str)):
        return "it was derived for other inputs"
    if set(layers) != set(shapes):
        return f"its layers are not the model's (e.g. {sorted(set(layers) ^ set(shapes))[0]})"
    for name, shape in shapes.items():
        layer = layers[name]
        if (tuple(layer["shape"]) != tuple(shape) or len(layer["row_scores"]) != shape[0]
                or len(layer["col_scores"]) != shape[1]):
            return f"layer {name} has shape {layer['shape']}, the model's is {list(shape)}"
    return None


class RatioCache:
    """Read and write ``<directory>/<importance>_<key>.json`` entries."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, inputs: dict[str, Any]) -> Path:
        return self.directory / f"{inputs['importance']}_{cache_key(inputs)}.json"

    def load(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, int]]
             ) -> tuple[dict[str, LayerScores], dict[str, LayerCounts], dict] | None:
        """The entry for ``inputs`` if there is a valid one for layers of these ``shapes`` (m x n), else ``None``."""
        path = self.path(inputs)
        if not path.is_file():
            return None
        entry, problem = read_json(path)
        try:
            problem = problem or _mismatch(entry, inputs, shapes)
        except (KeyError, TypeError) as error:  # a layer without its fields
            problem = f"it is unreadable ({type(error).__name__}: {error})"
        if problem is not None:
            log.warning("ratio cache %s is not usable: %s; deriving the ratios again.", path, problem)
            return None
        scores = {name: LayerScores(row=torch.tensor(layer["row_scores"]), col=torch.tensor(layer["col_scores"]))
                  for name, layer in entry["layers"].items()}
        counts = {name: LayerCounts(k_row=layer["k_row"], k_col=layer["k_col"], evaluations=layer["evaluations"])
                  for name, layer in entry["layers"].items()}
        return scores, counts, entry

    def load_any(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, int]], free: str
                 ) -> list[tuple[dict[str, LayerScores], dict[str, LayerCounts], dict]]:
        """Every valid entry for ``inputs`` whatever its value of the input ``free`` (a dry run, reading no data,
        does not know the derivation set's size), as :meth:`load` returns them."""
        found = []
        for path in sorted(self.directory.glob(f"{inputs['importance']}_*.json")):
            try:
                candidate = inputs | {free: json.loads(path.read_text())["inputs"][free]}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue  # unreadable entries are reported when a run loads them
            if self.path(candidate) == path and (entry := self.load(candidate, shapes)) is not None:
                found.append(entry)
        return found

    def save(self, inputs: dict[str, Any], baseline: float, scores: dict[str, LayerScores],
             counts: dict[str, LayerCounts], wall_time_s: float, extra: dict[str, Any] | None = None) -> Path:
        """Write the entry; ``baseline`` is the pretrained model's value of the rule's metric, ``extra``
        holds what the record reports beside it (baseline accuracy, majority-class rate, warnings)."""
        layers = {}
        for name, layer_counts in counts.items():
            row, col = scores[name].row, scores[name].col
            layers[name] = {
                "shape": [row.numel(), col.numel()],
                "k_row": layer_counts.k_row,
                "k_col": layer_counts.k_col,
                "kept_fraction_row": layer_counts.k_row / row.numel(),
                "kept_fraction_col": layer_counts.k_col / col.numel(),
                "evaluations": layer_counts.evaluations,
                "top_rows": torch.argsort(row, descending=True, stable=True)[: layer_counts.k_row].tolist(),
                "top_cols": torch.argsort(col, descending=True, stable=True)[: layer_counts.k_col].tolist(),
                "row_scores": row.tolist(),
                "col_scores": col.tolist(),
            }
        entry = {"inputs": inputs, "baseline": baseline, **(extra or {}), "wall_time_s": wall_time_s,
                 "evaluations": 1 + sum(c.evaluations for c in counts.values()), "layers": layers,
                 "checksum": _digest(layers)}
        path = self.path(inputs)
        return write_record(entry, path.parent, path.stem)


def load_entries(directory: str | Path) -> list[dict[str, Any]]:
    """Every intact cache entry under ``directory`` with its derivation inputs flattened beside it (for
    figures); other files are reported and skipped."""
    entries = []
    for path, entry in valid_files(sorted(Path(directory).glob("*.json")), _problem, "ratio cache"):
        inputs = entry["inputs"]
        entries.append({**inputs, "backbone": inputs["backbone"]["name_or_path"], "layers": entry["layers"],
                        "path": str(path), "modified": path.stat().st_mtime})
    return entries
