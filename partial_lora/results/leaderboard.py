"""A method leaderboard beyond the paper's anchors, ``results/leaderboard_<scale>.{md,png}``, from the records alone.

Per method and task: the test metric's mean over seeds with its 95% Student-t interval, the runs found of those
planned, the trainable adapter parameters, the saved adapter file's size, a training step's time and the peak memory
(``step_time_s``, ``peak_memory_bytes``, ``adapter_bytes``: ``-`` where records predate them, and no file size for a
method that saves no PEFT adapter, such as LoSiA, which trains blocks of the base weights),
and whether the setting is on the task's Pareto front of test metric against trainable parameters.

Its runs are exactly those named by run id in two plans: Table 6's (``conf/experiment/table6.yaml``, every cell of
its sweep) and the claims' (:meth:`ClaimPlan.planned_runs`, pilots included, without the larger training sets a
claim sweeps: those are another budget, not another method). A row is one setting, every planned value but seed and
learning rate, identified by the run id its config has at a fixed seed and rate: a setting both plans name (Table 6's
LoRA cell and the claims' ``lora`` arm) is one row under both labels, and two settings of one method (the claims'
``partial`` arm and ``partial_512``, counts derived on 128 or 512 examples) are two rows, never pooled.

Per seed a row takes its run with the best validation score among the planned learning rates (ties: the smaller
rate), as the claims' pilot picks a rate: the test metric never selects. Parameters are those runs' mean; the
costs their median over the runs that recorded them. A task LoRA did not learn at this budget
(``aggregate.learning_status``) has its rows marked, as the tables mark theirs, and so has a row whose own runs
the rule finds at chance (``aggregate.at_chance``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from partial_lora.protocol.budget import BUDGET_KEYS
from partial_lora.protocol.claims import ClaimPlan, compose_claims, paired_interval
from partial_lora.protocol.sweep import Checkout, compose_target, launched_run_id
from partial_lora.protocol.targets import TargetPlan
from partial_lora.results import figures
from partial_lora.results.aggregate import at_chance, fill_majority_rates, learning_status, load_records
from partial_lora.results.tables import AT_CHANCE, AT_CHANCE_NOTE, NOT_LEARNED, parameter_count, rule_note

TABLE = "table6"
# The seed and learning rate a setting's id is computed at: any fixed pair names the setting, not a run.
SETTING_AT = ("seed=0", "lr=0")
MEMORY_KINDS = {"cpu_max_rss": "RSS", "cuda_max_allocated": "CUDA"}


@dataclass
class Setting:
    """One row's setting: the plans' labels for it, its task and the run ids the plans name for it."""

    dataset: str
    labels: list[str] = field(default_factory=list)
    run_ids: set[str] = field(default_factory=set)


def planned_settings(checkout: Checkout, scale: str, extra: list[str] | tuple[str, ...] = (),
                     records: pd.DataFrame | None = None) -> list[Setting]:
    """Every setting Table 6's plan and the claims' plan name at ``scale``, by setting id (see the module docstring);
    ``extra``: the overrides their runs were launched with."""
    extra = list(extra)
    settings: dict[str, Setting] = {}

    def add(setting_id: str, dataset: str, label: str, run_ids: list[str]) -> None:
        setting = settings.setdefault(setting_id, Setting(dataset))
        setting.labels += [] if label in setting.labels else [label]
        setting.run_ids.update(run_ids)

    table = TargetPlan(checkout, compose_target(checkout, TABLE, scale, extra), extra, records)
    for cell in table.cells:
        named = dict(override.split("=", 1) for override in cell.setting)
        label = " / ".join(value for key, value in named.items() if key not in ("backbone", "dataset", *BUDGET_KEYS))
        add(launched_run_id(checkout, TABLE, scale, [*cell.setting, *SETTING_AT, *extra]), named["dataset"],
            f"{TABLE}: {label}", table.run_ids(cell))
    claims = ClaimPlan(checkout, compose_claims(checkout, scale, extra), scale, extra)
    for run in claims.planned_runs(swept=False):
        setting_id = launched_run_id(checkout, "claims", scale, [f"dataset={run.dataset}", *SETTING_AT, *run.overrides, *extra])
        add(setting_id, run.dataset, f"claims: {run.arm}",
            [claims.run_id(run.dataset, run.seed, run.lr, run.overrides)])
    return list(settings.values())


def pareto_front(rows: pd.DataFrame) -> pd.Series:
    """Whether each row (with ``dataset``, ``mean``, ``params``) is on its task's Pareto front: no other row of the
    task with runs has at least its test metric with at most its parameters, and one of the two strictly."""
    front = pd.Series(False, index=rows.index)
    for _, task in rows[rows["mean"].notna()].groupby("dataset"):
        for index, row in task.iterrows():
            at_least = (task["mean"] >= row["mean"]) & (task["params"] <= row["params"])
            strictly = (task["mean"] > row["mean"]) | (task["params"] < row["params"])
            front[index] = not (at_least & strictly).any()
    return front


def leaderboard_rows(settings: list[Setting], records: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: runs planned and found, the per-seed runs' test mean and interval, parameters, costs and
    the Pareto mark (see the module docstring)."""
    indexed = records.drop_duplicates("run_id", keep="last").set_index("run_id")
    rows = []
    for setting in settings:
        found = indexed[indexed.index.isin(setting.run_ids)]
        per_seed = found.sort_values(["val", "lr"], ascending=[False, True]).drop_duplicates("seed")
        interval = paired_interval(list(per_seed["test"]))
        kinds = set(per_seed["peak_memory_kind"].dropna())
        rows.append({"dataset": setting.dataset, "setting": "; ".join(setting.labels), "planned": len(setting.run_ids),
                     "found": len(found), "seeds": interval.n, "mean": interval.mean, "low": interval.low,
                     "high": interval.high, "at_chance": at_chance(found), "params": per_seed["params"].mean(),
                     **{key: per_seed[key].median() for key in ("adapter_bytes", "step_time_s", "peak_memory_bytes")},
                     "memory_kind": kinds.pop() if len(kinds) == 1 else "mixed" if kinds else None})
    frame = pd.DataFrame(rows)
    frame["pareto"] = pareto_front(frame)
    return frame.sort_values(["dataset", "mean", "setting"], ascending=[True, False, True],
                             na_position="last").reset_index(drop=True)


