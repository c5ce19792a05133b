"""Bad input fails with one sentence naming the setting or file, before anything is written: settings,
data files, ratio caches and adapter files."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from partial_lora.adapters import adapt, load_adapter
from partial_lora.backbones import build_backbone
from partial_lora.config import validate
from partial_lora.data import VisionDataModule
from partial_lora.errors import ConfigError, DataError, PartialLoraError
from partial_lora.importance import LayerScores
from partial_lora.pipeline import run
from partial_lora.ratios import DerivedCounts, LayerCounts, RatioCache
from tests.conftest import ROOT, compose_config
from tests.test_masked_adapter import write_legacy_adapter


def test_an_unknown_group_option_lists_the_choices(tmp_path: Path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "method=lora,lorra", "dry_run=true"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: method=lorra is not an option of the config group 'method': choose one "
                                    "of adalora, balanced, dora, full_ft,")


@pytest.mark.parametrize("overrides, message", [
    (["rank=0"], "rank must be an integer >= 1, got 0."),
    (["ratios.threshold=0"], "ratios.threshold must be a number in (0, 1]"),
    (["ratios.threshold=1.5"], "ratios.threshold must be a number in (0, 1]"),
    (["dataset=cifar10_fewshot", "backbone=clip_tiny", "dataset.shots=0"], "dataset.shots must be an integer >= 1"),
    (["lr=0"], "lr must be a number > 0, got 0."),
    (["lr=-1e-4"], "lr must be a number > 0, got -0.0001."),
    (["seed=abc"], "seed must be an integer (e.g. seed=3, or -m seed=0..19), got 'abc'."),
    (["seed=1.5"], "seed must be an integer"),
    (["train.epochs=0"], "train.epochs must be an integer >= 1, got 0."),
    (["ratios.max_examples=0"], "ratios.max_examples must be an integer >= 1 or null"),
    (["data_dir=/no/such/folder"], "data_dir '/no/such/folder' is not a directory"),
    (["method=vera", "+method.mask.mode=partial", "importance=svd"], "which only LoRA and AdaLoRA adapters have"),
    (["method=targeted_lora"], "method=targeted_lora needs an importance measure: add importance=svd, snip or imp."),
    (["backbone=clip_tiny"], "dataset sst2 holds text but backbone clip_tiny reads images: pick a matching pair."),
    (["backbone.target_modules=null"], "backbone minilm names none: set backbone.target_modules"),
])
def test_a_bad_setting_is_refused_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert message in str(error.value)
    assert re.search(r"\.\s+[A-Z]", str(error.value)) is None  # one sentence


@pytest.fixture
def tiny_run(tiny_cfg, glue_dir: Path, tmp_path: Path):
    """Run ``tiny_cfg`` expecting ``DataError`` with ``message``; nothing reaches the results store."""

    def failing(message: str) -> str:
        with pytest.raises(DataError) as error:
            run(tiny_cfg)
        assert message in str(error.value)
        assert not (tmp_path / "runs").exists()
        return str(error.value)

    return failing


def test_a_missing_split_is_named(tiny_run, glue_dir: Path):
    (glue_dir / "glue" / "sst2" / "validation.jsonl").unlink()
    tiny_run(f"GLUE task 'sst2' has no validation split at {glue_dir / 'glue' / 'sst2' / 'validation.jsonl'}")


def test_a_malformed_json_line_is_named_with_its_file_and_number(tiny_run, glue_dir: Path):
    path = glue_dir / "glue" / "sst2" / "train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[6] = lines[6].replace('"label"', '"label', 1)
    path.write_text("".join(lines))
    tiny_run(f"{path} line 7 is not valid JSON")


def test_an_empty_data_file_is_named(tiny_run, glue_dir: Path):
    path = glue_dir / "glue" / "sst2" / "validation.jsonl"
    path.write_text("")
    tiny_run(f"{path} holds no examples.")


def test_a_label_outside_the_classes_is_named(tiny_run, glue_dir: Path):
    path = glue_dir / "glue" / "sst2" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4]["label"] = 2
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tiny_run(f"{path} row 5 has label 2, outside the task's classes 0..1 (1 such rows).")


def test_nothing_left_to_train_or_derive_from_is_refused(tiny_run, tiny_cfg):
    with open_dict(tiny_cfg):
        tiny_cfg.dataset.val_size = 48
    tiny_run("GLUE sst2's train split has 48 rows and dataset.val_size=48 holds them all out")


def write_fewshot_npz(path: Path, train_labels: np.ndarray) -> None:
    images = np.zeros((len(train_labels), 8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, train_x=images, train_y=train_labels, val_x=images, val_y=train_labels,
                        test_x=images, test_y=train_labels, classes=np.array(["cat", "dog"]))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is not a readable few-shot .npz (BadZipFile"),
    ("label", "train_y[3] is 7, outside the 2 classes 0..1."),
])
def test_a_corrupt_npz_is_refused(tmp_path: Path, damage, message):
    path = tmp_path / "vision" / "tiny.npz"
    write_fewshot_npz(path, np.array([0, 0, 1, 7 if damage == "label" else 1]))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    cfg = compose_config("dataset=cifar10_fewshot", "backbone=clip_tiny", "dataset.file=tiny.npz",
                         "dataset.num_labels=2", "dataset.shots=1")
    with pytest.raises(DataError) as error:
        VisionDataModule(cfg.dataset, 32, str(tmp_path), batch_size=2, data_seed=0).setup()
    assert str(path) in str(error.value) and message in str(error.value)


def cache_entry(tmp_path: Path) -> tuple[RatioCache, dict, dict[str, tuple[int, int]]]:
    cache, shapes = RatioCache(tmp_path), {"layer.0": (4, 6)}
    inputs = {"settings": {"importance": "svd"}, "source": {"backbone": "a"}, "data": "0"}
    scores = {"layer.0": LayerScores(row=torch.arange(4.0), col=torch.arange(6.0))}
    cache.save(DerivedCounts(counts={"layer.0": LayerCounts(k_row=2, k_col=3, evaluations=5)}, scores=scores,
                             inputs=inputs, baseline_accuracy=0.9, wall_time_s=1.0))
    return cache, inputs, shapes


@pytest.mark.parametrize("damage, message", [
    ("truncate", "it is unreadable (JSONDecodeError"),
    ("tamper", "its checksum does not match its contents"),
    ("other inputs", "it was derived for other inputs"),
    ("other layers", "its layers are not the model's (e.g. layer.0)"),
    ("other shapes", "layer layer.0 has shape [4, 6], the model's is [8, 6]"),
])
def test_a_damaged_or_foreign_ratio_cache_is_reported_and_derived_again(tmp_path: Path, caplog, damage, message):
    cache, inputs, shapes = cache_entry(tmp_path)
    path = cache.path(inputs)
    assert cache.load(inputs, shapes) is not None
    entry = json.loads(path.read_text())
    if damage == "truncate":
        path.write_text(path.read_text()[:100])
    elif damage == "tamper":
        entry["layers"]["layer.0"]["k_row"] = 4
        path.write_text(json.dumps(entry))
    elif damage == "other inputs":
        entry["inputs"]["source"]["backbone"] = "b"
        path.write_text(json.dumps(entry))
    else:
        shapes = {"layer.1": (4, 6)} if damage == "other layers" else {"layer.0": (8, 6)}
    with caplog.at_level(logging.WARNING):
        assert cache.load(inputs, shapes) is None
    assert f"ratio cache {path} is not usable: {message}" in caplog.text
    assert "deriving the ratios again" in caplog.text


def tiny_lora(backbone: str, rank: int = 4) -> tuple[torch.nn.Module, list[str]]:
    cfg = compose_config(f"backbone={backbone}", "method=lora", f"rank={rank}")
    torch.manual_seed(0)
    built = build_backbone(cfg.backbone, num_labels=2)
    return adapt(built.model, cfg), built.head_modules


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is not a complete safetensors file (Error while deserializing header"),
    ("pickle", "is not a complete safetensors file"),
    ("other backbone", "does not fit this model: the model has no base_model.model.bert.encoder.layer.0."),
    ("other rank", "lora_A.weight has shape (4, 32), the model's is (8, 32)"),
])
def test_a_damaged_or_foreign_adapter_file_is_refused(tmp_path: Path, damage, message):
    model, heads = tiny_lora("tiny_bert")
    path = write_legacy_adapter(model, tmp_path / "adapter.safetensors", heads)
    target, _ = tiny_lora("tiny_bert")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "pickle":
        torch.save(dict(model.state_dict()), path)
    elif damage == "other backbone":
        target, _ = tiny_lora("tiny_deberta")
    else:
        target, _ = tiny_lora("tiny_bert", rank=8)
    before = {name: value.clone() for name, value in target.state_dict().items()}
    with pytest.raises(PartialLoraError) as error:
        load_adapter(target, path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert all(torch.equal(before[name], value) for name, value in target.state_dict().items())  # untouched
