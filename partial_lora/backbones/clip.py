"""CLIP image classifiers (open_clip): a ViT whose attention has separate q / k / v / out linear layers,
and a linear head that starts as the text tower's zero-shot classifier (SPEC 5)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.functional import cross_entropy, normalize, scaled_dot_product_attention
from transformers.modeling_outputs import SequenceClassifierOutput

from partial_lora.backbones.base import Backbone, fetching

PROMPT = "a photo of a {}."


class SplitAttention(torch.nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (self-attention, no dropout) with four plain linear layers.

    The fused ``in_proj_weight`` is split into ``q_proj``, ``k_proj`` and ``v_proj`` so that LoRA and
    every other adapter (and the masks) target ordinary ``nn.Linear`` layers; outputs are the same.
    """

    def __init__(self, attention: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        has_bias = attention.in_proj_bias is not None
        weights = attention.in_proj_weight.detach().chunk(3)
        biases = attention.in_proj_bias.detach().chunk(3) if has_bias else (None, None, None)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            linear = torch.nn.Linear(width, width, bias=has_bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if has_bias:
                    linear.bias.copy_(bias)
            self.add_module(name, linear)
        self.out_proj = torch.nn.Linear(width, width, bias=attention.out_proj.bias is not None,
                                        device=weights[0].device, dtype=weights[0].dtype)
        self.out_proj.load_state_dict(attention.out_proj.state_dict())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        batch, length, width = query.shape

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        attended = scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                                heads(self.v_proj(value)), attn_mask=attn_mask)
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        return (output if self.batch_first else output.transpose(0, 1)), None


def split_attention(module: torch.nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` under ``module`` by a :class:`SplitAttention`; returns how many."""
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, torch.nn.MultiheadAttention)]
    for name, attention in targets:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, SplitAttention(attention))
    return len(targets)


class ClipClassifier(torch.nn.Module):
    """``logits = scale * head(normalize(visual(pixels)))``, the head's rows starting as normalised text
    embeddings of the class prompts, ``scale`` CLIP's learned temperature: at initialisation the logits
    are CLIP's zero-shot logits."""

    def __init__(self, visual: torch.nn.Module, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(text_embeddings.shape[1], text_embeddings.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(normalize(text_embeddings, dim=-1))
        self.register_buffer("logit_scale", logit_scale.detach().clone())

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.logit_scale * self.head(normalize(self.visual(pixel_values), dim=-1))
        loss = None if labels is None else cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def class_text_embeddings(clip: torch.nn.Module, tokenizer, class_names: list[str]) -> torch.Tensor:
    clip.eval()
    tokens = tokenizer([PROMPT.format(name) for name in class_names])
    return torch.cat([clip.encode_text(chunk) for chunk in tokens.split(256)])


def build_clip_backbone(cfg: DictConfig, class_names: list[str] | None, num_labels: int,
                        shapes_only: bool = False) -> Backbone:
    """open_clip ``cfg.model_name`` (pretrained weights ``cfg.pretrained``, e.g. ``openai``; ``null``: random
    init of the same shapes), or a model built from ``cfg.model_config`` (an open_clip config dict, for
    tests). The text tower is used once for the head and then dropped. ``shapes_only`` (a dry run) builds the
    same shapes on the meta device, with no weights and a head of ``num_labels`` rows that no text fills."""
    import open_clip

    device = "meta" if shapes_only else "cpu"
    with torch.device(device):
        if cfg.get("model_config"):
            spec = OmegaConf.to_container(cfg.model_config, resolve=True)
            clip = open_clip.CLIP(**spec)
        else:
            with fetching(f"the {cfg.pretrained} weights of {cfg.model_name}",
                          "set backbone.pretrained=null (the same architecture, random weights)", (RuntimeError,)):
                clip = open_clip.create_model(cfg.model_name, pretrained=None if shapes_only else cfg.pretrained,
                                              device=device)
        if shapes_only:
            embeddings = torch.empty(num_labels, clip.visual.output_dim)
        else:
            tokenizer = open_clip.get_tokenizer(cfg.get("tokenizer_name") or cfg.model_name)
            embeddings = class_text_embeddings(clip, tokenizer, class_names)
        split_attention(clip.visual)
        model = ClipClassifier(clip.visual, embeddings, clip.logit_scale.exp())
    del clip
    return Backbone(model=model, tokenizer=None, head_modules=list(cfg.head_modules))
