"""What every data module shares: train / val / test splits served as batches of dicts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset


def majority_rate(labels: Sequence[int]) -> float:
    """The share of the most frequent label, x100 as the metrics are: what always predicting it scores."""
    return 100 * max(Counter(labels).values()) / len(labels)


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``self.splits`` (``train``, ``val``, ``test``) in ``setup``."""

    def __init__(self, batch_size: int, collate: Callable[[list[Any]], dict], num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.collate = collate
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch on one device."""
        self.setup()
        return -(-len(self.splits["train"]) // self.batch_size)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[name], batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def split_labels(self, name: str) -> list[int]:
        """The labels of split ``name``, read without loading its inputs."""
        raise NotImplementedError

    def majority_rates(self) -> dict[str, float]:
        """The majority-class rate (x100) of the validation and test splits: what accuracy at chance reads."""
        self.setup()
        return {name: majority_rate(self.split_labels(name)) for name in ("val", "test")}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
