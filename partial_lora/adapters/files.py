"""Adapter folders on disk: PEFT's layout, and the compact layout that scales with what is kept (SPEC 1).

Both are a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) with PEFT's tensor names.

- **PEFT's layout** (``PeftModel.save_pretrained``): every factor full-shaped, zeros outside the masks, plus the
  masks as bool vectors ``<layer>.partial_row_mask`` / ``.partial_col_mask``, which plain PEFT ignores. Plain
  ``peft.PeftModel.from_pretrained`` loads it; it is as large as dense LoRA whatever is kept.
- **The compact layout** (:func:`save_partial_lora`, what runs write): a masked layer's ``lora_A`` holds its
  kept columns only (r x |C|), its ``lora_B`` its kept rows (|R| x r), and ``<layer>.partial_kept`` both masks
  as bits (rows then columns, ``numpy.packbits``, little bit order); the file's metadata says
  ``partial_lora_layout: compact/1`` and gives each masked layer's full shape (m, n) in ``partial_lora_shapes``.
  That is 4 bytes per trained parameter (float32) plus (m + n) / 8 bytes and the tensor headers per layer.
  Layers without masks are stored as in PEFT's layout. Plain PEFT refuses the file (its factor shapes are not
  LoRA's); :func:`convert_to_peft` writes PEFT's layout from it.

PEFT has no sparse or structured factor storage for LoRA (SHiRA stores index lists per entry), so the layout
is written here, with safetensors and numpy's bit packing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from partial_lora.adapters.compact import COL_MASK, ROW_MASK, outside_masks
from partial_lora.adapters.masked import damaged_mask
from partial_lora.errors import PartialLoraError

KEPT = "partial_kept"  # a compact layer's row and column masks, as bits
LAYOUT_KEY, COMPACT_LAYOUT, SHAPES_KEY = "partial_lora_layout", "compact/1", "partial_lora_shapes"
Tensors = dict[str, torch.Tensor]


def _factor_keys(tensors: Tensors, layer: str) -> tuple[str, str]:
    """The keys of ``layer``'s A and B: ``lora_A.weight`` in LoRA, a bare ``lora_A`` parameter in AdaLoRA."""
    return tuple(f"{layer}.{name}.weight" if f"{layer}.{name}.weight" in tensors else f"{layer}.{name}"
                 for name in ("lora_A", "lora_B"))


def compact_tensors(state_dict: Tensors) -> tuple[Tensors, dict[str, str]]:
    """The compact layout's tensors and metadata of an adapter state dict in PEFT's layout."""
    tensors, shapes = dict(state_dict), {}
    for mask_key in [key for key in state_dict if key.endswith(f".{ROW_MASK}")]:
        layer = mask_key.removesuffix(f".{ROW_MASK}")
        row, col = tensors.pop(mask_key), tensors.pop(f"{layer}.{COL_MASK}")
        key_a, key_b = _factor_keys(tensors, layer)
        if outside_masks(tensors[key_a], tensors[key_b], row, col):
            raise PartialLoraError(f"the factors of {layer} have non-zero entries outside its masks, which the "
                                   "compact layout would drop; save it with save_pretrained (PEFT's layout).")
        tensors[key_a], tensors[key_b] = tensors[key_a][:, col].contiguous(), tensors[key_b][row].contiguous()
        tensors[f"{layer}.{KEPT}"] = torch.from_numpy(np.packbits(torch.cat([row, col]).numpy(), bitorder="little"))
        shapes[layer] = [row.numel(), col.numel()]
    metadata = {"format": "pt"}
    if shapes:
        metadata |= {LAYOUT_KEY: COMPACT_LAYOUT, SHAPES_KEY: json.dumps(shapes)}
    return tensors, metadata


def _expanded_layer(tensors: Tensors, layer: str, shape: object) -> str | None:
    """Turn ``layer``'s compact entries of ``tensors`` into PEFT's layout in place, or say why they are damaged."""
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(size, int) and size > 0 for size in shape)):
        return f"the shape {shape!r} of {layer} is not two positive integers"
    (m, n), bits = shape, tensors.pop(f"{layer}.{KEPT}", None)
    if bits is None or bits.dtype != torch.uint8 or bits.shape != (math.ceil((m + n) / 8),):
        return f"{layer}.{KEPT} is missing or not {math.ceil((m + n) / 8)} bytes of mask bits"
    unpacked = np.unpackbits(bits.numpy(), bitorder="little")
    if unpacked[m + n:].any():
        return f"{layer}.{KEPT} sets bits past its {m + n} rows and columns"
    row, col = torch.from_numpy(unpacked[:m].astype(bool)), torch.from_numpy(unpacked[m:m + n].astype(bool))
    key_a, key_b = _factor_keys(tensors, layer)
    lora_a, lora_b = tensors.get(key_a), tensors.get(key_b)
    if (lora_a is None or lora_b is None or lora_a.dim() != 2 or lora_b.dim() != 2
            or lora_a.shape[1] != col.sum() or lora_b.shape[0] != row.sum() or lora_a.shape[0] != lora_b.shape[1]):
        return (f"the factors of {layer} are missing or do not have its {int(row.sum())} kept rows and "
                f"{int(col.sum())} kept columns")
    tensors[key_a] = lora_a.new_zeros(lora_a.shape[0], n).index_copy(1, col.nonzero().flatten(), lora_a)
    tensors[key_b] = lora_b.new_zeros(m, lora_b.shape[1]).index_copy(0, row.nonzero().flatten(), lora_b)
    tensors[f"{layer}.{ROW_MASK}"], tensors[f"{layer}.{COL_MASK}"] = row, col
    return None


