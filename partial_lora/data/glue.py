"""GLUE tasks from the Hugging Face hub or from local JSON Lines files in the hub's schema.

GLUE's test labels are hidden, so (SPEC 5) the official validation split is what a run reports as its
test metric, and a seeded held-out part of the train split chooses the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from partial_lora.config import DATA_DIR_ENV, is_int
from partial_lora.data.base import SplitDataModule
from partial_lora.errors import DataError

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "validation")


def load_glue_splits(task: str, data_dir: str | None, splits: Sequence[str] = SPLITS) -> DatasetDict:
    """Return the ``splits`` (default ``train`` and ``validation``) of a GLUE task, local when ``data_dir`` is set."""
    if data_dir is not None:
        files = {split: Path(data_dir) / "glue" / task / f"{split}.jsonl" for split in splits}
        for split, path in files.items():
            if not path.is_file():
                raise DataError(
                    f"GLUE task '{task}' has no {split} split at {path}: put the file there "
                    f"(JSON Lines in the Hugging Face glue schema), point data_dir or {DATA_DIR_ENV} at a "
                    f"folder that has it, or unset both to download {HUB_DATASET} from the Hugging Face hub."
                )
        try:
            # The config name keys the datasets cache on the files' content as well as their paths.
            return load_dataset("json", name=f"content-{content_digest(files.values())}",
                                data_files={split: str(path) for split, path in files.items()})
        except Exception as error:  # pyarrow's JSON reader names no line; find it to say where the file is broken
            for path in files.values():
                _check_json_lines(path)
            raise DataError(f"GLUE task '{task}' could not be read from {Path(data_dir) / 'glue' / task} "
                            f"({type(error).__name__}: {error}).") from error
    try:
        hub = load_dataset(HUB_DATASET, task)
    except Exception as error:  # the hub raises many types (offline, missing config, HTTP)
        raise DataError(
            f"GLUE task '{task}' could not be loaded from the Hugging Face hub ({type(error).__name__}): "
            f"set data_dir=... or {DATA_DIR_ENV} to a folder holding glue/{task}/{{train,validation}}.jsonl "
            "for offline use, or make the hub reachable."
        ) from error
    return DatasetDict({split: hub[split] for split in splits})


def content_digest(paths: Iterable[Path]) -> str:
    """A digest of the files' bytes. The datasets cache keys local files by path, size and modification time,
    which a file edited in place keeps under ``cp -p`` or ``rsync -t``: the run would read the old rows."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _check_json_lines(path: Path, fields: Sequence[str] = ()) -> None:
    """Raise :class:`DataError` naming the first line of ``path`` that is not UTF-8, not a JSON object, or
    (given the task's text ``fields``) lacks one of them or ``label`` or holds the wrong type; or an empty file."""
    required = [*fields, "label"] if fields else []
    rows = 0
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {number} is not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                f"{error.start + 1}): save the file as UTF-8.") from error
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}): "
                                "fix or remove that line.") from error
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is not a JSON object with the task's fields.")
            for field in required:
                if field not in row:
                    raise DataError(f"{path} line {number} has no {field} field; the task reads "
                                    f"{', '.join(fields)} and label.")
                label = field == "label"
                if not (is_int(row[field]) if label else isinstance(row[field], str)):
                    raise DataError(f"{path} line {number} field {field} is {row[field]!r}, not "
                                    f"{'an integer' if label else 'a string'}.")
            rows += 1
    if rows == 0:
        raise DataError(f"{path} holds no examples.")


def _typed(split: Dataset, field: str) -> bool:
    """Whether every row has ``field``, as UTF-8 text (or, for ``label``, as an integer class)."""
    feature, column = split.features[field], split.data.column(field)
    if column.null_count:
        return False
    if field == "label":
        return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith("int"))
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return False
    try:  # pyarrow's JSON reader keeps invalid UTF-8, which fails only when a row is read
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def check_split(split: Dataset, where: str, fields: list[str], num_labels: int, path: Path | None = None) -> None:
    """The split has the task's text fields and labels in ``0 .. num_labels - 1`` (GLUE's hidden test labels,
    -1, are never read). A split read from the local file ``path`` names the file's first bad line."""
    missing = [field for field in [*fields, "label"] if field not in split.column_names]
    if missing:
        raise DataError(f"{where} has no {', '.join(missing)} field; the task reads {', '.join(fields)} and label.")
    for field in [*fields, "label"]:
        if not _typed(split, field):
            if path is not None:
                _check_json_lines(path, fields)
            raise DataError(f"{where} has rows whose {field} is missing or not "
                            f"{'an integer' if field == 'label' else 'a string'}.")
    labels = np.asarray(split["label"])
    outside = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if len(outside):
        raise DataError(f"{where} row {outside[0] + 1} has label {labels[outside[0]]}, outside the task's classes "
                        f"0..{num_labels - 1} ({len(outside)} such rows).")


