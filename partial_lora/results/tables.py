"""Protocol summaries rendered as the paper's tables, with the paper's numbers beside them.

The paper's numbers live in ``results/paper/tables.csv`` (one row per printed cell; see the README
there). A rendered row is one cell (a setting on one dataset): this run's top-k mean and std, its runs found of
those planned, the selected runs' mean validation minus test metric, trainable adapter parameters, and the paper's
value, parameters and the difference; a cell without runs keeps its row. A task the learning rule finds not learned
(``aggregate.learning_status``) has its cells marked and the caption says why, as has a cell whose own runs the
same rule finds at chance (``aggregate.at_chance``); a validation-test gap beyond ``aggregate.VAL_TEST_GAP`` is
marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from partial_lora.results.aggregate import VAL_TEST_GAP, Learning, describe_rule, large_gap

ROW_KEYS = ["method", "importance"]


def load_paper(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"variant": str}, keep_default_na=False, na_values={"value": [""], "params": [""]})


def paper_kept_share(paper: pd.DataFrame, backbone: str, dataset: str) -> float | None:
    """The paper's Partial-LoRA (SVD) adapter parameters over its LoRA's on ``dataset`` with ``backbone``
    (DeBERTa-v3-base: SST-2 13.5%, MRPC 10.5%; CLIP ViT-B/16: 21-48%), or ``None`` where it prints no pair."""
    rows = paper[(paper["backbone"] == backbone) & (paper["dataset"] == dataset) & (paper["variant"] == "")]
    counts = {method: rows.loc[(rows["method"] == method) & (rows["importance"] == importance), "params"].dropna()
              for method, importance in (("partial_lora", "svd"), ("lora", "none"))}
    if any(values.empty for values in counts.values()):
        return None
    return float(counts["partial_lora"].iloc[0] / counts["lora"].iloc[0])


def parameter_count(count: float | None, millions_from: float = 1e6, fixed: bool = True, missing: str = "-") -> str:
    """A parameter count as 1.23M / 45.6K / 789 (millions from ``millions_from`` on), with fixed decimals or, not
    ``fixed``, as few as the value needs (axis ticks: 10K, 1M); ``missing`` where there is no count."""
    if pd.isna(count) or not math.isfinite(count):
        return missing
    number, unit = (count / 1e6, "M") if count >= millions_from else (count / 1e3, "K") if count >= 1e3 else (count, "")
    return f"{number:{ {'M': '.2f', 'K': '.1f', '': '.0f'}[unit] if fixed else 'g'}}{unit}"


def _parameters(count: float) -> str:
    """Table cells: a tenth of a million reads as 0.15M, the paper's style."""
    return parameter_count(count, millions_from=1e5, missing="")


def table_rows(cells: pd.DataFrame, paper: pd.DataFrame, table: str, variant: str | None = None,
               paper_setting: dict[str, Any] | None = None) -> pd.DataFrame:
    """Long table: one row per cell (method, importance[, variant], dataset and any other planned setting) with
    this run next to the paper. A cell at another value of a ``paper_setting`` key (a training strategy the paper
    did not use) gets no paper numbers: they describe another setting."""
    keys = ROW_KEYS + ([variant] if variant else []) + ["dataset"]
    published = paper[paper["table"] == table].copy()
    if variant:
        published[variant] = published["variant"]
    published = published.rename(columns={"value": "paper", "params": "paper_params"})
    rows = cells.merge(published[keys + ["paper", "paper_params"]], on=keys, how="left")
    for key, value in (paper_setting or {}).items():
        rows.loc[rows[key] != value, ["paper", "paper_params"]] = float("nan")
    rows["diff"] = rows["test_mean"] - rows["paper"]
    return rows.sort_values(keys + list(paper_setting or {})).reset_index(drop=True)


NOT_LEARNED = "(not learned)"
AT_CHANCE = "(at chance)"
LARGE_GAP = "(large)"
AT_CHANCE_NOTE = (f" {AT_CHANCE}: the same rule applied to one setting's own runs: their best by validation does "
                  f"not clear chance by that margin (at every planned rate the method learned nothing the validation "
                  f"split shows, such as a model that predicts one class).")


