"""Row/column-masked LoRA on top of PEFT's LoRA layers (SPEC 1).

PEFT has no structured masks on its factors, so they are added here: ``u_row`` masks rows of ``B``
(m x d) and ``u_col`` masks columns of ``A`` (d x n). Masked entries are zeroed once and their gradients
are masked on every backward pass, so Adam's moments for them stay zero and decoupled weight decay of a
zero is zero: they stay exactly 0 throughout training. The masks live as buffers on the layer, which
is what the parameter count, saving and loading read.

This dense layer is the reference (``adapter.compact=false``); by default the masked LoRA layers run
compact (``partial_lora.adapters.compact``), holding the kept rows and columns only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from partial_lora.adapters.compact import ROWS, full_factors, kept, make_compact
from partial_lora.adapters.targets import ADAPTER
from partial_lora.backbones.base import in_head
from partial_lora.errors import PartialLoraError
from partial_lora.masks import LayerMask

ROW_MASK, COL_MASK = "partial_row_mask", "partial_col_mask"
FORMAT = "partial-lora/1"


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """PEFT LoRA layers by the name of the base model module they wrap (``base_model.model.`` removed)."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in model.named_modules()
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
    layer.register_buffer(ROW_MASK, row, persistent=False)
    layer.register_buffer(COL_MASK, col, persistent=False)
    with torch.no_grad():
        lora_b.mul_(row[:, None].to(lora_b.dtype))
        lora_a.mul_(col[None, :].to(lora_a.dtype))
    if compact and hasattr(layer, "lora_E"):
        warnings.warn("AdaLoRA's masked layers run dense: its rank allocator prunes the full factors, so "
                      "adapter.compact applies to LoRA layers only.", stacklevel=3)
    elif compact:
        make_compact(layer, ADAPTER, row, col)
        return
    # Read the buffers at call time so a later ``.to(device)`` of the model is honoured.
    lora_b.register_hook(lambda grad, layer=layer: grad * getattr(layer, ROW_MASK)[:, None].to(grad.dtype))
    lora_a.register_hook(lambda grad, layer=layer: grad * getattr(layer, COL_MASK)[None, :].to(grad.dtype))


def apply_masks(model: torch.nn.Module, masks: dict[str, LayerMask], compact: bool = True) -> None:
    """Mask every LoRA layer of ``model``; ``compact`` per :func:`apply_mask` (``adapter.compact``)."""
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


def save_adapter(model: torch.nn.Module, path: str | Path, head_modules: list[str],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write A, B, masks and the trained head to one safetensors file (no pickle).

    Compact layers are written full-shaped (zeros outside the masks), so one format serves both.
    """
    tensors = {}
    for name, layer in lora_layers(model).items():
        full = full_factors(layer, ADAPTER) if is_compact(layer) else (factor(layer, "lora_A"), factor(layer, "lora_B"))
        for factor_name, value in zip(("lora_A", "lora_B"), full):
            tensors[f"{name}.{factor_name}"] = value.detach().cpu().contiguous()
        if hasattr(layer, ROW_MASK):
            tensors[f"{name}.row_mask"] = getattr(layer, ROW_MASK).cpu()
            tensors[f"{name}.col_mask"] = getattr(layer, COL_MASK).cpu()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and in_head(name, head_modules):
            tensors[f"head::{name}"] = parameter.detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, **(metadata or {})})
    return path


def _kept_part(layer: LoraLayer, factor_name: str, full: torch.Tensor) -> torch.Tensor:
    rows, cols = kept(layer)
    return full[:, cols.cpu()] if factor_name == "lora_A" else full[rows.cpu()]


def _read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (never unpickled); a truncated or foreign file is refused."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise PartialLoraError(f"adapter file {path} is not a complete safetensors file ({error}); refusing it.") from error
    if metadata.get("format") != FORMAT:
        raise PartialLoraError(f"adapter file {path} has format {metadata.get('format')!r}, not {FORMAT!r} "
                               "(written by save_adapter); refusing it.")
    return tensors, metadata


def _adapter_mismatch(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` do not fit ``model`` (names or shapes, e.g. another backbone or rank), or ``None``."""
    expected = {}
    for name, layer in lora_layers(model).items():
        # Files hold full-shaped factors whatever the execution: compare with the compact layer's full shape.
        lora_a, lora_b = full_factors(layer, ADAPTER) if is_compact(layer) else (factor(layer, "lora_A"),
                                                                                 factor(layer, "lora_B"))
        expected |= {f"{name}.lora_A": lora_a.shape, f"{name}.lora_B": lora_b.shape}
        if f"{name}.row_mask" in tensors:
            expected |= {f"{name}.row_mask": lora_b.shape[:1], f"{name}.col_mask": lora_a.shape[1:]}
    parameters = dict(model.named_parameters())
    for key in tensors:
        if key.startswith("head::") and key.removeprefix("head::") in parameters:
            expected[key] = parameters[key.removeprefix("head::")].shape
    unmatched = sorted(set(expected) ^ set(tensors))
    if unmatched:
        side = "the file lacks" if unmatched[0] in expected else "the model has no"
        return f"{side} {unmatched[0]} ({len(unmatched)} names differ)"
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            return f"{key} has shape {tuple(tensors[key].shape)}, the model's is {tuple(shape)}"
    return None


def load_adapter(model: torch.nn.Module, path: str | Path, compact: bool = True) -> dict[str, str]:
    """Load a file written by :func:`save_adapter` into a model built with the same backbone and rank.

    Everything is checked before the model changes: a file from another backbone, rank or method is refused.
    A masked file turns plain LoRA layers into masked ones (compact or dense per ``compact``); layers
    already masked keep their execution and must carry the file's masks.
    """
    tensors, metadata = _read_adapter(path)
    problem = _adapter_mismatch(model, tensors)
    if problem is not None:
        raise PartialLoraError(f"adapter file {path} does not fit this model: {problem}; build the model with the "
                               "backbone, method and rank it was saved from.")
    layers = lora_layers(model)
    masks = {name: LayerMask(tensors[f"{name}.row_mask"], tensors[f"{name}.col_mask"])
             for name in layers if f"{name}.row_mask" in tensors}
    for name, layer in layers.items():
        mask = masks.get(name)
        if is_compact(layer) and not (mask is not None and torch.equal(mask.row, getattr(layer, ROW_MASK).cpu())
                                      and torch.equal(mask.col, getattr(layer, COL_MASK).cpu())):
            raise PartialLoraError(f"adapter file {path} holds other masks than the compact layer {name}.")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            for factor_name in ("lora_A", "lora_B"):
                source = tensors[f"{name}.{factor_name}"]
                factor(layer, factor_name).copy_(_kept_part(layer, factor_name, source) if is_compact(layer) else source)
            if name in masks and not is_compact(layer):
                apply_mask(layer, masks[name], compact and not hasattr(layer, ROW_MASK))
        for key, value in tensors.items():
            if key.startswith("head::"):
                parameters[key.removeprefix("head::")].copy_(value)
    return metadata
