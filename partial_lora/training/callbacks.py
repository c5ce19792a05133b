"""Callbacks that adapters and reliable runs need from the training loop."""

from __future__ import annotations

import os
import random
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from partial_lora.adapters.losia import SubnetLinear, subnet_layers
from partial_lora.layers import group_by_block
from partial_lora.errors import ConfigError, TrainingDiverged


class AdaLoraBudget(L.Callback):
    """AdaLoRA's rank reallocation after every optimiser step, while gradients are still there.

    Lightning zeroes gradients at the start of the next step, so the end of a training batch sits
    between ``optimizer.step()`` and ``zero_grad()`` as PEFT's ``update_and_allocate`` requires.

    The allocator's importance averages and the final rank pattern live outside the model's state dict,
    so they travel in the checkpoint as this callback's state: a resumed run allocates as an
    uninterrupted one would, and one resumed after its last step counts its pruned ranks as one would.
    """

    def __init__(self) -> None:
        self.adalora: Any = None
        self.restored: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.adalora = pl_module.model.base_model

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.adalora.update_and_allocate(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        allocator = self.adalora.rankallocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The rank pattern tells the parameter count that ranks were pruned. It is set at once: a fit resumed
        # after its last step never calls on_train_start, and a test of the best checkpoint loads its own.
        self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]
        self.restored = state  # the allocator's tensors go where the model will be: in on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is None:
            return
        allocator = self.adalora.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {name: value.to(pl_module.device) for name, value in self.restored[key].items()})
        self.restored = None


