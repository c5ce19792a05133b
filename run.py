"""Hydra entry point: ``python run.py dataset=sst2 method=lora rank=8 -m seed=0..19``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from partial_lora.cli import check_group_options, expand_ranges, hydra_order
from partial_lora.config import register_resolvers
from partial_lora.errors import PartialLoraError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Heavy imports after Hydra has handled --help / --cfg; a dry run trains nothing and skips Lightning's.
    if cfg.dry_run:
        from partial_lora.dry_run import dry_run as run
    else:
        from partial_lora.pipeline import run

    try:
        record = run(cfg)
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return None if record is None else record.get("best_val")  # a failed run's record has none


if __name__ == "__main__":
    register_resolvers()
    try:
        sys.argv[1:] = hydra_order(expand_ranges(sys.argv[1:]))
        check_group_options(sys.argv[1:], Path(__file__).parent / "conf")
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
