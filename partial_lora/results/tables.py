"""Protocol summaries rendered as the paper's tables, with the paper's numbers beside them.

The paper's numbers live in ``results/paper/tables.csv`` (one row per printed cell; see the README
there). A rendered row is one setting on one dataset: this run's top-k mean and std, the runs behind
it, trainable adapter parameters, and the paper's value, parameters and the difference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PAPER_TABLES = Path(__file__).resolve().parents[2] / "results" / "paper" / "tables.csv"
ROW_KEYS = ["method", "importance"]


def load_paper(path: str | Path = PAPER_TABLES) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"variant": str}, keep_default_na=False, na_values={"value": [""], "params": [""]})


def _parameters(count: float) -> str:
    if pd.isna(count):
        return ""
    if count < 1e3:
        return f"{count:.0f}"
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def table_rows(summary: pd.DataFrame, paper: pd.DataFrame, table: str, variant: str | None = None) -> pd.DataFrame:
    """Long table: one row per (method, importance[, variant], dataset) with this run next to the paper."""
    keys = ROW_KEYS + ([variant] if variant else []) + ["dataset"]
    published = paper[paper["table"] == table].copy()
    if variant:
        published[variant] = published["variant"]
    published = published.rename(columns={"value": "paper", "params": "paper_params"})
    rows = summary.merge(published[keys + ["paper", "paper_params"]], on=keys, how="left")
    rows["diff"] = rows["test_mean"] - rows["paper"]
    return rows.sort_values(keys).reset_index(drop=True)


def formatted(rows: pd.DataFrame, variant: str | None = None) -> pd.DataFrame:
    """Human-readable columns: metric as mean ± std, parameter counts in K / M, differences signed."""
    out = rows[ROW_KEYS + ([variant] if variant else []) + ["dataset"]].copy()
    out["this run"] = [f"{mean:.2f} ± {std:.2f}" for mean, std in zip(rows["test_mean"], rows["test_std"])]
    out["runs (top-k)"] = [f"{runs} ({selected})" for runs, selected in zip(rows["runs"], rows["selected"])]
    out["params"] = rows["params"].map(_parameters)
    out["paper"] = rows["paper"].map(lambda value: "" if pd.isna(value) else f"{value:.2f}")
    out["paper params"] = rows["paper_params"].map(_parameters)
    out["diff"] = rows["diff"].map(lambda value: "" if pd.isna(value) else f"{value:+.2f}")
    return out


def render(rows: pd.DataFrame, title: str, provenance: str, variant: str | None = None) -> tuple[str, str]:
    """Markdown and LaTeX of a table target."""
    table = formatted(rows, variant)
    markdown = f"# {title}\n\n{provenance}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"
    latex = (f"% {title}\n% {provenance}\n"
             + table.to_latex(index=False, escape=True, caption=title, label=f"tab:{title.split(':')[0]}"))
    return markdown, latex
