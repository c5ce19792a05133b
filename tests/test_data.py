"""GLUE data: local JSON Lines or the hub; held-out validation never overlaps training; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from partial_lora.config import _minilm_path
from partial_lora.data import GlueDataModule, load_glue_splits
from partial_lora.data.glue import glue_splits
from partial_lora.errors import DataError
from tests.conftest import compose_config, write_jsonl


def test_local_splits_load_in_the_hub_schema(glue_dir: Path):
    splits = load_glue_splits("sst2", str(glue_dir))
    assert len(splits["train"]) == 48 and len(splits["validation"]) == 16
    assert set(splits["train"].column_names) == {"sentence", "label", "idx"}


def test_missing_local_file_names_the_path_and_both_remedies(tmp_path: Path):
    write_jsonl(tmp_path / "glue" / "qnli" / "validation.jsonl", [{"question": "q", "sentence": "s", "label": 0}])
    with pytest.raises(DataError) as error:
        load_glue_splits("qnli", str(tmp_path))
    message = str(error.value)
    assert "has no train split" in message and str(tmp_path / "glue" / "qnli" / "train.jsonl") in message
    assert "PARTIAL_LORA_DATA" in message and "Hugging Face hub" in message


def test_unreachable_hub_gives_the_same_kind_of_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub.*PARTIAL_LORA_DATA"):
        load_glue_splits("mrpc", None)


def test_validation_is_held_out_of_train_and_test_is_the_dev_split(glue_dir: Path):
    cfg = compose_config("dataset.val_size=8", "dataset.train_size=30", "dataset.max_length=16")
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    module = GlueDataModule(cfg.dataset, tokenizer, str(glue_dir), batch_size=4, data_seed=0)
    module.setup()
    sizes = {name: len(split) for name, split in module.splits.items()}
    assert sizes == {"train": 30, "val": 8, "test": 16}
    held_out = module.splits["val"]["labels"]  # chance for accuracy, as the run record keeps it
    assert module.majority_rates() == {"val": 100 * max(held_out.count(0), held_out.count(1)) / 8, "test": 50.0}

    again = GlueDataModule(cfg.dataset, tokenizer, str(glue_dir), batch_size=4, data_seed=0)
    again.setup()
    assert again.splits["val"]["input_ids"] == module.splits["val"]["input_ids"]
    other = GlueDataModule(cfg.dataset, tokenizer, str(glue_dir), batch_size=4, data_seed=1)
    other.setup()
    assert other.splits["val"]["labels"] != module.splits["val"]["labels"] or \
        other.splits["val"]["input_ids"] != module.splits["val"]["input_ids"]


def test_held_out_rows_are_disjoint_from_training_rows(glue_dir: Path):
    rows = load_glue_splits("sst2", str(glue_dir))["train"]
    held_out = rows.train_test_split(test_size=8, seed=0)
    assert not set(held_out["train"]["idx"]) & set(held_out["test"]["idx"])


def test_a_dev_only_task_divides_its_dev_split_once_for_every_seed(tmp_path: Path):
    rows = [{"question": f"q{i}", "sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(60)]
    write_jsonl(tmp_path / "glue" / "qnli" / "validation.jsonl", rows)  # no train split, as in the local data
    dataset = compose_config("dataset=qnli_dev", "dataset.val_size=10", "dataset.dev_division.test_size=20").dataset
    built = {seed: glue_splits(dataset, str(tmp_path), data_seed=seed) for seed in (0, 1)}
    ids = {seed: {name: set(split["idx"]) for name, split in parts.items()} for seed, parts in built.items()}
    for parts in ids.values():
        assert len(parts["test"]) == 20 and len(parts["val"]) == 10 and len(parts["train"]) == 30
        assert not parts["test"] & (parts["train"] | parts["val"]) and not parts["train"] & parts["val"]
    # one test part for every seed; the validation part moves with the seed, inside the same train part
    assert ids[0]["test"] == ids[1]["test"] and ids[0]["val"] != ids[1]["val"]
    assert ids[0]["train"] | ids[0]["val"] == ids[1]["train"] | ids[1]["val"]
    # the test part in the dev split's order: a part left shuffled by the division, split again with an equal
    # seed, replays the division's random stream
    assert list(built[0]["test"]["idx"]) == sorted(ids[0]["test"])
    with pytest.raises(DataError, match="dev_division.test_size=60 must leave rows"):
        glue_splits(OmegaConf.merge(dataset, {"dev_division": {"test_size": 60}}), str(tmp_path), data_seed=0)
