"""The paper's protocol (SPEC 5): which runs a table or figure needs, and how they are launched."""

from partial_lora.protocol.sweep import Checkout, Protocol, compose_target, launch, launched_run_id, planned_multiruns

__all__ = ["Checkout", "Protocol", "compose_target", "launch", "launched_run_id", "planned_multiruns"]
