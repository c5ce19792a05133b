"""Algorithm 1: binary search agrees with the literal linear search where accuracy is monotone."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from partial_lora.backbones import build_backbone
from partial_lora.errors import ConfigError, DataError, SettingError
from partial_lora.importance import LayerScores, svd_scores
from partial_lora.ratios import (AcceptanceRule, DerivationSettings, DerivedCounts, LayerCounts, PrefixReplay,
                                 RatioCache, DerivationMetric, derivation_inputs, derivation_warnings, derive_counts,
                                 largest_removable, majority_rate, search_counts, ticket_metric)
from partial_lora.ratios.search import SCOPES, SEARCHES, literal_evaluations
from partial_lora.ratios.probe import probed_head
from partial_lora.ratios.stability import kept_shares, stability_summary
from tests.conftest import compose_config


PAPER = AcceptanceRule("paper", 0.9)


@pytest.mark.parametrize("size, limit, step", [(10, 0, 1), (10, 4, 1), (10, 10, 1), (37, 20, 3), (37, 37, 5), (1, 1, 1)])
def test_binary_and_linear_find_the_same_count(size, limit, step):
    passes = lambda count: count <= limit  # noqa: E731 - monotone by construction
    linear, linear_calls = largest_removable(size, passes, "linear", step)
    binary, binary_calls = largest_removable(size, passes, "binary", step)
    whole, whole_calls = largest_removable(size, passes, "whole_first", step)
    expected = size if limit == size else (limit // step) * step
    assert linear == binary == whole == expected
    assert literal_evaluations(size, linear, step) == linear_calls
    bisection = (len(range(step, size, step)) + 1).bit_length()
    assert binary_calls <= max(1, bisection)
    # One call for "remove everything" (all that is needed when it passes), then the bisection.
    assert whole_calls == 1 if limit == size else whole_calls <= 1 + bisection


def test_searches_differ_only_where_accuracy_is_not_monotone():
    passes = lambda count: count <= 3 or count == 10  # noqa: E731 - removing all passes, 4..9 fail
    assert largest_removable(10, passes, "linear") == (3, 4)
    assert largest_removable(10, passes, "binary")[0] == 3
    assert largest_removable(10, passes, "whole_first") == (10, 1)


@pytest.mark.parametrize("call, message", [  # named as the caller wrote them: no run config key
    (lambda: largest_removable(4, lambda c: True, "random"),
     "largest_removable.search must be one of linear, binary, whole_first, got 'random'."),
    (lambda: largest_removable(4, lambda c: True, "linear", step=0), "largest_removable.step must be an integer >= 1, "
                                                                      "got 0."),
    (lambda: AcceptanceRule("paper", 1.5), "AcceptanceRule.tau must lie in (0, 1], got 1.5."),
    (lambda: AcceptanceRule("majority", 0.9),
     "AcceptanceRule.name must be one of paper, above_chance, loss, got 'majority'."),
    (lambda: AcceptanceRule("loss", 0.9, max_loss_increase=0),
     "AcceptanceRule.max_loss_increase must be a number > 0, got 0."),
])
def test_bad_search_settings_are_refused(call, message):
    with pytest.raises(SettingError) as error:
        call()
    assert str(error.value) == message


@pytest.mark.parametrize("setting, value, requirement", [
    ("importance", "none", "must be one of svd, snip, imp"),
    ("search", "foo", "must be one of linear, binary, whole_first"),
    ("step", 0, "must be an integer >= 1"),
    ("flow", "both", "must be one of isolated, continuous"),
    ("probe", "train", "must be one of in_sample, heldout"),
    ("scope", "global", "must be one of isolated, cumulative"),
    ("rule", "strict", "must be one of paper, above_chance, loss"),
    ("threshold", 1.5, "must lie in (0, 1]"),  # AcceptanceRule's tau, named as the field the caller set
    ("max_loss_increase", 0, "must be a number > 0"),
])
def test_derivation_settings_refuse_a_bad_field_by_its_name(setting, value, requirement):
    """Before any model is scored, and in the caller's terms: ``DerivationSettings.<field>``."""
    with pytest.raises(SettingError) as error:
        DerivationSettings(target_modules=["hidden"], **{setting: value})
    assert str(error.value) == f"DerivationSettings.{setting} {requirement}, got {value!r}."
    assert (error.value.owner, error.value.setting) == ("DerivationSettings", setting)


