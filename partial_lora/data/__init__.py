"""Datasets as Lightning data modules: train, held-out validation (checkpoint selection) and test splits."""

from partial_lora.data.glue import GlueDataModule, load_glue_splits

__all__ = ["GlueDataModule", "load_glue_splits"]
