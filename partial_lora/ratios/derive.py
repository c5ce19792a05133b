"""From a pretrained model and a few labelled batches to per-layer kept counts (paper Sec. 4, SPEC 3-4).

Importance scores of every targeted weight, then Algorithm 1 on the derivation set, optionally cached on disk.
Plain Python settings (:class:`DerivationSettings`), any model whose call returns ``.logits`` (a
``transformers`` sequence classifier, the CLIP classifier here); the model is the one before adapters are
added, and is left as it was found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import cross_entropy

from partial_lora.adapters.targets import targeted_linears
from partial_lora.errors import ConfigError, DataError, SettingError, check_choice
from partial_lora.importance import compute_importance
from partial_lora.importance.measures import FLOWS, MEASURES
from partial_lora.ratios.cache import RatioCache
from partial_lora.ratios.counts import DerivedCounts
from partial_lora.ratios.probe import head_linear, probed_head
from partial_lora.ratios.replay import PrefixReplay
from partial_lora.ratios.search import (SCOPES, SEARCHES, AcceptanceRule, LayerCounts, search_counts,
                                       ticket_metric)

Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)
# A derivation is flagged when the pretrained model is this close to the majority-class rate (accuracy
# points / 100), or when its counts keep less than this share of the adapter's rows and columns.
NEAR_CHANCE = 0.05
NEARLY_EMPTY = 0.01
# Metadata of settings that change how fast the counts are found, never which: left out of the cache key.
SAME_COUNTS = {"same_counts": True}
# Metadata of settings added after counts were first cached: left out of the key at their default, which is
# how every earlier derivation ran, so those cache entries (and the runs that used them) still match.
SINCE_ADDED = {"omitted_at_default": True}
PROBES = ("in_sample", "heldout")
# The fields of DerivationSettings that AcceptanceRule's own checks are about, by AcceptanceRule's name for each.
RULE_FIELDS = {"name": "rule", "tau": "threshold", "max_loss_increase": "max_loss_increase"}


@dataclass(frozen=True)
class DerivationSettings:
    """What the counts depend on besides the model and the data. Every field is part of the cache key unless it
    is marked ``SAME_COUNTS``, so a new setting cannot silently reuse counts derived without it."""

    target_modules: str | tuple[str, ...]  # PEFT's meaning: a regex fully matching module names, or name suffixes
    importance: str = "svd"               # svd | snip | imp (SPEC 3)
    threshold: float = 0.9                # tau of the acceptance rule
    rule: str = "paper"                   # paper | above_chance | loss (see partial_lora.ratios.search)
    max_loss_increase: float = 0.1        # rule=loss: the mean cross-entropy may rise by this fraction at most
    search: str = "whole_first"           # whole_first | binary | linear (see partial_lora.ratios.search)
    step: int = 1                         # indices per evaluation of the linear search
    top_k: int | None = None              # svd: singular directions used (None: all)
    flow: str = "isolated"                # isolated | continuous (App. H)
    probe_head_steps: int = 0             # fit the head as a linear probe first (random heads sit at chance)
    probe: str = field(default="in_sample", metadata=SINCE_ADDED)  # in_sample (fit on D_t) | heldout (probe_batches)
    scope: str = field(default="isolated", metadata=SINCE_ADDED)   # isolated | cumulative (see ratios.search)
    head_modules: tuple[str, ...] = ("classifier",)  # the classifier head (probed, never scored)
    blocks: str | None = field(default=None, metadata=SAME_COUNTS)  # the model's block list: replay its prefix
    progress: bool = field(default=False, metadata=SAME_COUNTS)

    def __post_init__(self) -> None:
        # Lists from callers (or Hydra) become tuples: the settings are hashable and compare by value.
        for name in ("target_modules", "head_modules"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        # Checked here, not where each is first used: a bad value fails before any model is scored.
        check_choice("DerivationSettings", "importance", self.importance, MEASURES)
        check_choice("DerivationSettings", "search", self.search, SEARCHES)
        check_choice("DerivationSettings", "flow", self.flow, FLOWS)
        check_choice("DerivationSettings", "probe", self.probe, PROBES)
        check_choice("DerivationSettings", "scope", self.scope, SCOPES)
        if not (isinstance(self.step, int) and self.step >= 1):
            raise SettingError("DerivationSettings", "step", "must be an integer >= 1", self.step)
        try:
            AcceptanceRule(self.rule, self.threshold, max_loss_increase=self.max_loss_increase)  # checks all three
        except SettingError as error:  # named as the caller set it
            raise SettingError("DerivationSettings", RULE_FIELDS[error.setting], error.requirement,
                               error.value) from None

    @property
    def probes_held_out(self) -> bool:
        """Whether the head is fitted on a labelled sample other than the derivation set."""
        return bool(self.probe_head_steps) and self.probe == "heldout"

    def key(self) -> dict[str, Any]:
        """The settings that can change the counts."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("same_counts")
                and not (f.metadata.get("omitted_at_default") and getattr(self, f.name) == f.default)}


