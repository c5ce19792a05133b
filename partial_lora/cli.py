"""Command-line pre-processing that Hydra does not do itself.

Hydra reads ``seed=0..19`` as the single string ``"0..19"``; researchers expect an inclusive
integer range, so ``key=a..b`` is rewritten to Hydra's sweep syntax ``key=range(a,b+1)``
before Hydra parses the command line.

An unknown option of a project config group (``method=lorra``) gets the project's one-sentence
error listing the choices, instead of Hydra's multi-line report and stack-trace hint.

A setting added with ``+`` (``+train.lr=0.5``) where the run reads a fixed set of keys (the top level and the
blocks of ``conf/config.yaml``) does nothing but change the run's id: :func:`check_added_keys` refuses it.

Hydra's parser takes overrides in one run only, so ``dataset=mrpc -m seed=0..19`` is refused there;
:func:`hydra_order` moves the flags first, as Hydra expects, whatever order they were typed in.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from partial_lora.errors import ConfigError

_RANGE = re.compile(r"^(?P<key>[\w.+~/@-]+)=(?P<start>[^=]*)\.\.(?P<stop>[^=]*)$")
_INTEGER = re.compile(r"^[+-]?\d+$")


def expand_ranges(argv: list[str]) -> list[str]:
    """Rewrite every ``key=a..b`` argument into ``key=range(a,b+1)`` (both ends inclusive)."""
    expanded = []
    for arg in argv:
        match = _RANGE.match(arg)
        if match is None:
            expanded.append(arg)
            continue
        key, start, stop = match["key"], match["start"].strip(), match["stop"].strip()
        if not (start and stop) or any(separator in start + stop for separator in "/\\"):
            expanded.append(arg)  # a path (data_dir=../data, results_dir=..), not a range
            continue
        if not (_INTEGER.match(start) and _INTEGER.match(stop)):
            raise ConfigError(
                f"'{arg}' is not an integer range: write {key}=A..B with integers A <= B, e.g. {key}=0..19."
            )
        if int(stop) < int(start):
            raise ConfigError(f"'{arg}' is an empty range: the end {stop} is below the start {start}.")
        expanded.append(f"{key}=range({int(start)},{int(stop) + 1})")
    return expanded


def hydra_order(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's flags (``-m``, ``--cfg job``, ...) first and the overrides after them, in their order.

    Hydra's own parser, read intermixed, tells flags, their values and overrides apart (it exits with
    argparse's usage message on a flag it does not know, as Hydra would).
    """
    overrides = get_args_parser().parse_intermixed_args(argv).overrides
    flags, pending = [], list(overrides)
    for arg in argv:
        if pending and arg == pending[0]:
            pending.pop(0)
        else:
            flags.append(arg)
    return flags + overrides


def planned_jobs(argv: list[str]) -> list[list[str]]:
    """The overrides of each job that ``run.py ARGV`` launches, in the order Hydra's basic sweeper expands them
    (the local launcher's); in a sweep, only the overrides that differ between jobs, which name them."""
    arguments = get_args_parser().parse_args(argv)
    if not arguments.multirun:
        return [arguments.overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(arguments.overrides)
    except HydraException:  # Hydra reports it when it parses the same overrides
        return [arguments.overrides]
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    common = set.intersection(*(set(job) for job in jobs))
    return [[override for override in job if override not in common] for job in jobs]


def check_group_options(argv: list[str], conf_dir: Path) -> None:
    """Raise :class:`ConfigError` for ``group=option`` (or ``group=a,b`` sweeps) naming no file in ``conf_dir``.

    Only the project's own groups are checked: ``hydra/...`` groups also hold plugin options, and
    sweep functions such as ``choice(...)`` are left to Hydra.
    """
    for arg in argv:
        key, equals, value = arg.lstrip("+").partition("=")
        group = key.partition("@")[0]
        if not equals or arg.startswith(("-", "~")) or group.startswith("hydra") or "(" in value:
            continue
        if not (conf_dir / group).is_dir():
            continue
        choices = sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))
        for option in value.split(","):
            if option not in choices and option != "null":
                raise ConfigError(f"{group}={option} is not an option of the config group '{group}': choose one of "
                                  f"{', '.join(choices)}.")


def check_added_keys(argv: list[str], conf_dir: Path) -> None:
    """Raise :class:`ConfigError` for ``+key=value`` (or ``++``) adding a key that ``conf/config.yaml`` does not
    have, at its top level or in one of its blocks (``train``, ``ratios``, ``checkpoint``, ``adapter``).

    The code reads those by name, so an added key is never read; config groups (``method``, ``backbone``, ...)
    and blocks that experiments bring are read with optional keys and instantiated, so keys added there pass.
    """
    config = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"))  # unresolved: only its keys count
    for arg in argv:
        if not arg.startswith("+") or "=" not in arg:
            continue
        key = arg.lstrip("+").partition("=")[0]
        *parents, leaf = key.split(".")
        if (conf_dir / parents[0] if parents else conf_dir / leaf).is_dir() or key.startswith("hydra") or \
                (parents and parents[0] not in config):
            continue
        block = config
        for parent in parents:
            block = block.get(parent) if isinstance(block, dict) else None
        if isinstance(block, dict) and leaf in block:
            continue
        holds = f" ({'.'.join(parents)} holds {', '.join(block)})" if parents and isinstance(block, dict) else ""
        raise ConfigError(f"{arg} adds {key}, a setting no run reads{holds}: drop it, or set an existing one without "
                          "the + (python run.py --cfg job lists them).")
