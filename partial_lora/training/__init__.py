"""Lightning training: one module for every backbone and adapter."""

from partial_lora.training.callbacks import FiniteLoss, RngState, RunClock, SigtermCheckpoint, TrainingCost
from partial_lora.training.module import ClassificationModule

__all__ = ["ClassificationModule", "FiniteLoss", "RngState", "RunClock", "SigtermCheckpoint", "TrainingCost"]
