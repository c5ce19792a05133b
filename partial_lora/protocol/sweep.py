"""A table or figure target as Hydra multiruns.

An experiment config (``conf/experiment/<target>.yaml``) names the domains it covers (language, vision,
llm: the scale maps each to a backbone and datasets), groups of settings to cross, fixed settings, and
whether the protocol's seeds x learning rates apply. Each (domain, group) becomes one
``run.py -m ...`` command, so every Hydra launcher (local, joblib, SLURM) runs the sweep unchanged and
a rerun skips the runs whose records exist. The same plan selects the records a rendering reads.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from partial_lora.config import register_resolvers
from partial_lora.errors import INTERRUPTED_EXIT, RUNS_FAILED_EXIT, ConfigError, RunInterrupted
from partial_lora.results.record import NON_SEMANTIC_KEYS

ROOT = Path(__file__).resolve().parents[2]
# Config groups are selected by file name and recorded by their ``name`` field.
GROUPS = ("backbone", "dataset", "method", "importance", "strategy")


@dataclass(frozen=True)
class Protocol:
    """``models`` runs per setting (seeds x ``lrs``), reported as the mean test metric of the ``top_k``
    best by validation score."""

    models: int
    lrs: tuple[float, ...]
    top_k: int

    @classmethod
    def from_config(cls, protocol: DictConfig) -> Protocol:
        models, lrs, top_k = int(protocol.models), tuple(float(lr) for lr in protocol.lrs), int(protocol.top_k)
        if not lrs or models % len(lrs):
            raise ConfigError(f"protocol.models ({models}) must be a multiple of the number of learning rates "
                              f"in protocol.lrs ({len(lrs)}): each seed trains one model per learning rate.")
        if not 1 <= top_k <= models:
            raise ConfigError(f"protocol.top_k must be between 1 and protocol.models ({models}), got {top_k}.")
        return cls(models, lrs, top_k)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.models // len(self.lrs)))

    def describe(self) -> str:
        return (f"{self.models} models per setting ({len(self.seeds)} seeds x learning rates "
                f"{', '.join(f'{lr:g}' for lr in self.lrs)}), mean and std of the test metric of the "
                f"top {self.top_k} by validation score")


def compose_target(target: str, scale: str, overrides: list[str] = ()) -> DictConfig:
    """The resolved config of ``experiment=<target> scale=<scale>``, as each of its runs starts from."""
    register_resolvers()
    if not (ROOT / "conf" / "experiment" / f"{target}.yaml").is_file():
        raise ConfigError(f"no experiment config conf/experiment/{target}.yaml for target {target!r}.")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={target}", f"scale={scale}", *overrides])
    if "sweep" not in cfg:
        raise ConfigError(f"experiment {target} has no `sweep:` block, so it is no table or figure target.")
    return cfg


def _override_value(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def planned_multiruns(cfg: DictConfig, domains: list[str] | None = None) -> list[dict[str, list[Any]]]:
    """One dict of swept settings (key -> values) per (domain, group) of the target's sweep."""
    sweep, planned = cfg.sweep, []
    unknown = set(domains or ()) - set(sweep.domains)
    if unknown:
        raise ConfigError(f"target {sweep.name} covers domains {list(sweep.domains)}, not {sorted(unknown)}.")
    protocol = Protocol.from_config(cfg.protocol) if sweep.get("protocol", True) else None
    for domain in sweep.domains:
        if domains and domain not in domains:
            continue
        where = cfg.scale.domains[domain]
        datasets = [name for name in where.datasets if name in sweep.get("datasets", where.datasets)]
        for group in sweep.groups:
            settings: dict[str, list[Any]] = {"backbone": [where.backbone], "dataset": datasets or list(where.datasets)}
            if protocol is not None:
                settings |= {"seed": protocol.seeds, "lr": list(protocol.lrs)}
            settings |= {key: list(values) for key, values in OmegaConf.to_container(group).items()}
            settings |= {key: [value] for key, value in (sweep.get("fixed") or {}).items()}
            planned.append(settings)
    return planned


def command(target: str, scale: str, settings: dict[str, list[Any]], launcher: str,
            extra: list[str] = ()) -> list[str]:
    swept = [f"{key}={','.join(_override_value(value) for value in values)}" for key, values in settings.items()]
    return [sys.executable, str(ROOT / "run.py"), "-m", f"experiment={target}", f"scale={scale}",
            f"hydra/launcher={launcher}", *swept, *extra]


