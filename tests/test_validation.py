"""Bad input fails with one sentence naming the setting or file, before anything is written: settings,
folders, data files, ratio caches and adapter files."""

from __future__ import annotations

import ast
import ctypes
import json
import logging
import os
import re
import subprocess
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from partial_lora.adapters import load_adapter
from partial_lora.backbones import build_backbone
from partial_lora.config import validate
from partial_lora.data import VisionDataModule
from partial_lora.errors import ConfigError, DataError, PartialLoraError, SettingError
from partial_lora.importance import LayerScores
from partial_lora.pipeline import run
from partial_lora.ratios import DerivedCounts, LayerCounts, RatioCache
from partial_lora.ratios.cache import load_entries
from partial_lora.settings import YAML_KEYS, adapt, derivation_settings
from tests.conftest import ROOT, TINY_ANY_LR, compose_config, run_py
from tests.test_masked_adapter import write_legacy_adapter


def test_an_unknown_group_option_lists_the_choices(tmp_path: Path):
    result = run_py("-m", "method=lora,lorra", "dry_run=true", cwd=tmp_path)
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
    (["seed=abc"], "seed must be an integer in 0..4294967295 (e.g. seed=3, or -m seed=0..19), got 'abc'."),
    (["seed=1.5"], "seed must be an integer"),
    (["seed=-1"], "seed must be an integer in 0..4294967295 (e.g. seed=3, or -m seed=0..19), got -1."),
    (["seed=4294967296"], "seed must be an integer in 0..4294967295 (e.g. seed=3, or -m seed=0..19), got 4294967296."),
    (["data_seed=-1"], "data_seed must be an integer in 0..4294967295, got -1."),
    (["alpha=0"], "alpha must be a number > 0 (LoRA scales its update by alpha / rank), got 0."),
    (["alpha=-16"], "alpha must be a number > 0 (LoRA scales its update by alpha / rank), got -16."),
    (["alpha=abc"], "alpha must be a number > 0 (LoRA scales its update by alpha / rank), got 'abc'."),
    (["trainer.max_steps=-2"], "trainer.max_steps must be -1 (no limit) or an integer >= 1, got -2."),
    (["trainer.max_steps=0"], "trainer.max_steps must be -1 (no limit) or an integer >= 1, got 0."),
    (["method=stochastic_lora", "importance=svd", "method.mask.temperature=0"],
     "method.mask.temperature must be a number > 0, got 0."),
    (["method=stochastic_lora", "importance=svd", "method.mask.temperature=hot"],
     "method.mask.temperature must be a number > 0, got 'hot'."),
    (["method=balanced", "method.mask.sparsity=1.5"],
     "method.mask.sparsity must be a number in [0, 1] (1: every row and column masked), got 1.5."),
    (["method=losia", "method.losia.rank_factor=0"], "method.losia.rank_factor must be a number in (0, 1], got 0."),
    (["strategy=coto", "strategy.initial_p=2"], "strategy.initial_p must be a number in (0, 1], got 2."),
    (["ratios.search=fast"], "ratios.search must be one of linear, binary, whole_first, got 'fast'."),
    (["ratios.rule=strict"], "ratios.rule must be one of paper, above_chance, loss, got 'strict'."),
    (["ratios.max_loss_increase=0"], "ratios.max_loss_increase must be a number > 0, got 0."),
    (["importance.flow=both"], "importance.flow must be one of isolated, continuous, got 'both'."),
    (["ratios.step=0"], "ratios.step must be an integer >= 1, got 0."),
    (["train.weight_decay=-0.1"], "train.weight_decay must be a number >= 0, got -0.1."),
    (["lr=inf"], "lr must be a number > 0, got inf."),
    (["train.weight_decay=inf"], "train.weight_decay must be a number >= 0, got inf."),
    (["method=balanced", "method.mask.sparsity=nan"],
     "method.mask.sparsity must be a number in [0, 1] (1: every row and column masked), got nan."),
    (["method=partial_lora", "importance.name=../../x"],
     "importance.name must be one of none, svd, snip, imp, got '../../x'."),
    (["dataset.max_length=0"], "dataset.max_length must be an integer >= 1, got 0."),
    (["dataset.derivation_fraction=0"], "dataset.derivation_fraction must be a number in (0, 1], got 0."),
    (["checkpoint.keep=maybe"], "checkpoint.keep must be true or false, got 'maybe'."),
    (["train.epochs=0"], "train.epochs must be an integer >= 1, got 0."),
    (["ratios.max_examples=0"], "ratios.max_examples must be an integer >= 1 or null"),
    (["data_dir=/no/such/folder"], "data_dir '/no/such/folder' is not a directory"),
    (["method=vera", "+method.mask.mode=partial", "importance=svd"], "which only LoRA and AdaLoRA adapters have"),
    (["+method.mask.mode=balanced", "+method.mask.sparsity=0.5"],
     "method lora sets method.mask, which its plugin partial_lora.methods.lora.PeftLora does not read"),
    (["method.plugin=partial_lora.methods.none.Nothing"], "method.plugin must name a method class"),
    (["method.peft_config=null"], "method lora trains the PEFT adapter of method.peft_config, which is null"),
    (["method=targeted_lora", "importance=none"], "method=targeted_lora derives its masks from importance scores, "
                                                  "which importance=none does not give: set importance=svd"),
    (["backbone=clip_tiny"], "dataset sst2 holds text but backbone clip_tiny reads images: pick a matching pair."),
    (["backbone.target_modules=null"], "backbone minilm names none: set backbone.target_modules"),
])
def test_a_bad_setting_is_refused_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert message in str(error.value) and one_sentence(str(error.value))


