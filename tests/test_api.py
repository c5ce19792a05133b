"""The library API outside the harness: any transformers classifier or the CLIP visual tower, plain PEFT reading
the saved adapter in a process without this package, transformers.Trainer, and the example of docs/library.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from partial_lora import (DerivationSettings, DerivedCounts, PartialLoraConfig, derive_counts, get_partial_lora_model,
                          load_partial_lora)
from partial_lora.adapters.compact import COL_MASK, ROW_MASK
from partial_lora.adapters.losia import apply_losia
from partial_lora.adapters.sparse_delta import apply_random_masking
from partial_lora.adapters.masked import factor, is_compact, lora_layers
from partial_lora.config import _minilm_path
from partial_lora.errors import SettingError
from tests.conftest import NEGATIVE, POSITIVE, ROOT, compose_config

TARGETS = compose_config("backbone=minilm").backbone.target_modules


def minilm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the random classifier head
    return AutoModelForSequenceClassification.from_pretrained(_minilm_path(), num_labels=2)


def sentences(count: int = 10) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    texts = [(POSITIVE + NEGATIVE)[index % 10] for index in range(count)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return {**batch, "labels": torch.tensor([int(text in POSITIVE) for text in texts])}


class Dense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)


@pytest.mark.parametrize("call, message", [
    (lambda: DerivationSettings(target_modules=["dense"], search="foo"),
     "DerivationSettings.search must be one of linear, binary, whole_first, got 'foo'."),
    (lambda: get_partial_lora_model(Dense(), PartialLoraConfig(r=2, target_modules=["dense"], mode="balanced",
                                                               sparsity=1.5)),
     "MaskSettings.sparsity must lie in [0, 1] for balanced masks, got 1.5."),
    (lambda: apply_losia(Dense(), "dense", rank_factor=0, beta=0.9, seed=0),
     "apply_losia.rank_factor must lie in (0, 1], got 0."),
    (lambda: apply_random_masking(Dense(), "nothing", trainable_fraction=0.5, seed=0),
     "targeted_linears.target_modules must match a linear layer of the model, got 'nothing'."),
])
def test_a_bad_setting_is_named_as_the_library_caller_wrote_it(call, message):
    """By the settings class or function called and its field or argument, never a run config's YAML key."""
    with pytest.raises(SettingError) as error:
        call()
    assert str(error.value) == message


@pytest.fixture(scope="module")
def minilm_counts() -> DerivedCounts:
    settings = DerivationSettings(target_modules=TARGETS, importance="svd", threshold=0.9, probe_head_steps=100,
                                  blocks="bert.encoder.layer")
    return derive_counts(minilm(), [sentences()], settings)


def partial_minilm(counts: DerivedCounts, compact: bool = True) -> torch.nn.Module:
    """A Partial-LoRA MiniLM whose B factors are non-zero on their kept rows, as after training."""
    model = get_partial_lora_model(minilm(), PartialLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                               modules_to_save=["classifier"], counts=counts,
                                                               seed=0, compact=compact))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            lora_b = torch.nn.init.normal_(factor(layer, "lora_B"), std=0.5)
            if not is_compact(layer):
                lora_b.mul_(getattr(layer, ROW_MASK)[:, None])
    return model.eval()


FRESH_PROCESS = r"""
import json, sys
sys.modules["partial_lora"] = None  # importing this package would fail: only transformers and peft are used
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base_path, adapter, inputs_file = sys.argv[1:]
inputs = {key: torch.tensor(value) for key, value in json.loads(open(inputs_file).read()).items()}
model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2), adapter)
with torch.no_grad():
    logits = model.eval()(**inputs).logits
    merged = model.merge_and_unload()(**inputs).logits
loaded = [name for name in sys.modules if name.split(".")[0] == "partial_lora" and sys.modules[name] is not None]
print(json.dumps({"logits": logits.tolist(), "merged": merged.tolist(), "partial_lora_modules": loaded,
                  "merged_type": type(model.base_model.model).__name__}))
"""


@pytest.mark.parametrize("compact", [True, False])
def test_plain_peft_in_a_fresh_process_gives_the_same_logits(minilm_counts, tmp_path: Path, compact: bool):
    model = partial_minilm(minilm_counts, compact)
    batch = sentences(6)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                             SAFETENSORS_WEIGHTS_NAME]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    (tmp_path / "inputs.json").write_text(json.dumps({key: value.tolist() for key, value in inputs.items()}))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, _minilm_path(), str(tmp_path / "adapter"),
                             str(tmp_path / "inputs.json")], capture_output=True, text=True, cwd=tmp_path,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert fresh["partial_lora_modules"] == []
    assert (torch.tensor(fresh["logits"]) - expected).abs().max() <= 1e-5
    assert (torch.tensor(fresh["merged"]) - expected).abs().max() <= 1e-5
    assert (expected - minilm()(**inputs).logits).abs().max() > 1e-2  # the adapter does change the logits


