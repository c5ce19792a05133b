"""A table or figure target as Hydra multiruns.

An experiment config (``conf/experiment/<target>.yaml``) names the domains it covers (language, vision,
llm: the scale maps each to a backbone and datasets), groups of settings to cross, fixed settings, and
whether the protocol's seeds x learning rates apply. Each (domain, group) becomes one
``run.py -m ...`` command, so every Hydra launcher (local, joblib, SLURM) runs the sweep unchanged and
a rerun skips the runs whose records exist. A rendering reads exactly the plan's runs, found by run id
(:func:`launched_run_id`).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from partial_lora.config import register_resolvers
from partial_lora.errors import INTERRUPTED_EXIT, RUNS_FAILED_EXIT, ConfigError, RunInterrupted
from partial_lora.results.record import config_hash

# Config groups are selected by file name and recorded by their ``name`` field.
GROUPS = ("backbone", "dataset", "method", "importance", "strategy")


@dataclass(frozen=True)
class Checkout:
    """The project folder a protocol runs in: its Hydra configs (``conf/``), the script that runs one config
    (``run.py``, run from the folder) and the paper's numbers the renderings cite. Given by the caller (``scripts/reproduce.py``, the tests), never looked for:
    the package may be installed elsewhere."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def run_script(self) -> Path:
        return self.root / "run.py"

    @property
    def paper_tables(self) -> Path:
        """The paper's printed numbers, one row per cell (``results/paper/README.md``)."""
        return self.root / "results" / "paper" / "tables.csv"


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


def compose_target(checkout: Checkout, target: str, scale: str, overrides: list[str] = ()) -> DictConfig:
    """The resolved config of ``experiment=<target> scale=<scale>``, as each of its runs starts from."""
    if not (checkout.conf / "experiment" / f"{target}.yaml").is_file():
        raise ConfigError(f"no experiment config conf/experiment/{target}.yaml for target {target!r}.")
    cfg = copy.deepcopy(_composed(checkout.conf, target, scale, tuple(overrides)))
    if "sweep" not in cfg:
        raise ConfigError(f"experiment {target} has no `sweep:` block, so it is no table or figure target.")
    return cfg


def _override_value(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def planned_multiruns(cfg: DictConfig, domains: list[str] | None = None,
                      budgets: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, list[Any]]]:
    """One dict of swept settings (key -> values) per (domain, group) of the target's sweep, and per training budget
    where ``budgets`` (dataset -> the budget rule's overrides, ``protocol/budget.py``) gives its datasets different
    ones; a group's own value of a budget key wins."""
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
        by_budget: dict[tuple[str, ...], list[str]] = {}
        for dataset in datasets or list(where.datasets):
            by_budget.setdefault((budgets or {}).get(dataset, ()), []).append(dataset)
        for group in sweep.groups:
            for budget, budgeted in by_budget.items():
                settings: dict[str, list[Any]] = {"backbone": [where.backbone], "dataset": budgeted}
                settings |= {key: [value] for key, value in (override.split("=", 1) for override in budget)}
                if protocol is not None:
                    settings |= {"seed": protocol.seeds, "lr": list(protocol.lrs)}
                settings |= {key: list(values) for key, values in OmegaConf.to_container(group).items()}
                settings |= {key: [value] for key, value in (sweep.get("fixed") or {}).items()}
                planned.append(settings)
    return planned


def command(checkout: Checkout, target: str, scale: str, settings: dict[str, list[Any]], launcher: str,
            extra: list[str] = ()) -> list[str]:
    swept = [f"{key}={','.join(_override_value(value) for value in values)}" for key, values in settings.items()]
    return [sys.executable, str(checkout.run_script), "-m", f"experiment={target}", f"scale={scale}",
            f"hydra/launcher={launcher}", *swept, *extra]