def one_sentence(message: str) -> bool:
    return re.search(r"\.\s+[A-Z]", message) is None


@pytest.mark.parametrize("overrides, message", [
    (["ratios.search=fast"], "ratios.search must be one of linear, binary, whole_first, got 'fast'."),
    (["ratios.threshold=1.5"], "ratios.threshold must lie in (0, 1], got 1.5."),
    (["importance.flow=both"], "importance.flow must be one of isolated, continuous, got 'both'."),
])
def test_the_settings_door_names_what_the_core_refuses_by_its_key(overrides, message):
    """``DerivationSettings`` refuses in its own terms (``DerivationSettings.search ...``); built from a run config,
    the same sentence names the key the run set."""
    with pytest.raises(ConfigError) as error:
        derivation_settings(compose_config("method=partial_lora", *overrides))
    assert str(error.value) == message and not isinstance(error.value, SettingError)


@pytest.mark.parametrize("overrides, message", [
    (["method=losia", "method.losia.rank_factor=0"], "method.losia.rank_factor must lie in (0, 1], got 0."),
    (["method=random_masking", "method.sparse_delta.trainable_fraction=2"],
     "method.sparse_delta.trainable_fraction must lie in (0, 1], got 2."),
    (["method=balanced", "method.mask.sparsity=1.5"],
     "method.mask.sparsity must lie in [0, 1] for balanced masks, got 1.5."),
    (["method=losia", "backbone.target_modules=nothing"],
     "backbone.target_modules must match a linear layer of the model, got 'nothing'."),
])
def test_adapting_names_what_the_core_refuses_by_its_key(overrides, message):
    """Past config validation (called as a library would be), the method's adapters refuse with the run's key."""
    cfg = compose_config("backbone=tiny_bert", *overrides)
    with pytest.raises(ConfigError) as error:
        adapt(build_backbone(cfg.backbone, num_labels=2).model, cfg)
    assert str(error.value) == message and not isinstance(error.value, SettingError)


def core_setting_errors() -> set[tuple[str, str]]:
    """Every (owner, setting) that the core's ``SettingError`` can name, read from its source: the literal owner and
    setting of each ``SettingError(...)`` and ``check_choice(...)`` call, where a setting looked up in a module's
    table (``RULE_FIELDS[...]``) stands for each of the table's values."""
    core = ROOT / "partial_lora"
    found = set()
    for path in [core / "masks.py", *(path for folder in ("ratios", "importance", "adapters")
                                      for path in sorted((core / folder).rglob("*.py")))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("SettingError", "check_choice")):
                continue
            owner, setting = node.args[:2]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert isinstance(owner, ast.Constant), f"{where}: name the owner literally"
            if isinstance(setting, ast.Subscript):
                module = import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
                names = list(getattr(module, setting.value.id).values())
            else:
                assert isinstance(setting, ast.Constant), f"{where}: name the setting literally"
                names = [setting.value]
            found |= {(owner.value, name) for name in names}
    return found


