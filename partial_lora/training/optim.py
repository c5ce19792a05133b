"""Optimiser factories named by method configs: each takes the model and returns its optimiser."""

from __future__ import annotations

import torch
from peft.optimizers import create_loraplus_optimizer


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (SPEC 5)."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)


def loraplus(model: torch.nn.Module, lr: float, weight_decay: float, lr_ratio: float) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al., 2024): B factors learn ``lr_ratio`` times faster than A (PEFT's builder)."""
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=lr_ratio,
                                     weight_decay=weight_decay)


def adamw_per_tensor(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one parameter group per trainable tensor, so that a callback can re-warm one layer's
    learning rate (LoSiA) while the run's scheduler keeps driving every group."""
    groups = [{"params": [parameter]} for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
