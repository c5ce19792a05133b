"""Few-shot image classification: torchvision datasets (paper's eight) or a local ``.npz`` file.

SPEC 5: ``shots`` images per class train (16; Flowers 6) and a disjoint set of the same size, from the
same train split, selects the checkpoint; the dataset's own test split is reported. Both few-shot sets
are drawn with the data seed, and the training shots also serve ratio derivation.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from partial_lora.config import DATA_DIR_ENV
from partial_lora.data.base import SplitDataModule
from partial_lora.errors import DataError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def few_shot_split(labels: Sequence[int], shots: int | None, seed: int,
                   val_shots: int | None = None) -> tuple[list[int], list[int]]:
    """``val_shots`` (default ``shots``) indices per class for validation and ``shots`` more, disjoint, for
    training; ``shots=None`` trains on every image outside the validation set (Table 3)."""
    val_shots = shots if val_shots is None else val_shots
    if val_shots is None or val_shots < 1 or (shots is not None and shots < 1):
        raise DataError(f"dataset.shots and dataset.val_shots must be >= 1 (shots may be null for the whole "
                        f"training set), got shots={shots}, val_shots={val_shots}.")
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        needed = val_shots + (shots or 1)
        if len(members) < needed:
            raise DataError(f"class {label} has {len(members)} training images, fewer than the {needed} needed "
                            f"for {shots or 'the remaining'} training and {val_shots} validation shots.")
        chosen = generator.permutation(members)
        val += chosen[:val_shots].tolist()
        train += chosen[val_shots:None if shots is None else val_shots + shots].tolist()
    return sorted(train), sorted(val)


def dataset_labels(dataset: Any) -> list[int]:
    """Labels of a torchvision dataset without decoding its images."""
    for attribute in ("targets", "_labels", "labels"):
        if hasattr(dataset, attribute):
            return [int(label) for label in getattr(dataset, attribute)]
    if hasattr(dataset, "_samples"):
        return [int(sample[1]) for sample in dataset._samples]
    raise DataError(f"cannot read labels of {type(dataset).__name__} without loading every image.")


class _Images(Dataset):
    """``(image, label)`` pairs from ``source`` at ``indices``, as model inputs."""

    def __init__(self, source: Any, indices: Sequence[int], transform: Any) -> None:
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> list[int]:
        every = dataset_labels(self.source)
        return [every[index] for index in self.indices]

    def __getitem__(self, position: int) -> dict[str, Any]:
        image, label = self.source[self.indices[position]]
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return {"pixel_values": self.transform(image.convert("RGB")), "labels": int(label)}


class _Arrays:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def _collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples])}


class VisionDataModule(SplitDataModule):
    def __init__(self, dataset: DictConfig, image_size: int, data_dir: str | None, batch_size: int,
                 data_seed: int, num_workers: int = 0) -> None:
        super().__init__(batch_size, _collate, num_workers)
        self.cfg = dataset
        self.image_size = image_size
        self.data_dir = data_dir
        self.data_seed = data_seed
        self._names: list[str] | None = None

    def _root(self) -> Path:
        if self.data_dir is None:
            raise DataError(f"vision dataset '{self.cfg.name}' needs a data directory: set data_dir=... or "
                            f"{DATA_DIR_ENV} to a folder holding vision/{self.cfg.name} (torchvision downloads "
                            "there with dataset.download=true where the dataset allows it).")
        return Path(self.data_dir) / "vision"

    def _transform(self, train: bool):
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=train and self.cfg.augment,
                                         mean=OPENAI_MEAN, std=OPENAI_STD)

    def _load(self) -> tuple[Any, list[int], Any, list[int], Any, list[str]]:
        """(train pool, train indices, val pool, val indices, test set, class names)."""
        if self.cfg.source == "npz":
            path = self._root() / self.cfg.file
            if not path.is_file():
                raise DataError(f"vision dataset '{self.cfg.name}' expects {path}: put the file there or point "
                                f"data_dir / {DATA_DIR_ENV} at the folder above vision/.")
            try:  # np.load reads lazily: a truncated or corrupt archive fails on first access, in several ways
                with np.load(path) as arrays:
                    train = _Arrays(arrays["train_x"], arrays["train_y"])
                    val = _Arrays(arrays["val_x"], arrays["val_y"])
                    test = _Arrays(arrays["test_x"], arrays["test_y"])
                    names = [str(name) for name in arrays["classes"]]
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise DataError(f"{path} is not a readable few-shot .npz ({type(error).__name__}: {error}); it needs "
                                "arrays train_x, train_y, val_x, val_y, test_x, test_y and classes.") from error
            for split, arrays in (("train", train), ("val", val), ("test", test)):
                outside = np.flatnonzero((arrays.labels < 0) | (arrays.labels >= len(names)))
                if len(outside):
                    raise DataError(f"{path} {split}_y[{outside[0]}] is {arrays.labels[outside[0]]}, outside the "
                                    f"{len(names)} classes 0..{len(names) - 1}.")
            generator = np.random.default_rng(self.data_seed)
            train_idx = self._per_class(train.labels, generator, self.cfg.shots)
            val_idx = self._per_class(val.labels, generator, self.cfg.val_shots)
            return train, train_idx, val, val_idx, test, names
        cls = get_class(self.cfg.torchvision_class)
        root = self._root() / self.cfg.name
        split_args = {split: OmegaConf.to_container(self.cfg[f"{split}_args"], resolve=True)
                      for split in ("train", "val", "test") if self.cfg.get(f"{split}_args") is not None}
        try:
            pools = {split: cls(root=str(root), **args) for split, args in split_args.items()}
        except (RuntimeError, FileNotFoundError, OSError) as error:
            raise DataError(f"vision dataset '{self.cfg.name}' could not be read from {root} ({error}): put it "
                            "there, set dataset.download=true where torchvision can download it, or point "
                            f"data_dir / {DATA_DIR_ENV} elsewhere.") from error
        train, test = pools["train"], pools["test"]
        names = list(self.cfg.class_names) if self.cfg.get("class_names") else [
            name[0] if isinstance(name, tuple) else name for name in train.classes]
        if "val" in pools:  # a dataset with its own validation split (Flowers102: 10 images per class each)
            generator = np.random.default_rng(self.data_seed)
            val = pools["val"]
            return (train, self._per_class(np.asarray(dataset_labels(train)), generator, self.cfg.shots), val,
                    self._per_class(np.asarray(dataset_labels(val)), generator, self.cfg.val_shots), test, names)
        train_idx, val_idx = few_shot_split(dataset_labels(train), self.cfg.shots, self.data_seed,
                                            self.cfg.val_shots)
        return train, train_idx, train, val_idx, test, names

    def _per_class(self, labels: np.ndarray, generator: np.random.Generator, count: int | None) -> list[int]:
        """The first ``count`` of each class after a seeded shuffle (files may hold more than asked); all of
        them for ``None``."""
        chosen = []
        for label in np.unique(labels):
            members = generator.permutation(np.flatnonzero(labels == label))
            if count is not None and len(members) < count:
                raise DataError(f"class {label} has {len(members)} images, fewer than the {count} per class asked.")
            chosen += members[:count].tolist()
        return sorted(chosen)

    def class_names(self) -> list[str]:
        if self._names is None:
            self._names = self._load()[-1]
        return self._names

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, train_idx, val, val_idx, test, self._names = self._load()
        if len(self._names) != self.cfg.num_labels:
            raise DataError(f"dataset '{self.cfg.name}' has {len(self._names)} classes, its config says "
                            f"num_labels={self.cfg.num_labels}.")
        evaluation = self._transform(train=False)
        self.splits = {"train": _Images(train, train_idx, self._transform(train=True)),
                       "val": _Images(val, val_idx, evaluation),
                       "test": _Images(test, range(len(test)), evaluation)}
        self.derivation = _Images(train, train_idx, evaluation)

    def split_labels(self, name: str) -> list[int]:
        return self.splits[name].labels()

    def derivation_batches(self, fraction: float, max_examples: int | None, batch_size: int) -> list[dict]:
        """The training shots themselves (paper: the same few-shot set), at most ``max_examples`` of them."""
        self.setup()
        size = len(self.derivation) if max_examples is None else min(len(self.derivation), max_examples)
        subset = torch.utils.data.Subset(self.derivation, np.random.default_rng(self.data_seed).permutation(
            len(self.derivation))[:size].tolist())
        return list(DataLoader(subset, batch_size=batch_size, collate_fn=_collate))

