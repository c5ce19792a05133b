"""Hydra entry point: ``python run.py dataset=sst2 method=lora rank=8 -m seed=0..19``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from partial_lora.cli import check_added_keys, check_group_options, expand_ranges, hydra_order, planned_jobs
from partial_lora.config import register_resolvers, validate
from partial_lora.errors import INTERRUPTED_EXIT, RUNS_FAILED_EXIT, SIGTERM_PENDING, PartialLoraError, RunInterrupted

# (status, record path) of each job this process launched, in launch order: status "finished" or "failed" (the
# record's), "skipped" (a dry run, or a run another process holds), "refused" (a bad setting or data) or
# "interrupted" (SIGTERM). Hydra's local launcher runs a sweep's jobs here, one after another, and drops their
# return values.
outcomes: list[tuple[str, str | None]] = []


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
    except RunInterrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        outcomes.append(("interrupted", None))
        sys.exit(INTERRUPTED_EXIT)  # SystemExit passes through Hydra's launcher: a sweep stops here
    except PartialLoraError as error:  # this job only: the next job of a sweep runs
        print(f"error: {error}", file=sys.stderr)
        outcomes.append(("refused", None))
        return None
    outcomes.append(("skipped", None) if record is None else (record["status"], record["path"]))
    return None if record is None else record.get("best_val")  # a failed run's record has none


def stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM outside a fit or test ends the run at once (its files are written atomically or not at all).

    Inside one, Lightning's handler calls this one after its own, which stops at the next batch boundary
    with a checkpoint (``SigtermCheckpoint``): then SIGTERM's handler is Lightning's, and this one does nothing.
    ``SIGTERM_PENDING`` keeps the stop where a library swallows the raise.
    """
    if signal.getsignal(signal.SIGTERM) is stop_on_sigterm:
        SIGTERM_PENDING.set()
        raise RunInterrupted("the run was stopped by SIGTERM before training began or after it ended; launching "
                             "the same command again runs it.")


def report(jobs: list[list[str]]) -> int:
    """Print how the launched jobs ended (one line each for what did not finish) and return the exit status."""
    # By launch order; where Hydra planned jobs that planned_jobs could not, they go unnamed.
    described = [" ".join(job) for job in jobs] + [""] * len(outcomes)
    statuses = [status for status, _ in outcomes]
    if "interrupted" in statuses:
        if len(jobs) > 1:
            stopped = len(outcomes) - 1
            left = [f"#{index} {described[index]}".strip() for index in range(stopped, len(jobs))]
            print(f"error: the sweep stopped at job #{stopped} of {len(jobs)} (SIGTERM); {len(left)} jobs did not run "
                  f"to the end: {', '.join(left)}; launching the same command again resumes them (finished runs are "
                  "skipped).", file=sys.stderr)
        return INTERRUPTED_EXIT
    refused = [f"#{index} {described[index]}".strip() for index, status in enumerate(statuses) if status == "refused"]
    failed = [path for status, path in outcomes if status == "failed"]
    if refused and len(outcomes) > 1:
        print(f"error: {len(refused)} of {len(outcomes)} runs were refused, see their errors above "
              f"({', '.join(refused)}), and {len(failed)} failed{', their records say why' if failed else ''}; the "
              "other runs ran.", file=sys.stderr)
    elif failed:  # a failed run does not stop a sweep, but the command must not look successful
        print(f"error: {len(failed)} of {len(outcomes)} runs failed, their records say why ({', '.join(failed)}); "
              "deleting a failed record runs it again.", file=sys.stderr)
    return 2 if refused else RUNS_FAILED_EXIT if failed else 0


if __name__ == "__main__":
    register_resolvers()
    try:
        sys.argv[1:] = hydra_order(expand_ranges(sys.argv[1:]))
        check_group_options(sys.argv[1:], Path(__file__).parent / "conf")
        check_added_keys(sys.argv[1:], Path(__file__).parent / "conf")
        jobs = planned_jobs(sys.argv[1:])
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        main()
    except SystemExit as stop:
        if stop.code != INTERRUPTED_EXIT:
            raise
    sys.exit(report(jobs))
