"""How far each departure from the paper's derivation setting moves the counts (results/claims/derivation_fidelity_cpu.md).

The cpu preset departs from Algorithm 1's setting in four ways (the probe's fit on ``D_t``, ``D_t``'s size cap, the
``whole_first`` search, and the acceptance rule) and the paper's text leaves a fifth open (the scope). Each row of
:data:`ROWS` derives SVD counts under the preset with some of these changed, on every derivation sample
(``data_seed``), and keeps one small JSON record per derivation, so a relaunch derives only what is missing and the
table is rendered from the records alone:

    python scripts/derivation_fidelity.py --rows preset probe_heldout --datasets sst2 mrpc
    python scripts/derivation_fidelity.py --render-only

A row's columns: the pretrained model's accuracy ``mu`` on ``D_t`` and the majority rate there, the share of the
adapter's rows and columns kept, matrices left with ``delta W = 0`` (no row or no column kept), the whole ticket's
accuracy on ``D_t`` with every layer's removal applied at once and whether it meets the accuracy bound, the mean
Jaccard overlap of the matrices kept across samples (``partial_lora/ratios/stability.py``), and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from statistics import mean

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from derivation_stability import derive  # noqa: E402

from partial_lora.config import register_resolvers  # noqa: E402
from partial_lora.ratios.search import AcceptanceRule  # noqa: E402
from partial_lora.ratios.stability import agreement, kept_shares  # noqa: E402
from partial_lora.files import write_record  # noqa: E402

# Each row: (name, what it changes from the cpu preset, Hydra overrides). Single departures first, then the
# combinations that follow the paper's text where it speaks. MRPC's 2% is 69 examples, under the preset's cap of
# 128, so every MRPC row derives on the paper's D_t; SST-2's 5% is 3,357, which only ``paper_size`` uses.
HELD_OUT, CUMULATIVE, PAPER_RULE = "ratios.probe=heldout", "ratios.scope=cumulative", "ratios.rule=paper"
# MiniLM's last block (index 5), from the backbone's own targets: the literal search at one index per evaluation
# is affordable there, since the prefix replay leaves one block to run per evaluation (0.06 s at 128 examples).
LAST_BLOCK = yaml.safe_load((ROOT / "conf" / "backbone" / "minilm.yaml").read_text())["target_modules"].replace(
    r"\d+", "5")
# The preset the rows depart from, pinned: the cpu preset has since moved to the protocol this table chose
# (held-out probe, the paper's rule), and a row measured again must measure what its name says.
MEASURED_FROM = ("ratios.probe=in_sample", "ratios.rule=above_chance", "ratios.scope=isolated",
                 "ratios.search=whole_first", "ratios.max_examples=128")
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "preset": ("the previous cpu preset: probe fitted on D_t, D_t capped at 128, whole_first, isolated, above_chance", ()),
    "probe_heldout": ("probe fitted on 2,000 train examples disjoint from D_t", (HELD_OUT,)),
    "paper_size": ("D_t at the paper's fraction (SST-2 5%; MRPC 2%, as in every row)", ("ratios.max_examples=null",)),
    "literal_search": ("the literal search, 8 indices per evaluation", ("ratios.search=linear", "ratios.step=8")),
    "cumulative": ("scope cumulative: removals stay applied", (CUMULATIVE,)),
    "rule_paper": ("the paper's rule, acc >= tau mu", (PAPER_RULE,)),
    "rule_loss": ("the loss rule, cross-entropy +10% at most", ("ratios.rule=loss",)),
    "heldout_cumulative": ("held-out probe, cumulative", (HELD_OUT, CUMULATIVE)),
    "heldout_paper_rule": ("held-out probe, the paper's rule", (HELD_OUT, PAPER_RULE)),
    "heldout_paper_rule_cumulative": ("held-out probe, the paper's rule, cumulative", (HELD_OUT, PAPER_RULE, CUMULATIVE)),
    "heldout_cumulative_512": ("held-out probe, cumulative, D_t capped at 512 (SST-2)",
                               (HELD_OUT, CUMULATIVE, "ratios.max_examples=512")),
    "heldout_paper_rule_paper_size": ("the chosen protocol (held-out probe, the paper's rule) at the paper's D_t",
                                      (HELD_OUT, PAPER_RULE, "ratios.max_examples=null")),
    # The chosen protocol with its search or rule changed: is the empty SST-2 ticket whole_first's shortcut?
    "chosen_binary": ("the chosen protocol, bisection (no W = 0 first)", (HELD_OUT, PAPER_RULE, "ratios.search=binary")),
    "chosen_literal": ("the chosen protocol, the literal search, 8 indices per evaluation",
                       (HELD_OUT, PAPER_RULE, "ratios.search=linear", "ratios.step=8")),
    "chosen_literal_last_block": ("the chosen protocol, the literal search, 1 index per evaluation, the last block's "
                                  "6 matrices only", (HELD_OUT, PAPER_RULE, "ratios.search=linear", "ratios.step=1",
                                                      f"backbone.target_modules='{LAST_BLOCK}'")),
    "chosen_loss": ("the chosen protocol with the loss rule, cross-entropy +10% at most",
                    (HELD_OUT, "ratios.rule=loss")),
}
# The searches compared matrix by matrix on the same samples (isolated scope: a matrix's count does not depend on
# which other matrices are searched, so a search over a subset is compared on that subset).
SEARCH_ROWS = {"heldout_paper_rule": "whole_first", "chosen_binary": "binary", "chosen_literal": "linear, step 8",
               "chosen_literal_last_block": "linear, step 1"}
RECORDS = ROOT / "results" / "claims" / "derivation_fidelity"
OUT = ROOT / "results" / "claims" / "derivation_fidelity_cpu.md"
# The paper's Partial-LoRA parameters as a share of LoRA's (SPEC 5; paper Table 6, Sec. 5).
PAPER_SHARES = {"sst2": "13.5% (0.18M of 1.33M, DeBERTa-v3-base)", "mrpc": "10.5% (0.14M of 1.33M)"}


def record_name(row: str, dataset: str, data_seed: int) -> str:
    return f"{row}_{dataset}_d{data_seed}"


def measure(row: str, dataset: str, data_seed: int, cache_dir: str) -> dict:
    """Derive the counts of one (row, dataset, sample) and summarise them as a record."""
    cfg, derived, examples = derive("cpu", dataset, "svd", f"data_seed={data_seed}", cache_dir,
                                    [*MEASURED_FROM, *ROWS[row][1]])
    ratios = cfg.ratios
    rule = AcceptanceRule("paper" if ratios.rule == "paper" else "above_chance", ratios.threshold,
                          chance=derived.majority_rate)
    return {"row": row, "dataset": dataset, "data_seed": data_seed, "overrides": list(ROWS[row][1]),
            "probe": ratios.probe, "scope": ratios.scope, "search": ratios.search, "step": ratios.step,
            "rule": ratios.rule, "examples": examples,
            "probe_examples": ratios.probe_examples if ratios.probe == "heldout" else None,
            "mu": derived.baseline_accuracy, "majority_rate": derived.majority_rate,
            "kept_fraction": derived.kept_fraction, "kept_shares": kept_shares(derived),
            "counts": {name: [c.k_row, c.k_col] for name, c in derived.counts.items()},
            "zero_delta_matrices": sum(1 for c in derived.counts.values() if c.k_row == 0 or c.k_col == 0),
            "matrices": len(derived.counts), "ticket_accuracy": derived.ticket_accuracy,
            # The accuracy bound the ticket is held to (the loss rule bounds the loss: judged on its accuracy
            # rule's twin, above_chance, for comparison).
            "accuracy_bound": rule.target(derived.baseline_accuracy), "evaluations": derived.evaluations,
            "wall_time_s": derived.wall_time_s, "cache_hit": derived.cache_hit,
            "threads": os.environ.get("OMP_NUM_THREADS")}


def render(records: list[dict]) -> str:
    lines = ["# Derivation fidelity at scale `cpu`: what each departure from the paper's setting keeps", "",
             "SVD importance, tau 0.9, MiniLM-L6, seed 0, derivation samples `data_seed` 0-4 (fewer where the "
             "samples column says so). Rendered by `scripts/derivation_fidelity.py` from the records in "
             "`results/claims/derivation_fidelity/`. Kept: share of the adapter's rows and columns "
             "(= share of LoRA's parameters at any rank), mean and range over samples. dW=0: matrices with no row or "
             "no column kept (mean of 36). Ticket: accuracy on D_t with every layer's removal applied at once, "
             "and in how many samples it meets the accuracy bound (above_chance's bound for the above_chance and "
             "loss rules, tau mu for the paper's). Wall time: per derivation, with other jobs sharing the 2 cores.",
             "", "| row | what changes | dataset | samples | D_t | mu | majority | kept % mean [min, max] | paper "
             "| dW=0 | ticket acc | ticket >= bound | Jaccard | evaluations | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (description, _) in ROWS.items():
        for dataset in ("sst2", "mrpc"):
            group = sorted((r for r in records if r["row"] == row and r["dataset"] == dataset),
                           key=lambda r: r["data_seed"])
            if not group:
                continue
            kept = [r["kept_fraction"] for r in group]
            jaccard = "n/a"
            if len(group) > 1:
                jaccard = f"{agreement({r['data_seed']: r['kept_shares'] for r in group})['jaccard_mean']:.2f}"
            holds = sum(r["ticket_accuracy"] >= r["accuracy_bound"] - 1e-9 for r in group)
            lines.append(
                f"| {row} | {description} | {dataset} | {len(group)} | {mean(r['examples'] for r in group):.0f} "
                f"| {mean(r['mu'] for r in group):.3f} | {mean(r['majority_rate'] for r in group):.3f} "
                f"| {mean(kept):.2%} [{min(kept):.2%}, {max(kept):.2%}] | {PAPER_SHARES[dataset].split(' ')[0]} "
                f"| {mean(r['zero_delta_matrices'] for r in group):.1f} "
                f"| {mean(r['ticket_accuracy'] for r in group):.3f} | {holds} of {len(group)} | {jaccard} "
                f"| {mean(r['evaluations'] for r in group):.0f} | {mean(r['wall_time_s'] for r in group):.0f} |")
    lines += ["", "The paper's shares: " + "; ".join(f"{d} {s}" for d, s in PAPER_SHARES.items()) +
              "; CLIP ViT-B/16 21-48%."]
    return "\n".join(lines + compare_searches(records)) + "\n"


def compare_searches(records: list[dict]) -> list[str]:
    """Per (dataset, sample): each search's per-matrix kept shares against the literal search's, on the matrices
    both searched. Shares, not counts, since the earliest records hold shares only; a share differs exactly when
    ``k_row + k_col`` does."""
    by_key = {(r["row"], r["dataset"], r["data_seed"]): r for r in records if r["row"] in SEARCH_ROWS}
    lines = []
    for literal in ("chosen_literal_last_block", "chosen_literal"):
        for dataset, data_seed in sorted({(d, s) for row, d, s in by_key if row == literal}):
            reference = by_key[literal, dataset, data_seed]["kept_shares"]
            for row, search in SEARCH_ROWS.items():
                other = by_key.get((row, dataset, data_seed))
                if row == literal or other is None:
                    continue
                names = sorted(set(reference) & set(other["kept_shares"]))
                differ = [n for n in names if abs(other["kept_shares"][n] - reference[n]) > 1e-12]
                shown = ", ".join(f"{n.removeprefix('bert.encoder.')} {other['kept_shares'][n]:.1%} vs "
                                  f"{reference[n]:.1%}" for n in differ[:6]) + (" ..." if len(differ) > 6 else "")
                lines.append(f"| {dataset} | {data_seed} | {search} | {SEARCH_ROWS[literal]} | {len(names)} "
                             f"| {len(names) - len(differ)} | {shown or '-'} |")
    if not lines:
        return []
    return ["", "## The searches compared matrix by matrix", "",
            "Under the chosen protocol (held-out probe, the paper's rule, isolated scope), each search's per-matrix "
            "kept share against the literal search's on the same sample. Under the isolated scope a matrix's count "
            "does not depend on which other matrices are searched, so the literal search over the last block alone "
            "is compared on those six matrices. At 8 indices per evaluation the literal search stops only at "
            "multiples of 8, so a difference of a few indices there is its resolution, not a disagreement.", "",
            "| dataset | sample | search | literal search | matrices | same share | where they differ (search vs literal) |",
            "|---|---|---|---|---|---|---|", *lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mrpc"])
    parser.add_argument("--samples", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="data seeds")
    parser.add_argument("--cache-dir", default=str(ROOT / "results" / "ratios" / "fidelity"))
    parser.add_argument("--records", default=str(RECORDS))
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    register_resolvers()
    records_dir = Path(args.records)
    if not args.render_only:
        for row in args.rows:
            for dataset in args.datasets:
                for data_seed in args.samples:
                    name = record_name(row, dataset, data_seed)
                    if (records_dir / f"{name}.json").exists():
                        continue
                    record = measure(row, dataset, data_seed, args.cache_dir)
                    write_record(record, records_dir, name)
                    print(f"{name}: kept {record['kept_fraction']:.2%}, mu {record['mu']:.3f}, ticket "
                          f"{record['ticket_accuracy']:.3f}, {record['wall_time_s']:.0f} s", flush=True)
    records = [json.loads(path.read_text()) for path in sorted(records_dir.glob("*.json"))]
    OUT.write_text(render(records))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