def _bytes(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    if value >= 1e9:
        return f"{value / 1e9:.2f} GB"
    return f"{value / 1e6:.1f} MB" if value >= 1e6 else f"{value / 1e3:.1f} KB"


def _metric(row: pd.Series, not_learned: frozenset[str]) -> str:
    if row["seeds"] == 0:
        return "-"
    text = f"{row['mean']:.2f} [{row['low']:.2f}, {row['high']:.2f}]" if row["seeds"] > 1 else f"{row['mean']:.2f}"
    return text + (f" {NOT_LEARNED}" if row["dataset"] in not_learned else f" {AT_CHANCE}" if row["at_chance"] else "")


def formatted(rows: pd.DataFrame, not_learned: frozenset[str] = frozenset()) -> pd.DataFrame:
    """The leaderboard's human-readable columns; ``-`` where a row has no runs or its records lack a cost."""
    memory = [_bytes(value) + (f" ({MEMORY_KINDS.get(kind, kind)})" if np.isfinite(value) else "")
              for value, kind in zip(rows["peak_memory_bytes"], rows["memory_kind"])]
    return pd.DataFrame({
        "task": rows["dataset"], "setting": rows["setting"],
        "test [95% CI]": [_metric(row, not_learned) for _, row in rows.iterrows()], "seeds": rows["seeds"].astype(str),
        "runs found of planned": [f"{found} of {planned}" for found, planned in zip(rows["found"], rows["planned"])],
        "trainable params": rows["params"].map(parameter_count), "adapter file": rows["adapter_bytes"].map(_bytes),
        "step time": rows["step_time_s"].map(lambda value: "-" if not np.isfinite(value) else f"{1e3 * value:.0f} ms"),
        "peak memory": memory, "Pareto": rows["pareto"].map(lambda on: "**front**" if on else "")})


def render_leaderboard(checkout: Checkout, scale: str, extra: list[str] | tuple[str, ...] = (),
                       directory: str | Path = "results") -> list[Path]:
    """Write ``leaderboard_<scale>.md`` and ``.png`` under ``directory`` from the records of the two plans' runs."""
    cfg = compose_target(checkout, TABLE, scale, extra)
    records = load_records(cfg.results_dir)
    settings = planned_settings(checkout, scale, extra, records)
    planned = set().union(*(setting.run_ids for setting in settings))
    used = fill_majority_rates(records[records["run_id"].isin(planned)], cfg.data_dir)
    rows = leaderboard_rows(settings, used)
    learning = learning_status(used)
    not_learned = frozenset(dataset for dataset, status in learning.items() if not status.learned)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"leaderboard_{scale}"
    title = f"Leaderboard at scale {scale}: test metric against trainable parameters"
    note = (f"Scale `{scale}`: the runs named by run id in the plans of {TABLE} (`conf/experiment/{TABLE}.yaml`) and "
            f"of the claims (`conf/experiment/claims.yaml`, pilots included, not the larger training sets a claim "
            f"sweeps), {len(used)} finished of {len(planned)} planned. A row is one "
            f"setting (every planned value but seed and learning rate), labelled by the plans that name it; settings "
            f"are never pooled. Per seed, the run with the best validation score among the planned learning rates; "
            f"test: the mean over those seeds with a 95% Student-t interval (none from one seed). Trainable params: "
            f"adapter parameters, the per-seed runs' mean (the classifier head apart). Adapter file: the saved "
            f"safetensors file (`adapter_bytes`); step time: the median training step (forward, backward, optimiser "
            f"step; `step_time_s`); peak memory: CUDA's peak allocated over the fit, or on CPU (RSS) the process's "
            f"peak resident set, which covers all it did before, earlier runs of one multirun process included: an "
            f"upper bound. Costs are the per-seed runs' median; `-` where their records predate these fields, and no "
            f"adapter file for a method that saves none (LoSiA trains blocks of the base weights; the head alone has "
            f"no adapter). Pareto: "
            f"**front** where no other row of the task has at least its test mean with at most its parameters. "
            f"{rule_note(learning)}{AT_CHANCE_NOTE if rows['at_chance'].any() else ''} "
            f"Rendered by `make leaderboard SCALE={scale}` "
            f"(`partial_lora/results/leaderboard.py`) from the records alone.")
    image, report = directory / f"{stem}.png", directory / f"{stem}.md"
    table = formatted(rows, not_learned).to_markdown(index=False, disable_numparse=True)
    report.write_text(f"# {title}\n\n{note}\n\n{table}\n\n![{title}]({image.name})\n")
    figures.save(figures.leaderboard(rows, title), image)
    return [report, image]