def test_counts_on_a_small_model_agree_between_searches_and_restore_weights():
    # Unit i of a diagonal layer alone carries class i (i + 1 examples of it): zeroing units from the least
    # important one up loses whole classes, so accuracy falls monotonically and both searches must agree.
    size = 16
    hidden = torch.nn.Linear(size, size, bias=False)
    readout = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        hidden.weight.copy_(torch.diag(torch.arange(1.0, size + 1)))
        readout.weight.copy_(torch.eye(size))
    labels = torch.repeat_interleave(torch.arange(size), torch.arange(1, size + 1))
    inputs = torch.eye(size)[labels]

    def accuracy(layer: str | None, target: float | None) -> float:
        with torch.no_grad():
            return float((readout(hidden(inputs)).argmax(dim=1) == labels).float().mean())

    weights = {"hidden": hidden.weight, "readout": readout.weight}
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    scores = {name: svd_scores(weight.detach()) for name, weight in weights.items()}
    base, linear = search_counts(weights, scores, accuracy, PAPER, search="linear", progress=False)
    _, binary = search_counts(weights, scores, accuracy, PAPER, search="binary", progress=False)
    _, whole = search_counts(weights, scores, accuracy, PAPER, search="whole_first", progress=False)
    assert base == 1.0
    for name in weights:
        assert torch.equal(weights[name], before[name])
        assert (linear[name].k_row, linear[name].k_col) == (binary[name].k_row, binary[name].k_col)
        assert (whole[name].k_row, whole[name].k_col) == (binary[name].k_row, binary[name].k_col)
    # Zeroing units 0..3 loses classes 1..3 (9 of 136 examples; class 0 still wins the all-zero argmax);
    # unit 4 would lose 5 more, 14 > 10% of 136.
    assert linear["hidden"].k_row == linear["hidden"].k_col == size - 4


def tiny_model_and_batches(count: int, size: int):
    """A random tiny BERT (eval mode) and ``count`` labelled random batches of ``size``."""
    cfg = compose_config("backbone=tiny_bert")
    torch.manual_seed(0)
    model = build_backbone(cfg.backbone, num_labels=2).model.eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 1000, (size, 8), generator=generator),
                "attention_mask": torch.ones(size, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (size,), generator=generator)} for _ in range(count)]
    return cfg, model, batches


def test_prefix_replay_gives_the_full_forward_outputs_of_a_modified_layer():
    cfg, model, batches = tiny_model_and_batches(3, 4)
    logits = lambda batch: model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # noqa: E731
    replay = PrefixReplay(model.get_submodule(cfg.backbone.blocks), batches, logits)
    name = "bert.encoder.layer.1.intermediate.dense"
    assert replay.block_of(name, cfg.backbone.blocks) == 1
    weight = model.get_submodule(name).weight
    with torch.no_grad():
        original = logits(batches[0])
        weight[:20] = 0
        expected = [logits(batch) for batch in batches]
        with replay.starting_at(1):
            replayed = [logits(batch) for batch in replay.batches_in_order()]
    assert not torch.allclose(original, expected[0])  # the modification matters downstream
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, replayed))
    blocks = model.get_submodule(cfg.backbone.blocks)
    assert type(blocks[0]) is type(blocks[1])  # the real blocks are back after the context


def test_probed_head_fits_the_derivation_set_and_is_restored():
    torch.manual_seed(0)
    features = torch.randn(64, 8)
    labels = (features[:, 0] > 0).long()
    model = torch.nn.Sequential()
    model.add_module("classifier", torch.nn.Linear(8, 2))
    batches = [{"features": features[i:i + 16], "labels": labels[i:i + 16]} for i in range(0, 64, 16)]
    run_batch = lambda batch: model(batch["features"])  # noqa: E731
    before = {name: value.clone() for name, value in model.state_dict().items()}

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(features).argmax(dim=1) == labels).float().mean())

    with probed_head(model, ["classifier"], batches, run_batch, steps=200):
        assert accuracy() >= 0.95
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_early_stopping_evaluation_decides_like_the_full_one():
    cfg, model, batches = tiny_model_and_batches(6, 5)
    for blocks in (None, cfg.backbone.blocks):
        accuracy = DerivationMetric(model, batches, blocks)
        full = accuracy(None, None)
        assert 0 < full < 1
        for target in torch.linspace(0, 1, 31).tolist():
            assert (accuracy("bert.encoder.layer.1.output.dense", target) >= target) == (full >= target)


