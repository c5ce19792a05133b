"""Start Algorithm 1's evaluations at the block that holds the searched layer.

Zeroing rows of a layer in block ``b`` cannot change what blocks ``0..b-1`` compute, so their outputs
are recorded once per derivation batch and replayed: while a layer of block ``b`` is searched, every
block before it is swapped for a module that returns block ``b-1``'s recorded output for the current
batch. This needs only the path of the model's sequence of blocks (``backbone.blocks``), not its
architecture; the embeddings still run, which is cheap next to the blocks.

A search that keeps removals applied (``scope=cumulative``) changes what earlier blocks compute: it says so
with :meth:`PrefixReplay.weights_changed`, and the recording is redone before it is next replayed past the
changed block (once per block, not per evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from partial_lora.layers import block_of


class _Replay(torch.nn.Module):
    def __init__(self, outputs: list[Any], position: list[int]) -> None:
        super().__init__()
        self.outputs = outputs
        self.position = position

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.position[0]]


class PrefixReplay:
    """Recorded outputs of every block for a fixed list of batches, and a context to replay them."""

    def __init__(self, blocks: torch.nn.ModuleList, batches: list[Any], run_batch: Callable[[Any], Any]) -> None:
        self.blocks = blocks
        self.batches = batches
        self.run_batch = run_batch
        self.position = [0]
        self.stale_from: int | None = None  # lowest block whose recorded output no longer matches the model
        self._record()

    def _record(self) -> None:
        self.outputs: list[list[Any]] = [[] for _ in self.blocks]
        handles = [block.register_forward_hook(self._recorder(index)) for index, block in enumerate(self.blocks)]
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    self.run_batch(batch)
        finally:
            for handle in handles:
                handle.remove()
        self.stale_from = None

    def weights_changed(self, block: int) -> None:
        """Weights of ``block`` changed: its recorded output, and every later one's, are out of date."""
        self.stale_from = block if self.stale_from is None else min(self.stale_from, block)

    def _recorder(self, index: int):
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.outputs[index].append(output)

        return record

    def block_of(self, layer: str, blocks_path: str) -> int:
        """Index of the block whose dotted path prefixes ``layer`` (0 when it sits before every block)."""
        block = block_of(layer, blocks_path)
        return 0 if block is None else block

    @contextmanager
    def starting_at(self, block: int) -> Iterator[None]:
        """Within the context, blocks before ``block`` return their recorded outputs instantly."""
        if block == 0:
            yield
            return
        if self.stale_from is not None and self.stale_from < block:
            self._record()
        originals = [self.blocks[index] for index in range(block)]
        replay = _Replay(self.outputs[block - 1], self.position)
        for index in range(block):
            self.blocks[index] = replay
        try:
            yield
        finally:
            for index, original in enumerate(originals):
                self.blocks[index] = original

    def batches_in_order(self, order: list[int] | None = None) -> Iterator[Any]:
        """The recorded batches (in ``order``, indices into them: default, as recorded), moving the replay to each
        in turn."""
        for index in range(len(self.batches)) if order is None else order:
            self.position[0] = index
            yield self.batches[index]
