"""Run the sweep a table or figure target names (skipping finished runs), then render it; ``claims`` runs what
the paper's claims need, pilots first, and renders their verdicts (results/claims/claims_<scale>.{md,png});
``leaderboard`` renders results/leaderboard_<scale>.{md,png} from the records of Table 6's and the claims' runs, and
``index`` writes results/README.md, the state of every target at every scale (both run nothing).

    python scripts/reproduce.py table6 --scale cpu                 # sweep, then render
    python scripts/reproduce.py table6 fig4 --scale cpu --render-only
    python scripts/reproduce.py fig2 --scale cpu --domains language --launcher parallel
    python scripts/reproduce.py table5 --scale paper --launcher slurm -- trainer=gpu
    python scripts/reproduce.py table6 --scale cpu --dry-run        # the multirun commands, nothing run
    python scripts/reproduce.py claims --scale cpu --launcher parallel
    python scripts/reproduce.py leaderboard --scale cpu            # per method: metric, interval, costs, Pareto
    python scripts/reproduce.py index                              # results/README.md: every target's state

Arguments after ``--`` are passed to every run (Hydra overrides).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partial_lora.errors import (INTERRUPTED_EXIT, RUNS_FAILED_EXIT, PartialLoraError,  # noqa: E402
                                 RunInterrupted)
from partial_lora.protocol import Checkout, compose_target, launch, planned_multiruns  # noqa: E402
from partial_lora.protocol.claims import ClaimPlan, compose_claims, evaluate_claims, render_report, run_claims  # noqa: E402
from partial_lora.protocol.targets import budget_overrides, render_index, render_target, settle_budgets  # noqa: E402
from partial_lora.results.leaderboard import render_leaderboard  # noqa: E402

CHECKOUT = Checkout(ROOT)  # the configs and run.py of this checkout


def claims(arguments: argparse.Namespace, extra: list[str]) -> int:
    """The claims target: its runs (planned anew after each multirun, since pilots decide learning rates), then
    the report. Returns how many multiruns exited non-zero."""
    plan = ClaimPlan(CHECKOUT, compose_claims(CHECKOUT, arguments.scale, extra), arguments.scale, extra)
    if arguments.dry_run:  # what the records present let us plan: later stages wait on the pilots' results
        for argv in plan.commands(arguments.launcher):
            print("+", " ".join(argv[1:]))
        return 0
    failures = 0 if arguments.render_only else run_claims(plan, arguments.launcher)
    plan.reload()
    for path in render_report(plan, evaluate_claims(plan)):
        print(f"claims: wrote {path}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="experiment configs with a sweep: table1..table6, fig2..fig17, "
                        "claims, leaderboard, index")
    parser.add_argument("--scale", default="paper", help="conf/scale preset: paper or cpu")
    parser.add_argument("--launcher", default="local", help="hydra/launcher preset: local, parallel or slurm")
    parser.add_argument("--domains", nargs="*", help="only these domains of the targets (language, vision, llm)")
    parser.add_argument("--render-only", action="store_true", help="render from the records present, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the multiruns and their run counts; run and "
                        "render nothing")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    arguments, extra = parser.parse_args(argv[:split]), argv[split + 1:]
    with_failures = 0
    try:
        for target in arguments.targets:
            if target == "claims":
                with_failures += claims(arguments, extra)
                continue
            if target == "leaderboard":
                if not arguments.dry_run:
                    for path in render_leaderboard(CHECKOUT, arguments.scale, extra):
                        print(f"leaderboard: wrote {path}")
                continue
            if target == "index":
                if not arguments.dry_run:
                    print(f"index: wrote {render_index(CHECKOUT, extra=extra)}")
                continue
            cfg = compose_target(CHECKOUT, target, arguments.scale, extra)
            if not arguments.render_only:
                # Each task's training budget first (the scale's rule), then the target's runs at those budgets.
                failures, budgets = settle_budgets(CHECKOUT, cfg, arguments.launcher, extra, arguments.dry_run)
                with_failures += failures + launch(CHECKOUT, target, arguments.scale,
                                                   planned_multiruns(cfg, arguments.domains, budget_overrides(budgets)),
                                                   arguments.launcher, extra, dry_run=arguments.dry_run)
            if arguments.dry_run:
                continue
            for path in render_target(CHECKOUT, cfg, extra=extra):  # from the finished runs: failed ones are left out
                print(f"{target}: wrote {path}")
    except RunInterrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if with_failures:
        print(f"error: {with_failures} sweeps had failed or refused runs (see above); the rendering leaves them out.",
              file=sys.stderr)
        sys.exit(RUNS_FAILED_EXIT)


if __name__ == "__main__":
    main()
