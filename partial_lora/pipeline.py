"""One run, end to end: config -> backbone -> importance -> ratios -> masks -> adapted model -> Lightning fit
-> run record."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from partial_lora.adapters import ParameterCounts, count_parameters, residual_norms, save_partial_lora
from partial_lora.backbones import Backbone, build_backbone
from partial_lora.config import validate, validate_max_length
from partial_lora.data import GlueDataModule, SplitDataModule, VisionDataModule
from partial_lora.dry_run import dry_run
from partial_lora.errors import DataError, RunInterrupted, TrainingDiverged
from partial_lora.ratios import DerivedCounts, derive_counts
from partial_lora.results import (LAST_CHECKPOINT, RunSlot, config_hash, environment, portable_config, portable_path,
                                  write_record)
from partial_lora.files import no_space_reported
from partial_lora.methods.base import Method
from partial_lora.settings import derivation_settings, method_of, yaml_terms
from partial_lora.training import ClassificationModule, FiniteLoss, RngState, RunClock, SigtermCheckpoint, TrainingCost


def backbone_and_data(cfg: DictConfig) -> tuple[Backbone, SplitDataModule]:
    """Text backbones tokenise the data; image backbones need the data's class names for their head."""
    loader = {"batch_size": cfg.train.batch_size, "data_seed": cfg.data_seed, "num_workers": cfg.train.num_workers}
    if cfg.dataset.kind == "vision":
        datamodule = VisionDataModule(cfg.dataset, cfg.backbone.image_size, cfg.data_dir, **loader)
        return build_backbone(cfg.backbone, cfg.dataset.num_labels, datamodule.class_names()), datamodule
    backbone = build_backbone(cfg.backbone, num_labels=cfg.dataset.num_labels)
    return backbone, GlueDataModule(cfg.dataset, backbone.tokenizer, cfg.data_dir, **loader)


