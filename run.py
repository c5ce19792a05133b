"""Hydra entry point: ``python run.py dataset=sst2 method=lora rank=8 -m seed=0..19``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from partial_lora.cli import check_group_options, expand_ranges, hydra_order
from partial_lora.config import register_resolvers, validate
from partial_lora.errors import RUNS_FAILED_EXIT, PartialLoraError

# (record path, status) of each run this process launched; None for a dry run or a run another process holds.
# Hydra's local launcher runs a sweep's jobs here, one after another, and drops their return values.
outcomes: list[tuple[str, str] | None] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)  # before the pipeline's imports (seconds): a bad setting fails at once
        # Heavy imports after Hydra has handled --help / --cfg; a dry run trains nothing and skips Lightning's.
        if cfg.dry_run:
            from partial_lora.dry_run import dry_run as run
        else:
            from partial_lora.pipeline import run

        record = run(cfg)
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    outcomes.append(None if record is None else (record["path"], record["status"]))
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
    failed = [outcome[0] for outcome in outcomes if outcome is not None and outcome[1] == "failed"]
    if failed:  # a failed run does not stop a sweep, but the command must not look successful
        print(f"error: {len(failed)} of {len(outcomes)} runs failed, their records say why ({', '.join(failed)}); "
              "deleting a failed record runs it again.", file=sys.stderr)
        sys.exit(RUNS_FAILED_EXIT)