def _unless_missing(value: float, text: str) -> str:
    return "-" if pd.isna(value) else text


def formatted(rows: pd.DataFrame, variant: str | None = None, not_learned: frozenset[str] = frozenset(),
              shown: list[str] = ()) -> pd.DataFrame:
    """Human-readable columns: metric as mean ± std (marked on the ``not_learned`` datasets, else where the cell's
    own runs are ``at_chance``), runs found of those planned, parameter counts in K / M, differences signed; ``-``
    where a cell has no runs or the paper no number."""
    out = rows[ROW_KEYS + ([variant] if variant else []) + list(shown) + ["dataset"]].copy()
    marks = [NOT_LEARNED if dataset in not_learned else AT_CHANCE if chance else ""
             for dataset, chance in zip(rows["dataset"], rows["at_chance"])]
    out["this run"] = [_unless_missing(mean, f"{mean:.2f} ± {std:.2f}" + (f" {mark}" if mark else ""))
                       for mean, std, mark in zip(rows["test_mean"], rows["test_std"], marks)]
    out["val - test"] = [_unless_missing(test, f"{val - test:+.2f}" + (f" {LARGE_GAP}" if large_gap(val, test) else ""))
                         for val, test in zip(rows["val_mean"], rows["test_mean"])]
    out["runs of planned (top-k)"] = [f"{found} of {planned}" + ("" if pd.isna(selected) else f" ({selected:.0f})")
                                      for found, planned, selected in zip(rows["found"], rows["planned"],
                                                                          rows["selected"])]
    out["params"] = rows["params"].map(_parameters)
    out["paper"] = rows["paper"].map(lambda value: _unless_missing(value, f"{value:.2f}"))
    out["paper params"] = rows["paper_params"].map(_parameters)
    out["diff"] = rows["diff"].map(lambda value: _unless_missing(value, f"{value:+.2f}"))
    return out


def learning_note(learning: dict[str, Learning], rows: pd.DataFrame) -> str:
    """The caption's account of the validation-test gap, the learning rule, the tasks it finds not learned, the
    cells it finds at chance and the cells whose derivation kept no adapter entry."""
    note = (f"val - test: the selected runs' mean validation minus test metric, {LARGE_GAP} beyond {VAL_TEST_GAP:g} "
            f"points (the validation split then does not predict the reported one). {rule_note(learning)}")
    if rows["at_chance"].any():
        note += AT_CHANCE_NOTE
    if rows["params"].eq(0).any():
        note += (" params 0: the derived ratios keep no adapter entry on that task, so the cell trains the "
                 "classifier head alone.")
    return note


def rule_note(learning: dict[str, Learning]) -> str:
    """The learning rule, and each task it finds not learned (marked :data:`NOT_LEARNED`) with the reason."""
    note = describe_rule()
    unknown = sorted(dataset for dataset, status in learning.items() if not status.known)
    if unknown:
        note += f" Chance is unknown for {', '.join(unknown)} (no majority rate in the records or the local data)."
    for dataset, status in sorted(learning.items()):
        if not status.learned:
            note += f" {NOT_LEARNED} {dataset}: not learned at this budget: {status.reason()}."
    return note


def render(rows: pd.DataFrame, title: str, provenance: str, variant: str | None = None,
           learning: dict[str, Learning] | None = None, shown: list[str] = ()) -> tuple[str, str]:
    """Markdown and LaTeX of a table target; ``learning`` (per dataset, :func:`aggregate.learning_status`) marks
    the tasks not learned and says why in the caption; ``shown``: further planned settings, as columns."""
    learning = learning or {}
    not_learned = frozenset(dataset for dataset, status in learning.items() if not status.learned)
    table = formatted(rows, variant, not_learned, shown)
    provenance = f"{provenance} {learning_note(learning, rows)}"
    markdown = f"# {title}\n\n{provenance}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"
    latex = (f"% {title}\n% {provenance}\n"
             + table.to_latex(index=False, escape=True, caption=title, label=f"tab:{title.split(':')[0]}"))
    return markdown, latex