def derive_for_run(cfg: DictConfig, backbone: Backbone, datamodule: SplitDataModule) -> DerivedCounts:
    """The counts of a masked run (SPEC 4), derived on the backbone before adapters are added and cached under
    ``ratios.cache_dir``."""
    ratios = cfg.ratios
    batches = datamodule.derivation_batches(ratios.fraction, ratios.max_examples, ratios.batch_size)
    if not batches:
        raise DataError("the derivation set is empty: raise ratios.max_examples or dataset.derivation_fraction.")
    settings, source = derivation_settings(cfg)
    probe_batches = None
    if settings.probes_held_out:
        probe_batches = datamodule.probe_batches(ratios.fraction, ratios.max_examples, ratios.probe_examples,
                                                 ratios.batch_size)
    return derive_counts(backbone.model, batches, settings, probe_batches=probe_batches, cache_dir=ratios.cache_dir,
                         source=source)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train and test one model as configured; return its record (``None`` for ``dry_run``, which prints the
    parameter counts of a model built from shapes alone: see ``dry_run.py``).

    A run that already has a record returns it untrained, one that another process is training
    returns ``None``, and a half-finished one resumes from its last checkpoint (see ``results/store.py``).
    """
    if cfg.dry_run:
        return dry_run(cfg)
    validate(cfg)
    slot = RunSlot(config_hash(OmegaConf.to_container(cfg, resolve=True)), Path(cfg.results_dir),
                   Path(cfg.checkpoint.dir))
    if rank_zero_only.rank != 0:  # a DDP worker (SLURM task or Lightning-launched): rank 0 holds the lock
        return slot.record() or _run(cfg, slot)
    with slot.claim() as claimed:
        if not claimed:
            print(f"run {slot.run_id} is being trained by another process (lock {slot.lock_file}): skipped")
            return None
        record = slot.record()
        if record is not None:
            print(f"run {slot.run_id} already has a {record['status']} record: {record['path']} (skipped)")
            return record
        with no_space_reported(f"the run's checkpoints ({slot.checkpoints}) or outputs ({cfg.output_dir})"):
            return _run(cfg, slot)


@dataclass
class Build:
    """What a run trains: the adapted model in its Lightning module, with what it was built from."""

    backbone: Backbone
    datamodule: SplitDataModule
    method: Method
    module: ClassificationModule
    params: ParameterCounts  # trainable before training (AdaLoRA prunes while training)
    masks: dict[str, Any] | None  # the record's ``masks``


@dataclass
class Fit:
    """How training ended: its trainer and the callbacks the record reads; the test metrics, or why it failed."""

    trainer: L.Trainer
    best: ModelCheckpoint
    cost: TrainingCost
    test: dict[str, float] | None
    failure: TrainingDiverged | None


def _run(cfg: DictConfig, slot: RunSlot) -> dict[str, Any] | None:
    """Build, fit, record; ``None`` where this process writes no record (a DDP worker, a requeued job)."""
    clock = RunClock()  # first: the run's time includes building the backbone and deriving counts
    L.seed_everything(cfg.seed, workers=True)
    build = _build(cfg)
    fit = _fit(cfg, slot, build, clock)
    if fit is None or not fit.trainer.is_global_zero:  # under DDP one process writes the adapter and the record
        return None
    return _record(cfg, slot, build, fit, clock)


def _build(cfg: DictConfig) -> Build:
    """Backbone and data, the derived counts where the method reads them, the adapted model."""
    backbone, datamodule = backbone_and_data(cfg)
    method = method_of(cfg)
    with yaml_terms():  # the core's checks of what it is given, about the keys this run set
        method.validate_model(backbone.model)  # needs the built model: before any training data, derivation or step
        validate_max_length(cfg, backbone.model)
        total_steps = None
        if method.needs_total_steps:
            total_steps = datamodule.steps_per_epoch() * cfg.train.epochs
            if cfg.trainer.max_steps > 0:
                total_steps = min(total_steps, cfg.trainer.max_steps)
        derived = derive_for_run(cfg, backbone, datamodule) if method.derives_counts else None
        model = method.adapt(backbone.model, total_steps, derived)
    module = ClassificationModule(model, num_labels=cfg.dataset.num_labels, metric=cfg.dataset.metric,
                                  optimizer=method.optimizer())
    return Build(backbone, datamodule, method, module, count_parameters(model, backbone.head_modules),
                 method.mask_summary(model, derived))


def _fit(cfg: DictConfig, slot: RunSlot, build: Build, clock: RunClock) -> Fit | None:
    """Train (resuming from the slot's last checkpoint) and test the best checkpoint; ``None`` where submitit
    requeues the job."""
    checkpoint = ModelCheckpoint(dirpath=slot.checkpoints, monitor="val/metric", mode="max", save_top_k=1)
    # Lightning's save_last only follows improvements of the monitored metric: resuming needs every epoch.
    latest = ModelCheckpoint(dirpath=slot.checkpoints, filename=LAST_CHECKPOINT.removesuffix(".ckpt"), save_top_k=1)
    logger = instantiate(cfg.logger) if cfg.logger else False
    # Training strategies (CoTo) and methods with their own schedule (LoSiA, AdaLoRA) bring callbacks; CoTo's
    # comes before AdaLoRA's, which reads the gradients it completes.
    strategy = [instantiate(cfg.strategy.callback)] if cfg.strategy.callback else []
    stopped = SigtermCheckpoint(slot.checkpoints / LAST_CHECKPOINT)
    # Last: a step's time then holds what the method does after the optimiser step (AdaLoRA's reallocation,
    # LoSiA's re-localisation).
    cost = TrainingCost()
    callbacks = [checkpoint, latest, RngState(), clock, FiniteLoss(), stopped, *strategy, *build.method.callbacks(),
                 cost]
    # A step limit inside the first epoch would end training before any validation, with no best checkpoint
    # to test: validate at the limit instead.
    within_first_epoch = 0 < cfg.trainer.max_steps < build.datamodule.steps_per_epoch()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                     **({"val_check_interval": cfg.trainer.max_steps} if within_first_epoch else {}))
    if logger:
        logger.log_hyperparams({"params/adapter": build.params.adapter, "params/head": build.params.head})
    # Shapes as checkpoints hold them: a compact layer's state dict has full-shaped factors (adapters/compact.py).
    state = build.module.state_dict()
    resume = slot.resume_from({name: state[name].shape for name, parameter in build.module.named_parameters()
                               if parameter.requires_grad})
    if resume is not None:
        print(f"resuming run {slot.run_id} from {resume}")
    try:
        with warnings.catch_warnings():
            # The train loader's position travels in the datamodule's state (data/base.py, ResumableLoader), which
            # Lightning's warning about a mid-epoch checkpoint and a loader without state_dict does not know.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(build.module, datamodule=build.datamodule, ckpt_path=resume)
    except TrainingDiverged as failure:
        return Fit(trainer, checkpoint, cost, None, failure)
    except SIGTERMException:
        if stopped.requeue():  # under submitit: the job is requeued and this process exits
            return None
        where = (f"its checkpoint {stopped.path} resumes it" if stopped.saved
                 else f"its last epoch's checkpoint {stopped.path} resumes it" if stopped.path.is_file()
                 else "it starts over")
        raise RunInterrupted(f"run {slot.run_id} was stopped by SIGTERM at step {trainer.global_step} (epoch "
                             f"{trainer.current_epoch}); {where} when the same command is launched again.") from None
    try:
        (test,) = trainer.test(build.module, datamodule=build.datamodule, ckpt_path="best")
    except SIGTERMException:
        raise RunInterrupted(f"run {slot.run_id} was stopped by SIGTERM while testing; its training is done, and "
                             "launching the same command again tests it.") from None
    return Fit(trainer, checkpoint, cost, test, None)


def _record(cfg: DictConfig, slot: RunSlot, build: Build, fit: Fit, clock: RunClock) -> dict[str, Any]:
    """The run's record (failed or finished), written to the store, and the adapter file of a finished run."""
    # A strategy makes another method of the protocol: "lora+coto" is aggregated apart from "lora".
    method = cfg.method.name if cfg.strategy.name == "none" else f"{cfg.method.name}+{cfg.strategy.name}"
    identity = {"run_id": slot.run_id, "config": portable_config(OmegaConf.to_container(cfg, resolve=True)),
                "seed": cfg.seed, "backbone": cfg.backbone.name, "dataset": cfg.dataset.name, "method": method,
                "rank": cfg.rank, "lr": cfg.lr}
    name = f"{cfg.backbone.name}_{cfg.dataset.name}_{method}_r{cfg.rank}_s{cfg.seed}_{slot.run_id}"
    if fit.failure is not None:
        record = identity | {"status": "failed", "reason": str(fit.failure), "step": fit.failure.step,
                             **clock.record_fields(), "environment": environment()}
        record["path"] = _store(cfg, slot, record, name)
        print(f"\nrun {slot.run_id} failed: {fit.failure}\nrun record: {record['path']}")
        return record
    model, trainer = build.module.model, fit.trainer
    adapter_file = None
    if build.method.peft_adapter:  # the best checkpoint's adapter, as loaded by trainer.test, compact
        adapter_file = save_partial_lora(model, Path(cfg.output_dir) / "adapter")

    # AdaLoRA prunes ranks while training: the paper reports what is left at the end.
    final_counts = count_parameters(model, build.backbone.head_modules)
    record = identity | {
        "status": "finished",
        "params": final_counts.as_dict(),
        "params_initial": build.params.as_dict(),
        "masks": build.masks,
        "residual_norms": residual_norms(model),
        "adapter_file": None if adapter_file is None else portable_path(adapter_file),
        "adapter_bytes": None if adapter_file is None else adapter_file.stat().st_size,
        "metric": cfg.dataset.metric,
        "majority_rates": build.datamodule.majority_rates(),  # chance for accuracy: whether the task was learned
        "best_val": 100 * float(fit.best.best_model_score),
        "test": 100 * float(fit.test["test/metric"]),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        **clock.record_fields(),
        **fit.cost.record_fields(),
        "environment": environment(),
    }
    if trainer.logger:
        trainer.logger.log_metrics({"record/best_val": record["best_val"], "record/test": record["test"]})
    record["path"] = path = _store(cfg, slot, record, name)
    print(
        f"\n{cfg.dataset.name} | {method} (rank {cfg.rank}) | trainable adapter parameters "
        f"{final_counts.adapter:,} of {final_counts.unmasked_adapter:,} unmasked (+{final_counts.head:,} head) | "
        f"{cfg.dataset.get('reported_split', 'test')} {cfg.dataset.metric} {record['test']:.2f} "
        f"(best val {record['best_val']:.2f}) | {record['wall_time_s']:.0f} s\nrun record: {path}"
    )
    return record


def _store(cfg: DictConfig, slot: RunSlot, record: dict[str, Any], name: str) -> str:
    """Write the record; its checkpoints have then served resumption (``checkpoint.keep`` keeps them)."""
    path = write_record(record, cfg.results_dir, name)
    if not cfg.checkpoint.keep:
        slot.discard_checkpoints()
    return str(path)