@pytest.fixture
def probed_tiny():
    """:func:`tiny_model_and_batches` (8 batches of 6) with its head fitted as the derivation's probe (well above
    chance), its targeted weights and their SVD scores."""
    cfg, model, batches = tiny_model_and_batches(8, 6)
    logits = lambda batch: model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # noqa: E731
    weights = {name: model.get_submodule(name).weight for name, _ in model.named_modules()
               if re.fullmatch(cfg.backbone.target_modules, name)}
    with probed_head(model, ["classifier"], batches, logits, steps=300):
        yield cfg, model, batches, weights, {name: svd_scores(w.detach()) for name, w in weights.items()}


def test_the_early_decision_equals_the_full_evaluations_on_random_removals(probed_tiny):
    # Targets one example either side of the exact accuracy and random ones, while the batches run least confident
    # first: an early stop that is off by one example, or that decides from part of the order, fails here.
    cfg, model, batches, weights, _ = probed_tiny
    early = DerivationMetric(model, batches, cfg.backbone.blocks)
    full = DerivationMetric(model, batches)
    baseline = early(None, None)
    assert sorted(early.order) == list(range(len(batches))) and early.order != sorted(early.order)
    generator = torch.Generator().manual_seed(3)
    names, step = list(weights), 1 / full.total
    for _ in range(40):
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        weight = weights[name]
        rows = torch.randperm(weight.shape[0], generator=generator)[: int(torch.randint(weight.shape[0], (1,),
                                                                                        generator=generator))]
        saved = weight[rows].clone()
        with torch.no_grad():
            weight[rows] = 0
        exact = full(name, None)
        for target in (exact - step, exact, exact + step, float(torch.rand(1, generator=generator)) * baseline):
            assert PAPER.passes(early(name, target), target) == PAPER.passes(exact, target)
        with torch.no_grad():
            weight[rows] = saved
    assert early.examples_evaluated < full.total + 4 * full.examples_evaluated  # the baseline, then 4 targets a case


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("search", SEARCHES)
def test_counts_are_the_same_with_and_without_the_early_decision(probed_tiny, search, scope):
    cfg, model, batches, weights, scores = probed_tiny
    early = DerivationMetric(model, batches, cfg.backbone.blocks)
    full = DerivationMetric(model, batches, cfg.backbone.blocks)
    rule = AcceptanceRule("paper", 0.97)  # at 0.9 every matrix of this model could go whole
    settings = {"search": search, "step": 4, "progress": False, "scope": scope}
    _, decided_early = search_counts(weights, scores, early, rule, weights_changed=early.weights_changed, **settings)
    _, evaluated_whole = search_counts(weights, scores, lambda layer, target: full(layer, None), rule,
                                       weights_changed=full.weights_changed, **settings)
    assert decided_early == evaluated_whole
    kept = [(c.k_row + c.k_col) / sum(weights[n].shape) for n, c in decided_early.items()]
    assert min(kept) < 1 and max(kept) > 0  # some removals passed, some failed: both decisions were taken
    assert early.examples_evaluated <= full.examples_evaluated


def test_removing_everything_is_one_evaluation_for_both_axes():
    # Accuracy ignores this layer (it passes with W = 0): one evaluation settles rows and columns alike.
    weight = torch.randn(6, 5)
    evaluated = []

    def accuracy(layer, target):
        evaluated.append(None if layer is None else weight.clone())
        return 1.0

    scores = {"layer": svd_scores(weight)}
    _, counts = search_counts({"layer": weight}, scores, accuracy, PAPER, search="whole_first", progress=False)
    assert (counts["layer"].k_row, counts["layer"].k_col, counts["layer"].evaluations) == (0, 0, 1)
    assert len(evaluated) == 2 and torch.count_nonzero(evaluated[1]) == 0


