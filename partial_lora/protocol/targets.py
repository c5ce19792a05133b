"""Render a table or figure target from the records and caches present (nothing is trained here), and the index of
every target's state (``results/README.md``).

A cell (a row of a table, a point or line of a figure) is one setting of the target's plan: its runs are the seeds x
learning rates the plan launches for it, found in the store by run id (``sweep.launched_run_id``) and by nothing
else, so a record of another setting (another derivation, budget, strategy or rank) never enters a cell. Each
caption says how many of its planned runs every cell holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from partial_lora.protocol.budget import BUDGET_KEYS, BudgetDecision, BudgetRule
from partial_lora.protocol.sweep import (GROUPS, Checkout, Protocol, compose_target, launch, launched_config,
                                         launched_run_id, planned_multiruns, run_overrides)
from partial_lora.ratios.cache import load_entries
from partial_lora.results import figures
from partial_lora.results.aggregate import (REFERENCE_METHOD, fill_majority_rates, learning_status, load_records,
                                            protocol_summary)
from partial_lora.results.tables import load_paper, render, table_rows

SELECTED_OVER = ("seed", "lr")  # what the protocol chooses among, never a setting of its own
CACHE_KINDS = ("overlap", "kept_fraction")
STORED_GROUPS = ("backbone", "dataset", "method")  # record columns named as the plan names them  # figures drawn from ratio caches, not from run records
# What a backbone needs that this project's machines (offline CPUs) lack: a target that plans it cannot run here.
NEEDS_FROM_OUTSIDE = {
    "clip_vit_b16": "the CLIP ViT-B/16 weights (open_clip `openai`) and the paper's vision datasets, which cannot "
                    "be downloaded offline",
    "deberta_v3_base": "microsoft/deberta-v3-base from the Hugging Face hub, which cannot be downloaded offline",
    "llama2_7b": "meta-llama/Llama-2-7b-hf (gated, 13 GB, a GPU), which cannot be downloaded offline",
}


@dataclass(frozen=True)
class Cell:
    """One setting of a target's plan: every planned override but the seeds and learning rates, and the overrides
    of each of its runs, as ``run.py`` receives them from the target's multirun."""

    setting: tuple[str, ...]
    runs: tuple[tuple[str, ...], ...]


def planned_cells(cfg: DictConfig, budgets: dict[str, tuple[str, ...]] | None = None) -> list[Cell]:
    cells = []
    for settings in planned_multiruns(cfg, budgets=budgets):
        fixed = {key: values for key, values in settings.items() if key not in SELECTED_OVER}
        selected = {key: values for key, values in settings.items() if key in SELECTED_OVER}
        for setting in run_overrides(fixed):
            cells.append(Cell(tuple(setting), tuple(tuple(setting + run) for run in run_overrides(selected))))
    return cells


def _setting_keys(planned: list[dict]) -> list[str]:
    """Swept keys other than seed, learning rate and the training budget (the rule's, one per task), in first-seen
    order."""
    keys = ["backbone", "dataset", "method", "importance"]
    for settings in planned:
        keys += [key for key in settings if key not in keys and key not in SELECTED_OVER and key not in BUDGET_KEYS]
    return keys


def setting_value(config: dict[str, Any], key: str) -> Any:
    """A resolved config's value of a planned key: a config group's ``name``, else the dotted key."""
    node: Any = config
    for part in (f"{key}.name" if key in GROUPS else key).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# --- training budgets (protocol/budget.py) ----------------------------------------------------------------------

def _budget_datasets(cfg: DictConfig, rule: BudgetRule) -> dict[str, str]:
    """The target's datasets the rule covers, each with its domain's backbone."""
    covered = {}
    for domain in cfg.sweep.domains:
        if domain in rule.domains:
            where = cfg.scale.domains[domain]
            for dataset in where.datasets:
                if dataset in cfg.sweep.get("datasets", where.datasets):
                    covered.setdefault(dataset, where.backbone)
    return covered


