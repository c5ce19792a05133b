"""Command-line pre-processing that Hydra does not do itself.

Hydra reads ``seed=0..19`` as the single string ``"0..19"``; researchers expect an inclusive
integer range, so ``key=a..b`` is rewritten to Hydra's sweep syntax ``key=range(a,b+1)``
before Hydra parses the command line.
"""

from __future__ import annotations

import re

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
        if not (_INTEGER.match(start) and _INTEGER.match(stop)):
            raise ConfigError(
                f"'{arg}' is not an integer range: write {key}=A..B with integers A <= B, e.g. {key}=0..19."
            )
        if int(stop) < int(start):
            raise ConfigError(f"'{arg}' is an empty range: the end {stop} is below the start {start}.")
        expanded.append(f"{key}=range({int(start)},{int(stop) + 1})")
    return expanded
