"""The paper's figures from protocol summaries, run records and ratio caches (matplotlib, PNG).

Each function returns a matplotlib Figure with one panel per dataset; the caller saves it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import combinations

import matplotlib

matplotlib.use("Agg")  # files only: rendering runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from partial_lora.layers import block_of  # noqa: E402
from partial_lora.results.tables import parameter_count  # noqa: E402


def save(figure: Figure, path) -> None:
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _panels(names: list[str], title: str) -> tuple[Figure, list[plt.Axes]]:
    columns = min(4, max(1, len(names)))
    rows = -(-len(names) // columns) if names else 1
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    figure.suptitle(title)
    return figure, list(axes.flat)


def _log_parameters(axis: plt.Axes) -> None:
    """Log x axis of parameter counts, labelled 10K / 1M rather than crowded 2x10^3 minor labels."""
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: parameter_count(value, fixed=False)))
    axis.xaxis.set_minor_formatter(NullFormatter())


def _colours(labels: Iterable[str]) -> dict[str, str]:
    """One colour per method (or series), the same in every panel of a figure."""
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: palette[index % len(palette)] for index, label in enumerate(sorted(set(labels)))}


def _label(row: pd.Series, series: Iterable[str]) -> str:
    parts = [str(row[key]) for key in series if key in row and str(row[key]) not in ("none", "nan")]
    return " / ".join(parts)


def tradeoff(summary: pd.DataFrame, title: str, arrows: list[list[str]] = ()) -> Figure:
    """Figures 2-4: test metric against trainable adapter parameters, one point per method and training strategy
    (top-k mean, std as error bar), arrows from a dense method to each of its Partial variants' points (Table 6's
    Partial-LoRA has two: alone and with CoTo)."""
    datasets = sorted(summary["dataset"].unique())
    figure, axes = _panels(datasets, title)
    series = ["method", "importance", "strategy"]
    colours = _colours(_label(row, series) for _, row in summary.iterrows())
    for axis, dataset in zip(axes, datasets):
        part = summary[summary["dataset"] == dataset]
        for _, row in part.iterrows():
            label = _label(row, series)
            axis.errorbar(row["params"], row["test_mean"], yerr=row["test_std"], fmt="o", capsize=3,
                          label=label, color=colours[label])
        for start, end in arrows:
            for _, source in part[part["method"] == start].iterrows():
                for _, target in part[part["method"] == end].iterrows():
                    axis.annotate("", xy=(target["params"], target["test_mean"]),
                                  xytext=(source["params"], source["test_mean"]),
                                  arrowprops={"arrowstyle": "->", "color": "grey"})
        _log_parameters(axis)
        axis.set(title=f"{dataset} ({part['backbone'].iloc[0]})", xlabel="trainable adapter parameters",
                 ylabel="test metric (top-k mean)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def curve(summary: pd.DataFrame, title: str, x: str, series: list[str], log_x: bool = False) -> Figure:
    """Figures 5, 6/16, 11: the test metric along ``x`` (a setting or ``params``), one line per series,
    with the min-max band of the selected models."""
    datasets = sorted(summary["dataset"].unique())
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        part = summary[summary["dataset"] == dataset]
        for label, line in part.groupby(series, dropna=False):
            line = line.sort_values(x)
            name = _label(line.iloc[0], series)
            if len(line) == 1:  # a method without the swept setting (e.g. LoRA among sparsity sweeps)
                axis.axhline(line["test_mean"].iloc[0], linestyle="--", linewidth=1, label=name)
                continue
            axis.plot(line[x], line["test_mean"], marker="o", label=name)
            axis.fill_between(line[x].astype(float), line["test_min"], line["test_max"], alpha=0.2)
        if x == "params":
            _log_parameters(axis)
        elif log_x:
            axis.set_xscale("log")
        axis.set(title=dataset, xlabel=x, ylabel="test metric (top-k)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def residuals(records: pd.DataFrame, title: str, layers: list[str], series: list[str]) -> Figure:
    """Figures 7-10: ||dW|| / ||W|| per block for the layers matching ``layers`` (regexes), averaged over
    the runs given (the protocol's selected models)."""
    patterns = [re.compile(pattern) for pattern in layers]
    datasets = sorted(records["dataset"].unique())
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        part = records[records["dataset"] == dataset]
        for label, runs in part.groupby(series, dropna=False):
            per_block: dict[int, list[float]] = {}
            for norms in runs["residual_norms"]:
                for layer, norm in (norms or {}).items():
                    block = block_of(layer)
                    if block is not None and any(pattern.search(layer) for pattern in patterns):
                        per_block.setdefault(block, []).append(norm["delta"] / norm["weight"])
            if per_block:
                blocks = sorted(per_block)
                axis.plot(blocks, [np.mean(per_block[block]) for block in blocks], marker="o",
                          label=_label(runs.iloc[0], series))
        axis.set(title=dataset, xlabel="block", ylabel="||dW|| / ||W||")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _per_block(layers: dict[str, dict], value) -> tuple[list[int], list[float]]:
    grouped: dict[int, list[float]] = {}
    for name, layer in layers.items():
        block = block_of(name)
        if block is not None:
            grouped.setdefault(block, []).append(value(layer))
    blocks = sorted(grouped)
    return blocks, [float(np.mean(grouped[block])) for block in blocks]


def kept_fraction(caches: pd.DataFrame, title: str) -> Figure:
    """Figure 17: share of each pretrained weight inside the subnetwork, (k_row x k_col) / (m x n),
    averaged over the adapted matrices of a block, per importance measure."""
    datasets = sorted(caches["dataset"].unique())
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        for _, entry in caches[caches["dataset"] == dataset].iterrows():
            blocks, fractions = _per_block(entry["layers"], lambda layer: layer["kept_fraction_row"]
                                           * layer["kept_fraction_col"])
            axis.plot(blocks, fractions, marker="o", label=f"{entry['importance']} (data seed {entry['data_seed']})")
        axis.set(title=dataset, xlabel="block", ylabel="kept fraction of W")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def index_overlap(first: dict, second: dict) -> float:
    """Shared selected rows and columns of one matrix in two derivations, over the most they could
    share (the smaller selections): 1 when one selection contains the other."""
    shared = possible = 0
    for key in ("top_rows", "top_cols"):
        shared += len(set(first[key]) & set(second[key]))
        possible += min(len(first[key]), len(second[key]))
    return shared / possible if possible else float("nan")


def overlap(caches: pd.DataFrame, title: str) -> Figure:
    """Figures 12-15: per block, overlap of the selected indices between importance measures (same data
    seed, solid) and between data seeds (same measure, dashed; the shots differ)."""
    datasets = sorted(caches["dataset"].unique())
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        part = caches[caches["dataset"] == dataset].reset_index(drop=True)
        for first, second in combinations(range(len(part)), 2):
            a, b = part.iloc[first], part.iloc[second]
            same_seed = a["data_seed"] == b["data_seed"]
            if not same_seed and a["importance"] != b["importance"]:
                continue
            shared = {name: (a["layers"][name], b["layers"][name]) for name in a["layers"] if name in b["layers"]}
            blocks, values = _per_block(shared, lambda pair: index_overlap(*pair))
            label = (f"{a['importance']} vs {b['importance']} (seed {a['data_seed']})" if same_seed
                     else f"{a['importance']}: seeds {a['data_seed']} vs {b['data_seed']}")
            axis.plot(blocks, values, marker="o", linestyle="-" if same_seed else "--", label=label)
        axis.set(title=dataset, xlabel="block", ylabel="overlap of selected indices", ylim=(0, 1.05))
        axis.legend(fontsize=6)
    figure.tight_layout()
    return figure


VERDICT_COLOURS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:orange"}


def claims_forest(verdicts: pd.DataFrame, title: str) -> Figure:
    """Each claim's effect (treatment - control, points) with its 95% interval, one panel per dataset; the
    shaded band is the claim's margin, the colour its verdict."""
    datasets = list(dict.fromkeys(verdicts["dataset"]))
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        rows = verdicts[(verdicts["dataset"] == dataset) & verdicts["effect"].notna()].reset_index(drop=True)
        for position, row in rows.iterrows():
            low = row["low"] if np.isfinite(row["low"]) else row["effect"]
            high = row["high"] if np.isfinite(row["high"]) else row["effect"]
            colour = VERDICT_COLOURS.get(row["verdict"], "tab:gray")
            axis.errorbar(row["effect"], position, xerr=[[row["effect"] - low], [high - row["effect"]]], fmt="o",
                          color=colour, capsize=3)
            if row["test"] in ("noninferior", "equivalent"):
                axis.fill_betweenx([position - 0.35, position + 0.35], -row["margin"],
                                   row["margin"] if row["test"] == "equivalent" else max(high, row["margin"]),
                                   color="tab:gray", alpha=0.15, linewidth=0)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(rows)), [f"{row.claim}" for row in rows.itertuples()])
        axis.invert_yaxis()
        axis.set_xlabel("effect, treatment - control (points)")
        axis.set_title(dataset)
    figure.tight_layout()
    return figure