class FiniteLoss(L.Callback):
    """Stop at the first NaN or infinite training loss, before it reaches the weights.

    Lightning's ``EarlyStopping(check_finite=True)`` only looks at epoch ends and stops quietly; a run
    record must say that, and at which step, the run failed.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss).all())
        # Under DDP every process stops at the same step, whichever saw the non-finite loss.
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            became = "became non-finite in another process" if finite else f"became {loss.item()}"
            raise TrainingDiverged(f"the training loss {became} at step {trainer.global_step}; "
                                   "a smaller lr usually avoids it.", step=trainer.global_step)


class SigtermCheckpoint(L.Callback):
    """On SIGTERM, save ``path`` (the run's ``last.ckpt``) at the step the fit stopped at, so a relaunch resumes
    there, mid-epoch, as if never stopped (the train loader's position travels too: ``ResumableLoader``).

    Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary, where optimiser, scheduler and
    loop states agree; a stop inside validation keeps the previous ``last.ckpt`` (the validation metric's partial
    state is in no checkpoint), and the relaunch redoes that epoch.

    Under submitit on SLURM (``SUBMITIT_EXECUTOR=slurm``) submitit's own signal (USR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise), sent before a time limit or preemption, stops the fit the same
    way; :meth:`requeue` then hands over to submitit's handler, which resubmits the job (Hydra's submitit launcher
    is checkpointable) and exits, and the requeued job resumes from this checkpoint.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved = False
        self.requeue_signal: int | None = None
        self.submitit_handler: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return
        from submitit import JobEnvironment

        self.requeue_signal = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")
        self.submitit_handler = signal.signal(self.requeue_signal, self._stop_at_next_batch)

    @staticmethod
    def _stop_at_next_batch(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM handler ends the fit at the next batch boundary

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not trainer.validating:
            trainer.save_checkpoint(self.path)
            self.saved = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.requeue_signal is not None:
            signal.signal(self.requeue_signal, self.submitit_handler)

    def requeue(self) -> bool:
        """Let submitit requeue the job (it exits the process); ``False`` outside submitit."""
        if self.submitit_handler is None:
            return False
        self.submitit_handler(self.requeue_signal, None)
        return True


class RngState(L.Callback):
    """Save the global random generators in every checkpoint and restore them on resume.

    Lightning checkpoints hold model, optimiser, scheduler and loop state but not the generators that
    draw dropout and the next epoch's shuffling, so without this a resumed run takes a different path
    from an uninterrupted one. Stored as tensors and lists so the checkpoint loads with ``weights_only``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunClock(L.Callback):
    """A run's wall time summed over its resumptions: each checkpoint holds the time spent so far.

    Lightning's ``Timer`` carries only the fit loop's time across a resume, not the setup before it
    (building the backbone, deriving counts: minutes at paper scale), and the protocol's compute report
    needs the whole run. What a segment did after its last checkpoint is lost with it; the next segment redoes
    that work and counts it.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()  # made when this process begins the run
        self.carried = 0.0  # earlier segments' time, up to the checkpoint resumed from
        self.stage: str | None = None

    def elapsed(self) -> float:
        return self.carried + time.perf_counter() - self.started

    def record_fields(self) -> dict[str, float]:
        """The run record's times: the total, and the part of it earlier segments spent (0 if never resumed)."""
        return {"wall_time_s": self.elapsed(), "wall_time_carried_s": self.carried}

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stage = stage  # called before the trainer restores a checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # trainer.test(ckpt_path="best") restores callback states too: only a resumed fit carries time over.
        if self.stage == "fit":
            self.carried = float(state["elapsed_s"])


class TrainingCost(L.Callback):
    """What a fit costs per step: the median wall time of a training step and the peak memory, for the run record.

    A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward and optimiser step,
    not the loader's fetch of the batch. A callback rather than a profiler (Lightning's ``SimpleProfiler``, PyTorch's
    profiler): a profiler is a trainer setting, so turning it on would enter the config and change every run's id,
    and it instruments every hook and writes reports; this times one interval and is always on. On CUDA each end
    synchronises, so the interval holds the step's kernels and not only their launch.

    Peak memory (``peak_memory_kind`` says which): on CUDA, ``torch.cuda.max_memory_allocated`` over the fit (the
    tensors' peak, reset when training starts); on CPU, the process's peak resident set from
    ``resource.getrusage``, which the kernel never resets: it covers everything the process did before, the
    backbone's loading and, under a multirun launched in one process, the earlier runs.

    A resumed fit times the steps of its last segment only: a median needs no earlier steps to stand."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.started: float | None = None
        self.cuda: torch.device | None = None
        self.peak_cuda_bytes: int | None = None

    def _now(self) -> float:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        return time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.cuda = trainer.strategy.root_device if trainer.strategy.root_device.type == "cuda" else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cuda is not None:
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.started = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.step_times.append(self._now() - self.started)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cuda is not None:  # read here: testing the best checkpoint afterwards allocates too
            self.peak_cuda_bytes = torch.cuda.max_memory_allocated(self.cuda)

    def record_fields(self) -> dict[str, Any]:
        """``step_time_s`` (median over the timed steps; ``None`` when the fit took none), ``peak_memory_bytes``
        and ``peak_memory_kind`` (``cuda_max_allocated`` or ``cpu_max_rss``, see the class docstring)."""
        step_time = statistics.median(self.step_times) if self.step_times else None
        if self.cuda is not None:  # no peak where the fit trained nothing (resumed after its last step)
            return {"step_time_s": step_time, "peak_memory_bytes": self.peak_cuda_bytes,
                    "peak_memory_kind": "cuda_max_allocated"}
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"step_time_s": step_time, "peak_memory_kind": "cpu_max_rss",
                "peak_memory_bytes": max_rss if sys.platform == "darwin" else 1024 * max_rss}  # Linux counts KiB


class SubnetRelocalization(L.Callback):
    """LoSiA's asynchronous, periodic subnet re-localisation, one transformer block at a time.

    Training is cut into time slots of ``period`` steps; slot ``s`` belongs to block ``s mod B`` (``B``
    blocks of ``backbone.blocks``; adapted layers outside every block form one more group). During its
    slot a block's layers record sensitivity; at the slot's end they re-localise their subnets, their
    AdamW state is dropped (the old moments belong to other weights) and their learning rate re-warms
    linearly over the next ``period`` steps, on top of the run's cosine schedule. Each layer has its own
    parameter group for this (``partial_lora.training.optim.adamw_per_tensor``).

    Checkpoints keep the merged weights, subnet indices and folded changes of every layer (under ``"losia"``)
    next to the trainable deltas, so that testing the best checkpoint restores the weights it was scored with.
    """

    def __init__(self, period: int, blocks: str | None) -> None:
        if not isinstance(period, int) or period < 1:
            raise ConfigError(f"method.losia.period must be an integer >= 1, got {period!r}.")
        self.period, self.blocks = period, blocks or ""
        self.layers: dict[str, SubnetLinear] = {}
        self.groups: list[list[SubnetLinear]] = []
        self.relocalized_at: dict[int, int] = {}  # id(layer.delta_block) -> global step of its last re-localisation
        self.trainer: L.Trainer | None = None
        self._hooks: list[Any] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.layers = subnet_layers(pl_module.model)
        if not self.layers:
            raise ConfigError("the LoSiA callback needs LoSiA layers (method=losia).")
        self.groups = [[self.layers[name] for name in names]
                       for names in group_by_block(list(self.layers), self.blocks)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = trainer
        optimizer = trainer.optimizers[0]
        self._hooks = [optimizer.register_step_pre_hook(self._warm), optimizer.register_step_post_hook(self._unwarm)]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        recording = self.recording_group(trainer.global_step)
        for index, group in enumerate(self.groups):
            for layer in group:
                layer.recording = index == recording

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # steps taken so far
        if step % self.period:
            return
        optimizer = trainer.optimizers[0]
        for layer in self.groups[self.recording_group(step - 1)]:
            if layer.relocalize():
                optimizer.state.pop(layer.delta_block, None)
                self.relocalized_at[id(layer.delta_block)] = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in self.layers.values():
            layer.recording = False
        for hook in self._hooks:
            hook.remove()

    def recording_group(self, step: int) -> int:
        """The group whose slot holds ``step`` (0-based)."""
        return (step // self.period) % len(self.groups)

    def warm_factor(self, parameter: torch.Tensor, step: int) -> float:
        """Learning-rate factor at ``step`` for a layer's delta: ``(steps since re-localisation + 1) / period``,
        at most 1."""
        since = self.relocalized_at.get(id(parameter))
        return 1.0 if since is None else min(1.0, (step - since + 1) / self.period)

    def _warm(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            factor = self.warm_factor(group["params"][0], self.trainer.global_step)
            if factor < 1:
                group["unwarmed_lr"] = group["lr"]
                group["lr"] = group["lr"] * factor

    def _unwarm(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The cosine scheduler updates each group's lr from its previous value: hand it the unwarmed one.
        for group in optimizer.param_groups:
            if "unwarmed_lr" in group:
                group["lr"] = group.pop("unwarmed_lr")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["losia"] = {name: {"weight": layer.base_layer.weight.detach().clone(), "rows": layer.rows.clone(),
                                      "cols": layer.cols.clone(), "folded_indices": layer.folded.indices().clone(),
                                      "folded_values": layer.folded.values().clone()}
                               for name, layer in self.layers.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        with torch.no_grad():
            for name, state in checkpoint.get("losia", {}).items():
                layer = self.layers[name]
                layer.base_layer.weight.copy_(state["weight"])
                layer.rows.copy_(state["rows"])
                layer.cols.copy_(state["cols"])
                layer.folded = torch.sparse_coo_tensor(state["folded_indices"], state["folded_values"],
                                                       layer.folded.shape, check_invariants=True).coalesce()
