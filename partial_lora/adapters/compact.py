"""Compact execution of row/column-masked LoRA (SPEC 1): only the kept rows of B and columns of A exist.

A masked layer with kept rows ``R`` of ``B`` (m x d) and kept columns ``C`` of ``A`` (d x n) adds
``scaling * B[R, :] @ A[:, C] @ x[C]`` to output rows ``R`` and nothing elsewhere. The compact layer
stores ``A[:, C]`` (d x |C|) and ``B[R, :]`` (|R| x d) as PEFT's ``lora_A`` / ``lora_B`` linear
modules, so parameters, gradients and AdamW state shrink with the kept fraction; a layer that keeps no
row or no column adds nothing to the graph, and backpropagation stops below the lowest layer that
trains. PEFT has no structured sparsity of its factors, so the computation is a PEFT ``LoraVariant``
(its extension point, as DoRA uses it): PEFT's layer, dropout, scaling, merging and adapter switching
stay in charge.

How it computes: each side of the product takes the cheaper of two paths, by the share it keeps. Below
:data:`GATHER_BELOW` of the input columns, ``x[..., C]`` is gathered and multiplied by the stored ``A``;
above it, the stored columns are scattered into a zero-padded d x n ``A`` (tiny, rebuilt each call so that
gradients reach the stored entries only) and ``x`` is multiplied whole, as LoRA does. Likewise the output:
below the share of rows, ``index_add`` adds the kept rows into the output's columns ``R``; above it, a
zero-padded ``B`` gives the whole m-wide delta. A side that keeps everything uses the stored factor as it is.
At rank 8 the work is reading and writing activations, not arithmetic: on CPU at MiniLM's shapes (2048
tokens, forward + backward of one layer, measured side by side on a loaded machine), gathering cost 10-25%
of the padded path's overhead over the frozen layer at 5% kept, half of it at 30%, the same at 60%, and more
than it with everything kept (earlier, at 70% kept, 10-40% more). Every layer that keeps no row or no column
is skipped outright. Dropout is applied to the whole ``x`` as PEFT's LoRA does, so one random state gives the
dense masked layer's output.

AdaLoRA (``partial_adalora``) stays dense: its P, Lambda, Q triplets are pruned by PEFT's rank
allocator, which works on the full factors, and its layers have no variant hook.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant

from partial_lora.errors import PartialLoraError, SettingError

ROWS, COLS = "partial_rows", "partial_cols"  # kept indices (compact layers)
ROW_MASK, COL_MASK = "partial_row_mask", "partial_col_mask"  # the masks (every masked layer; saved with the adapter)
GATHER_BELOW = 0.5  # kept share of a side's indices under which gathering / index_add beats zero-padding


def kept(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept rows of B and kept columns of A of a compact layer."""
    return getattr(layer, ROWS), getattr(layer, COLS)


