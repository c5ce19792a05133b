"""Side by side: what masked adapters cost against LoRA and against the frozen backbone (issue 8).

In one run, on one batch shape, for (a) the frozen backbone with no adapter, backpropagated to the
input of its first block (the floor every adapter pays), (b) PEFT LoRA, (c) dense masked Partial-LoRA
(``adapter.compact=false``), (d) compact Partial-LoRA: the median training-step time (forward,
backward, AdamW step; the variants take turns, step by step, so that load on a shared machine hits
them alike), the step's peak memory above its starting level (CUDA's allocator peak, or on CPU the
torch profiler's allocation events), and the adapter's parameter + AdamW-state bytes. Then the ratio
derivation: wall time and evaluations of the fast search against the literal Algorithm 1, whose
evaluation count follows from the derived counts (``literal_evaluations``) and whose time is that
count times the time of one full evaluation measured on a sample of layers; the configured search against a
reference search (binary: O(log m) evaluations per layer), time and layer-by-layer counts, derived afresh in
the same run. Then the cost curves: derivation time against the derivation set's size, and training-step
time of LoRA and compact Partial-LoRA against the rank, and the four variants at kept shares of 0.5-60% of every
matrix's rows and columns (``--only shares``) against the line ``floor + share x (LoRA - floor)``, the step time of an
adapter whose cost scales with what it keeps. Last, the saved adapter's bytes per trained parameter in the compact
layout, PEFT's layout and for dense LoRA, at the same shares (``--only file-sizes``).

    python scripts/bench.py                                    # MiniLM, SST-2, CPU (make bench)
    python scripts/bench.py --backbone tiny_bert --steps 3     # a quick check
    python scripts/bench.py --only file-sizes                  # the file-size table alone (seconds, no timing)
    python scripts/bench.py --only shares --reuse-ratios       # the table across kept shares alone
    python scripts/bench.py --only sizes --sizes 64 512 3367   # the derivation's cost curve alone
    python scripts/bench.py --backbone clip_vit_b16 --device cuda --override backbone.pretrained=null
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch.nn.functional import cross_entropy
from torch.profiler import ProfilerActivity, profile

from partial_lora.adapters import PartialLoraConfig, count_parameters, get_partial_lora_model, save_partial_lora
from partial_lora.adapters.targets import targeted_linears
from partial_lora.config import register_resolvers
from partial_lora.layers import in_head
from partial_lora.pipeline import backbone_and_data, derive_for_run
from partial_lora.ratios import DerivedCounts, DerivationMetric, LayerCounts
from partial_lora.ratios.search import literal_evaluations
from partial_lora.settings import adapt
from partial_lora.training.optim import adamw

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ("floor", "lora", "dense", "compact")
SHARES = (0.005, 0.05, 0.15, 0.30, 0.60)  # kept shares of rows and columns: the paper's tickets keep 10-48%
LABELS = {"floor": "(a) frozen backbone", "lora": "(b) PEFT LoRA", "dense": "(c) masked, dense",
          "compact": "(d) masked, compact"}
Batch = dict[str, torch.Tensor]


def config(args: argparse.Namespace) -> DictConfig:
    register_resolvers()
    overrides = [f"backbone={args.backbone}", f"rank={args.rank}", "method=partial_lora", "importance=svd",
                 "ratios.progress=false", *args.override]
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    elif args.backbone.startswith("clip"):
        overrides.append("dataset=cifar10_fewshot")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench_")
    return cfg


def training_batch(cfg: DictConfig, tokenizer, size: int, length: int, device: str) -> Batch:
    """``size`` SST-2 (or the configured task's) training sentences padded to ``length`` tokens; random
    pixels for an image backbone (only the shapes matter for timing)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg.dataset.num_labels, (size,), generator=generator)
    if tokenizer is None:
        side = cfg.backbone.image_size
        return {"pixel_values": torch.randn(size, 3, side, side, generator=generator).to(device),
                "labels": labels.to(device)}
    from partial_lora.data.glue import load_glue_splits

    rows = load_glue_splits(cfg.dataset.task, cfg.data_dir)["train"].select(range(size))
    encoded = tokenizer(*(list(rows[field]) for field in cfg.dataset.text_fields), padding="max_length",
                        truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device),
            "labels": torch.tensor(list(rows["label"])).to(device)}