def test_derivation_leaves_the_model_and_the_random_stream_as_it_found_them(tmp_path):
    cfg, model, batches = tiny_model_and_batches(2, 4)
    model.train()
    model.bert.embeddings.requires_grad_(False)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    stream = torch.get_rng_state()
    settings = DerivationSettings(target_modules=cfg.backbone.target_modules, importance="snip", probe_head_steps=5,
                                  blocks=cfg.backbone.blocks)
    derived = derive_counts(model, batches, settings)
    assert torch.equal(torch.get_rng_state(), stream)  # adapters initialised after it draw what they would have
    assert model.training and flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert len(derived.counts) == 12 and derived.evaluations > 1 and not derived.cache_hit
    # The counts object round-trips through JSON.
    path = derived.save(tmp_path / "counts.json")
    assert DerivedCounts.load(path).to_json() == derived.to_json()


def test_the_cache_key_follows_every_setting_that_can_change_the_counts(tmp_path):
    cfg, model, batches = tiny_model_and_batches(2, 4)
    settings = DerivationSettings(target_modules=cfg.backbone.target_modules, importance="svd")
    first = derive_counts(model, batches, settings, cache_dir=tmp_path, source={"model": "tiny"})
    again = derive_counts(model, batches, replace(settings, blocks=cfg.backbone.blocks, progress=True),
                          cache_dir=tmp_path, source={"model": "tiny"})
    assert again.cache_hit and again.path == first.path  # replay and progress: same counts
    assert again.to_json() == first.to_json()
    # The search's share of the wall time is measured when derived, and not claimed for a cache read.
    assert 0 < first.search_time_s <= first.wall_time_s and again.search_time_s is None
    for changed in (replace(settings, threshold=0.8), replace(settings, top_k=2), replace(settings, search="linear"),
                    replace(settings, rule="above_chance")):
        assert not derive_counts(model, batches, changed, cache_dir=tmp_path, source={"model": "tiny"}).cache_hit
    other_data = [dict(batch, labels=1 - batch["labels"]) for batch in batches]
    assert not derive_counts(model, other_data, settings, cache_dir=tmp_path, source={"model": "tiny"}).cache_hit
    with pytest.raises(ConfigError, match="source"):
        derive_counts(model, batches, settings, cache_dir=tmp_path)


def test_a_run_started_beside_a_deriving_one_waits_and_reads_its_entry(tmp_path):
    """Two runs of one setting must train on one set of counts: while another process derives (holds the
    entry's lock), a run waits, then reads what that process saved instead of deriving its own."""
    cfg, model, batches = tiny_model_and_batches(2, 4)
    settings = DerivationSettings(target_modules=cfg.backbone.target_modules, importance="svd")
    source = {"model": "tiny"}
    inputs = derivation_inputs(settings, source, batches)
    cache = RatioCache(tmp_path)
    result = {}
    with cache.deriving(inputs):
        waiting = threading.Thread(target=lambda: result.update(derived=derive_counts(
            model, batches, settings, cache_dir=tmp_path, source=source)))
        waiting.start()
        time.sleep(0.5)
        assert "derived" not in result  # still waiting for the lock
        # What the other process saves: counts no derivation of this model gives (nothing kept anywhere).
        other = derive_counts(model, batches, settings)
        other.counts, other.inputs = {name: LayerCounts(0, 0, 1) for name in other.counts}, inputs
        cache.save(other)
    waiting.join(timeout=60)
    assert result["derived"].cache_hit and result["derived"].to_json() == other.to_json()


