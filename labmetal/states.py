"""Ironic's node states and the verbs that move a node between them (DESIGN §3).

A verb either changes the state at once (no hardware involved) or puts the node in an
in-progress state with a target and a pending action for its conductor.
"""
from __future__ import annotations

from dataclasses import dataclass

ENROLL = "enroll"
VERIFYING = "verifying"
MANAGEABLE = "manageable"
CLEANING = "cleaning"
CLEAN_FAILED = "clean failed"
AVAILABLE = "available"
INSPECT_FAILED = "inspect failed"

POWER_ON = "power on"
POWER_OFF = "power off"
REBOOTING = "rebooting"
SOFT_POWER_OFF = "soft power off"
SOFT_REBOOTING = "soft rebooting"
POWER_ERROR = "error"

# What the API accepts in PUT /states/power, and the target_power_state shown meanwhile.
POWER_TARGETS: dict[str, str] = {
    POWER_ON: POWER_ON,
    POWER_OFF: POWER_OFF,
    REBOOTING: POWER_ON,
    SOFT_POWER_OFF: POWER_OFF,
    SOFT_REBOOTING: POWER_ON,
}


@dataclass(frozen=True)
class Transition:
    state: str  # the node's state as soon as the verb is accepted
    target: str | None = None  # target_provision_state while the conductor works; None = done
    action: str | None = None  # the conductor's pending action


PROVISION_VERBS: dict[tuple[str, str], Transition] = {
    (ENROLL, "manage"): Transition(VERIFYING, MANAGEABLE, "verify"),
    (MANAGEABLE, "provide"): Transition(CLEANING, AVAILABLE, "clean"),
    (AVAILABLE, "manage"): Transition(MANAGEABLE),
    (CLEAN_FAILED, "manage"): Transition(MANAGEABLE),
    (INSPECT_FAILED, "manage"): Transition(MANAGEABLE),
}

# Where a node may be deleted without putting it in maintenance first.
DELETABLE = {ENROLL, MANAGEABLE, AVAILABLE, CLEAN_FAILED, INSPECT_FAILED}

# Where a failed or interrupted action leaves the node.
FAILURE_STATE = {VERIFYING: ENROLL, CLEANING: CLEAN_FAILED}


def allowed_verbs(state: str) -> list[str]:
    return sorted(verb for (from_state, verb) in PROVISION_VERBS if from_state == state)


def transition(state: str, verb: str) -> Transition | None:
    return PROVISION_VERBS.get((state, verb))
