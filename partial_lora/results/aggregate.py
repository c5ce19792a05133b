"""Run records -> the paper's protocol numbers (SPEC 5).

The paper trains 20 models per method and dataset (seeds x learning rates) and reports the mean test
metric of the 5 with the best validation score. Records are grouped by everything that defines a
method's setting, never by seed or learning rate, which are what the protocol selects over.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from partial_lora.results.record import config_hash
from partial_lora.results.store import read_records

GROUP_KEYS = ["backbone", "dataset", "method", "importance", "rank"]
COLUMNS = ["scale", *GROUP_KEYS, "seed", "lr", "val", "test", "params", "unmasked_params", "path",
           "wall_time_s"]


def load_records(directory: str | Path) -> pd.DataFrame:
    """One row per finished run record under ``directory`` (recursively): the protocol's columns, the
    whole resolved config flattened as ``config.<dotted key>`` columns, and per-layer residual norms.
    Files that are not valid records are reported and skipped."""
    rows = []
    for path, record in read_records(sorted(Path(directory).rglob("*.json"))):
        if record["status"] != "finished":
            continue
        config = record["config"]
        rows.append({
            "scale": config.get("scale", {}).get("name", "paper"), "backbone": record["backbone"],
            "dataset": record["dataset"], "method": record["method"], "importance": config["importance"]["name"],
            "rank": record["rank"], "seed": record["seed"], "lr": record["lr"], "val": record["best_val"],
            "test": record["test"], "params": record["params"]["adapter"],
            "unmasked_params": record["params"]["unmasked_adapter"], "path": str(path),
            "wall_time_s": record.get("wall_time_s", math.nan),
            "residual_norms": record.get("residual_norms"), "masks": record.get("masks"),
            "run_id": config_hash(config),
            **pd.json_normalize(config, sep=".").add_prefix("config.").iloc[0].to_dict(),
        })
    return pd.DataFrame(rows, columns=None if rows else COLUMNS)


def protocol_summary(records: pd.DataFrame, top_k: int = 5, keys: list[str] | None = None) -> pd.DataFrame:
    """Per setting (``keys``, default backbone, dataset, method, importance, rank): mean and std of the
    test metric over the ``top_k`` runs with the best validation score, min and max of those, the number
    of runs, and the mean trainable adapter parameters of the selected runs."""
    keys = list(keys or GROUP_KEYS)

    def best(group: pd.DataFrame) -> pd.Series:
        chosen = group.sort_values(["val", "seed"], ascending=[False, True]).head(top_k)
        return pd.Series({"test_mean": chosen["test"].mean(), "test_std": chosen["test"].std(ddof=0),
                          "test_min": chosen["test"].min(), "test_max": chosen["test"].max(),
                          "val_mean": chosen["val"].mean(), "runs": len(group), "selected": len(chosen),
                          "params": chosen["params"].mean(), "unmasked_params": chosen["unmasked_params"].mean(),
                          "paths": list(chosen["path"])})

    if records.empty:
        return pd.DataFrame(columns=keys)
    summary = records.groupby(keys, dropna=False).apply(best, include_groups=False).reset_index()
    return summary.astype({"runs": int, "selected": int}).round({"params": 0, "unmasked_params": 0})
