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

from partial_lora.errors import SIGTERM_PENDING, TrainingDiverged
# conf/method/losia.yaml names LoSiA's callback by this path, which every LoSiA run id holds; it lives with its method.
from partial_lora.methods.losia import SubnetRelocalization  # noqa: F401


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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if SIGTERM_PENDING.is_set():  # a SIGTERM from before Lightning's handler whose stop was swallowed (errors.py)
            raise SIGTERMException

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