def test_stability_compares_which_matrices_derivations_keep_and_how_they_rank():
    def derived(kept: dict[str, tuple[int, int]]) -> DerivedCounts:  # every matrix 4 x 6
        return DerivedCounts(counts={name: LayerCounts(row, col, 1) for name, (row, col) in kept.items()},
                             scores={name: LayerScores(torch.ones(4), torch.ones(6)) for name in kept}, inputs={})

    same = derived({"q": (2, 3), "k": (0, 0), "v": (1, 1)})
    assert kept_shares(same) == {"q": 0.5, "k": 0.0, "v": 0.2}
    summary = stability_summary({0: same, 1: derived({"q": (2, 3), "k": (0, 0), "v": (1, 1)}),
                                 2: derived({"q": (0, 0), "k": (4, 6), "v": (1, 0)})})
    assert summary["non_empty"] == {0: 2, 1: 2, 2: 2} and (summary["kept_by_all"], summary["kept_by_any"]) == (1, 3)
    assert summary["jaccard_mean"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert summary["kept_fraction_sd"] > 0 and summary["spearman_mean"] == pytest.approx((1 - 1 - 1) / 3)
    empty = derived({"q": (0, 0), "k": (0, 0), "v": (0, 0)})  # no ranking: out of the correlation only
    summary = stability_summary({0: same, 1: empty, 2: derived({"q": (1, 1), "k": (0, 0), "v": (2, 2)})})
    assert (summary["spearman_pairs"], summary["pairs"]) == (1, 3) and summary["spearman_mean"] == pytest.approx(0.5)
    assert summary["jaccard_mean"] == pytest.approx((0 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="at least two"):
        stability_summary({0: same})
    with pytest.raises(ValueError, match="different layers"):
        stability_summary({0: same, 1: derived({"q": (1, 1)})})


def test_above_chance_rule_keeps_a_layer_that_the_paper_rule_empties():
    # 80 examples of class 0 and 20 of class 1 (majority rate c = 0.8). Unit 1 of the layer alone recognises
    # class 1; with the layer zeroed a small constant vote predicts class 0 everywhere: accuracy 0.8. The
    # pretrained model is right everywhere (mu = 1). At tau = 0.75 the paper's bound tau x mu = 0.75 lies
    # below c, so the all-majority model passes and the layer is emptied; above chance asks for
    # c + tau (mu - c) = 0.95, which only keeping unit 1 (row 1, column 1) meets.
    labels = torch.cat([torch.zeros(80, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    inputs = torch.stack([torch.ones(100), labels.float() * 2.0], dim=1)
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))

    def accuracy(name, target):
        with torch.no_grad():
            hidden = layer(inputs)
            logits = torch.stack([hidden[:, 0] + 0.01, hidden[:, 1]], dim=1)
            return float((logits.argmax(dim=1) == labels).float().mean())

    batches = [{"labels": labels}]
    chance = majority_rate(batches)
    assert chance == 0.8
    scores = {"layer": svd_scores(layer.weight.detach())}
    weights = {"layer": layer.weight}
    for search in ("linear", "binary"):
        _, paper = search_counts(weights, scores, accuracy, AcceptanceRule("paper", 0.75), search, progress=False)
        _, above = search_counts(weights, scores, accuracy, AcceptanceRule("above_chance", 0.75, chance=chance),
                                 search, progress=False)
        assert (paper["layer"].k_row, paper["layer"].k_col) == (0, 0)
        assert (above["layer"].k_row, above["layer"].k_col) == (1, 1)
    warnings = derivation_warnings(1.0, chance, paper, {"layer": (2, 2)})
    assert len(warnings) == 1 and "keep 0 of 4 rows and columns" in warnings[0]
    assert derivation_warnings(1.0, chance, above, {"layer": (2, 2)}) == []


def test_rules_targets_and_directions():
    assert AcceptanceRule("paper", 0.9).target(0.8) == pytest.approx(0.72)
    above = AcceptanceRule("above_chance", 0.9, chance=0.7)
    assert above.target(0.8) == pytest.approx(0.79)
    assert AcceptanceRule("above_chance", 0.9, chance=0.0).target(0.8) == AcceptanceRule("paper", 0.9).target(0.8)
    loss = AcceptanceRule("loss", 0.9, max_loss_increase=0.1)
    assert loss.metric == "loss" and loss.target(0.5) == pytest.approx(0.55)
    assert loss.passes(0.55, 0.55) and not loss.passes(0.56, 0.55)
    assert above.passes(0.79, 0.79) and not above.passes(0.78, 0.79)


def test_warnings_flag_a_baseline_near_chance():
    counts = {"layer": LayerCounts(k_row=5, k_col=5, evaluations=3)}
    warnings = derivation_warnings(0.70, 0.68, counts, {"layer": (10, 10)})
    assert len(warnings) == 1 and "within 0.05 of the majority-class rate 0.680" in warnings[0]


def test_loss_rule_counts_on_a_small_model_and_early_stopped_loss_decides_like_the_full_one():
    cfg, model, batches = tiny_model_and_batches(6, 5)
    for blocks in (None, cfg.backbone.blocks):
        loss = DerivationMetric(model, batches, blocks, metric="loss")
        full = loss(None, None)
        assert full > 0
        for target in torch.linspace(full * 0.5, full * 1.5, 21).tolist():
            assert (loss("bert.encoder.layer.1.output.dense", target) <= target) == (full <= target)
    weights = {name: model.get_submodule(name).weight for name, _ in model.named_modules()
               if re.fullmatch(cfg.backbone.target_modules, name) and ".1." in name}
    scores = {name: svd_scores(w.detach()) for name, w in weights.items()}
    rule = AcceptanceRule("loss", 0.9, max_loss_increase=0.05)
    _, linear = search_counts(weights, scores, DerivationMetric(model, batches, metric="loss"), rule, "linear",
                              step=8, progress=False)
    assert all(0 <= c.k_row <= weights[n].shape[0] and 0 <= c.k_col <= weights[n].shape[1]
               for n, c in linear.items())


class _Toy(torch.nn.Module):
    """Features -> ``hidden`` -> ``classifier``, called like a transformers classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(4))
            self.hidden.bias.zero_()

    def forward(self, features: torch.Tensor):
        return SimpleNamespace(logits=self.classifier(self.hidden(features)))


def test_the_held_out_probe_is_fitted_on_its_own_sample_and_never_on_the_derivation_set():
    # The probe's sample labels the sign of the first feature the other way round from the derivation set: a
    # probe fitted there scores near 0 on the derivation set, one fitted on the derivation set itself 1.00.
    torch.manual_seed(0)
    model = _Toy().eval()
    features = torch.randn(2, 32, 4)
    derivation = [{"features": features[0], "labels": (features[0, :, 0] > 0).long()}]
    probe = [{"features": features[1], "labels": (features[1, :, 0] <= 0).long()}]
    settings = DerivationSettings(target_modules=["hidden"], probe_head_steps=300)
    in_sample = derive_counts(model, derivation, settings)
    held_out = derive_counts(model, derivation, replace(settings, probe="heldout"), probe_batches=probe)
    assert in_sample.baseline_accuracy > 0.95
    assert held_out.baseline_accuracy < 0.2
    assert held_out.inputs["probe_data"] != held_out.inputs["data"] and "probe_data" not in in_sample.inputs
    assert held_out.inputs["settings"]["probe"] == "heldout" and "probe" not in in_sample.inputs["settings"]
    with pytest.raises(ConfigError, match=re.escape("settings.probe='heldout' fits the head on its own labelled")):
        derive_counts(model, derivation, replace(settings, probe="heldout"))
    with pytest.raises(ConfigError, match="probe_batches were given"):
        derive_counts(model, derivation, settings, probe_batches=probe)


def test_the_probe_sample_shares_no_row_with_the_derivation_set_or_validation(tmp_path):
    from partial_lora.data.glue import GlueDataModule
    from transformers import AutoTokenizer

    from tests.conftest import write_jsonl

    rows = [{"sentence": f"sentence number {index}", "label": index % 2, "idx": index} for index in range(60)]
    write_jsonl(tmp_path / "glue" / "sst2" / "train.jsonl", rows)
    write_jsonl(tmp_path / "glue" / "sst2" / "validation.jsonl", rows[:8])
    cfg = compose_config("backbone=tiny_bert", "dataset.val_size=10")
    tokenizer = AutoTokenizer.from_pretrained(build_backbone(cfg.backbone, num_labels=2).tokenizer.name_or_path)
    data = GlueDataModule(cfg.dataset, tokenizer, str(tmp_path), batch_size=8, data_seed=3)

    def texts(batches):
        return {tuple(ids[mask.bool()].tolist()) for batch in batches
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])}

    derivation = texts(data.derivation_batches(0.2, None, 8))
    probe = texts(data.probe_batches(0.2, None, 25, 8))
    validation = {tuple(row["input_ids"]) for row in data.splits["val"]}
    assert (len(derivation), len(probe)) == (10, 25)
    assert not derivation & probe and not probe & validation and not derivation & validation
    with pytest.raises(DataError, match="none for the held-out probe"):
        data.probe_batches(1.0, None, 25, 8)


def _redundant_pair():
    """Two parallel identity layers summed: either alone carries every class, removing both leaves none."""
    first, second = torch.eye(4).clone(), torch.eye(4).clone()
    labels = torch.arange(4).repeat(4)
    inputs = torch.eye(4)[labels]

    def accuracy(layer, target):
        return float(((inputs @ first.T + inputs @ second.T).argmax(dim=1) == labels).float().mean())

    weights = {"first": first, "second": second}
    return weights, {name: svd_scores(weight) for name, weight in weights.items()}, accuracy


@pytest.mark.parametrize("search", ["linear", "binary", "whole_first"])
def test_cumulative_scope_keeps_the_whole_ticket_within_the_bound_where_isolated_does_not(search):
    weights, scores, accuracy = _redundant_pair()
    before = {name: weight.clone() for name, weight in weights.items()}
    changed = []
    _, isolated = search_counts(weights, scores, accuracy, PAPER, search=search, progress=False)
    _, cumulative = search_counts(weights, scores, accuracy, PAPER, search=search, progress=False,
                                  scope="cumulative", weights_changed=changed.append)
    assert all(torch.equal(weights[name], before[name]) for name in weights)
    # Isolated: each layer goes whole on its own, and the ticket (both gone) is at chance.
    assert all((c.k_row, c.k_col) == (0, 0) for c in isolated.values())
    assert ticket_metric(weights, scores, isolated, accuracy) == 0.25
    # Cumulative: the first goes whole, then the second must carry every class but the one an all-zero
    # output still predicts (class 0).
    assert (cumulative["first"].k_row, cumulative["first"].k_col) == (0, 0)
    assert cumulative["second"].k_row == 3
    assert ticket_metric(weights, scores, cumulative, accuracy) >= PAPER.target(1.0)
    assert all(torch.equal(weights[name], before[name]) for name in weights)
    assert changed[0] == "first" and changed[-1] == "first"  # told of each applied removal, and of the restore
    with pytest.raises(SettingError, match="^search_counts.scope must be one of isolated, cumulative, got 'global'"):
        search_counts(weights, scores, accuracy, PAPER, scope="global", progress=False)


def test_cumulative_counts_are_the_same_with_and_without_the_replayed_prefix():
    # The replay must re-record a block's output once an earlier block's removal is left applied.
    cfg, model, batches = tiny_model_and_batches(3, 6)
    settings = DerivationSettings(target_modules=cfg.backbone.target_modules, probe_head_steps=300,
                                  rule="loss", max_loss_increase=0.01, search="binary", scope="cumulative")
    plain = derive_counts(model, batches, settings)
    replayed = derive_counts(model, batches, replace(settings, blocks=cfg.backbone.blocks))
    assert plain.to_json()["layers"] == replayed.to_json()["layers"]
    assert 0 < plain.kept_fraction < 1  # some removals applied, some refused: the replay had work to redo
    isolated = derive_counts(model, batches, replace(settings, scope="isolated"))
    assert plain.to_json()["layers"] != isolated.to_json()["layers"]


def test_probe_and_scope_at_their_original_values_keep_earlier_run_ids():
    """Runs recorded before ``ratios.probe`` / ``ratios.scope`` existed ran in_sample and isolated: their ids hold."""
    from omegaconf import OmegaConf

    from partial_lora.results import config_hash

    def config(probe: str = "in_sample", *overrides: str) -> dict:
        return OmegaConf.to_container(compose_config("method=partial_lora", "importance=svd", f"ratios.probe={probe}",
                                                     *overrides), resolve=True)

    def run_id(probe: str = "in_sample", *overrides: str) -> str:
        return config_hash(config(probe, *overrides))

    original = config()
    before = original | {"ratios": {key: value for key, value in original["ratios"].items()
                                    if key not in ("probe", "probe_examples", "scope")}}
    assert run_id() == config_hash(before) == run_id("in_sample", "ratios.probe_examples=500")
    assert len({run_id(), run_id("heldout"), run_id("in_sample", "ratios.scope=cumulative"),
                run_id("heldout", "ratios.probe_examples=500")}) == 4
