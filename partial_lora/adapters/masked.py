"""Row/column-masked LoRA on top of PEFT's LoRA layers (SPEC 1).

PEFT has no structured masks on its factors, so they are added here: ``u_row`` masks rows of ``B``
(m x d) and ``u_col`` masks columns of ``A`` (d x n). Masked entries are zeroed once and their gradients
are masked on every backward pass, so Adam's moments for them stay zero and decoupled weight decay of a
zero is zero: they stay exactly 0 throughout training. The masks live as (saved) buffers on the layer,
which is what the parameter count, saving and loading read.

This dense layer is the reference (``adapter.compact=false``); by default the masked LoRA layers run
compact (``partial_lora.adapters.compact``), holding the kept rows and columns only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from partial_lora.adapters.compact import COL_MASK, ROW_MASK, ROWS, make_compact
from partial_lora.adapters.targets import ADAPTER
from partial_lora.errors import PartialLoraError
from partial_lora.masks import LayerMask

LEGACY_FORMAT = "partial-lora/1"  # the single-file adapters runs wrote before PEFT's layout
PEFT_PREFIX = "base_model.model."


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """PEFT LoRA layers by the name of the base model module they wrap (``base_model.model.`` removed)."""
    return {name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}


def factor(layer: LoraLayer, name: str) -> torch.nn.Parameter:
    """``lora_A`` (d x n) or ``lora_B`` (m x d): a Linear's weight in LoRA, a bare Parameter in AdaLoRA."""
    held = getattr(layer, name)[ADAPTER]
    return held.weight if isinstance(held, torch.nn.Module) else held


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen pretrained weight (m x n) under each LoRA layer."""
    return {name: layer.get_base_layer().weight for name, layer in lora_layers(model).items()}


def is_compact(layer: LoraLayer) -> bool:
    return hasattr(layer, ROWS)


def apply_mask(layer: LoraLayer, mask: LayerMask, compact: bool = True) -> None:
    """Zero the masked entries of ``layer``'s factors; then either keep only the kept ones (``compact``,
    LoRA layers) or keep the dense factors with gradient masks (the reference, and AdaLoRA's layers)."""
    lora_a, lora_b = factor(layer, "lora_A"), factor(layer, "lora_B")
    row = mask.row.to(device=lora_b.device)
    col = mask.col.to(device=lora_a.device)
    layer.register_buffer(ROW_MASK, row)
    layer.register_buffer(COL_MASK, col)
    with torch.no_grad():
        lora_b.mul_(row[:, None].to(lora_b.dtype))
        lora_a.mul_(col[None, :].to(lora_a.dtype))
    if compact and isinstance(layer, AdaLoraLayer):
        warnings.warn("AdaLoRA's masked layers run dense: its rank allocator prunes the full factors, so "
                      "compact=True applies to LoRA layers only.", stacklevel=3)
    elif compact:
        make_compact(layer, ADAPTER, row, col)
        return
    # Read the buffers at call time so a later ``.to(device)`` of the model is honoured.
    lora_b.register_hook(lambda grad, layer=layer: grad * getattr(layer, ROW_MASK)[:, None].to(grad.dtype))
    lora_a.register_hook(lambda grad, layer=layer: grad * getattr(layer, COL_MASK)[None, :].to(grad.dtype))


def apply_masks(model: torch.nn.Module, masks: dict[str, LayerMask], compact: bool = True) -> None:
    """Mask every LoRA layer of ``model``; ``compact`` per :func:`apply_mask`."""
    layers = lora_layers(model)
    missing = set(layers) ^ set(masks)
    if missing:
        raise PartialLoraError(f"masks and adapted layers differ: {sorted(missing)[:3]}...")
    for name, layer in layers.items():
        apply_mask(layer, masks[name], compact)


def masked_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, layer in lora_layers(model).items():
        if hasattr(layer, ROW_MASK):
            yield name, layer


def kept_fractions(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    return {name: {"row": float(getattr(layer, ROW_MASK).float().mean()),
                   "col": float(getattr(layer, COL_MASK).float().mean())}
            for name, layer in masked_layers(model)}


def masks_in(state_dict: dict[str, torch.Tensor]) -> dict[str, LayerMask]:
    """The masks an adapter state dict holds (PEFT's checkpoint keys), by layer name."""
    suffix = f".{ROW_MASK}"
    return {key.removeprefix(PEFT_PREFIX).removesuffix(suffix): LayerMask(
        value.to(torch.bool), state_dict[key.removesuffix(ROW_MASK) + COL_MASK].to(torch.bool))
        for key, value in state_dict.items() if key.endswith(suffix)}


def _mismatch(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why an adapter state dict does not fit ``model`` (names or shapes: another backbone, rank or method), or
    ``None``. Compared with PEFT's own adapter state dict of ``model`` (full-shaped factors, compact or not)."""
    expected = {key: value.shape for key, value in get_peft_model_state_dict(model).items()
                if not key.endswith((ROW_MASK, COL_MASK))}
    layers = lora_layers(model)
    for name, mask in masks_in(state_dict).items():
        if name in layers:
            expected[PEFT_PREFIX + name + "." + ROW_MASK] = torch.Size([layers[name].out_features])
            expected[PEFT_PREFIX + name + "." + COL_MASK] = torch.Size([layers[name].in_features])
    unmatched = sorted(set(expected) ^ set(state_dict))
    if unmatched:
        side = "the file lacks" if unmatched[0] in expected else "the model has no"
        return f"{side} {unmatched[0]} ({len(unmatched)} names differ)"
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            return f"{key} has shape {tuple(state_dict[key].shape)}, the model's is {tuple(shape)}"
    return None


def damaged_mask(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The first mask of an adapter state dict that is not a bool vector of bytes 0 and 1, or ``None``: torch reads
    any other byte of a bool tensor as True, so a flipped byte would silently train a masked row."""
    for key, value in state_dict.items():
        if key.endswith((ROW_MASK, COL_MASK)) and (value.dtype != torch.bool or value.dim() != 1
                                                   or bool((value.view(torch.uint8) > 1).any())):
            return key
    return None


def check_adapter_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Refuse an adapter state dict in PEFT's checkpoint layout that the PEFT ``model`` (a meta-device copy will
    do) cannot load as it is: damaged masks, names or shapes of another model, or other masks than the masked
    layers of ``model`` carry."""
    damaged = damaged_mask(state_dict)
    if damaged is not None:
        raise PartialLoraError(f"adapter {origin} is damaged: its mask {damaged} is not a bool vector of bytes 0 "
                               "and 1; save the adapter again.")
    problem = _mismatch(model, state_dict)
    if problem is not None:
        raise PartialLoraError(f"adapter {origin} does not fit this model: {problem}; build the model with the "
                               "backbone, method and rank it was saved from.")
    masks = masks_in(state_dict)
    for name, layer in masked_layers(model):
        if not (name in masks and torch.equal(masks[name].row, getattr(layer, ROW_MASK).cpu())
                and torch.equal(masks[name].col, getattr(layer, COL_MASK).cpu())):
            raise PartialLoraError(f"adapter {origin} holds other masks than the masked layer {name}.")


def load_masked_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], origin: str,
                      compact: bool = True) -> None:
    """Load an adapter state dict in PEFT's checkpoint layout (as ``save_pretrained`` writes it, masks included)
    into a PEFT LoRA / AdaLoRA ``model`` of the same backbone, rank and layers, with PEFT's loader.

    Everything is checked (:func:`check_adapter_state`) before the model changes. Masks in ``state_dict`` turn
    plain LoRA layers into masked ones (compact or dense per ``compact``); layers already masked keep their
    execution and must carry the same masks.
    """
    check_adapter_state(model, state_dict, origin)
    masks = masks_in(state_dict)
    set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER)
    for name, layer in lora_layers(model).items():
        if name in masks and not hasattr(layer, ROW_MASK):
            apply_mask(layer, masks[name], compact)


def load_adapter(model: torch.nn.Module, path: str | Path, compact: bool = True) -> dict[str, str]:
    """Load a single-file adapter (``partial-lora/1``, written by runs before adapters took PEFT's layout) into a
    model built with the same backbone, method and rank; returns the file's metadata.

    The file holds full-shaped ``{layer}.lora_A`` / ``{layer}.lora_B``, optional ``{layer}.row_mask`` /
    ``{layer}.col_mask``, and ``head::{parameter}`` entries; they are renamed to PEFT's checkpoint keys and
    loaded by :func:`load_masked_state`.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise PartialLoraError(f"adapter file {path} is not a complete safetensors file ({error}); refusing it.") from error
    if metadata.get("format") != LEGACY_FORMAT:
        raise PartialLoraError(f"adapter file {path} has format {metadata.get('format')!r}, not {LEGACY_FORMAT!r}; "
                               "refusing it.")
    renamed = {"row_mask": ROW_MASK, "col_mask": COL_MASK, "lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    state_dict = {}
    for key, value in tensors.items():
        if key.startswith("head::"):
            state_dict[key.removeprefix("head::").replace(f".modules_to_save.{ADAPTER}", "")] = value
        else:
            name, _, kind = key.rpartition(".")
            state_dict[f"{PEFT_PREFIX}{name}.{renamed[kind]}"] = value
    load_masked_state(model, state_dict, f"file {path}", compact)
    return metadata
