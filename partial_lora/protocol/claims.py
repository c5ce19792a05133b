"""The paper's claims as paired comparisons over seeds, each with an effect, its 95% interval and a verdict.

``conf/experiment/claims.yaml`` names the arms (settings a run is launched with), the claims (which arm
is compared with which, by which test and margin) and the pilot that picks one learning rate per arm:
each piloted arm trains once per learning rate at a pilot seed kept apart from the claim seeds, and the
learning rate with the best validation score is the one its claim runs use. Arms that only change which
rows and columns a masked adapter keeps take the learning rate of the arm they are a variant of
(``lr_from``), and Balanced takes the sparsity that matches its reference arm's derived parameter count
(``match_sparsity``).

Runs are found by their run id (the hash of the config they are launched with), never by a loose match
of settings, so a record of another preset or another learning rate can never enter a comparison. Both
arms of a claim run on the same seeds (and data seed), so the comparison is paired by seed: the effect
is the mean of per-seed differences (treatment - control, in metric points), and its interval is
Student's t over those differences.

Verdicts, for an interval ``[low, high]`` and margin ``m``:

- ``noninferior`` (the treatment is at most ``m`` below the control): supported if ``low > -m``,
  contradicted if ``high < -m``;
- ``equivalent`` (within ``m`` either way): supported if the interval lies inside ``(-m, m)``,
  contradicted if it lies wholly beyond ``m`` or below ``-m``;
- ``superior`` (the treatment beats the control): supported if ``low > 0``, contradicted if ``high < 0``;
- ``shrinking`` (the control's lead over the treatment shrinks from the smallest to the largest value
  of the swept setting): the per-seed change of that lead, supported if ``low > 0``, contradicted if
  ``high < 0``;

and inconclusive otherwise (at this scale the interval spans the margin). A claim that also requires a
parameter reduction (``min_param_reduction``) is contradicted when the measured reduction falls short.
Until every planned seed has both arms, a claim gets no verdict ("missing runs"), though its partial effect
is shown: a sweep still running must not read as evidence, and its first seeds are no random sample.

A task that LoRA did not learn at this budget (``results.aggregate.learning_status`` over
:meth:`ClaimPlan.budget_records`) gets no verdict either ("not learned", with the reason): its comparisons are
between models at chance. Nor does a comparison in which neither arm trains an adapter parameter ("no contrast":
both tickets empty, or an empty ticket against the head alone): the claims are about masks, counts and measures,
and such runs differ only by the head's seed noise. Beside each claim the report shows the treatment arm's adapter
parameters as a share of LoRA's next to the paper's Partial-LoRA share (``results/paper/tables.csv``), the arms'
validation-test gaps, and, where the interval is too wide to decide, how many seeds would decide it (:func:`seeds_to_decide`).

The parts: ``claims_statistics`` (intervals, verdicts, seeds to decide), ``claims_plan`` (``ClaimPlan``: runs, run
ids, launching), ``claims_verdicts`` (:func:`evaluate_claims`) and ``claims_report`` (Markdown and figure); their
public names are importable from here.
"""

from partial_lora.protocol.claims_plan import Claim, ClaimPlan, PlannedRun, claims_of, compose_claims, run_claims
from partial_lora.protocol.claims_report import render_report
from partial_lora.protocol.claims_statistics import (CONTRADICTED, INCONCLUSIVE, MAX_SEEDS, MISSING, NO_CONTRAST,
                                                     NOT_LEARNED, SUPPORTED, TESTS, Interval, boundaries, half_width,
                                                     paired_interval, seeds_to_decide, verdict)
from partial_lora.protocol.claims_verdicts import evaluate_claims

__all__ = ["CONTRADICTED", "INCONCLUSIVE", "MAX_SEEDS", "MISSING", "NO_CONTRAST", "NOT_LEARNED", "SUPPORTED", "TESTS",
           "Claim", "ClaimPlan", "Interval", "PlannedRun", "boundaries", "claims_of", "compose_claims",
           "evaluate_claims", "half_width", "paired_interval", "render_report", "run_claims", "seeds_to_decide",
           "verdict"]
