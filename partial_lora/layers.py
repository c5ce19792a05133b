"""Where a layer sits in a backbone, read from its dotted name: in the classifier head, in which block.

Plain string rules (no torch), shared by the core (pyramidal masks, prefix replay, probes), training (CoTo,
LoSiA) and the figures, so that every part numbers blocks the same way.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\.(\d+)\.")


def in_head(name: str, head_modules: list[str]) -> bool:
    """Whether the dotted module or parameter ``name`` lies under one of the backbone's head modules."""
    parts = name.split(".")
    return any(head in parts for head in head_modules)


def block_of(name: str, blocks_path: str | None = None) -> int | None:
    """Index of the transformer block holding the dotted module ``name``: the number after ``blocks_path`` (the
    backbone's block list, e.g. ``bert.encoder.layer``) or, where the block list is not known, the first number in
    the name; ``None`` when it lies outside every block."""
    if blocks_path is not None:
        if not name.startswith(f"{blocks_path}."):
            return None
        name = name[len(blocks_path) + 1:]
    match = _NUMBER.search(f".{name}.")
    return None if match is None else int(match.group(1))


def group_by_block(names: list[str], blocks_path: str) -> list[list[str]]:
    """``names`` grouped per transformer block, in block order; names outside every block form a last group."""
    groups: dict[int, list[str]] = {}
    for name in names:
        block = block_of(name, blocks_path)
        groups.setdefault(-1 if block is None else block, []).append(name)
    return [groups[key] for key in sorted(groups, key=lambda key: (key < 0, key))]
