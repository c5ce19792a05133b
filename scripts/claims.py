"""Run what the paper's claims need (skipping finished runs), then render their verdicts.

    python scripts/claims.py --scale cpu                       # sweep, then render results/claims/claims_cpu.md
    python scripts/claims.py --scale cpu --render-only         # from the records present
    python scripts/claims.py --scale cpu --launcher parallel -- trainer=cpu

Arguments after ``--`` are passed to every run (Hydra overrides).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partial_lora.errors import RUNS_FAILED_EXIT, PartialLoraError  # noqa: E402
from partial_lora.protocol.claims import ClaimPlan, compose_claims, evaluate_claims, render_report, run_claims  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", help="conf/scale preset: paper or cpu")
    parser.add_argument("--launcher", default="local", help="hydra/launcher preset: local, parallel or slurm")
    parser.add_argument("--render-only", action="store_true", help="render from the records present, run nothing")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    arguments, extra = parser.parse_args(argv[:split]), argv[split + 1:]
    try:
        plan = ClaimPlan(compose_claims(arguments.scale, extra), arguments.scale, extra)
        failures = 0 if arguments.render_only else run_claims(plan, arguments.launcher)
        plan.reload()
        for path in render_report(plan, evaluate_claims(plan)):
            print(f"claims: wrote {path}")
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if failures:
        print(f"claims: {failures} multirun command(s) exited non-zero; their failed runs are left out.", file=sys.stderr)
        sys.exit(RUNS_FAILED_EXIT)


if __name__ == "__main__":
    main()
