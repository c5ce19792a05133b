"""Datasets as Lightning data modules: train, held-out validation (checkpoint selection) and test splits."""

from partial_lora.data.base import SplitDataModule
from partial_lora.data.glue import GlueDataModule, load_glue_splits
from partial_lora.data.vision import VisionDataModule, few_shot_split

__all__ = ["GlueDataModule", "SplitDataModule", "VisionDataModule", "few_shot_split", "load_glue_splits"]
