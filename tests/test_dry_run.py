"""``dry_run=true`` counts from shapes alone (meta device: no weights, tokenizer, data or network), and what
needs the hub and cannot reach it fails with one sentence naming the setting that avoids it."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from partial_lora.adapters import count_parameters
from partial_lora.backbones import build_backbone
from partial_lora.errors import ConfigError
from partial_lora.pipeline import run
from partial_lora.settings import adapt, method_of
from tests.conftest import ROOT, compose_config, methods


def printed_counts(out: str) -> tuple[int, int]:
    """(adapter, head) parameter counts of a dry run's output."""
    adapter = re.search(r"trainable adapter parameters: ([\d,]+)", out)
    head = re.search(r"classifier head parameters: ([\d,]+)", out)
    return int(adapter.group(1).replace(",", "")), int(head.group(1).replace(",", ""))


def built_counts(*overrides: str):
    """What a run counts on the model it builds with weights (before training)."""
    cfg = compose_config(*overrides)
    torch.manual_seed(0)
    names = [f"class {i}" for i in range(cfg.dataset.num_labels)] if cfg.dataset.kind == "vision" else None
    built = build_backbone(cfg.backbone, cfg.dataset.num_labels, names)
    model = adapt(built.model, cfg, 10 if method_of(cfg).needs_total_steps else None)  # masked too
    return count_parameters(model, built.head_modules)


# Every method of conf/method/ whose masks need no derived counts (a dry run of the others reads a ratio cache,
# below); pyramidal at a seed whose draws keep some rows.
@pytest.mark.parametrize("overrides", [
    *([f"method={method}", *(["seed=3"] if method == "pyramidal" else [])] for method in methods(derive=False)),
    ["backbone=tiny_deberta"], ["backbone=tiny_llama"], ["dataset=cifar10_fewshot", "backbone=clip_tiny"]])
def test_dry_run_counts_what_the_built_model_trains_without_tokenizer_or_data(overrides, capsys):
    overrides = ["backbone=tiny_bert", *overrides, "rank=4"]
    cfg = compose_config(*overrides, "dry_run=true", "data_dir=null", "++backbone.tokenizer=/no/such/tokenizer")
    assert run(cfg) is None
    out = capsys.readouterr().out
    expected = built_counts(*overrides)
    assert printed_counts(out) == (expected.adapter, expected.head)
    if cfg.method.get("mask"):
        assert f"the unmasked adapter would train: {expected.unmasked_adapter:,}" in out
    if method_of(cfg).needs_total_steps:
        assert "adalora is counted at its initial rank 12" in out and "this dry run assumed 3 steps" in out


def test_dry_run_refuses_a_rank_larger_than_a_layer():
    cfg = compose_config("backbone=tiny_bert", "rank=64", "dry_run=true", "data_dir=null")
    with pytest.raises(ConfigError, match="rank=64 is larger than the smallest layer it adapts"):
        run(cfg)


def test_dry_run_names_what_the_core_refuses_by_its_key():
    cfg = compose_config("backbone=tiny_bert", "backbone.target_modules=nothing", "dry_run=true", "data_dir=null")
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert str(error.value) == "backbone.target_modules must match a linear layer of the model, got 'nothing'."


def test_masked_dry_run_takes_its_masks_from_a_matching_ratio_cache(tiny_cfg, tmp_path: Path, capsys):
    with open_dict(tiny_cfg):
        tiny_cfg.method = compose_config("method=targeted_lora").method
        tiny_cfg.importance = compose_config("importance=svd").importance
        tiny_cfg.ratios.cache_dir = str(tmp_path / "ratios")
        tiny_cfg.ratios.progress = False
        tiny_cfg.dry_run = True
    run(tiny_cfg)
    assert "decided by the ratio derivation on the data (importance svd, no matching cache" in capsys.readouterr().out
    with open_dict(tiny_cfg):
        tiny_cfg.dry_run = False
    record = run(tiny_cfg)
    with open_dict(tiny_cfg):
        tiny_cfg.dry_run, tiny_cfg.data_dir = True, None
    run(tiny_cfg)
    out = capsys.readouterr().out
    assert printed_counts(out) == (record["params_initial"]["adapter"], record["params_initial"]["head"])
    assert f"ratios cached in {record['masks']['cache_file']}" in out


def run_offline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` as typed, on a machine whose hub is out of reach."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_llama2_7b_dry_run_is_counted_not_allocated(tmp_path: Path):
    result = run_offline("backbone=llama2_7b", "backbone.pretrained=false", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable adapter parameters: 4,194,304" in result.stdout  # paper Table 1: 4.2M
    # 27 GB in fp32 were it allocated; every child process so far stayed far below.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 6 * 1024 ** 2  # KiB
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args, message", [
    (["backbone=deberta_v3_base", "backbone.pretrained=false"],
     "error: the tokenizer microsoft/deberta-v3-base could not be loaded (OSError): set backbone.tokenizer to a "
     "local tokenizer folder."),
    (["backbone=deberta_v3_base"],
     "error: the config of microsoft/deberta-v3-base could not be loaded (OSError): set backbone.pretrained=false"),
])
def test_what_needs_the_hub_fails_offline_with_one_sentence(args, message, glue_dir: Path, tmp_path: Path):
    result = run_offline(*args, f"data_dir={glue_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "results" / "runs").glob("*.json"))  # no record (the run's lock lives there)
