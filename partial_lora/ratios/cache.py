"""On-disk cache of derived counts and scores, keyed by everything they depend on (not the training seed).

One JSON file per key. It also holds the scores and the selected (top-k) indices that Figures 12-15 and
17 plot, and that targeted / inverted / stochastic masks need, so no derivation is repeated across
the seeds of a sweep or across mask modes sharing an importance measure.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from partial_lora.importance import LayerScores
from partial_lora.ratios.search import LayerCounts
from partial_lora.results import write_record


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RatioCache:
    """Read and write ``<directory>/<importance>_<key>.json`` entries."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, inputs: dict[str, Any]) -> Path:
        return self.directory / f"{inputs['importance']}_{cache_key(inputs)}.json"

    def load(self, inputs: dict[str, Any]) -> tuple[dict[str, LayerScores], dict[str, LayerCounts], dict] | None:
        path = self.path(inputs)
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        scores = {name: LayerScores(row=torch.tensor(layer["row_scores"]), col=torch.tensor(layer["col_scores"]))
                  for name, layer in entry["layers"].items()}
        counts = {name: LayerCounts(k_row=layer["k_row"], k_col=layer["k_col"], evaluations=layer["evaluations"])
                  for name, layer in entry["layers"].items()}
        return scores, counts, entry

    def save(self, inputs: dict[str, Any], baseline: float, scores: dict[str, LayerScores],
             counts: dict[str, LayerCounts], wall_time_s: float) -> Path:
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
        entry = {"inputs": inputs, "baseline_accuracy": baseline, "wall_time_s": wall_time_s,
                 "evaluations": 1 + sum(c.evaluations for c in counts.values()), "layers": layers}
        path = self.path(inputs)
        return write_record(entry, path.parent, path.stem)


def load_entries(directory: str | Path) -> list[dict[str, Any]]:
    """Every cache entry under ``directory`` with its derivation inputs flattened beside it (for figures)."""
    entries = []
    for path in sorted(Path(directory).glob("*.json")):
        entry = json.loads(path.read_text())
        inputs = entry["inputs"]
        entries.append({**inputs, "backbone": inputs["backbone"]["name_or_path"], "layers": entry["layers"],
                        "path": str(path), "modified": path.stat().st_mtime})
    return entries
