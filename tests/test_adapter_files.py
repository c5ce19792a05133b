"""Adapter folders: the compact layout round-trips, converts to PEFT's layout, reads old files, and refuses damaged
files in one sentence with the caller's model untouched."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from partial_lora import PartialLoraError, convert_to_peft, load_partial_lora, save_partial_lora
from partial_lora.adapters import count_parameters, load_adapter
from partial_lora.adapters.compact import ROW_MASK
from partial_lora.adapters.files import COMPACT_LAYOUT, KEPT, LAYOUT_KEY, SHAPES_KEY
from partial_lora.adapters.masked import ADAPTER, apply_masks, factor, lora_layers
from partial_lora.backbones import build_backbone
from partial_lora.masks import LayerMask
from tests.conftest import ROOT, compose_config
from tests.test_masked_adapter import batch, masked_tiny_model, write_legacy_adapter

# fc1 keeps some rows and columns, fc2 no row (its compact B is 0 x r); 10 + 12 and 7 + 10 mask bits leave padding.
MASKS = {"fc1": LayerMask(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool),
                          torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)),
         "fc2": LayerMask(torch.zeros(7, dtype=torch.bool), torch.ones(10, dtype=torch.bool))}
INPUTS = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def base_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(12, 10), act=torch.nn.Tanh(), fc2=torch.nn.Linear(10, 7),
                                           head=torch.nn.Linear(7, 3)))


def masked_mlp(adalora: bool = False, compact: bool = True) -> PeftModel:
    """The MLP under masked LoRA (or AdaLoRA) whose factors and head moved, as after training."""
    config = (AdaLoraConfig(init_r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"], total_step=10)
              if adalora else LoraConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    model = get_peft_model(base_mlp(), config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(factor(layer, "lora_B"))
            if adalora:
                torch.nn.init.normal_(layer.lora_E[ADAPTER])
        model.base_model.model.head.modules_to_save[ADAPTER].weight.mul_(2)
    apply_masks(model, MASKS, compact=compact and not adalora)
    return model.eval()


def saved_compact(tmp_path: Path, **options) -> tuple[torch.Tensor, Path]:
    model = masked_mlp(**options)
    save_partial_lora(model, tmp_path / "adapter")
    return model(INPUTS), tmp_path / "adapter"


def tiny_bert_base() -> torch.nn.Module:
    torch.manual_seed(0)  # the saved model's random base weights
    return build_backbone(compose_config("backbone=tiny_bert").backbone, num_labels=2).model


def trained_tiny_bert() -> tuple[torch.nn.Module, list[str]]:
    """A compact Partial-LoRA tiny BERT after three AdamW steps."""
    _, backbone, model = masked_tiny_model(compact=True, init_b=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        data = batch(step)
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, data["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), backbone.head_modules


def logits(model: torch.nn.Module) -> torch.Tensor:
    data = batch(9)
    with torch.no_grad():
        return model.eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def test_the_compact_file_holds_the_trained_floats_and_mask_bits_and_loads_to_the_same_outputs(tmp_path: Path):
    model, heads = trained_tiny_bert()
    expected = logits(model)
    path = save_partial_lora(model, tmp_path / "adapter")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()[LAYOUT_KEY] == COMPACT_LAYOUT
    header = int.from_bytes(path.read_bytes()[:8], "little")
    counts = count_parameters(model, heads)
    bits = sum(math.ceil((layer.out_features + layer.in_features) / 8) for layer in lora_layers(model).values())
    assert path.stat().st_size - 8 - header == 4 * (counts.adapter + counts.head) + bits  # nothing else stored
    model.save_pretrained(tmp_path / "peft")
    assert path.stat().st_size < 0.75 * (tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME).stat().st_size

    reloaded = load_partial_lora(tiny_bert_base(), tmp_path / "adapter")
    assert torch.allclose(logits(reloaded), expected, atol=1e-6)
    assert count_parameters(reloaded, heads) == counts
    assert all(torch.equal(getattr(layer, ROW_MASK), getattr(lora_layers(model)[name], ROW_MASK))
               for name, layer in lora_layers(reloaded).items())


def test_a_compact_adapter_converts_to_what_save_pretrained_writes_and_plain_peft_loads_it(tmp_path: Path):
    model, _ = trained_tiny_bert()
    expected = logits(model)
    save_partial_lora(model, tmp_path / "compact")
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(RuntimeError, match="size mismatch"):  # plain PEFT refuses the compact layout loudly
        PeftModel.from_pretrained(tiny_bert_base(), tmp_path / "compact")

    convert_to_peft(tmp_path / "compact", tmp_path / "converted")
    converted = load_file(str(tmp_path / "converted" / SAFETENSORS_WEIGHTS_NAME))
    written = load_file(str(tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME))
    assert converted.keys() == written.keys() and all(torch.equal(converted[key], written[key]) for key in written)
    assert (tmp_path / "converted" / CONFIG_NAME).read_text() == (tmp_path / "compact" / CONFIG_NAME).read_text()
    plain = PeftModel.from_pretrained(tiny_bert_base(), tmp_path / "converted")
    assert torch.allclose(logits(plain), expected, atol=1e-6)
    assert not any(hasattr(layer, ROW_MASK) for layer in lora_layers(plain).values())  # plain LoRA layers


@pytest.mark.parametrize("adalora", [False, True], ids=["lora", "adalora"])
def test_layers_keeping_no_row_and_adalora_factors_round_trip(tmp_path: Path, adalora: bool):
    expected, folder = saved_compact(tmp_path, adalora=adalora)
    tensors = load_file(str(folder / SAFETENSORS_WEIGHTS_NAME))
    fc2_b = "base_model.model.fc2.lora_B" + ("" if adalora else ".weight")
    assert tensors[fc2_b].shape == (0, 4) and f"base_model.model.fc1.{KEPT}" in tensors
    reloaded = load_partial_lora(base_mlp(), folder, compact=not adalora)
    assert torch.allclose(reloaded.eval()(INPUTS), expected, atol=1e-6)
    convert_to_peft(folder, folder)  # in place
    assert load_file(str(folder / SAFETENSORS_WEIGHTS_NAME))[fc2_b].shape == (7, 4)
    assert torch.allclose(load_partial_lora(base_mlp(), folder, compact=not adalora).eval()(INPUTS), expected,
                          atol=1e-6)


def test_an_adapter_without_masks_is_written_in_plain_peft_layout(tmp_path: Path):
    model = get_peft_model(base_mlp(), LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    save_partial_lora(model, tmp_path / "lora")
    model.save_pretrained(tmp_path / "peft")
    with safe_open(str(tmp_path / "lora" / SAFETENSORS_WEIGHTS_NAME), framework="pt") as handle:
        assert LAYOUT_KEY not in handle.metadata()
    assert PeftModel.from_pretrained(base_mlp(), tmp_path / "lora")


def test_an_adapter_saved_before_the_compact_layout_still_loads(tmp_path: Path):
    model, _ = trained_tiny_bert()
    model.save_pretrained(tmp_path / "adapter")  # what runs wrote before: PEFT's layout with the masks
    assert torch.allclose(logits(load_partial_lora(tiny_bert_base(), tmp_path / "adapter")), logits(model), atol=1e-6)


def tensor_bytes(path: Path, key: str) -> tuple[bytearray, slice]:
    """A safetensors file's bytes and where ``key``'s data lies in them."""
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header])[key]["data_offsets"]
    return raw, slice(8 + header + start, 8 + header + end)


def set_mask_byte(folder: Path, compact: bool) -> None:
    """A masked-out entry of fc1's row mask set to byte 2 (PEFT's layout) or its bit-packed masks' padding bits
    set (compact layout)."""
    path = folder / SAFETENSORS_WEIGHTS_NAME
    raw, where = tensor_bytes(path, f"base_model.model.fc1.{KEPT if compact else ROW_MASK}")
    if compact:
        raw[where.stop - 1] |= 0b11000000  # bits 22 and 23 of 24: past the 10 rows and 12 columns
    else:
        raw[where.start + MASKS["fc1"].row.tolist().index(False)] = 2
    path.write_bytes(raw)


def edit_file(folder: Path, edit) -> None:
    path = folder / SAFETENSORS_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | changes))


def flip_kept_bit(tensors, metadata):
    tensors[f"base_model.model.fc1.{KEPT}"] = tensors[f"base_model.model.fc1.{KEPT}"] ^ 1  # one more or fewer row


DAMAGES = {
    "config truncated": (lambda folder: (folder / CONFIG_NAME).write_text((folder / CONFIG_NAME).read_text()[:40]),
                         "adapter_config.json is not a readable PEFT config (JSONDecodeError"),
    "config missing": (lambda folder: (folder / CONFIG_NAME).unlink(), "holds no adapter_config.json"),
    "config of another model": (lambda folder: edit_config(folder, target_modules=["query"]),
                                "does not apply to this model"),
    "config of another rank": (lambda folder: edit_config(folder, r=8), "does not fit this model"),
    "weights truncated": (lambda folder: (folder / SAFETENSORS_WEIGHTS_NAME).write_bytes(
        (folder / SAFETENSORS_WEIGHTS_NAME).read_bytes()[:-50]), "is missing or not a complete safetensors file"),
    "weights missing": (lambda folder: (folder / SAFETENSORS_WEIGHTS_NAME).unlink(),
                        "is missing or not a complete safetensors file"),
    "weights a pickle": (lambda folder: torch.save({"a": torch.ones(3)}, folder / SAFETENSORS_WEIGHTS_NAME),
                         "is missing or not a complete safetensors file"),
    "mask padding bits set": (lambda folder: set_mask_byte(folder, compact=True), "sets bits past its 22 rows"),
    "mask bit flipped": (lambda folder: edit_file(folder, flip_kept_bit), "do not have its"),
    "layout metadata lost": (lambda folder: edit_file(folder, lambda tensors, metadata: metadata.pop(LAYOUT_KEY)),
                             f"but no {LAYOUT_KEY} metadata"),
    "shapes metadata truncated": (lambda folder: edit_file(
        folder, lambda tensors, metadata: metadata.update({SHAPES_KEY: metadata[SHAPES_KEY][:-9]})),
        f"its {SHAPES_KEY} metadata does not list exactly"),
    "PEFT layout, mask byte 2": (lambda folder: set_mask_byte(folder, compact=False),
                                 f"its mask base_model.model.fc1.{ROW_MASK} is not a bool vector of bytes 0 and 1"),
}

NEEDS_THE_MODEL = {"config of another model", "config of another rank"}  # not damaged, only not this model's


def snapshot(model: torch.nn.Module) -> list:
    return [(name, type(module), [(key, value.clone(), value.requires_grad)
                                  for key, value in module.named_parameters(recurse=False)])
            for name, module in model.named_modules()] + [sorted(vars(model))]


@pytest.mark.parametrize("damage", DAMAGES, ids=DAMAGES)
def test_a_damaged_adapter_folder_is_refused_in_one_sentence_and_the_model_is_left_as_it_was(tmp_path: Path,
                                                                                              damage: str):
    damaging, message = DAMAGES[damage]
    model = masked_mlp()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder) if damage.startswith("PEFT layout") else save_partial_lora(model, folder)
    damaging(folder)
    target = base_mlp()
    before = snapshot(target)
    with pytest.raises(PartialLoraError) as error:
        load_partial_lora(target, folder)
    assert message in str(error.value) and "\n" not in str(error.value) and str(error.value).endswith(".")
    after = snapshot(target)
    assert [entry[:2] for entry in after[:-1]] == [entry[:2] for entry in before[:-1]]  # not wrapped
    assert after[-1] == before[-1] and not any(isinstance(module, LoraLayer) for module in target.modules())
    for (_, _, parameters), (_, _, saved) in zip(after[:-1], before[:-1]):
        assert all(torch.equal(value, old) and grad == old_grad
                   for (_, value, grad), (_, old, old_grad) in zip(parameters, saved))
    if damage not in NEEDS_THE_MODEL:
        with pytest.raises(PartialLoraError, match=re.escape(message)):  # the converter refuses it alike
            convert_to_peft(folder, tmp_path / "converted")


def test_the_single_file_loader_refuses_mask_bytes_other_than_0_and_1(tmp_path: Path):
    _, backbone, model = masked_tiny_model(seed=0, init_b=True)
    path = write_legacy_adapter(model, tmp_path / "adapter.safetensors", backbone.head_modules)
    name = next(iter(lora_layers(model)))
    raw, where = tensor_bytes(path, f"{name}.row_mask")
    raw[where.start + getattr(lora_layers(model)[name], ROW_MASK).tolist().index(False)] = 7
    path.write_bytes(raw)
    _, _, target = masked_tiny_model(seed=0, compact=True)
    with pytest.raises(PartialLoraError, match=r"is damaged: its mask .* is not a bool vector of bytes 0 and 1"):
        load_adapter(target, path)


def test_the_converter_command_writes_peft_layout(tmp_path: Path):  # its refusals: tests/test_readme.py
    _, folder = saved_compact(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_to_peft.py"), str(folder),
                           str(tmp_path / "peft")], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"wrote {tmp_path / 'peft' / SAFETENSORS_WEIGHTS_NAME} in PEFT's layout")
    tensors = load_file(str(tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME))
    assert tensors["base_model.model.fc2.lora_B.weight"].shape == (7, 4)