def peft_tensors(tensors: Tensors, metadata: dict[str, str]) -> tuple[Tensors, str | None]:
    """PEFT's layout of an adapter file's tensors (compact or PEFT's own), or why they are damaged."""
    layout = metadata.get(LAYOUT_KEY)
    kept = {key.removesuffix(f".{KEPT}") for key in tensors if key.endswith(f".{KEPT}")}
    if layout not in (None, COMPACT_LAYOUT):
        return tensors, f"its layout {layout!r} is not {COMPACT_LAYOUT!r}"
    if layout is None and kept:
        return tensors, f"it holds {sorted(kept)[0]}.{KEPT} but no {LAYOUT_KEY} metadata"
    expanded = dict(tensors)
    if layout == COMPACT_LAYOUT:
        try:
            shapes = json.loads(metadata.get(SHAPES_KEY, ""))
        except json.JSONDecodeError:
            shapes = None
        if not isinstance(shapes, dict) or set(shapes) != kept:
            return tensors, f"its {SHAPES_KEY} metadata does not list exactly its {len(kept)} compact layers"
        for layer, shape in shapes.items():
            problem = _expanded_layer(expanded, layer, shape)
            if problem is not None:
                return tensors, problem
    damaged = damaged_mask(expanded)
    return expanded, None if damaged is None else f"its mask {damaged} is not a bool vector of bytes 0 and 1"


def first_line(error: Exception) -> str:
    """A library error in a few words, for the sentence that wraps it (some of PEFT's span lines)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def read_config(directory: str | Path) -> LoraConfig:
    """The LoRA or AdaLoRA config of an adapter folder; a missing or unreadable file is one sentence."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PartialLoraError(f"the adapter folder '{directory}' holds no {CONFIG_NAME}: pass the folder that "
                               "save_partial_lora or save_pretrained wrote.")
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as error:  # PEFT's parsing raises each
        raise PartialLoraError(f"{path} is not a readable PEFT config ({first_line(error)}); save the adapter "
                               "again.") from error
    if not isinstance(config, LoraConfig):
        raise PartialLoraError(f"{path} describes a {config.peft_type} adapter, not LoRA or AdaLoRA; load it with "
                               "peft.PeftModel.from_pretrained.")
    return config


def read_tensors(directory: str | Path) -> Tensors:
    """An adapter folder's tensors in PEFT's layout, whichever layout the file holds; a missing, truncated or
    damaged file is one sentence."""
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise PartialLoraError(f"adapter file {path} is missing or not a complete safetensors file "
                               f"({first_line(error)}); save the adapter again.") from error
    tensors, problem = peft_tensors(tensors, metadata)
    if problem is not None:
        raise PartialLoraError(f"adapter file {path} is damaged: {problem}; save the adapter again.")
    return tensors


def _replace_file(path: Path, tensors: Tensors, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary beside it, so a crash leaves the old file or the new one."""
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def save_partial_lora(model: PeftModel, directory: str | Path) -> Path:
    """Save ``model``'s adapter in the compact layout (PEFT's ``save_pretrained``, then its masked layers cut to
    their kept rows and columns); returns the safetensors file. :func:`convert_to_peft` makes it plain PEFT's."""
    model.save_pretrained(str(directory))
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    _replace_file(path, *compact_tensors(load_file(str(path))))
    return path


def convert_to_peft(source: str | Path, target: str | Path) -> Path:
    """Write the adapter folder ``source`` (compact or PEFT's layout) to ``target`` in PEFT's layout, which plain
    ``peft.PeftModel.from_pretrained`` loads (the masks ride along); returns the safetensors file written."""
    read_config(source)
    tensors = read_tensors(source)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, "README.md"):  # the config, and PEFT's model card where there is one
        copied, copy = Path(source) / name, target / name
        if copied.is_file() and not (copy.exists() and copy.samefile(copied)):
            shutil.copyfile(copied, copy)
    _replace_file(target / SAFETENSORS_WEIGHTS_NAME, tensors, {"format": "pt"})
    return target / SAFETENSORS_WEIGHTS_NAME