def run_multirun(argv: list[str]) -> int:
    """Run one ``run.py -m ...`` command and return its exit status; SIGTERM sent to this process is passed on
    to it, and its stop by SIGTERM raises :class:`RunInterrupted`: a plan stops where its multirun did."""
    process = subprocess.Popen(argv, cwd=ROOT)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        status = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status == INTERRUPTED_EXIT:
        raise RunInterrupted(f"SIGTERM stopped the multirun {' '.join(argv[2:])}; launching the same command again "
                             "resumes it and runs the rest of the plan.")
    return status


def launch(target: str, scale: str, planned: list[dict[str, list[Any]]], launcher: str = "local",
           extra: list[str] = (), dry_run: bool = False) -> int:
    """Run every multirun of the plan; finished runs skip themselves, so this fills in what is missing.
    ``dry_run`` prints each command and its number of runs, and runs nothing.

    Returns how many multiruns had failed (NaN loss) or refused (bad setting, exit status 2) runs: those leave
    failed records or errors and the rest of the plan still runs; SIGTERM or any other non-zero exit stops it.
    """
    with_failures = 0
    for settings in planned:
        argv = command(target, scale, settings, launcher, extra)
        runs = math.prod(len(values) for values in settings.values())
        print("+", " ".join(argv[1:]), f"  # {runs} runs", flush=True)
        if dry_run:
            continue
        status = run_multirun(argv)
        if status in (2, RUNS_FAILED_EXIT):
            with_failures += 1
        elif status:
            raise subprocess.CalledProcessError(status, argv)
    return with_failures


def record_column(key: str) -> str:
    """The column of :func:`load_records` holding an override's value: a group's ``name``, else the key."""
    return f"config.{key}.name" if key in GROUPS else f"config.{key}"


def _normalised(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "null"
    if isinstance(value, float) and value.is_integer():  # pandas holds ints as floats in a column with nulls
        value = int(value)
    return json.dumps(value)


def training_budget(cfg: DictConfig, dataset: str | None = None) -> dict[str, Any]:
    """The settings that fix how much a run trains at this scale: the ``dataset`` and ``train`` keys the scale
    preset sets (``conf/scale/<name>.yaml``) and every ``train`` key that changes what a run computes, as
    ``cfg`` resolves them, for ``dataset`` when given (a preset may budget datasets apart, ``scale.budgets``)."""
    preset = OmegaConf.load(ROOT / "conf" / "scale" / f"{cfg.scale.name}.yaml")
    keys = {f"dataset.{key}" for key in preset.get("dataset") or {}}
    keys |= {f"train.{key}" for key in (*(preset.get("train") or {}), *cfg.train)}
    if dataset is not None:
        # The preset's keys outrank the dataset group's, and read the dataset only through its name.
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.dataset.name = dataset
    return {key: OmegaConf.select(cfg, key) for key in sorted(keys - set(NON_SEMANTIC_KEYS))}


def select_runs(records: pd.DataFrame, planned: list[dict[str, list[Any]]], scale: str,
                budgets: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """The records a target's plan produced at ``scale``: each matches one planned multirun on every
    swept and fixed setting and, when given, on its dataset's budget (``budgets[dataset]``, see
    :func:`training_budget`), so that a run trained on another budget at the same settings (claim C7's larger
    training sets) stays out."""
    if records.empty:
        return records
    chosen = pd.Series(False, index=records.index)
    within_budget = pd.Series(True, index=records.index) if budgets is None else pd.Series(False, index=records.index)
    for dataset, budget in (budgets or {}).items():
        on_budget = records["dataset"] == dataset
        for key, value in budget.items():
            column = f"config.{key}"
            on_budget &= records[column].map(_normalised) == _normalised(value) if column in records else False
        within_budget |= on_budget
    for settings in planned:
        match = (records["scale"] == scale) & within_budget
        for key, values in settings.items():
            column = record_column(key)
            if column not in records:
                match &= False
                continue
            allowed = {_normalised(value) for value in values}
            match &= records[column].map(_normalised).isin(allowed)
        chosen |= match
    return records[chosen]
