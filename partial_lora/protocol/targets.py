"""Render a table or figure target from the records and caches present (nothing is trained here)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from partial_lora.protocol.sweep import Protocol, planned_multiruns, record_column, select_runs, training_budget
from partial_lora.ratios.cache import load_entries
from partial_lora.results import figures
from partial_lora.results.aggregate import fill_majority_rates, learning_status, load_records, protocol_summary
from partial_lora.results.tables import load_paper, render, table_rows

SELECTED_OVER = {"seed", "lr"}  # what the protocol chooses among, never a setting of its own


def _setting_keys(planned: list[dict]) -> list[str]:
    """Swept keys other than seed and learning rate, as record columns, in first-seen order."""
    keys = ["backbone", "dataset", "method", "importance"]
    for settings in planned:
        keys += [key for key in settings if key not in keys and key not in SELECTED_OVER]
    return keys


def provenance(cfg: DictConfig, runs: int) -> str:
    domains = "; ".join(f"{name}: {cfg.scale.domains[name].backbone} on {', '.join(cfg.scale.domains[name].datasets)}"
                        for name in cfg.sweep.domains)
    text = f"Scale `{cfg.scale.name}` ({domains})."
    if cfg.sweep.get("protocol", True):
        text += f" Protocol: {Protocol.from_config(cfg.protocol).describe()}; {runs} run records."
    return text


def _caches(cfg: DictConfig, planned: list[dict]) -> pd.DataFrame:
    """The newest cache entry per (backbone, dataset, importance, data seed) that the plan asks for, at
    the configured threshold and, where counts depend on the seed (a probed head), the configured seed."""
    wanted = set()
    for settings in planned:
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
        return frame
    frame = frame.sort_values("modified").drop_duplicates(["backbone", "dataset", "importance", "data_seed"], keep="last")
    return frame.sort_values(["dataset", "importance", "data_seed"]).reset_index(drop=True)


def render_target(cfg: DictConfig, tables_dir: str | Path = "results/tables",
                  figures_dir: str | Path = "results/figures") -> list[Path]:
    """Write the target's Markdown and LaTeX (tables) or PNG and a Markdown caption (figures); return the paths."""
    sweep, scale = cfg.sweep, cfg.scale.name
    spec = OmegaConf.to_container(sweep.render, resolve=True)
    planned = planned_multiruns(cfg)
    stem = f"{sweep.name}_{scale}"
    written: list[Path] = []
    if spec["kind"] in ("overlap", "kept_fraction"):
        caches = _caches(cfg, planned)
        if caches.empty:
            print(f"{sweep.name}: no ratio caches under {cfg.ratios.cache_dir} for this plan; run the target first.")
            return written
        figure = getattr(figures, "overlap" if spec["kind"] == "overlap" else "kept_fraction")(caches, sweep.title)
        note = f"Scale `{scale}`; ratio caches: {', '.join(Path(path).name for path in caches['path'])}."
        return _save_figure(figure, Path(figures_dir), stem, sweep.title, note)

    budgets = {dataset: training_budget(cfg, dataset) for settings in planned for dataset in settings["dataset"]}
    records = select_runs(load_records(cfg.results_dir), planned, scale, budgets)
    if records.empty:
        print(f"{sweep.name}: no finished run records at scale {scale} under {cfg.results_dir}; run the target first.")
        return written
    keys = _setting_keys(planned)
    records = records.assign(**{key: records[record_column(key)] for key in keys if key not in records})
    top_k = Protocol.from_config(cfg.protocol).top_k
    summary = protocol_summary(records, top_k=top_k, keys=keys)
    note = provenance(cfg, len(records))
    if spec["kind"] == "table":
        variant = spec.get("variant")
        rows = table_rows(summary, load_paper(), sweep.name, variant)
        paper_backbones = ", ".join(sorted(load_paper().query("table == @sweep.name")["backbone"].unique()))
        note += f" The paper column is the paper's {sweep.name} ({paper_backbones}); diff = this run - paper."
        learning = learning_status(fill_majority_rates(records, cfg.data_dir))
        markdown, latex = render(rows, sweep.title, note, variant, learning)
        Path(tables_dir).mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".md", markdown), (".tex", latex)):
            path = Path(tables_dir) / f"{stem}{suffix}"
            path.write_text(text)
            written.append(path)
        return written
    if spec["kind"] == "tradeoff":
        figure = figures.tradeoff(summary, sweep.title, spec.get("arrows", []))
    elif spec["kind"] == "curve":
        figure = figures.curve(summary, sweep.title, spec["x"], spec["series"], spec.get("log_x", False))
    elif spec["kind"] == "residuals":
        selected = records[records["path"].isin([path for paths in summary["paths"] for path in paths])]
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