def test_every_setting_the_core_refuses_has_a_run_config_key():
    """A new core check without a key in ``partial_lora.settings.YAML_KEYS`` would crash a run's error instead of
    naming its key; a key left for a check that is gone, or one no run config holds, is a stale entry."""
    found = core_setting_errors()
    assert {("DerivationSettings", "search"), ("DerivationSettings", "threshold"), ("MaskSettings", "temperature"),
            ("targeted_linears", "target_modules")} <= found  # the walk reads the core, RULE_FIELDS included
    assert found == set(YAML_KEYS)
    configs = [compose_config(f"method={method}") for method in ("partial_lora", "stochastic_lora", "balanced", "losia",
                                                                    "random_masking")]
    absent = object()
    for key in YAML_KEYS.values():
        assert any(OmegaConf.select(cfg, key, default=absent) is not absent for cfg in configs), key


def test_a_folder_that_cannot_be_created_is_refused(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError) as error:
        validate(compose_config(f"results_dir={a_file / 'runs'}"))
    assert str(error.value) == f"results_dir '{a_file / 'runs'}' is not a folder: {a_file} is a file."


def store_overrides(root: Path) -> list[str]:
    """Every folder a run writes to, under ``root``."""
    return [f"results_dir={root / 'runs'}", f"checkpoint.dir={root / 'checkpoints'}",
            f"ratios.cache_dir={root / 'ratios'}", f"hydra.run.dir={root / 'out'}"]


def assert_refused(result: subprocess.CompletedProcess, message: str, root: Path) -> None:
    """Exit status 2, ``error: <message>`` as one sentence and no traceback; no record, checkpoint or cache."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: {message}" and one_sentence(message)
    assert not list((root / "runs").glob("*.json")) and not (root / "ratios").exists()
    assert not (root / "checkpoints").exists() or not any((root / "checkpoints").iterdir())


@pytest.mark.parametrize("overrides, message", [  # each costs an interpreter start: the table above has the rest
    (["alpha=0"], "alpha must be a number > 0 (LoRA scales its update by alpha / rank), got 0."),
    (["method=stochastic_lora", "importance=svd", "method.mask.temperature=0"],
     "method.mask.temperature must be a number > 0, got 0."),
    # Checked once the backbone is built (its shapes are not in the config), before data, derivation or training.
    (["rank=64"], "rank=64 is larger than the smallest layer it adapts, bert.encoder.layer.0.attention.self.query "
                  "(32 x 32): choose rank <= 32."),
    # The core's own check (targeted_linears), named by the run's key.
    (["backbone.target_modules=nothing"], "backbone.target_modules must match a linear layer of the model, got "
                                          "'nothing'."),
])
def test_a_bad_setting_as_typed_exits_2_before_any_record_or_cache(glue_dir: Path, tmp_path: Path, overrides, message):
    result = run_py(*TINY_ANY_LR, f"data_dir={glue_dir}", *store_overrides(tmp_path), *overrides, cwd=tmp_path)
    assert_refused(result, message, tmp_path)


def without_root_override() -> None:
    """Make permission bits bind in the child: root ignores them while it holds CAP_DAC_OVERRIDE, so drop it from
    the bounding set before exec (PR_CAPBSET_DROP); other users are bound anyway."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop CAP_DAC_OVERRIDE")


@pytest.mark.parametrize("setting, inside", [("results_dir", False), ("checkpoint.dir", True)])
def test_a_read_only_folder_is_refused_before_anything_runs(glue_dir: Path, tmp_path: Path, setting, inside):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    folder = read_only / "new" if inside else read_only
    cause = f"cannot be created in {read_only}" if inside else "is not writable"
    try:
        result = run_py(*TINY_ANY_LR, f"data_dir={glue_dir}", *store_overrides(tmp_path), f"{setting}={folder}",
                        cwd=tmp_path, preexec_fn=without_root_override)
    except subprocess.SubprocessError:
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: permission bits cannot bind")
    assert_refused(result, f"{setting} '{folder}' {cause} (Permission denied): point {setting} at a folder this user "
                           "can write to.", tmp_path)
    assert not any(read_only.iterdir())


