"""The paper's protocol (SPEC 5): which runs a table or figure needs, and how they are launched."""

from partial_lora.protocol.sweep import (Protocol, compose_target, launch, planned_multiruns, select_runs,
                                         training_budget)

__all__ = ["Protocol", "compose_target", "launch", "planned_multiruns", "select_runs", "training_budget"]