def glue_splits(dataset: DictConfig, data_dir: str | None, data_seed: int) -> dict[str, Dataset]:
    """The untokenised ``train`` (capped at ``dataset.train_size``), ``val`` (``dataset.val_size`` rows held out
    of the train split with ``data_seed``) and ``test`` (the official dev split, capped at ``dataset.test_size``)
    splits of a run, checked, and the ``derivation_pool`` (the train split without ``val``, uncapped).

    A task with ``dataset.dev_division`` ({test_size, seed}) is built from the dev split alone, for a task whose
    train split is not at hand (the local data holds QNLI's dev split only): the dev split is divided once, by
    the division's own seed and not the run's, so every seed trains on one train part and reports on one test
    part; ``val`` is then held out of that train part as usual."""
    division = dataset.get("dev_division")
    raw = load_glue_splits(dataset.task, data_dir, ("validation",) if division else SPLITS)
    for name, split in raw.items():
        path = None if data_dir is None else Path(data_dir) / "glue" / dataset.task / f"{name}.jsonl"
        where = f"{HUB_DATASET} {dataset.task} {name} split" if path is None else str(path)
        check_split(split, where, list(dataset.text_fields), dataset.num_labels, path)
    if division:
        if not 0 < division.test_size < len(raw["validation"]):
            raise DataError(f"dataset.dev_division.test_size={division.test_size} must leave rows of GLUE "
                            f"{dataset.task}'s {len(raw['validation'])}-row dev split on both sides.")
        # Both parts keep the dev split's order: a part left in the division's shuffled order and then split
        # again with an equal seed (data_seed = division seed) replays the same random stream, which drew a
        # validation part of 63% one label from QNLI's balanced dev split.
        order = np.random.default_rng(division.seed).permutation(len(raw["validation"]))
        raw = DatasetDict(train=raw["validation"].select(np.sort(order[division.test_size:])),
                          validation=raw["validation"].select(np.sort(order[:division.test_size])))
    if len(raw["train"]) <= dataset.val_size:
        raise DataError(f"GLUE {dataset.task}'s train split has {len(raw['train'])} rows and dataset.val_size="
                        f"{dataset.val_size} holds them all out: nothing is left to train on or derive ratios "
                        "from; lower dataset.val_size.")
    held_out = raw["train"].train_test_split(test_size=dataset.val_size, seed=data_seed)
    train = pool = held_out["train"]
    if dataset.train_size is not None and dataset.train_size < len(train):
        train = train.shuffle(seed=data_seed).select(range(dataset.train_size))
    test = raw["validation"]
    if dataset.get("test_size") is not None and dataset.test_size < len(test):
        test = test.shuffle(seed=data_seed).select(range(dataset.test_size))
    return {"train": train, "val": held_out["test"], "test": test, "derivation_pool": pool}


class GlueDataModule(SplitDataModule):
    """Tokenised GLUE splits: ``train`` (optionally capped), ``val`` (held out of train), ``test`` (official dev)."""

    def __init__(self, dataset: DictConfig, tokenizer: PreTrainedTokenizerBase, data_dir: str | None,
                 batch_size: int, data_seed: int, num_workers: int = 0) -> None:
        super().__init__(batch_size, DataCollatorWithPadding(tokenizer), num_workers)
        self.cfg = dataset
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.data_seed = data_seed
        self.derivation_pool: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = glue_splits(self.cfg, self.data_dir, self.data_seed)
        self.derivation_pool = raw.pop("derivation_pool")
        self.splits = {name: self._tokenize(split) for name, split in raw.items()}

    def split_labels(self, name: str) -> list[int]:
        return list(self.splits[name]["labels"])

    def _tokenize(self, split: Dataset) -> Dataset:
        fields = list(self.cfg.text_fields)

        def encode(batch):
            encoded = self.tokenizer(*(batch[field] for field in fields), truncation=True,
                                     max_length=self.cfg.max_length)
            encoded["labels"] = batch["label"]
            return encoded

        return split.map(encode, batched=True, remove_columns=split.column_names,
                         load_from_cache_file=False, desc=f"tokenise {self.cfg.task}")

    def _derivation_order(self, fraction: float, max_examples: int | None) -> tuple[Dataset, int]:
        """The rows that are neither validation nor test, in the data seed's order, and how many of the first form
        Algorithm 1's derivation set: ``fraction`` of them (paper: 2% small, 5% large tasks), at most
        ``max_examples``."""
        self.setup()
        size = max(1, round(fraction * len(self.derivation_pool)))
        if max_examples is not None:
            size = min(size, max_examples)
        return self.derivation_pool.shuffle(seed=self.data_seed), size

    def derivation_batches(self, fraction: float, max_examples: int | None, batch_size: int) -> list[dict]:
        """Algorithm 1's labelled sample (see :meth:`_derivation_order`)."""
        order, size = self._derivation_order(fraction, max_examples)
        return self._batches(order.select(range(size)), batch_size)

    def probe_batches(self, fraction: float, max_examples: int | None, probe_examples: int,
                      batch_size: int) -> list[dict]:
        """The held-out probe's labelled sample (``ratios.probe=heldout``): the ``probe_examples`` rows that follow
        the derivation set in the same order, so it shares no row with it, nor with validation or test."""
        order, size = self._derivation_order(fraction, max_examples)
        if size >= len(order):
            raise DataError(f"GLUE {self.cfg.task}'s derivation set takes all {len(order)} rows outside validation, "
                            "leaving none for the held-out probe: lower dataset.derivation_fraction or "
                            "ratios.max_examples, or set ratios.probe=in_sample.")
        return self._batches(order.select(range(size, min(len(order), size + probe_examples))), batch_size)

    def _batches(self, rows: Dataset, batch_size: int) -> list[dict]:
        sample = self._tokenize(rows)
        # Accuracy ignores order: batching similar lengths together cuts padding, and so evaluation time.
        by_length = sorted(range(len(sample)), key=lambda row: len(sample[row]["input_ids"]))
        loader = DataLoader(sample.select(by_length), batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        return list(loader)