def leaderboard(rows: pd.DataFrame, title: str) -> Figure:
    """The leaderboard (``results/leaderboard.py``): per task, each setting's test mean with its 95% interval against
    its trainable adapter parameters (log axis), the Pareto front drawn as the best metric reachable with at most
    that many parameters. A setting without adapter parameters (the head alone) has no place on the log axis: the
    panel names it."""
    scored = rows[rows["seeds"] > 0]
    datasets = sorted(scored["dataset"].unique())
    figure, axes = _panels(datasets, title)
    for axis, dataset in zip(axes, datasets):
        task = scored[scored["dataset"] == dataset]
        drawn = task[task["params"] > 0]
        for row in drawn.itertuples():
            spread = [[row.mean - row.low], [row.high - row.mean]] if row.seeds > 1 else None
            axis.errorbar(row.params, row.mean, yerr=spread, fmt="o", capsize=3,
                          color="tab:blue" if row.pareto else "tab:gray")
            axis.annotate(row.setting.split("; ")[0].split(": ", 1)[1], (row.params, row.mean), fontsize=7,
                          xytext=(4, 3), textcoords="offset points")
        front = drawn[drawn["pareto"]].sort_values("params")
        axis.step(front["params"], front["mean"], where="post", color="tab:blue", linewidth=1, label="Pareto front")
        left_out = task[task["params"] <= 0]
        if not left_out.empty:
            axis.text(0.02, 0.02, "0 params, not drawn: " + ", ".join(left_out["setting"]), transform=axis.transAxes,
                      fontsize=6, va="bottom")
        _log_parameters(axis)
        if not drawn.empty:  # at least a decade either side: settings within one decade still get labelled ticks
            axis.set_xlim(drawn["params"].min() / 4, drawn["params"].max() * 4)
        axis.set(title=dataset, xlabel="trainable adapter parameters", ylabel="test metric, mean over seeds (95% CI)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