def run_multirun(argv: list[str], cwd: Path) -> int:
    """Run one ``run.py -m ...`` command and return its exit status; SIGTERM sent to this process is passed on
    to it, and its stop by SIGTERM raises :class:`RunInterrupted`: a plan stops where its multirun did."""
    process = subprocess.Popen(argv, cwd=cwd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        status = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status == INTERRUPTED_EXIT:
        raise RunInterrupted(f"SIGTERM stopped the multirun {' '.join(argv[2:])}; launching the same command again "
                             "resumes it and runs the rest of the plan.")
    return status


def launch_multirun(argv: list[str], cwd: Path) -> bool:
    """Run one multirun of a plan (tables, figures or claims alike) under the plans' one failure rule; returns
    whether it had failed (NaN loss) or refused (bad setting, exit status 2) runs. Those leave failed records or
    errors, and the rest of the plan still runs. SIGTERM (:class:`RunInterrupted`) or any other non-zero exit, a
    crash the records cannot explain, stops the plan."""
    status = run_multirun(argv, cwd)
    if status and status not in (2, RUNS_FAILED_EXIT):
        raise subprocess.CalledProcessError(status, argv)
    return bool(status)


def launch(checkout: Checkout, target: str, scale: str, planned: list[dict[str, list[Any]]], launcher: str = "local",
           extra: list[str] = (), dry_run: bool = False) -> int:
    """Run every multirun of the plan; finished runs skip themselves, so this fills in what is missing.
    ``dry_run`` prints each command and its number of runs, and runs nothing.

    Returns how many multiruns had failed or refused runs (:func:`launch_multirun`).
    """
    with_failures = 0
    for settings in planned:
        argv = command(checkout, target, scale, settings, launcher, extra)
        runs = math.prod(len(values) for values in settings.values())
        print("+", " ".join(argv[1:]), f"  # {runs} runs", flush=True)
        if not dry_run:
            with_failures += launch_multirun(argv, checkout.root)
    return with_failures


def run_overrides(settings: dict[str, list[Any]]) -> list[list[str]]:
    """The overrides of each run of one planned multirun, one value per key, as Hydra's sweeper passes them."""
    return [[f"{key}={_override_value(value)}" for key, value in zip(settings, values)]
            for values in itertools.product(*settings.values())]


# A plain value override (``seed=1``, ``ratios.max_examples=512``): no prefix, no package, not a config group.
_VALUE_KEY = re.compile(r"^[A-Za-z_][\w.]*$")


def _is_value_override(conf: Path, override: str) -> bool:
    key = override.partition("=")[0]
    return bool(_VALUE_KEY.match(key)) and not key.startswith("hydra") and (
        "." in key or not (conf / key).is_dir())


def compose(conf: Path, overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides``, as ``run.py`` composes it (Hydra's runtime keys aside)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@functools.lru_cache(maxsize=None)
def _composed(conf: Path, experiment: str, scale: str, overrides: tuple[str, ...]) -> DictConfig:
    return compose(conf, [f"experiment={experiment}", f"scale={scale}", *overrides])




def launched_config(checkout: Checkout, experiment: str, scale: str,
                    overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config of the run ``run.py experiment=<experiment> scale=<scale> <overrides>``, Hydra's runtime
    folder aside (left out of the run id anyway): what :func:`launched_run_id` hashes.

    Hydra applies plain value overrides after composing the defaults, and composing takes about 0.2 s, too slow for
    the thousands of runs of a paper-scale plan: the defaults are composed once per choice of config groups (and
    Hydra settings), and the value overrides applied to a copy as Hydra applies them (its parser, then
    ``OmegaConf.update``)."""
    composed = tuple(override for override in overrides if not _is_value_override(checkout.conf, override))
    cfg = copy.deepcopy(_composed(checkout.conf, experiment, scale, composed))
    parsed = OverridesParser.create().parse_overrides([override for override in overrides
                                                       if _is_value_override(checkout.conf, override)])
    for override in parsed:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    cfg.output_dir = None
    return OmegaConf.to_container(cfg, resolve=True)


def launched_run_id(checkout: Checkout, experiment: str, scale: str,
                    overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The id ``run.py`` gives the run ``run.py experiment=<experiment> scale=<scale> <overrides>``: the hash of its
    resolved config (``results/store.py``). Targets and claims find their runs by it, so a record of any other
    setting (derivation, budget, strategy, rank) never stands in for a planned run."""
    return config_hash(launched_config(checkout, experiment, scale, overrides))