def frozen_floor(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """No adapter: only the head trains, and the first block's input asks for its gradient, so backward
    runs through every block as it must for any adapter of the first block."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if in_head(name, list(cfg.backbone.head_modules)):
            module.requires_grad_(True)

    def needs_grad(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, kwargs | {key: kwargs[key].detach().requires_grad_(True)}

    model.get_submodule(cfg.backbone.blocks)[0].register_forward_pre_hook(needs_grad, with_kwargs=True)
    return model


def build(variant: str, cfg: DictConfig, derived: DerivedCounts, device: str):
    """The model of one variant (the same random head for all: same seed) and its AdamW."""
    torch.manual_seed(cfg.seed)
    backbone, _ = backbone_and_data(cfg)
    if variant == "floor":
        model = frozen_floor(backbone.model, cfg)
    else:  # every masked method is LoRA's PEFT config plus masks
        variant_cfg = cfg.copy()
        with open_dict(variant_cfg):
            variant_cfg.adapter.compact = variant == "compact"
            if variant == "lora":
                variant_cfg.method.mask = None
        model = adapt(backbone.model, variant_cfg, counts=derived)
    model.to(device).train()
    optimizer = adamw(model, lr=1e-4, weight_decay=cfg.train.weight_decay)
    return model, backbone, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    cross_entropy(logits, batch["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_step_bytes(step: Callable[[], None], device: str) -> int:
    """Peak memory one step allocates above its starting level."""
    if device.startswith("cuda"):
        synchronize(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - start
    # The allocator's own events, in time order: each op's own allocations net of its frees, and frees.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    level = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        level += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, head_modules: list[str]) -> int:
    """Adapter parameters plus their AdamW state (moments and step counters); the head is common to all."""
    total = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not in_head(name, head_modules):
            total += parameter.nbytes
            total += sum(value.nbytes for value in optimizer.state.get(parameter, {}).values()
                         if isinstance(value, torch.Tensor))
    return total


def with_ratios(cfg: DictConfig, **settings) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.ratios.update(settings)
    return cfg


def derive(cfg: DictConfig, reuse: bool, time_evaluation: bool = True) -> tuple[DerivedCounts, float | None, int]:
    """The counts of ``cfg`` (derived afresh, into a fresh cache, unless ``reuse``), the time of one literal
    evaluation (None unless ``time_evaluation``) and the derivation set's size."""
    torch.manual_seed(cfg.seed)  # the head the probe starts from, as a run with this seed draws it
    backbone, datamodule = backbone_and_data(cfg)
    if not reuse:
        cfg = with_ratios(cfg, cache_dir=tempfile.mkdtemp(prefix="bench_ratios_"))
    derived = derive_for_run(cfg, backbone, datamodule)
    batches = datamodule.derivation_batches(cfg.ratios.fraction, cfg.ratios.max_examples, cfg.ratios.batch_size)
    examples = sum(len(batch["labels"]) for batch in batches)
    full = full_evaluation_seconds(backbone.model, cfg.backbone.target_modules, batches) if time_evaluation else None
    return derived, full, examples


def count_differences(derived: DerivedCounts, reference: DerivedCounts) -> list[str]:
    """One line per layer whose kept rows or columns differ between two derivations."""
    lines = []
    for name, counts in derived.counts.items():
        other = reference.counts[name]
        if (counts.k_row, counts.k_col) != (other.k_row, other.k_col):
            lines.append(f"    {name}: rows {other.k_row} -> {counts.k_row}, columns {other.k_col} -> {counts.k_col}")
    return lines


def full_evaluation_seconds(model: torch.nn.Module, target_modules: str, batches: list[Batch],
                            samples: int = 3) -> float:
    """Median time of one literal evaluation (whole model, whole derivation set, no replay or early stop),
    with a few rows of ``samples`` layers spread over the model zeroed in turn."""
    accuracy = DerivationMetric(model.eval(), batches)
    weights = {name: layer.weight for name, layer in targeted_linears(model, target_modules).items()}
    names = list(weights)
    times = []
    for name in names[:: max(1, len(names) // samples)][:samples]:
        weight = weights[name]
        saved = weight[:8].clone()
        with torch.no_grad():
            weight[:8] = 0
        started = time.perf_counter()
        accuracy(name, None)
        times.append(time.perf_counter() - started)
        with torch.no_grad():
            weight[:8] = saved
    return statistics.median(times)


def literal_count(derived: DerivedCounts, step: int) -> int:
    """Evaluations of the literal algorithm for the derived counts (plus the baseline)."""
    total = 1  # the baseline
    for name, counts in derived.counts.items():
        rows, cols = derived.scores[name].row.numel(), derived.scores[name].col.numel()
        total += literal_evaluations(rows, rows - counts.k_row, step)
        total += literal_evaluations(cols, cols - counts.k_col, step)
    return total


def median_step_times(models: dict[str, tuple], batch: Batch, warmup: int, steps: int, device: str) -> dict[str, float]:
    """Median training-step time of each model; the models take turns, step by step, so that load on a shared
    machine hits them alike."""
    times: dict[str, list[float]] = {variant: [] for variant in models}
    for round_index in range(warmup + steps):
        for variant, (model, _, optimizer) in models.items():
            synchronize(device)
            begin = time.perf_counter()
            train_step(model, optimizer, batch)
            synchronize(device)
            if round_index >= warmup:
                times[variant].append(time.perf_counter() - begin)
    return {variant: statistics.median(values) for variant, values in times.items()}


def measured(models: dict[str, tuple], batch: Batch, args: argparse.Namespace) -> dict[str, dict]:
    """Per variant: median step time (the variants taking turns), the step's peak memory, the adapter + AdamW bytes
    and the trainable adapter parameters (``None`` for the frozen floor)."""
    steps = median_step_times(models, batch, args.warmup, args.steps, args.device)
    rows = {}
    for variant, (model, backbone, optimizer) in models.items():
        gc.collect()
        rows[variant] = {
            "step": steps[variant],
            "peak": peak_step_bytes(lambda: train_step(model, optimizer, batch), args.device),
            "state": None if variant == "floor" else state_bytes(model, optimizer, backbone.head_modules),
            "params": None if variant == "floor" else count_parameters(model, backbone.head_modules).adapter,
        }
    return rows


def uniform_counts(derived: DerivedCounts, share: float) -> DerivedCounts:
    """``derived`` with every matrix keeping ``share`` of its rows and of its columns (at least one of each), chosen
    by the derivation's scores as its own counts would be."""
    return dataclasses.replace(derived, counts={
        name: LayerCounts(k_row=max(1, round(share * scores.row.numel())),
                          k_col=max(1, round(share * scores.col.numel())), evaluations=0)
        for name, scores in derived.scores.items()})


def share_table(cfg: DictConfig, derived: DerivedCounts, batch: Batch, args: argparse.Namespace,
                shares: tuple[float, ...] = SHARES) -> None:
    """The four variants at each kept share, all four built afresh and taking turns at every share, against the line
    ``floor + kept x (LoRA - floor)``, ``kept`` being compact's trainable parameters over LoRA's."""
    print(f"\ntraining step across kept shares (one uniform share of every matrix's rows and columns, the highest-scored "
          f"by {cfg.importance.name}; batch {args.batch_size}, median of {args.steps} steps; floor and LoRA measured "
          "beside each share; line = floor + kept x (LoRA - floor); goals: compact/line <= 1.10, compact/LoRA <= 1):")
    print(f"  {'share':>6} {'kept':>7} {'floor ms':>9} {'LoRA ms':>8} {'dense ms':>9} {'compact ms':>11} {'line ms':>8} "
          f"{'compact/line':>13} {'compact/LoRA':>13} | step peak MiB: {'floor':>6} {'LoRA':>6} {'dense':>6} "
          f"{'compact':>8} | adapter+AdamW KiB: {'LoRA':>7} {'dense':>7} {'compact':>8}")
    for share in shares:
        models = {variant: build(variant, cfg, uniform_counts(derived, share), args.device) for variant in VARIANTS}
        rows = measured(models, batch, args)
        del models
        gc.collect()
        floor, lora, dense, compact = (rows[variant] for variant in VARIANTS)
        kept = compact["params"] / lora["params"]
        line = floor["step"] + kept * (lora["step"] - floor["step"])
        peaks = " ".join(f"{rows[variant]['peak'] / 2**20:>{width}.1f}" for variant, width in zip(VARIANTS, (6, 6, 6, 8)))
        states = " ".join(f"{rows[variant]['state'] / 1024:>{width},.0f}"
                          for variant, width in zip(VARIANTS[1:], (7, 7, 8)))
        print(f"  {share:>6.1%} {kept:>7.2%} {1000 * floor['step']:>9.1f} {1000 * lora['step']:>8.1f} "
              f"{1000 * dense['step']:>9.1f} {1000 * compact['step']:>11.1f} {1000 * line:>8.1f} "
              f"{compact['step'] / line:>13.3f} {compact['step'] / lora['step']:>13.3f} | {'':15}{peaks} | "
              f"{'':19}{states}", flush=True)


def rank_curve(cfg: DictConfig, derived: DerivedCounts, batch: Batch, ranks: list[int], args: argparse.Namespace) -> None:
    """Training-step time of PEFT LoRA and compact Partial-LoRA (the derived counts) against the rank."""
    print(f"\ntraining step against rank (batch {args.batch_size}, median of {args.steps} steps):")
    print(f"  {'rank':>5} {'LoRA ms':>9} {'compact ms':>11} {'compact / LoRA':>15}")
    for rank in ranks:
        ranked = cfg.copy()
        with open_dict(ranked):
            ranked.rank = rank
        models = {variant: build(variant, ranked, derived, args.device) for variant in ("lora", "compact")}
        step = median_step_times(models, batch, args.warmup, args.steps, args.device)
        print(f"  {rank:>5} {1000 * step['lora']:>9.1f} {1000 * step['compact']:>11.1f} "
              f"{step['compact'] / step['lora']:>15.3f}", flush=True)
        del models
        gc.collect()


def size_curve(cfg: DictConfig, sizes: list[int], measured: DerivedCounts | None = None,
               measured_examples: int | None = None) -> None:
    """Derivation time and evaluations against the derivation set's size: the first ``size`` rows of the derivation
    pool (``ratios.fraction`` lifted to 1 so that sizes past the paper's 5% exist; below it, the same rows). ``measured``
    is the run at the configured size, reused rather than derived twice. ``seconds`` is the whole derivation (the
    probe's fit, importance scores, the search and the whole ticket's check); ``search s`` the search alone."""
    ratios = cfg.ratios
    print(f"\nratio derivation against derivation-set size ({cfg.importance.name}, rule {ratios.rule}, probe "
          f"{ratios.probe}, {ratios.search} search, scope {ratios.scope}; fresh cache each; read: the share of the "
          "set's examples the evaluations ran, the rest skipped by the early decision):")
    print(f"  {'examples':>8} {'evaluations':>12} {'seconds':>8} {'search s':>9} {'search s / evaluation':>22} "
          f"{'read':>7} {'kept rows+cols':>15}")
    for size in sizes:
        if measured is not None and size == cfg.ratios.max_examples:
            derived, examples = measured, measured_examples
        else:
            derived, _, examples = derive(with_ratios(cfg, max_examples=size, fraction=1.0), reuse=False,
                                          time_evaluation=False)
        read = derived.examples_evaluated / (derived.evaluations * examples)
        print(f"  {examples:>8} {derived.evaluations:>12,} {derived.wall_time_s:>8.1f} {derived.search_time_s:>9.1f} "
              f"{derived.search_time_s / derived.evaluations:>22.3f} {read:>7.1%} {derived.kept_fraction:>15.2%}",
              flush=True)


def file_size_table(cfg: DictConfig, shares: tuple[float, ...] = SHARES) -> None:
    """Bytes per trained parameter of the saved adapter file in the compact layout (what runs write), in PEFT's
    layout (``save_pretrained``) and for dense LoRA, with balanced masks that keep each share of every targeted
    matrix's rows and columns (one Bernoulli draw per row and column, so the kept share is about the share).
    The adapter alone: no head is saved. File sizes are deterministic; nothing is timed."""
    torch.manual_seed(cfg.seed)
    base = backbone_and_data(cfg)[0].model
    folder = Path(tempfile.mkdtemp(prefix="bench_files_"))
    lora = LoraConfig(r=cfg.rank, target_modules=cfg.backbone.target_modules)

    def saved(model: torch.nn.Module, name: str, save: Callable[[torch.nn.Module, Path], object]) -> tuple[int, int]:
        save(model, folder / name)
        return (folder / name / SAFETENSORS_WEIGHTS_NAME).stat().st_size, count_parameters(model, []).adapter

    lora_bytes, lora_params = saved(get_peft_model(copy.deepcopy(base), lora), "lora", PeftModel.save_pretrained)
    matrices = len(targeted_linears(base, lora.target_modules))
    print(f"\nadapter file bytes per trained parameter (rank {cfg.rank}, {matrices} matrices, float32, no head, "
          f"balanced masks of seed {cfg.seed}): dense LoRA {lora_bytes:,} bytes / {lora_params:,} = "
          f"{lora_bytes / lora_params:.2f}")
    print("  (B/p: file bytes per trained parameter; other: the compact file's bytes besides 4 per trained "
          "parameter: mask bits, tensor headers, metadata)")
    print(f"  {'share':>6} {'kept':>7} {'trained':>9} {'compact bytes':>14} {'compact B/p':>12} {'other':>8} "
          f"{'PEFT bytes':>11} {'PEFT B/p':>9} {'LoRA B/p':>9} {'compact/LoRA':>13}")
    for share in shares:
        model = get_partial_lora_model(copy.deepcopy(base), PartialLoraConfig(
            r=lora.r, target_modules=lora.target_modules, mode="balanced", sparsity=1 - share, seed=cfg.seed))
        compact_bytes, params = saved(model, f"compact_{share}", save_partial_lora)
        peft_bytes, _ = saved(model, f"peft_{share}", PeftModel.save_pretrained)
        print(f"  {share:>6.1%} {params / lora_params:>7.2%} {params:>9,} {compact_bytes:>14,} "
              f"{compact_bytes / params:>12.2f} {compact_bytes - 4 * params:>8,} {peft_bytes:>11,} "
              f"{peft_bytes / params:>9.2f} {lora_bytes / params:>9.2f} {compact_bytes / lora_bytes:>13.3f}",
              flush=True)
    shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--dataset", default=None, help="default: sst2 (text), cifar10_fewshot (clip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per example (text)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reuse-ratios", action="store_true", help="take cached counts instead of timing a derivation")
    parser.add_argument("--reference-search", default="binary",
                        help="derive again with this search and compare time and counts ('none': skip)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048, 3367, 4096],
                        help="derivation-set sizes of the cost curve, up to the paper's 3,367 on SST-2 and past it "
                             "(none: skip)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 4, 16, 64],
                        help="ranks of the step-time curve (none: skip)")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. backbone.pretrained=null")
    parser.add_argument("--only", choices=["file-sizes", "shares", "sizes"],
                        help="print this table alone: file-sizes (no timing), shares (its scores from the ratio "
                             "cache, derived there if absent) or sizes (the derivation's cost curve over --sizes)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        # Before the ratio derivation, which would run minutes on the CPU first.
        print(f"error: --device {args.device} needs a CUDA GPU and none is visible: use --device cpu.", file=sys.stderr)
        sys.exit(2)

    datasets.disable_progress_bars()
    cfg = config(args)
    if args.only == "file-sizes":
        file_size_table(cfg)
        return
    print(f"backbone {cfg.backbone.name} | dataset {cfg.dataset.name} | device {args.device} | "
          f"torch threads {torch.get_num_threads()} | rank {args.rank} | batch {args.batch_size}"
          + ("" if cfg.dataset.kind == "vision" else f" x {args.length} tokens"), flush=True)
    if args.only == "sizes":
        size_curve(cfg, args.sizes)
        return
    if args.only == "shares":
        derived = derive(cfg, reuse=True)[0]
        batch = training_batch(cfg, backbone_and_data(cfg)[0].tokenizer, args.batch_size, args.length, args.device)
        share_table(cfg, derived, batch, args)
        return
    started = time.perf_counter()
    derived, full_eval, examples = derive(cfg, args.reuse_ratios)
    derivation_wall = time.perf_counter() - started

    models = {variant: build(variant, cfg, derived, args.device) for variant in VARIANTS}
    tokenizer = models["floor"][1].tokenizer
    batch = training_batch(cfg, tokenizer, args.batch_size, args.length, args.device)
    rows = measured(models, batch, args)

    print(f"\n{'':22} {'step ms (median)':>17} {'step peak MiB':>14} {'adapter+AdamW KiB':>18} {'trainable':>10}")
    for variant, row in rows.items():
        state = "-" if row["state"] is None else f"{row['state'] / 1024:,.0f}"
        params = "-" if row["params"] is None else f"{row['params']:,}"
        print(f"{LABELS[variant]:22} {1000 * row['step']:>17.1f} {row['peak'] / 2**20:>14.1f} {state:>18} {params:>10}")
    compact, lora, floor = rows["compact"], rows["lora"], rows["floor"]
    param_ratio = compact["params"] / lora["params"]
    state_ratio = compact["state"] / lora["state"]
    print(f"\nstep time (d)/(b) = {compact['step'] / lora['step']:.3f}   (goal <= 0.90)")
    print(f"step time (d)/(a) = {compact['step'] / floor['step']:.3f}   (goal <= 1.05)")
    print(f"step time (c)/(b) = {rows['dense']['step'] / lora['step']:.3f}")
    print(f"step peak (d)/(b) = {compact['peak'] / max(lora['peak'], 1):.3f}")
    relative = f"{state_ratio / param_ratio:.3f}x" if param_ratio else "n/a (nothing trains)"
    print(f"adapter+AdamW bytes (d)/(b) = {state_ratio:.4f} vs trainable parameters (d)/(b) = {param_ratio:.4f}: "
          f"{relative} (goal <= 1.1)")

    fast = derived.evaluations
    literal = literal_count(derived, cfg.ratios.step)
    timed = f"cached: {derived.path}" if derived.cache_hit else "this run"
    print(f"\nratio derivation ({cfg.importance.name}, {len(derived.counts)} matrices, rule {cfg.ratios.rule}, threshold "
          f"{cfg.ratios.threshold}, {examples} examples): baseline accuracy {derived.baseline_accuracy:.3f}, "
          f"majority rate {derived.majority_rate:.3f}, kept rows+cols {derived.kept_fraction:.2%}")
    print(f"  fast search ({cfg.ratios.search}): {fast:,} evaluations, {derived.wall_time_s:.1f} s ({timed}; "
          f"with model loading {derivation_wall:.1f} s)")
    print(f"  literal Algorithm 1: {literal:,} evaluations x {full_eval:.3f} s per full evaluation "
          f"(median of a sample of layers) = {literal * full_eval:,.0f} s (estimated)")
    print(f"  evaluations literal / fast = {literal / fast:.1f}x (goal >= 50); time literal / fast = "
          f"{literal * full_eval / derived.wall_time_s:.1f}x; fast wall time goal < 60 s")
    if args.reference_search != "none" and not args.reuse_ratios:
        reference, _, _ = derive(with_ratios(cfg, search=args.reference_search), reuse=False)
        print(f"  reference search ({args.reference_search}): {reference.evaluations:,} evaluations, "
              f"{reference.wall_time_s:.1f} s; time {args.reference_search} / {cfg.ratios.search} = "
              f"{reference.wall_time_s / derived.wall_time_s:.1f}x (goal >= 5)")
        differences = count_differences(derived, reference)
        print(f"  layers whose counts differ ({args.reference_search} -> {cfg.ratios.search}): {len(differences)} "
              f"of {len(derived.counts)}; kept rows+cols {reference.kept_fraction:.2%} -> {derived.kept_fraction:.2%}")
        print("\n".join(differences))
    if args.sizes and not args.reuse_ratios:
        size_curve(cfg, args.sizes, derived, examples)
    del models
    gc.collect()
    if args.ranks:
        rank_curve(cfg, derived, batch, args.ranks, args)
    share_table(cfg, derived, batch, args)
    file_size_table(cfg)


if __name__ == "__main__":
    main()