def fingerprint(batches: list[Batch]) -> str:
    """Digest of the derivation batches' tensors: the data sample, tokenisation and order, whatever produced them."""
    hasher = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            tensor = batch[name].detach().cpu().contiguous()
            hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def derivation_inputs(settings: DerivationSettings, source: dict[str, Any] | None,
                      batches: list[Batch] | None = None, probe_batches: list[Batch] | None = None) -> dict[str, Any]:
    """What counts are derived from, as the cache keys and records them: the settings that can change them, the
    model's description and the batches' fingerprint (left out without ``batches``: a dry run has no data), and
    that of the probe's own sample where the probe is held out."""
    inputs = {"settings": settings.key(), "source": source}
    if batches is not None:
        inputs["data"] = fingerprint(batches)
    if probe_batches is not None:
        inputs["probe_data"] = fingerprint(probe_batches)
    # As JSON holds them (tuples become lists), so that inputs read back from a cache compare equal.
    return json.loads(json.dumps(inputs, default=str))


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


class DerivationMetric:
    """Accuracy (or mean cross-entropy, ``metric="loss"``) of ``model`` (in eval mode) on the derivation set,
    as Algorithm 1 measures it: ``metric(layer, target)``, ``layer`` being the one the search modifies
    (``None``: any or none).

    Given a ``target``, evaluation may stop early and return a bound on the same side of it: accuracy once the
    batches left cannot change the comparison (the correct answers reach the target, or the wrong ones put it out
    of reach), the loss once its running sum (which only grows) is already above the target. So that failing
    removals fail after few batches, accuracy with a target runs the batches in the order fixed by the first
    evaluation without one (the baseline): least confident first, by their examples' mean rank of the margin of
    the true class's logit over the best other. Accuracy sums whole answers, so the order cannot change it; the
    loss, a float sum, keeps the batches' own order, and so does every evaluation without a target.
    ``examples_evaluated`` counts the examples run so far.

    With ``blocks_path`` (the model's sequence of blocks), the blocks before the searched layer's are
    replayed from a recording instead of recomputed; :meth:`weights_changed` keeps that recording true when a
    search leaves a layer modified.
    """

    def __init__(self, model: torch.nn.Module, batches: list[Batch], blocks_path: str | None = None,
                 metric: str = "accuracy") -> None:
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
        self.model, self.batches, self.blocks_path, self.metric = model, batches, blocks_path, metric
        self.replay = None
        if blocks_path:
            self.replay = PrefixReplay(model.get_submodule(blocks_path), batches, lambda batch: _logits(model, batch))
        self.total = sum(len(batch["labels"]) for batch in batches)
        self.order: list[int] | None = None  # of the batches, for accuracy against a target (see above)
        self.examples_evaluated = 0

    def weights_changed(self, layer: str) -> None:
        if self.replay is not None:
            self.replay.weights_changed(self.replay.block_of(layer, self.blocks_path))

    @torch.inference_mode()
    def __call__(self, layer: str | None, target: float | None = None) -> float:
        summed = seen = 0.0
        total, replay = self.total, self.replay
        start = 0 if replay is None or layer is None else replay.block_of(layer, self.blocks_path)
        order = self.order if target is not None and self.metric == "accuracy" else None
        margins = [] if self.order is None and target is None and self.metric == "accuracy" else None
        with nullcontext() if replay is None else replay.starting_at(start):
            for batch in (self._in_order(order) if replay is None else replay.batches_in_order(order)):
                logits = _logits(self.model, batch)
                seen += len(batch["labels"])
                self.examples_evaluated += len(batch["labels"])
                if self.metric == "loss":
                    summed += float(cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                    if target is not None and summed / total > target:
                        return summed / total
                    continue
                summed += int((logits.argmax(dim=-1) == batch["labels"]).sum())
                if margins is not None:
                    margins.append(_margins(logits.float(), batch["labels"]))
                if target is not None:
                    # Stop once the comparison with the target is settled, whatever the rest holds.
                    if (summed + total - seen) / total < target:
                        return (summed + total - seen) / total
                    if summed / total >= target:
                        return summed / total
        if margins is not None:
            self.order = _least_confident_first(margins)
        return summed / total

    def _in_order(self, order: list[int] | None) -> Iterator[Batch]:
        return iter(self.batches) if order is None else (self.batches[index] for index in order)


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's logit of its true class minus the best other class's (negative where it is misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return true - logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def _least_confident_first(margins: list[torch.Tensor]) -> list[int]:
    """Batch indices by the mean rank of their examples' margins, lowest first: ranks, not margins, so that a few
    confident outliers do not hide a batch of near-ties."""
    ranks = torch.empty(sum(len(batch) for batch in margins))
    ranks[torch.argsort(torch.cat(margins), stable=True)] = torch.arange(len(ranks), dtype=ranks.dtype)
    means = [chunk.mean().item() for chunk in ranks.split([len(batch) for batch in margins])]
    return sorted(range(len(means)), key=means.__getitem__)


def majority_rate(batches: list[Batch]) -> float:
    """Share of the derivation set in its most frequent class: what predicting one class scores."""
    labels = torch.cat([batch["labels"] for batch in batches])
    return float(torch.bincount(labels).max()) / len(labels)


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


@contextmanager
def _scoring(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and frozen weights (importance asks for gradients of the scored weights only); both restored."""
    was_training = model.training
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in trainable)


def derive_counts(model: torch.nn.Module, batches: list[Batch], settings: DerivationSettings, *,
                  probe_batches: list[Batch] | None = None, cache_dir: str | Path | None = None,
                  source: dict[str, Any] | None = None) -> DerivedCounts:
    """Kept counts of every layer ``settings.target_modules`` selects, by paper Algorithm 1.

    ``batches`` are the labelled derivation set (dicts of model inputs plus ``labels``). ``probe_batches``,
    required with ``settings.probe="heldout"`` (and a probe), are the labelled sample the head is fitted on
    instead, disjoint from ``batches``: then the derivation set only measures. With ``cache_dir``,
    counts are read from / written to the cache, keyed by the settings, ``source`` (a JSON-able description of
    the model, e.g. its name and config: required with a cache, since weights are not hashed) and a fingerprint
    of the batches. The model's weights, head, mode and ``requires_grad`` flags are as they were afterwards.
    """
    if not batches:
        raise DataError("the derivation set is empty: pass at least one batch.")
    try:
        classes = head_linear(model, list(settings.head_modules)).out_features
    except ValueError:  # no linear head to read the classes from: labels are checked by the loss
        classes = None
    for number, batch in enumerate(batches, start=1):
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise DataError(f"derivation batch {number} has no labels: each batch is a dict of the model's inputs "
                            "plus `labels`, the class of each row.")
        labels = torch.as_tensor(batch["labels"])
        if labels.numel() == 0:
            raise DataError(f"derivation batch {number} has no rows: leave empty batches out.")
        outside = labels[(labels < 0) | (labels >= classes)] if classes else labels[:0]
        if outside.numel():
            raise DataError(f"derivation batch {number} has label {outside[0].item()}, outside the head's classes "
                            f"0..{classes - 1}: fix the labels or build the head with more classes.")
    if cache_dir is not None and source is None:
        raise ConfigError("a cache_dir needs `source`, a description of the model that the counts belong to.")
    if settings.probes_held_out and not probe_batches:
        raise ConfigError("settings.probe='heldout' fits the head on its own labelled sample, and none was given: "
                          "pass probe_batches, or set probe='in_sample'.")
    if probe_batches is not None and not settings.probes_held_out:
        raise ConfigError("probe_batches were given but the head is not probed on them: set probe='heldout' (and "
                          "probe_head_steps > 0) in the settings, or leave probe_batches out.")
    weights = {name: layer.weight for name, layer in targeted_linears(model, settings.target_modules).items()}
    inputs = derivation_inputs(settings, source, batches, probe_batches)
    if cache_dir is None:
        return _derive(model, batches, probe_batches, settings, inputs, weights)
    cache = RatioCache(cache_dir)
    with cache.deriving(inputs):  # runs started together: one derives, the others read its entry
        cached = cache.load(inputs, {name: tuple(weight.shape) for name, weight in weights.items()})
        if cached is not None:
            for warning in cached.warnings:
                log.warning("%s (ratio cache %s)", warning, cached.path)
            return cached
        derived = _derive(model, batches, probe_batches, settings, inputs, weights)
        cache.save(derived)
    return derived


def _derive(model: torch.nn.Module, batches: list[Batch], probe_batches: list[Batch] | None,
            settings: DerivationSettings, inputs: dict[str, Any], weights: dict[str, torch.Tensor]) -> DerivedCounts:
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    started = time.perf_counter()

    def loss_batches():
        for batch in batches:
            yield lambda batch=batch: cross_entropy(_logits(model, batch), batch["labels"])

    rule = AcceptanceRule(settings.rule, settings.threshold, chance=majority_rate(batches),
                          max_loss_increase=settings.max_loss_increase)
    with _scoring(model):
        head = nullcontext()
        if settings.probe_head_steps:
            head = probed_head(model, list(settings.head_modules), probe_batches if settings.probes_held_out
                               else batches, lambda batch: _logits(model, batch), steps=settings.probe_head_steps)
        with head:
            scores = compute_importance(weights, settings.importance, top_k=settings.top_k, flow=settings.flow,
                                        loss_batches=loss_batches())
            evaluate = DerivationMetric(model, batches, settings.blocks, rule.metric)
            search_started = time.perf_counter()
            baseline, counts = search_counts(weights, scores, evaluate, rule, search=settings.search,
                                             step=settings.step, progress=settings.progress, scope=settings.scope,
                                             weights_changed=evaluate.weights_changed)
            search_time = time.perf_counter() - search_started
            accuracy_on_set = DerivationMetric(model, batches)
            # The baseline's accuracy is what the warnings compare with chance, whatever the rule measured.
            accuracy = baseline if rule.metric == "accuracy" else accuracy_on_set(None, None)
            ticket_accuracy = ticket_metric(weights, scores, counts, accuracy_on_set)
    derived = DerivedCounts(counts=counts, scores=scores, inputs=inputs, baseline=baseline,
                            baseline_accuracy=accuracy, ticket_accuracy=ticket_accuracy, majority_rate=rule.chance,
                            warnings=derivation_warnings(accuracy, rule.chance, counts, shapes),
                            wall_time_s=time.perf_counter() - started, examples_evaluated=evaluate.examples_evaluated,
                            search_time_s=search_time)
    return derived
