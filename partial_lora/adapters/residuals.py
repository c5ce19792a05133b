"""The weight change dW each adapted layer applies after training (paper Figures 7-10)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from partial_lora.adapters.masked import ADAPTER
from partial_lora.adapters.sparse_delta import SparseDeltaLinear


@torch.no_grad()
def residual_norms(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Frobenius norms of dW and of the pretrained W, per adapted layer (by module name).

    dW is PEFT's ``get_delta_weight`` (for DoRA the low-rank part, before its magnitude rescaling) or
    the sparse delta of random masking; fully fine-tuned models keep no copy of W and report none.
    """
    norms = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight") and ADAPTER in getattr(
                module, "r", {}):
            delta, weight = module.get_delta_weight(ADAPTER), module.get_base_layer().weight
        elif isinstance(module, SparseDeltaLinear):
            delta, weight = module.delta(), module.base.weight
        else:
            continue
        norms[name.removeprefix("base_model.model.")] = {"delta": float(delta.float().norm()),
                                                         "weight": float(weight.float().norm())}
    return norms