def test_the_saved_adapter_is_dense_lora_of_the_same_rank_plus_masks(minilm_counts, tmp_path: Path):
    model = partial_minilm(minilm_counts)
    model.save_pretrained(tmp_path / "partial")
    get_peft_model(minilm(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                        modules_to_save=["classifier"])).save_pretrained(tmp_path / "lora")
    partial = load_file(str(tmp_path / "partial" / SAFETENSORS_WEIGHTS_NAME))
    lora = load_file(str(tmp_path / "lora" / SAFETENSORS_WEIGHTS_NAME))
    masks = {key for key in partial if key.endswith((ROW_MASK, COL_MASK))}
    assert len(masks) == 2 * 36 and set(partial) - masks == set(lora)
    assert all(partial[key].shape == lora[key].shape for key in lora)
    for key in masks:  # zeros outside the masks: what plain PEFT computes is the masked adapter
        if key.endswith(ROW_MASK):
            assert torch.count_nonzero(partial[key.replace(ROW_MASK, "lora_B.weight")][~partial[key]]) == 0
        else:
            assert torch.count_nonzero(partial[key.replace(COL_MASK, "lora_A.weight")][:, ~partial[key]]) == 0
    mask_bytes = sum(partial[key].numel() for key in masks)
    sizes = {name: (tmp_path / name / SAFETENSORS_WEIGHTS_NAME).stat().st_size for name in ("partial", "lora")}
    assert sizes["lora"] < sizes["partial"] < sizes["lora"] + mask_bytes + 16_384  # + masks and their headers


@pytest.mark.parametrize("compact", [True, False])
def test_transformers_trainer_trains_kept_entries_only(minilm_counts, tmp_path: Path, compact: bool):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_partial_lora_model(minilm(), PartialLoraConfig(r=8, target_modules=TARGETS, counts=minilm_counts,
                                                               modules_to_save=["classifier"], compact=compact))
    start = {key: value.clone() for key, value in model.state_dict().items() if "lora_" in key}
    batch = sentences(16)
    data = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                                  learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                                  use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=arguments, train_dataset=data).train()
    state = model.state_dict()  # full-shaped factors whatever the execution
    moved = 0
    for name, layer in lora_layers(model).items():
        row, col = getattr(layer, ROW_MASK), getattr(layer, COL_MASK)
        key = f"base_model.model.{name}.lora_"
        lora_a, lora_b = state[key + "A.default.weight"], state[key + "B.default.weight"]
        assert torch.count_nonzero(lora_b[~row]) == 0 and torch.count_nonzero(lora_a[:, ~col]) == 0
        moved += int(row.any() and col.any() and not torch.equal(lora_a, start[key + "A.default.weight"]))
    assert moved > 0


def test_the_clip_visual_tower_takes_the_same_api(tmp_path: Path):
    from partial_lora.backbones import build_backbone

    cfg = compose_config("backbone=clip_tiny", "dataset=cifar10_fewshot")
    torch.manual_seed(0)
    classifier = build_backbone(cfg.backbone, 3, ["cat", "dog", "ship"]).model
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(12, 3, 32, 32, generator=generator),
             "labels": torch.randint(0, 3, (12,), generator=generator)}
    settings = DerivationSettings(target_modules=cfg.backbone.target_modules, importance="snip", threshold=1.0,
                                  head_modules=("head",), blocks=cfg.backbone.blocks)
    counts = derive_counts(classifier, [batch], settings)
    assert set(counts.counts) == {name for name, module in classifier.named_modules()
                                  if re.fullmatch(cfg.backbone.target_modules, name)}
    model = get_partial_lora_model(classifier, PartialLoraConfig(r=4, target_modules=cfg.backbone.target_modules,
                                                                 modules_to_save=["head"], mode="targeted",
                                                                 counts=counts))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(factor(layer, "lora_B"))
        expected = model.eval()(pixel_values=batch["pixel_values"]).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = build_backbone(cfg.backbone, 3, ["cat", "dog", "ship"]).model
    reloaded = load_partial_lora(fresh, tmp_path / "adapter").eval()
    assert torch.allclose(reloaded(pixel_values=batch["pixel_values"]).logits, expected, atol=1e-5)


def readme_example() -> str:
    section = (ROOT / "docs" / "library.md").read_text().split("## Use in your own code", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params" in result.stdout
    assert (tmp_path / "counts.json").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert DerivedCounts.load(tmp_path / "counts.json").counts


WITHOUT_HYDRA = r"""
import importlib.abc, sys, tempfile


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf"):
            raise ImportError(f"{name} is blocked: the library API must not need it")


sys.meta_path.insert(0, Blocked())
import torch
from transformers import BertConfig, BertForSequenceClassification

from partial_lora import (DerivationSettings, PartialLoraConfig, derive_counts, get_partial_lora_model,
                          load_partial_lora, save_partial_lora)


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


targets = r".*\.(query|value)"
batch = {"input_ids": torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(0)),
         "labels": torch.tensor([0, 1] * 4)}
counts = derive_counts(tiny_bert(), [batch], DerivationSettings(target_modules=targets, probe_head_steps=0))
model = get_partial_lora_model(tiny_bert(), PartialLoraConfig(r=2, target_modules=targets, counts=counts, seed=0))
with tempfile.TemporaryDirectory() as folder:
    save_partial_lora(model, folder)
    loaded = load_partial_lora(tiny_bert(), folder)
assert {"hydra", "omegaconf"}.isdisjoint(name.split(".")[0] for name in sys.modules)
print("layers", len(counts.counts), "trainable", sum(p.numel() for p in loaded.parameters() if p.requires_grad))
"""


def test_the_library_api_runs_where_hydra_and_omegaconf_cannot_be_imported():
    result = subprocess.run([sys.executable, "-c", WITHOUT_HYDRA], capture_output=True, text=True, cwd=ROOT,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"layers 4 trainable \d+\n", result.stdout)