def target_budgets(checkout: Checkout, cfg: DictConfig, records: pd.DataFrame,
                   extra: list[str] | tuple[str, ...] = ()) -> dict[str, BudgetDecision]:
    """Each covered dataset's budget decision from ``records`` (indexed by run id); none where the scale has no rule."""
    rule = BudgetRule.from_config(cfg, extra)
    if rule is None:
        return {}

    def record_of(backbone: str, dataset: str, overrides: tuple[str, ...]) -> dict[str, Any] | None:
        run_id = launched_run_id(checkout, cfg.sweep.name, cfg.scale.name,
                                 [f"backbone={backbone}", f"dataset={dataset}", *overrides, *extra])
        return records.loc[run_id].to_dict() if run_id in records.index else None

    return {dataset: rule.decide(dataset, lambda overrides: record_of(backbone, dataset, overrides), cfg.data_dir)
            for dataset, backbone in _budget_datasets(cfg, rule).items()}


def budget_overrides(decisions: dict[str, BudgetDecision]) -> dict[str, tuple[str, ...]]:
    """Per dataset, the overrides of its chosen budget, or of the budget under trial until one is chosen."""
    return {dataset: (decision.chosen or decision.pending).overrides() for dataset, decision in decisions.items()}


def settle_budgets(checkout: Checkout, cfg: DictConfig, launcher: str = "local", extra: list[str] | tuple[str, ...] = (),
                   dry_run: bool = False) -> tuple[int, dict[str, BudgetDecision]]:
    """Run the budget rule's pilots of the target's datasets until each budget is decided (``dry_run``: print the
    pending ones); returns how many multiruns had failed runs, and the decisions. A pilot that failed leaves its
    budget pending: it is launched once, not again."""
    rule, failures, launched = BudgetRule.from_config(cfg, extra), 0, set()
    backbones = _budget_datasets(cfg, rule) if rule is not None else {}
    while True:
        decisions = target_budgets(checkout, cfg, _indexed(load_records(cfg.results_dir)), extra)
        pending = [{"backbone": [backbones[dataset]], "dataset": [dataset], "seed": [rule.seed], "lr": list(rule.lrs),
                    "method": [REFERENCE_METHOD], **{key: [value] for key, value in
                                                     (override.split("=", 1) for override in decision.pending.overrides())}}
                   for dataset, decision in decisions.items() if decision.pending is not None]
        pending = [settings for settings in pending if repr(settings) not in launched]
        if not pending:
            return failures, decisions
        launched.update(repr(settings) for settings in pending)
        failures += launch(checkout, cfg.sweep.name, cfg.scale.name, pending, launcher, extra, dry_run)
        if dry_run:
            return failures, decisions


def _indexed(records: pd.DataFrame) -> pd.DataFrame:
    # A run id names one experiment: a second record of it (a copied store) must not count twice.
    return records if records.empty else records.drop_duplicates("run_id", keep="last").set_index("run_id", drop=False)


