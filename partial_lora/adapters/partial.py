"""From a pretrained model to the masks of a masked adapter: importance -> counts (cached) -> masks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.functional import cross_entropy

from partial_lora.adapters.masked import base_weights, lora_layers
from partial_lora.errors import DataError
from partial_lora.importance import LayerScores, compute_importance
from partial_lora.masks import NEEDS_DERIVATION, LayerMask, make_mask
from partial_lora.ratios import AcceptanceRule, LayerCounts, PrefixReplay, RatioCache, derive_counts
from partial_lora.ratios.probe import probed_head

Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

# A derivation is flagged when the pretrained model is this close to the majority-class rate (accuracy
# points / 100), or when its counts keep less than this share of the adapter's rows and columns.
NEAR_CHANCE = 0.05
NEARLY_EMPTY = 0.01


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


def batch_metric(model: torch.nn.Module, batches: list[Batch], blocks_path: str | None = None,
                 metric: str = "accuracy") -> Callable[[str | None, float | None], float]:
    """Accuracy (or mean cross-entropy, ``metric="loss"``) of ``model`` (in eval mode) on the derivation set,
    as Algorithm 1 measures it.

    Given a ``target``, evaluation may stop early and return a bound on the same side of it: accuracy once
    the examples left cannot change the comparison, the loss once its running sum (which only grows) is
    already above the target.

    With ``blocks_path`` (the backbone's sequence of blocks, relative to the PEFT-wrapped model), the
    blocks before the searched layer's are replayed from a recording instead of recomputed.
    """
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    replay = None
    if blocks_path:
        replay = PrefixReplay(model.base_model.model.get_submodule(blocks_path), batches,
                              lambda batch: _logits(model, batch))

    total = sum(len(batch["labels"]) for batch in batches)

    @torch.inference_mode()
    def evaluate(layer: str | None, target: float | None = None) -> float:
        summed = seen = 0.0
        start = 0 if replay is None or layer is None else replay.block_of(layer, blocks_path)
        with nullcontext() if replay is None else replay.starting_at(start):
            for batch in (batches if replay is None else replay.batches_in_order()):
                logits = _logits(model, batch)
                seen += len(batch["labels"])
                if metric == "loss":
                    summed += float(cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                    if target is not None and summed / total > target:
                        return summed / total
                    continue
                summed += int((logits.argmax(dim=-1) == batch["labels"]).sum())
                if target is not None:
                    # Stop once the comparison with the target is settled, whatever the rest holds.
                    if (summed + total - seen) / total < target:
                        return (summed + total - seen) / total
                    if summed / total >= target:
                        return summed / total
        return summed / total

    return evaluate


def majority_rate(batches: list[Batch]) -> float:
    """Share of the derivation set in its most frequent class: what predicting one class scores."""
    labels = torch.cat([batch["labels"] for batch in batches])
    return float(torch.bincount(labels).max()) / len(labels)


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Algorithm 1 scores the pretrained model: its still-zero adapters add exactly nothing, so they are
    switched off (PEFT's per-layer switch; the trained head copy stays on) and cost no evaluation time."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def derivation_inputs(cfg: DictConfig, examples: int) -> dict:
    """Everything the counts depend on (SPEC 2): backbone, data sample, measure, threshold; not the seed."""
    return {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True) | {"name_or_path": cfg.backbone.name},
        "dataset": cfg.dataset.name,
        "data_seed": cfg.data_seed,
        "examples": examples,
        "max_length": cfg.dataset.get("max_length"),
        "shots": cfg.dataset.get("shots"),
        "importance": cfg.importance.name,
        "top_k": cfg.importance.get("top_k"),
        "flow": cfg.importance.flow,
        "threshold": cfg.ratios.threshold,
        "rule": cfg.ratios.rule,
        **({"max_loss_increase": cfg.ratios.max_loss_increase} if cfg.ratios.rule == "loss" else {}),
        "search": cfg.ratios.search,
        "step": cfg.ratios.step,
        "probe_head_steps": cfg.ratios.probe_head_steps,
    }


def derivation_warnings(baseline_accuracy: float, chance: float, counts: dict[str, LayerCounts],
                        shapes: dict[str, tuple[int, int]]) -> list[str]:
    """What makes derived counts suspect, one sentence each, also logged: a pretrained model barely above
    predicting one class (so any rule on accuracy tests little), or counts that keep almost nothing."""
    warnings = []
    if baseline_accuracy - chance < NEAR_CHANCE:
        warnings.append(f"the pretrained model's derivation accuracy {baseline_accuracy:.3f} is within "
                        f"{NEAR_CHANCE:.2f} of the majority-class rate {chance:.3f}: the counts test little")
    kept = sum(c.k_row + c.k_col for c in counts.values())
    full = sum(sum(shapes[name]) for name in counts)
    if kept < NEARLY_EMPTY * full:
        warnings.append(f"the derived counts keep {kept} of {full} rows and columns ({kept / full:.2%}), under "
                        f"{NEARLY_EMPTY:.0%} of the adapter")
    for warning in warnings:
        log.warning("ratio derivation: %s.", warning)
    return warnings


def derive_masks(model: torch.nn.Module, cfg: DictConfig, batches: list[Batch],
                 head_modules: list[str]) -> tuple[dict[str, LayerMask], dict]:
    """Masks for every LoRA layer of ``model`` per ``cfg.method.mask``; returns them and a summary for the record."""
    mask_cfg = cfg.method.mask
    weights = base_weights(model)
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    summary: dict = {"mode": mask_cfg.mode}
    scores = counts = None
    if mask_cfg.mode in NEEDS_DERIVATION:
        if not batches:
            raise DataError("the derivation set is empty: raise ratios.max_examples or dataset.derivation_fraction.")
        examples = sum(len(batch["labels"]) for batch in batches)
        inputs = derivation_inputs(cfg, examples)
        cache = RatioCache(cfg.ratios.cache_dir)
        cached = cache.load(inputs, shapes)
        if cached is not None:
            scores, counts, entry = cached
            summary |= {"cache_hit": True, "evaluations": entry["evaluations"], "wall_time_s": entry["wall_time_s"],
                        **{key: entry.get(key) for key in ("baseline_accuracy", "majority_rate")},
                        "warnings": entry.get("warnings", [])}
            for warning in summary["warnings"]:
                log.warning("%s (ratio cache %s)", warning, cache.path(inputs))
        else:
            started = time.perf_counter()
            was_training = model.training
            model.eval()

            def loss_batches():
                for batch in batches:
                    yield lambda batch=batch: cross_entropy(_logits(model, batch), batch["labels"])

            head = nullcontext()
            if cfg.ratios.probe_head_steps and not cfg.backbone.get("zero_shot_head"):
                head = probed_head(model, head_modules, batches, lambda batch: _logits(model, batch),
                                   steps=cfg.ratios.probe_head_steps)
            with adapters_off(model), head:
                scores = compute_importance(weights, cfg.importance.name, top_k=cfg.importance.get("top_k"),
                                            flow=cfg.importance.flow, loss_batches=loss_batches())
                blocks = cfg.backbone.get("blocks") if cfg.ratios.replay_prefix else None
                rule = AcceptanceRule(cfg.ratios.rule, cfg.ratios.threshold, chance=majority_rate(batches),
                                      max_loss_increase=cfg.ratios.max_loss_increase)
                evaluate = batch_metric(model, batches, blocks, rule.metric)
                baseline, counts = derive_counts(weights, scores, evaluate, rule, search=cfg.ratios.search,
                                                 step=cfg.ratios.step, progress=cfg.ratios.progress)
                # The baseline's accuracy is what the warnings compare with chance, whatever the rule measured.
                accuracy = baseline if rule.metric == "accuracy" else batch_metric(model, batches)(None, None)
            model.train(was_training)
            wall = time.perf_counter() - started
            warnings = derivation_warnings(accuracy, rule.chance, counts, shapes)
            cache.save(inputs, baseline, scores, counts, wall,
                       extra={"baseline_accuracy": accuracy, "majority_rate": rule.chance, "warnings": warnings})
            summary |= {"cache_hit": False, "evaluations": 1 + sum(c.evaluations for c in counts.values()),
                        "wall_time_s": wall, "baseline_accuracy": accuracy, "majority_rate": rule.chance,
                        "warnings": warnings}
        summary["cache_file"] = str(cache.path(inputs))
        # What the derived counts keep of the adapter's rows and columns: Balanced matches it (claim C4).
        summary["derived_fraction"] = (sum(c.k_row + c.k_col for c in counts.values())
                                       / sum(sum(shapes[name]) for name in counts))
    return draw_masks(cfg, shapes, scores, counts), summary


def draw_masks(cfg: DictConfig, shapes: dict[str, tuple[int, int]], scores: dict[str, LayerScores] | None = None,
               counts: dict[str, LayerCounts] | None = None) -> dict[str, LayerMask]:
    """The seed's masks of ``cfg.method.mask`` for layers of these ``shapes`` (m x n), given the derived
    ``scores`` and ``counts`` where the mode needs them."""
    mask_cfg, masks = cfg.method.mask, {}
    for name, shape in shapes.items():
        layer_scores = None if scores is None else scores[name]
        masks[name] = make_mask(
            mask_cfg.mode, name, cfg.seed, shape,
            k_row=None if counts is None else counts[name].k_row,
            k_col=None if counts is None else counts[name].k_col,
            row_scores=None if layer_scores is None else layer_scores.row,
            col_scores=None if layer_scores is None else layer_scores.col,
            temperature=mask_cfg.get("temperature", 1.0), sparsity=mask_cfg.get("sparsity"))
    return masks
