"""Run records (one JSON file per run) and, later, their aggregation into the paper's tables."""

from partial_lora.files import write_record
from partial_lora.results.record import config_hash, environment, portable_config, portable_path
from partial_lora.results.store import LAST_CHECKPOINT, RunSlot

__all__ = ["LAST_CHECKPOINT", "RunSlot", "config_hash", "environment", "portable_config", "portable_path",
           "write_record"]
