"""The weight change dW each adapted layer applies after training (paper Figures 7-10)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from partial_lora.adapters.targets import ADAPTER, WeightDelta


@torch.no_grad()
def residual_norms(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Frobenius norms of dW and of the pretrained W, per adapted layer (by module name).

    dW is the layer's ``get_delta_weight``, the one interface of PEFT's layers and of those written here (for
    DoRA the low-rank part, before its magnitude rescaling; for LoSiA every subnet trained so far). Fully
    fine-tuned models keep no copy of W and report none.
    """
    norms = {}
    for name, module in model.named_modules():
        adapted = isinstance(module, WeightDelta) or (isinstance(module, BaseTunerLayer) and ADAPTER in getattr(
            module, "r", {}) and hasattr(module, "get_delta_weight"))
        if not adapted:
            continue
        delta, weight = module.get_delta_weight(ADAPTER), module.get_base_layer().weight
        norms[name.removeprefix("base_model.model.")] = {"delta": float(delta.float().norm()),
                                                         "weight": float(weight.float().norm())}
    return norms
