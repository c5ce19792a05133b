"""A linear probe as the classifier head while counts are derived (language backbones).

Algorithm 1 compares accuracies against the pretrained model's own. A vision backbone's head starts
from text embeddings (zero-shot) and has a meaningful accuracy; a language backbone's head starts
random, at chance, which would make every row look removable. So, before importance and counts are
computed, the head is fitted on the derivation set's frozen features (logistic regression), and its
initial weights are put back afterwards: training starts from the same head as every other method.
Full-batch Adam on cached features is deterministic and draws no random numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.functional import cross_entropy

from partial_lora.layers import in_head


def head_linear(model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Linear:
    """The last linear layer under the backbone's head modules (the head: counts are derived before adapters)."""
    found = [module for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and in_head(name, head_modules)]
    if not found:
        raise ValueError(f"no trainable linear layer under head modules {head_modules}")
    return found[-1]


def _pooled(features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example head inputs. Decoder classifiers (LLaMA) apply the head to every token and keep the
    last real one's logits, so a 3-D input is reduced to that token (left or right padding alike)."""
    if features.dim() == 2:
        return features
    mask = batch["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
    return features[torch.arange(features.shape[0]), last]


@contextmanager
def probed_head(model: torch.nn.Module, head_modules: list[str], batches: list[dict[str, torch.Tensor]],
                run_batch: Callable[[Any], Any], steps: int, lr: float = 1e-2) -> Iterator[None]:
    head = head_linear(model, head_modules)
    features: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    try:
        with torch.inference_mode():
            for batch in batches:
                run_batch(batch)
    finally:
        handle.remove()
    inputs = torch.cat([_pooled(f, batch) for f, batch in zip(features, batches)]).clone()
    labels = torch.cat([batch["labels"] for batch in batches])
    initial = {name: value.detach().clone() for name, value in head.state_dict().items()}
    weight = initial["weight"].clone().requires_grad_(True)
    bias = initial["bias"].clone().requires_grad_(True) if "bias" in initial else None
    optimizer = torch.optim.Adam([p for p in (weight, bias) if p is not None], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            cross_entropy(torch.nn.functional.linear(inputs, weight, bias), labels).backward()
            optimizer.step()
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    try:
        yield
    finally:
        head.load_state_dict(initial)
