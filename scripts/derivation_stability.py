"""Derive counts several times for one task, changing one setting, and say how far they agree
(``partial_lora/ratios/stability.py``): ``data_seed`` draws another derivation sample, ``seed`` another initial
head (where the linear probe starts). Everything else stays as the scale sets it. Derivations go to a temporary
cache, so the committed ratio caches stay those the runs used.

    python scripts/derivation_stability.py --scale cpu --out results/claims/derivation_stability_cpu.md
    python scripts/derivation_stability.py --scale cpu --datasets sst2 --vary data_seed --override ratios.max_examples=512 --out results/claims/derivation_stability_cpu_512.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
import lightning as L  # noqa: E402

from partial_lora.config import register_resolvers  # noqa: E402
from partial_lora.pipeline import backbone_and_data, derive_for_run  # noqa: E402
from partial_lora.ratios.stability import stability_summary  # noqa: E402


def derive(scale: str, dataset: str, importance: str, setting: str, cache_dir: str, overrides: list[str]):
    """The counts a masked run at these settings would derive (same seeding as ``pipeline._run``), and the
    configuration and size of the derivation sample they came from."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"scale={scale}", f"dataset={dataset}", "method=partial_lora", f"importance={importance}", setting,
            f"ratios.cache_dir={cache_dir}", "ratios.progress=false", *overrides])
    L.seed_everything(cfg.seed)
    backbone, datamodule = backbone_and_data(cfg)
    batches = datamodule.derivation_batches(cfg.ratios.fraction, cfg.ratios.max_examples, cfg.ratios.batch_size)
    return cfg, derive_for_run(cfg, backbone, datamodule), sum(len(batch["labels"]) for batch in batches)


def compare(args: argparse.Namespace, dataset: str, importance: str, vary: str, cache_dir: str) -> str:
    """One table row: the derivations at each value of ``vary`` and how far they agree."""
    derivations = {}
    for value in args.values:
        cfg, derivations[value], examples = derive(args.scale, dataset, importance, f"{vary}={value}", cache_dir,
                                                   args.override)
        print(f"{dataset} {importance} {vary}={value}: kept {derivations[value].kept_fraction:.2%} "
              f"(cache hit: {derivations[value].cache_hit})", flush=True)
    summary = stability_summary(derivations)
    return (f"| {dataset} | {importance} | {examples} | {cfg.ratios.rule} "
            f"| {', '.join(f'{d.kept_fraction:.2%}' for d in derivations.values())} "
            f"| {summary['kept_fraction_mean']:.2%} ({summary['kept_fraction_sd']:.2%}) "
            f"| {', '.join(map(str, summary['non_empty'].values()))} of {summary['matrices']} "
            f"| {summary['kept_by_all']} / {summary['kept_by_any']} | {summary['jaccard_mean']:.2f} "
            f"| {summary['spearman_mean']:.2f}; {summary['spearman_pairs']} of {summary['pairs']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mrpc"])
    parser.add_argument("--vary", nargs="+", choices=["data_seed", "seed"], default=["data_seed", "seed"],
                        help="one table per setting varied")
    parser.add_argument("--values", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--importance", nargs="+", default=["svd"])
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every derivation")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args()
    register_resolvers()
    lines = [f"# How derived counts move with the derivation sample and the seed (scale `{args.scale}`)", "",
             f"Values {', '.join(map(str, args.values))} of each varied setting, the others at their defaults; "
             f"overrides: {' '.join(args.override) or 'none'}. Written by `scripts/derivation_stability.py`."]
    with tempfile.TemporaryDirectory(prefix="stability_") as cache_dir:
        for vary in args.vary:
            lines += ["", f"## `{vary}` varied", "",
                      "| dataset | importance | examples | rule | kept % by value | kept % mean (sd) "
                      "| non-empty matrices by value | kept by all / any | Jaccard (non-empty) "
                      "| Spearman (kept shares; pairs) |", "|---|---|---|---|---|---|---|---|---|---|"]
            for dataset in args.datasets:
                for importance in args.importance:
                    lines.append(compare(args, dataset, importance, vary, cache_dir))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
