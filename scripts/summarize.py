"""Print the protocol summary (top-k by validation, mean test) of the run records under a folder.

    python scripts/summarize.py results/runs --top-k 5
"""

from __future__ import annotations

import argparse

from partial_lora.results.aggregate import load_records, protocol_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="results/runs")
    parser.add_argument("--top-k", type=int, default=5)
    arguments = parser.parse_args()
    summary = protocol_summary(load_records(arguments.directory), top_k=arguments.top_k)
    print(summary.to_markdown(index=False, floatfmt=".2f") if not summary.empty else "no finished runs")


if __name__ == "__main__":
    main()