class TargetPlan:
    """A target's cells at its scale, the run ids of their runs, and the finished records the store holds under
    them; ``extra`` are the overrides every run of the target is launched with (``reproduce.py ... -- <extra>``)."""

    def __init__(self, checkout: Checkout, cfg: DictConfig, extra: list[str] | tuple[str, ...] = (),
                 records: pd.DataFrame | None = None) -> None:
        self.checkout, self.cfg, self.extra = checkout, cfg, list(extra)
        self.name, self.scale = cfg.sweep.name, cfg.scale.name
        records = load_records(cfg.results_dir) if records is None else records
        self.records = _indexed(records)
        self.budgets = target_budgets(checkout, cfg, self.records, extra)
        self.cells = planned_cells(cfg, budget_overrides(self.budgets))
        self._ids: dict[Cell, list[str]] = {}
        self._stored = set() if records.empty else set(
            records[["scale", *STORED_GROUPS]].itertuples(index=False, name=None))

    @property
    def planned(self) -> int:
        return sum(len(cell.runs) for cell in self.cells)

    def run_ids(self, cell: Cell) -> list[str]:
        if cell not in self._ids:
            self._ids[cell] = [launched_run_id(self.checkout, self.name, self.scale, [*run, *self.extra])
                               for run in cell.runs]
        return self._ids[cell]

    def found(self, cell: Cell) -> pd.DataFrame:
        """The finished records of the cell's runs. A run id covers the scale and the groups the cell names, so ids
        are computed only where a record shares them: a paper-scale plan names thousands of runs."""
        named = dict(override.split("=", 1) for override in cell.setting)
        if not any(scale == self.scale and all(named.get(key, value) == value for key, value in zip(STORED_GROUPS, held))
                   for scale, *held in self._stored):
            return self.records.iloc[:0]
        return self.records[self.records.index.isin(self.run_ids(cell))]

    def cell_frame(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per cell (index), its planned keys' values (from the config its first run resolves to), planned and found
        run counts; and the found records, each with its cell's values and index (column ``cell``)."""
        keys = _setting_keys(planned_multiruns(self.cfg))
        rows, found = [], []
        for index, cell in enumerate(self.cells):
            config = launched_config(self.checkout, self.name, self.scale, [*cell.runs[0], *self.extra])
            values = {key: setting_value(config, key) for key in keys}
            records = self.found(cell)
            rows.append(values | {"planned": len(cell.runs), "found": len(records)})
            found.append(records.drop(columns=[key for key in keys if key in records]).assign(cell=index, **values))
        return pd.DataFrame(rows), pd.concat(found, ignore_index=True)


def cell_labels(cells: pd.DataFrame, keys: list[str]) -> list[str]:
    """Each cell's values of the keys that vary across the plan's cells, the dataset last and defaults ("none")
    left out: "partial_lora / svd / coto / sst2"."""
    varying = [key for key in keys if key != "dataset" and cells[key].astype(str).nunique() > 1] + ["dataset"]
    return [" / ".join(str(value) for value in row if str(value) not in ("none", "None"))
            for row in cells[varying].itertuples(index=False)]


def plan_note(cells: pd.DataFrame, labels: list[str], records: pd.DataFrame, command: str) -> str:
    """The caption's account of the plan: runs planned and found, each cell short of its planned runs, and what
    the missing ones would cost, timed by the plan's own finished runs of each task."""
    complete = int((cells["found"] == cells["planned"]).sum())
    text = (f"Runs found by run id: {cells['found'].sum()} of the {cells['planned'].sum()} the plan names "
            f"({complete} of {len(cells)} cells complete).")
    short = [f"{label} {found} of {planned}" for label, found, planned
             in zip(labels, cells["found"], cells["planned"]) if found < planned]
    if short:
        text += (f" Cells short of their runs (found of planned): {'; '.join(short)}."
                 + _missing_cost(cells, records, command))
    return text


def grid_edge_note(cells: pd.DataFrame, labels: list[str], lrs: tuple[float, ...]) -> str:
    """The caption's list of cells whose selected runs all trained at one end of the learning-rate grid: their best
    rate may lie beyond it, so the grid, not the method, may bound their number (at cpu, Partial-LoRA's and LoSiA's
    top-3 all sit at the top rate)."""
    ends = []
    for end, rate in (("top", max(lrs)), ("bottom", min(lrs))):
        at_end = [label for label, chosen in zip(labels, cells["lrs"])
                  if isinstance(chosen, list) and chosen and all(lr == rate for lr in chosen)]
        if at_end:
            ends.append(f"at the {end} rate {rate:g}: {', '.join(at_end)}")
    if not ends:
        return ""
    return (f" Cells whose selected runs all trained at an end of the learning-rate grid (their best rate may lie "
            f"beyond it, so a wider grid could score them higher): {'; '.join(ends)}.")


def _missing_cost(cells: pd.DataFrame, records: pd.DataFrame, command: str) -> str:
    missing = (cells["planned"] - cells["found"]).groupby(cells["dataset"]).sum()
    medians = records.groupby("dataset")["wall_time_s"].median().dropna()
    timed = [dataset for dataset in missing.index if dataset in medians.index and missing[dataset]]
    untimed = [dataset for dataset in missing.index if dataset not in medians.index and missing[dataset]]
    text = " They are not trained yet"
    if timed:
        hours = sum(missing[dataset] * medians[dataset] for dataset in timed) / 3600
        text += (f": at the median recorded wall time of this plan's finished runs ("
                 f"{', '.join(f'{dataset} {medians[dataset]:.0f} s' for dataset in timed)}), "
                 f"{'at least ' if untimed else ''}{hours:.1f} hours of one worker")
    if untimed:
        text += f" ({', '.join(untimed)}: no finished run to time)"
    return text + f"; `{command}` trains them and skips the finished ones."


def provenance(cfg: DictConfig) -> str:
    domains = "; ".join(f"{name}: {cfg.scale.domains[name].backbone} on {', '.join(cfg.scale.domains[name].datasets)}"
                        for name in cfg.sweep.domains)
    text = f"Scale `{cfg.scale.name}` ({domains})."
    if cfg.sweep.get("protocol", True):
        text += f" Protocol: {Protocol.from_config(cfg.protocol).describe()}."
    return text


def budget_note(cfg: DictConfig, decisions: dict[str, BudgetDecision]) -> str:
    """The caption's account of each task's training budget under the scale's rule (empty without a rule)."""
    if not decisions:
        return ""
    chosen = "; ".join(f"{dataset} {decision.chosen.describe()}" if decision.chosen else
                       f"{dataset} not decided (its pilot at {decision.pending.describe()} is unfinished: planned there)"
                       for dataset, decision in decisions.items())
    return f" Training budgets: {chosen}. {BudgetRule.from_config(cfg).describe()}"


def _caches(cfg: DictConfig) -> tuple[int, pd.DataFrame]:
    """How many ratio caches the plan asks for, one per (backbone, dataset, importance, data seed), and the newest
    entry of each present at the configured threshold and, where counts depend on the seed (a probed head), the
    configured seed."""
    wanted = set()
    for settings in planned_multiruns(cfg):
        for backbone in settings["backbone"]:
            for dataset in settings["dataset"]:
                for importance in settings.get("importance", []):
                    for data_seed in settings.get("data_seed", [cfg.data_seed]):
                        wanted.add((backbone, dataset, importance, data_seed))
    entries = [entry for entry in load_entries(cfg.ratios.cache_dir)
               if (entry["backbone"], entry["dataset"], entry["importance"], entry["data_seed"]) in wanted
               and entry["threshold"] == cfg.ratios.threshold and entry.get("seed", cfg.seed) == cfg.seed]
    frame = pd.DataFrame(entries)
    if frame.empty:
        return len(wanted), frame
    frame = frame.sort_values("modified").drop_duplicates(["backbone", "dataset", "importance", "data_seed"], keep="last")
    return len(wanted), frame.sort_values(["dataset", "importance", "data_seed"]).reset_index(drop=True)


def render_target(checkout: Checkout, cfg: DictConfig, tables_dir: str | Path = "results/tables",
                  figures_dir: str | Path = "results/figures", extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Write the target's Markdown and LaTeX (tables) or PNG and a Markdown caption (figures); return the paths.
    ``extra``: the overrides its runs were launched with, which their run ids include."""
    sweep, scale = cfg.sweep, cfg.scale.name
    spec = OmegaConf.to_container(sweep.render, resolve=True)
    stem = f"{sweep.name}_{scale}"
    if spec["kind"] in CACHE_KINDS:
        planned, caches = _caches(cfg)
        if caches.empty:
            print(f"{sweep.name}: no ratio caches under {cfg.ratios.cache_dir} for this plan; run the target first.")
            return []
        figure = getattr(figures, spec["kind"])(caches, sweep.title)
        note = (f"Scale `{scale}`; {len(caches)} of the {planned} ratio caches the plan names: "
                f"{', '.join(Path(path).name for path in caches['path'])}.")
        return _save_figure(figure, Path(figures_dir), stem, sweep.title, note)

    plan = TargetPlan(checkout, cfg, extra)
    cells, records = plan.cell_frame()
    if records.empty:
        print(f"{sweep.name}: none of the {plan.planned} planned runs has a finished record at scale {scale} under "
              f"{cfg.results_dir}; run the target first.")
        return []
    keys = _setting_keys(planned_multiruns(cfg))
    records = fill_majority_rates(records, cfg.data_dir)
    protocol = Protocol.from_config(cfg.protocol)
    summary = protocol_summary(records, top_k=protocol.top_k, keys=["cell"])
    cells = cells.join(summary.set_index("cell"))
    cells["at_chance"] = cells["at_chance"].fillna(False).astype(bool)  # a cell without runs is no evidence
    command = f"make {sweep.name} SCALE={scale}"
    labels = cell_labels(cells, keys)
    note = (f"{provenance(cfg)}{budget_note(cfg, plan.budgets)} {plan_note(cells, labels, records, command)}"
            f"{grid_edge_note(cells, labels, protocol.lrs)}")
    if spec["kind"] == "table":
        variant = spec.get("variant")
        shown = [key for key in keys if key not in ("backbone", "dataset", "method", "importance", variant)
                 and cells[key].astype(str).nunique() > 1]
        # The paper's numbers stand beside the setting it ran: the target's own value of each extra swept key.
        paper_setting = {key: setting_value(OmegaConf.to_container(cfg), key) for key in shown}
        paper = load_paper(checkout.paper_tables)
        rows = table_rows(cells, paper, sweep.name, variant, paper_setting)
        paper_backbones = ", ".join(sorted(paper.query("table == @sweep.name")["backbone"].unique()))
        note += f" The paper column is the paper's {sweep.name} ({paper_backbones}); diff = this run - paper."
        learning = learning_status(records)
        markdown, latex = render(rows, sweep.title, note, variant, learning, shown)
        Path(tables_dir).mkdir(parents=True, exist_ok=True)
        written = []
        for suffix, text in ((".md", markdown), (".tex", latex)):
            path = Path(tables_dir) / f"{stem}{suffix}"
            path.write_text(text)
            written.append(path)
        return written
    drawn = cells[cells["found"] > 0]
    if spec["kind"] == "tradeoff":
        figure = figures.tradeoff(drawn, sweep.title, spec.get("arrows", []))
    elif spec["kind"] == "curve":
        figure = figures.curve(drawn, sweep.title, spec["x"], spec["series"], spec.get("log_x", False))
    elif spec["kind"] == "residuals":
        selected = records[records["path"].isin([path for paths in drawn["paths"] for path in paths])]
        figure = figures.residuals(selected, sweep.title, spec["layers"], ["method", "importance"])
    else:
        raise ValueError(f"unknown render kind {spec['kind']!r} in experiment {sweep.name}")
    return _save_figure(figure, Path(figures_dir), stem, sweep.title, note)


def _save_figure(figure, directory: Path, stem: str, title: str, note: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    image, caption = directory / f"{stem}.png", directory / f"{stem}.md"
    figures.save(figure, image)
    caption.write_text(f"# {title}\n\n![{title}]({image.name})\n\n{note}\n")
    return [image, caption]


# --- the index of results ---------------------------------------------------------------------------------------

def target_names(checkout: Checkout) -> list[str]:
    """Every experiment config with a ``sweep:`` block (a table or figure target), tables first."""
    names = [path.stem for path in (checkout.conf / "experiment").glob("*.yaml")
             if "sweep" in (OmegaConf.load(path) or {})]
    return sorted(names, key=lambda name: (not name.startswith("table"), int("".join(filter(str.isdigit, name)))))


def scale_names(checkout: Checkout) -> list[str]:
    return sorted(path.stem for path in (checkout.conf / "scale").glob("*.yaml"))


def target_state(checkout: Checkout, cfg: DictConfig, extra: list[str] | tuple[str, ...] = (),
                 records: pd.DataFrame | None = None) -> dict[str, Any]:
    """What the store holds of a target at its scale: ``state`` (complete, partial, not run, cannot run here),
    ``found`` of ``planned`` runs (ratio caches for the cache figures), ``cells_complete`` of ``cells``, and why it
    cannot run here (``reason``: a backbone of its plan needs what :data:`NEEDS_FROM_OUTSIDE` names)."""
    if cfg.sweep.render.kind in CACHE_KINDS:
        planned, caches = _caches(cfg)
        found, cells, complete, unit = len(caches), planned, len(caches), "ratio caches"
    else:
        plan = TargetPlan(checkout, cfg, extra, records)
        counts = [(len(plan.found(cell)), len(cell.runs)) for cell in plan.cells]
        found, planned = sum(found for found, _ in counts), plan.planned
        cells, complete, unit = len(counts), sum(found == planned for found, planned in counts), "runs"
    backbones = {settings["backbone"][0] for settings in planned_multiruns(cfg)}
    reasons = [NEEDS_FROM_OUTSIDE[name] for name in sorted(backbones) if name in NEEDS_FROM_OUTSIDE]
    state = ("complete" if found == planned else "partial" if found
             else "cannot run here" if reasons else "not run")
    return {"state": state, "found": found, "planned": planned, "unit": unit, "cells": cells,
            "cells_complete": complete, "reason": "; ".join(reasons) if state == "cannot run here" else ""}


def render_index(checkout: Checkout, path: str | Path = "results/README.md", tables_dir: str | Path = "results/tables",
                 figures_dir: str | Path = "results/figures", extra: list[str] | tuple[str, ...] = (),
                 targets: list[str] | None = None) -> Path:
    """Write the index of results: each table and figure target (``targets``, default all) at every scale, its state
    from its plan and the store, the runs it uses and a link to its rendered file; and a link to the scale's
    leaderboard where one is rendered beside the index."""
    path = Path(path)
    lines = ["# Results", "", "Generated by `make tables` (`scripts/reproduce.py index`) from each target's plan "
             "(`conf/experiment/<target>.yaml` at `conf/scale/<scale>.yaml`) and the store: a target's runs are the "
             "ones its plan names, found by run id; complete when every one has a finished record, partial with "
             "the counts, not run, or cannot run here (and why). `make <target> SCALE=<scale>` runs what is missing "
             "and renders it.", ""]
    stores: dict[str, pd.DataFrame] = {}
    for scale in scale_names(checkout):
        lines += [f"## Scale `{scale}`", "", "| target | state | runs found / planned | cells complete | file |",
                  "|---|---|---|---|---|"]
        for name in targets or target_names(checkout):
            cfg = compose_target(checkout, name, scale, extra)
            if cfg.results_dir not in stores:
                stores[cfg.results_dir] = load_records(cfg.results_dir)
            state = target_state(checkout, cfg, extra, stores[cfg.results_dir])
            directory = Path(tables_dir if cfg.sweep.render.kind == "table" else figures_dir)
            rendered = directory / f"{name}_{scale}.md"
            link = f"[{rendered.name}]({os.path.relpath(rendered, path.parent)})" if rendered.is_file() else "-"
            described = state["state"] + (f": {state['reason']}" if state["reason"] else "")
            lines.append(f"| {name}: {cfg.sweep.title.partition(': ')[2]} | {described} | {state['found']} / "
                         f"{state['planned']} {state['unit']} | {state['cells_complete']} / {state['cells']} | {link} |")
        leaderboard = path.parent / f"leaderboard_{scale}.md"  # results/leaderboard.py
        if leaderboard.is_file():
            lines += ["", f"Leaderboard (per method and task: metric with its interval, costs, Pareto front; `make "
                      f"leaderboard SCALE={scale}`): [{leaderboard.name}]({leaderboard.name})."]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