def padded_a(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """``A`` (d x n) with the stored columns in place and zeros elsewhere (differentiable)."""
    weight = layer.lora_A[adapter].weight
    if weight.shape[1] == layer.in_features:  # every column kept
        return weight
    return weight.new_zeros(weight.shape[0], layer.in_features).index_copy(1, kept(layer)[1], weight)


def padded_b(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """``B`` (m x d) with the stored rows in place and zeros elsewhere (differentiable)."""
    weight = layer.lora_B[adapter].weight
    if weight.shape[0] == layer.out_features:  # every row kept
        return weight
    return weight.new_zeros(layer.out_features, weight.shape[1]).index_copy(0, kept(layer)[0], weight)


def delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """``scaling * B @ A`` (m x n), zero outside the kept rows and columns."""
    return padded_b(layer, adapter) @ padded_a(layer, adapter) * layer.scaling[adapter]


class CompactLora(LoraVariant):
    """PEFT LoRA variant for layers whose ``lora_A`` / ``lora_B`` hold the kept columns / rows only."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to set up: :func:`make_compact` replaces the factors of an existing layer."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        rows, cols = kept(module)
        if rows.numel() == 0 or cols.numel() == 0:
            return result
        x = module.lora_dropout[active_adapter](x)
        lora_a, lora_b = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        if cols.numel() < GATHER_BELOW * module.in_features:
            hidden = x.index_select(-1, cols) @ lora_a.T
        else:
            hidden = x @ padded_a(module, active_adapter).T
        if rows.numel() < GATHER_BELOW * module.out_features:
            delta = (hidden @ lora_b.T * module.scaling[active_adapter]).to(result.dtype)
            return result.index_add(-1, rows, delta)
        return result + (hidden @ padded_b(module, active_adapter).T * module.scaling[active_adapter]).to(result.dtype)


def _linear(weight: torch.Tensor, requires_grad: bool) -> torch.nn.Linear:
    """A bias-free linear module holding ``weight`` (out x in), as PEFT keeps its factors."""
    module = torch.nn.Linear(1, 1, bias=False, device="meta")  # no initialisation of the real (maybe empty) shape
    module.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    module.out_features, module.in_features = weight.shape
    return module


def outside_masks(lora_a: torch.Tensor, lora_b: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> bool:
    """Whether full-shaped factors have non-zero entries outside the masks (columns of A, rows of B)."""
    return bool(torch.count_nonzero(lora_a[:, ~col]) or torch.count_nonzero(lora_b[~row]))


def make_compact(layer: LoraLayer, adapter: str, row: torch.Tensor, col: torch.Tensor) -> None:
    """Replace the full factors of ``layer`` by their kept rows of B and columns of A.

    Entries outside the masks must be zero (a masked layer's are): dropping non-zero ones would change
    what the adapter computes.
    """
    if getattr(layer, "fan_in_fan_out", False) or adapter in layer.lora_variant:
        raise SettingError("MaskSettings", "compact", "must be False for layers other than plain LoRA on nn.Linear "
                           "targets (DoRA, fan_in_fan_out)", True)
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if outside_masks(lora_a, lora_b, row, col):
        raise PartialLoraError("the LoRA factors have non-zero entries outside the masks; a compact layer "
                               "would drop them.")
    rows, cols = row.nonzero().flatten().to(lora_b.device), col.nonzero().flatten().to(lora_a.device)
    layer.register_buffer(ROWS, rows, persistent=False)
    layer.register_buffer(COLS, cols, persistent=False)
    layer.lora_A[adapter] = _linear(lora_a[:, cols], lora_a.requires_grad)
    layer.lora_B[adapter] = _linear(lora_b[rows], lora_b.requires_grad)
    layer.lora_variant[adapter] = CompactLora()
    layer.register_state_dict_post_hook(_full_factors_out)
    layer.register_load_state_dict_pre_hook(_kept_factors_in)


# State dicts hold the full-shaped factors (zeros outside the masks), as a dense LoRA layer of the same rank does:
# PEFT's save_pretrained then writes an adapter that any PEFT install loads as plain LoRA, and checkpoints and files
# load into compact and dense layers alike. The hooks are module-level functions reading everything from ``layer``,
# so copies of a model keep working.
def _factor_keys(layer: LoraLayer, prefix: str) -> dict[str, str]:
    return {adapter: (f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight")
            for adapter, variant in layer.lora_variant.items() if isinstance(variant, CompactLora)}


def _full_factors_out(layer: LoraLayer, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for adapter, (key_a, key_b) in _factor_keys(layer, prefix).items():
        lora_a, lora_b = full_factors(layer, adapter)
        state_dict[key_a], state_dict[key_b] = lora_a, lora_b


def _kept_factors_in(layer: LoraLayer, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                     missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    for mask_name in (ROW_MASK, COL_MASK):
        held = state_dict.get(prefix + mask_name)
        if held is not None and not torch.equal(held.to(torch.bool).cpu(), getattr(layer, mask_name).cpu()):
            error_msgs.append(f"{prefix}: the state dict holds other masks than this compact layer's.")
            return
    rows, cols = kept(layer)
    for adapter, (key_a, key_b) in _factor_keys(layer, prefix).items():
        for key, axis, indices, full in ((key_a, 1, cols, layer.in_features), (key_b, 0, rows, layer.out_features)):
            value = state_dict.get(key)
            if value is None or value.shape[axis] != full:  # absent, or already the kept part
                continue
            outside = torch.ones(full, dtype=torch.bool)
            outside[indices.cpu()] = False
            if torch.count_nonzero(value.index_select(axis, outside.nonzero().flatten().to(value.device))):
                error_msgs.append(f"{key}: non-zero entries outside the masks, which a compact layer would drop.")
                continue
            state_dict[key] = value.index_select(axis, indices.to(value.device))


def full_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (d x n) and ``B`` (m x d) full-shaped, zero outside the masks, as the dense layer holds them."""
    with torch.no_grad():  # detached: a side that keeps everything is the parameter itself
        return padded_a(layer, adapter).detach(), padded_b(layer, adapter).detach()
