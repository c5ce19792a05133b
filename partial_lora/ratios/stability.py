"""How much derived counts depend on the derivation sample: the same model and settings, different examples.

Algorithm 1 judges each layer on a few hundred examples (128 at ``scale=cpu``). If another sample of the same
size keeps other layers, the per-layer counts describe the sample more than the model, and claims built on
them (C2, C4: the counts beat a uniform sparsity) rest on noise. This compares derivations pairwise: which
matrices they keep anything of, and how their per-matrix kept shares rank.
"""

from __future__ import annotations

from itertools import combinations
from statistics import mean, stdev
from typing import Any

import pandas as pd

from partial_lora.ratios.counts import DerivedCounts


def kept_shares(derived: DerivedCounts) -> dict[str, float]:
    """Per matrix, the share of its rows and columns kept, ``(k_row + k_col) / (m + n)``."""
    return {name: (c.k_row + c.k_col) / (derived.scores[name].row.numel() + derived.scores[name].col.numel())
            for name, c in derived.counts.items()}


def agreement(shares: dict[Any, dict[str, float]]) -> dict[str, Any]:
    """Across derivations' per-matrix kept shares (keyed by what told them apart, e.g. the data seed): over every
    pair, the Jaccard overlap of the matrices kept non-empty and the Spearman correlation of the shares. A
    derivation that keeps every matrix alike (all empty) has no ranking: its pairs are left out of the
    correlation's mean (``nan`` when no pair is left)."""
    if len(shares) < 2:
        raise ValueError(f"stability needs at least two derivations, got {len(shares)}")
    layers = [set(values) for values in shares.values()]
    if any(names != layers[0] for names in layers):
        raise ValueError("the derivations cover different layers: compare derivations of one model's adapter")
    names = sorted(layers[0])
    non_empty = {key: {name for name in names if values[name] > 0} for key, values in shares.items()}
    jaccards, correlations = [], []
    for first, second in combinations(shares, 2):
        union = non_empty[first] | non_empty[second]
        jaccards.append(len(non_empty[first] & non_empty[second]) / len(union) if union else 1.0)
        ranked = [pd.Series([shares[key][n] for n in names]) for key in (first, second)]
        if all(series.nunique() > 1 for series in ranked):
            correlations.append(float(ranked[0].corr(ranked[1], method="spearman")))
    return {"matrices": len(names), "non_empty": {key: len(kept) for key, kept in non_empty.items()},
            "kept_by_all": len(set.intersection(*non_empty.values())),
            "kept_by_any": len(set.union(*non_empty.values())),
            "jaccard_mean": mean(jaccards), "spearman_mean": mean(correlations) if correlations else float("nan"),
            "spearman_pairs": len(correlations), "pairs": len(jaccards)}


def stability_summary(derivations: dict[Any, DerivedCounts]) -> dict[str, Any]:
    """:func:`agreement` of derivations of the same layers, with their kept fractions' mean and spread."""
    fractions = [derived.kept_fraction for derived in derivations.values()]
    summary = agreement({key: kept_shares(derived) for key, derived in derivations.items()})
    return {"derivations": len(derivations), "kept_fraction_mean": mean(fractions),
            "kept_fraction_sd": stdev(fractions)} | summary
