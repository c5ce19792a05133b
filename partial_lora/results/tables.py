"""Protocol summaries rendered as the paper's tables, with the paper's numbers beside them.

The paper's numbers live in ``results/paper/tables.csv`` (one row per printed cell; see the README
there). A rendered row is one setting on one dataset: this run's top-k mean and std, the runs behind
it, the selected runs' mean validation minus test metric, trainable adapter parameters, and the paper's value,
parameters and the difference. A task the learning rule finds not learned (``aggregate.learning_status``) has
its cells marked and the caption says why; a validation-test gap beyond ``aggregate.VAL_TEST_GAP`` is marked.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from partial_lora.results.aggregate import VAL_TEST_GAP, Learning, describe_rule, large_gap

PAPER_TABLES = Path(__file__).resolve().parents[2] / "results" / "paper" / "tables.csv"
ROW_KEYS = ["method", "importance"]


def load_paper(path: str | Path = PAPER_TABLES) -> pd.DataFrame:
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


NOT_LEARNED = "(not learned)"
LARGE_GAP = "(large)"


def formatted(rows: pd.DataFrame, variant: str | None = None,
              not_learned: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Human-readable columns: metric as mean ± std (marked on the ``not_learned`` datasets), parameter counts
    in K / M, differences signed."""
    out = rows[ROW_KEYS + ([variant] if variant else []) + ["dataset"]].copy()
    out["this run"] = [f"{mean:.2f} ± {std:.2f}" + (f" {NOT_LEARNED}" if dataset in not_learned else "")
                       for mean, std, dataset in zip(rows["test_mean"], rows["test_std"], rows["dataset"])]
    out["val - test"] = [f"{val - test:+.2f}" + (f" {LARGE_GAP}" if large_gap(val, test) else "")
                         for val, test in zip(rows["val_mean"], rows["test_mean"])]
    out["runs (top-k)"] = [f"{runs} ({selected})" for runs, selected in zip(rows["runs"], rows["selected"])]
    out["params"] = rows["params"].map(_parameters)
    out["paper"] = rows["paper"].map(lambda value: "" if pd.isna(value) else f"{value:.2f}")
    out["paper params"] = rows["paper_params"].map(_parameters)
    out["diff"] = rows["diff"].map(lambda value: "" if pd.isna(value) else f"{value:+.2f}")
    return out


def learning_note(learning: dict[str, Learning]) -> str:
    """The caption's account of the learning rule and of the tasks it finds not learned."""
    note = (f"val - test: the selected runs' mean validation minus test metric, {LARGE_GAP} beyond {VAL_TEST_GAP:g} "
            f"points (the validation split then does not predict the reported one). {describe_rule()}")
    unknown = sorted(dataset for dataset, status in learning.items() if not status.known)
    if unknown:
        note += f" Chance is unknown for {', '.join(unknown)} (no majority rate in the records or the local data)."
    for dataset, status in sorted(learning.items()):
        if not status.learned:
            note += f" {NOT_LEARNED} {dataset}: not learned at this budget: {status.reason()}."
    return note


def render(rows: pd.DataFrame, title: str, provenance: str, variant: str | None = None,
           learning: dict[str, Learning] | None = None) -> tuple[str, str]:
    """Markdown and LaTeX of a table target; ``learning`` (per dataset, :func:`aggregate.learning_status`) marks
    the tasks not learned and says why in the caption."""
    learning = learning or {}
    not_learned = frozenset(dataset for dataset, status in learning.items() if not status.learned)
    table = formatted(rows, variant, not_learned)
    provenance = f"{provenance} {learning_note(learning)}"
    markdown = f"# {title}\n\n{provenance}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"
    latex = (f"% {title}\n% {provenance}\n"
             + table.to_latex(index=False, escape=True, caption=title, label=f"tab:{title.split(':')[0]}"))
    return markdown, latex
