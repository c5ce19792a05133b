"""The result of a derivation: per-layer kept counts and the scores they came from, as one JSON document.

The same document is the ratio cache's entry, what :func:`partial_lora.derive_counts` returns and what a mask
needs (counts for Partial-LoRA, scores too for targeted, inverted and stochastic masks). It also holds the
selected (top-k) indices that Figures 12-15 and 17 plot. A checksum over the layers guards against edits and
truncation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from partial_lora.errors import PartialLoraError
from partial_lora.importance import LayerScores
from partial_lora.ratios.search import LayerCounts
from partial_lora.files import read_json, write_record


LAYER_KEYS = {"k_row", "k_col", "evaluations", "row_scores", "col_scores"}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(eq=False)  # tensors inside: compare documents with to_json()
class DerivedCounts:
    """Kept counts ``k_row``, ``k_col`` and row / column scores per adapted layer (by module name), with what they
    were derived from (``inputs``: settings, model description, data fingerprint)."""

    counts: dict[str, LayerCounts]
    scores: dict[str, LayerScores]
    inputs: dict[str, Any]
    baseline: float | None = None  # the pretrained model's value of the acceptance rule's metric
    baseline_accuracy: float | None = None
    ticket_accuracy: float | None = None  # accuracy on the derivation set with every layer's removal applied at once
    majority_rate: float | None = None  # what predicting the most frequent class scores on the derivation set
    warnings: list[str] = field(default_factory=list)  # what makes the counts suspect (near chance, nearly empty)
    wall_time_s: float = 0.0
    cache_hit: bool = False  # how this object was obtained (from a cache), not part of the document
    examples_evaluated: int | None = None  # examples the search ran (None: read from a cache); not in the document
    search_time_s: float | None = None  # of wall_time_s, Algorithm 1's search alone (None: read from a cache); ditto
    path: Path | None = None  # where it was read or written

    @property
    def kept_fraction(self) -> float:
        """What the counts keep of the adapter's rows and columns, ``sum(k_row + k_col) / sum(m + n)``."""
        kept = sum(c.k_row + c.k_col for c in self.counts.values())
        return kept / sum(self.scores[name].row.numel() + self.scores[name].col.numel() for name in self.counts)

    @property
    def evaluations(self) -> int:
        """Model evaluations Algorithm 1 spent: the baseline plus every layer's."""
        return 1 + sum(layer.evaluations for layer in self.counts.values())

    def to_json(self) -> dict[str, Any]:
        layers = {}
        for name, layer_counts in self.counts.items():
            row, col = self.scores[name].row, self.scores[name].col
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
        return {"inputs": self.inputs, "baseline": self.baseline, "baseline_accuracy": self.baseline_accuracy,
                "ticket_accuracy": self.ticket_accuracy, "majority_rate": self.majority_rate, "warnings": self.warnings, "wall_time_s": self.wall_time_s,
                "evaluations": self.evaluations, "layers": layers, "checksum": digest(layers)}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> DerivedCounts:
        """Rebuild from :meth:`to_json`'s document; a document whose layers do not match its checksum is refused."""
        problem = damage(entry)
        if problem is not None:
            raise PartialLoraError(f"these derived counts cannot be used: {problem}.")
        layers = entry["layers"]
        return cls(counts={name: LayerCounts(k_row=layer["k_row"], k_col=layer["k_col"],
                                             evaluations=layer["evaluations"]) for name, layer in layers.items()},
                   scores={name: LayerScores(row=torch.tensor(layer["row_scores"]),
                                             col=torch.tensor(layer["col_scores"])) for name, layer in layers.items()},
                   inputs=entry["inputs"], baseline=entry.get("baseline"),
                   baseline_accuracy=entry.get("baseline_accuracy"), ticket_accuracy=entry.get("ticket_accuracy"),
                   majority_rate=entry.get("majority_rate"),
                   warnings=entry.get("warnings", []), wall_time_s=entry.get("wall_time_s", 0.0))

    def save(self, path: str | Path) -> Path:
        """Write the JSON document atomically (a crash leaves no half-written file)."""
        path = Path(path)
        self.path = write_record(self.to_json(), path.parent, path.name.removesuffix(".json"))
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> DerivedCounts:
        path = Path(path)
        entry, problem = read_json(path)
        if problem is not None:
            raise PartialLoraError(f"derived counts {path} cannot be used: {problem}.")
        derived = cls.from_json(entry)
        derived.path = path
        return derived

    def mismatch(self, shapes: dict[str, tuple[int, int]]) -> str | None:
        """Why these counts cannot serve a model whose adapted weights have ``shapes`` (m x n), or ``None``."""
        if set(self.counts) != set(shapes):
            return f"its layers are not the model's (e.g. {sorted(set(self.counts) ^ set(shapes))[0]})"
        for name, shape in shapes.items():
            held = (self.scores[name].row.numel(), self.scores[name].col.numel())
            if held != tuple(shape):
                return f"layer {name} has shape {list(held)}, the model's is {list(shape)}"
            # The checksum guards against accidents, not edits (anyone can recompute it): counts must fit the layer.
            for key, size in (("k_row", shape[0]), ("k_col", shape[1])):
                count = getattr(self.counts[name], key)
                if isinstance(count, bool) or not (isinstance(count, int) and 0 <= count <= size):
                    return f"layer {name} has {key} {count!r}, not an integer in 0..{size}"
        return None


def damage(entry: Any) -> str | None:
    """Why a JSON document is not an intact set of derived counts, or ``None``."""
    if not (isinstance(entry, dict) and isinstance(entry.get("layers"), dict) and isinstance(entry.get("inputs"), dict)
            and isinstance(entry["inputs"].get("settings"), dict)):
        return "it is not a cache entry (no layers, inputs or settings)"
    if "checksum" not in entry:
        return "it has no checksum"
    if entry["checksum"] != digest(entry["layers"]):
        return "its checksum does not match its contents"
    for name, layer in entry["layers"].items():
        missing = LAYER_KEYS - set(layer) if isinstance(layer, dict) else LAYER_KEYS
        if missing:
            return f"layer {name} lacks {sorted(missing)[0]}"
    return None