@pytest.fixture
def tiny_run(tiny_cfg, glue_dir: Path, tmp_path: Path):
    """Run ``tiny_cfg`` expecting ``DataError`` with ``message``; no record reaches the results store."""

    def failing(message: str) -> str:
        with pytest.raises(DataError) as error:
            run(tiny_cfg)
        assert message in str(error.value)
        assert not list((tmp_path / "runs").glob("*.json"))
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


LATIN1_LINE = b'{"sentence": "caf\xe9 cr\xe8me , a lovely film", "label": 1, "idx": 6}\n'  # not UTF-8


def replace_line_7(path: Path, line: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[6] = line
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("line, message", [
    (LATIN1_LINE, "line 7 is not UTF-8 text (byte 0xe9 at column 18): save the file as UTF-8."),
    (b'{"label": 1, "idx": 6}\n', "line 7 has no sentence field; the task reads sentence and label."),
    (b'{"sentence": null, "label": 1, "idx": 6}\n', "line 7 field sentence is None, not a string."),
    (b'{"sentence": 5, "label": 1, "idx": 6}\n', "line 7 field sentence is 5, not a string."),
    (b'{"sentence": "fine", "label": "1", "idx": 6}\n', "line 7 field label is '1', not an integer."),
    (b'{"sentence": "fine", "label": 1.5, "idx": 6}\n', "line 7 field label is 1.5, not an integer."),
])
def test_a_bad_row_is_named_with_its_file_line_and_field(tiny_run, glue_dir: Path, line, message):
    path = glue_dir / "glue" / "sst2" / "train.jsonl"
    replace_line_7(path, line)
    assert tiny_run(f"{path} {message}") == f"{path} {message}"


def test_a_non_utf8_data_file_as_typed_exits_2_before_training(glue_dir: Path, tmp_path: Path):
    path = glue_dir / "glue" / "sst2" / "validation.jsonl"
    replace_line_7(path, LATIN1_LINE)
    result = run_py(*TINY_ANY_LR, f"data_dir={glue_dir}", *store_overrides(tmp_path), cwd=tmp_path)
    assert_refused(result, f"{path} line 7 is not UTF-8 text (byte 0xe9 at column 18): save the file as UTF-8.",
                   tmp_path)


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
    inputs = {"settings": {"importance": "svd"}, "source": {"backbone": {"name": "a"}}, "data": "0"}
    scores = {"layer.0": LayerScores(row=torch.arange(4.0), col=torch.arange(6.0))}
    cache.save(DerivedCounts(counts={"layer.0": LayerCounts(k_row=2, k_col=3, evaluations=5)}, scores=scores,
                             inputs=inputs, baseline_accuracy=0.9, wall_time_s=1.0))
    return cache, inputs, shapes


@pytest.mark.parametrize("damage, message", [
    ("truncate", "it is unreadable (JSONDecodeError"),
    ("list", "it is not a cache entry (no layers, inputs or settings)"),
    ("no checksum", "it has no checksum"),
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
    elif damage == "list":
        path.write_text("[]")
    elif damage == "no checksum":
        del entry["checksum"]
        path.write_text(json.dumps(entry))
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


def test_figures_skip_ratio_caches_that_are_not_intact_entries(tmp_path: Path, caplog):
    cache, inputs, _ = cache_entry(tmp_path)
    without_checksum = {key: value for key, value in json.loads(cache.path(inputs).read_text()).items()
                        if key != "checksum"}
    broken = {"list.json": "[]", "truncated.json": '{"inputs": {', "no_checksum.json": json.dumps(without_checksum)}
    for name, content in broken.items():
        (tmp_path / name).write_text(content)
    with caplog.at_level(logging.WARNING):
        assert [entry["path"] for entry in load_entries(tmp_path)] == [str(cache.path(inputs))]
        load_entries(tmp_path)
    reasons = {"list.json": "it is not a cache entry (no layers, inputs or settings).",
               "no_checksum.json": "it has no checksum.", "truncated.json": "it is unreadable (JSONDecodeError"}
    for name, reason in reasons.items():
        reports = [message for message in caplog.messages if str(tmp_path / name) in message]
        assert len(reports) == 1 and f"ratio cache {tmp_path / name} is skipped: {reason}" in reports[0]


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
