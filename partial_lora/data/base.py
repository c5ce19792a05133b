"""What every data module shares: train / val / test splits served as batches of dicts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochPermutation(Sampler[int]):
    """``RandomSampler``'s draw, exactly (one seed from the global generator as an epoch starts, then a
    permutation), with the seed kept: a resumed epoch replays its order from it instead of drawing anew."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seed: int | None = None
        self.resume_seed: int | None = None

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.resume_seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        else:
            self.seed, self.resume_seed = self.resume_seed, None
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()


class ResumableLoader(DataLoader):
    """A shuffled loader that a checkpoint taken mid-epoch (on SIGTERM) resumes where it stopped.

    Its :meth:`position` is the epoch's permutation seed and the batches handed out (Lightning fetches no batch
    ahead of a loader whose length it knows); a loader built with that ``position`` replays the order and skips
    those batches. Creating an iterator draws its workers' base seed from the global generator: on resume that
    draw happened before the checkpoint, whose generator states the run restores, so it is undone.

    The position travels in the datamodule's state, not through Lightning's stateful-loader protocol
    (``state_dict``), which a fit whose optimiser reads ``trainer.estimated_stepping_batches`` (the cosine
    schedule here) never restores (Lightning issue #20550); torchdata's ``StatefulDataLoader`` meets the same
    gap and is not a dependency. A constructor argument, it survives Lightning re-creating the loader under DDP.
    """

    def __init__(self, dataset: Dataset, position: dict[str, Any] | None = None, **options: Any) -> None:
        options.setdefault("sampler", EpochPermutation(len(dataset)))  # Lightning passes its own under DDP
        super().__init__(dataset, **options)
        self.returned = 0
        self.skip = 0
        if position is not None and position["batches"] < len(self):  # at an epoch's end: the next draws anew
            self.skip = position["batches"]
            if isinstance(self.sampler, EpochPermutation):
                self.sampler.resume_seed = position["seed"]

    def position(self) -> dict[str, Any]:
        return {"seed": getattr(self.sampler, "seed", None), "batches": self.returned}

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        generator_state = torch.get_rng_state()
        batches = super().__iter__()
        if skip:
            torch.set_rng_state(generator_state)
        return self._counted(batches, skip)

    def _counted(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        self.returned = 0
        for batch in batches:
            self.returned += 1
            if self.returned > skip:
                yield batch


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
        self.train_position: dict[str, Any] | None = None  # where a checkpoint stopped the train loader

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch on one device."""
        self.setup()
        return -(-len(self.splits["train"]) // self.batch_size)

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(self.splits[name], batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def split_labels(self, name: str) -> list[int]:
        """The labels of split ``name``, read without loading its inputs."""
        raise NotImplementedError

    def majority_rates(self) -> dict[str, float]:
        """The majority-class rate (x100) of the validation and test splits: what accuracy at chance reads."""
        self.setup()
        return {name: majority_rate(self.split_labels(name)) for name in ("val", "test")}

    def train_dataloader(self) -> DataLoader:
        position, self.train_position = self.train_position, None
        return ResumableLoader(self.splits["train"], position, batch_size=self.batch_size, collate_fn=self.collate,
                               num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the train loader's position (see :class:`ResumableLoader`)."""
        loader = None if self.trainer is None else self.trainer.train_dataloader
        return {"train_position": loader.position()} if isinstance(loader, ResumableLoader) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_position = state.get("train_position")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
