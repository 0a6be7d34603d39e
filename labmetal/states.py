"""Ironic's node states and the verbs that move a node between them (DESIGN §3).

A verb either changes the state at once (no hardware involved) or puts the node in an
in-progress state with a target and a pending action for its conductor. States whose name
ends in "wait" are waiting for the deploy agent, without a lock.
"""
from __future__ import annotations

from dataclasses import dataclass

ENROLL = "enroll"
VERIFYING = "verifying"
MANAGEABLE = "manageable"
CLEANING = "cleaning"
CLEAN_WAIT = "clean wait"
CLEAN_FAILED = "clean failed"
AVAILABLE = "available"
DEPLOYING = "deploying"
DEPLOY_WAIT = "wait call-back"
DEPLOY_FAILED = "deploy failed"
ACTIVE = "active"
DELETING = "deleting"
INSPECTING = "inspecting"
INSPECT_WAIT = "inspect wait"
INSPECT_FAILED = "inspect failed"
# labmetal's own: a reference PC's disk read into a new image (not an Ironic state).
CAPTURING = "capturing"
CAPTURE_WAIT = "capture wait"

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


_DEPLOY = Transition(DEPLOYING, ACTIVE, "deploy")
_UNDEPLOY = Transition(DELETING, AVAILABLE, "undeploy")
_INSPECT = Transition(INSPECTING, MANAGEABLE, "inspect")

PROVISION_VERBS: dict[tuple[str, str], Transition] = {
    (ENROLL, "manage"): Transition(VERIFYING, MANAGEABLE, "verify"),
    (MANAGEABLE, "provide"): Transition(CLEANING, AVAILABLE, "clean"),
    (AVAILABLE, "manage"): Transition(MANAGEABLE),
    (CLEAN_FAILED, "manage"): Transition(MANAGEABLE),
    (INSPECT_FAILED, "manage"): Transition(MANAGEABLE),
    (MANAGEABLE, "inspect"): _INSPECT,
    (INSPECT_FAILED, "inspect"): _INSPECT,
    (AVAILABLE, "active"): _DEPLOY,
    (AVAILABLE, "deploy"): _DEPLOY,
    (DEPLOY_FAILED, "active"): _DEPLOY,
    (DEPLOY_FAILED, "deploy"): _DEPLOY,
    (ACTIVE, "rebuild"): _DEPLOY,
    (ACTIVE, "deleted"): _UNDEPLOY,
    (ACTIVE, "undeploy"): _UNDEPLOY,
    (DEPLOY_FAILED, "deleted"): _UNDEPLOY,
    (DEPLOY_FAILED, "undeploy"): _UNDEPLOY,
    (CLEAN_FAILED, "provide"): Transition(CLEANING, AVAILABLE, "clean"),
    (DEPLOY_WAIT, "abort"): Transition(DEPLOY_FAILED),
    (INSPECT_WAIT, "abort"): Transition(INSPECT_FAILED),
    (CLEAN_WAIT, "abort"): Transition(CLEAN_FAILED),
    (CAPTURE_WAIT, "abort"): Transition(MANAGEABLE),
}

# Where a node may be deleted without putting it in maintenance first.
DELETABLE = {ENROLL, MANAGEABLE, AVAILABLE, CLEAN_FAILED, INSPECT_FAILED}

# Where a failed or interrupted action leaves the node.
FAILURE_STATE = {VERIFYING: ENROLL, CLEANING: CLEAN_FAILED, CLEAN_WAIT: CLEAN_FAILED,
                 DEPLOYING: DEPLOY_FAILED, DEPLOY_WAIT: DEPLOY_FAILED,
                 DELETING: CLEAN_FAILED, INSPECTING: INSPECT_FAILED,
                 INSPECT_WAIT: INSPECT_FAILED, CAPTURING: MANAGEABLE, CAPTURE_WAIT: MANAGEABLE}

# Waiting for the deploy agent to call back (no lock held); the state it works in next.
AGENT_WAIT = {DEPLOY_WAIT: DEPLOYING, CLEAN_WAIT: CLEANING, INSPECT_WAIT: INSPECTING,
              CAPTURE_WAIT: CAPTURING}

# States in which a node boots the deploy ramdisk when it PXE-boots.
BOOTS_RAMDISK = {DEPLOYING, DEPLOY_WAIT, CLEANING, CLEAN_WAIT, DELETING, INSPECTING,
                 INSPECT_WAIT, CAPTURING, CAPTURE_WAIT}


def allowed_verbs(state: str) -> list[str]:
    return sorted(verb for (from_state, verb) in PROVISION_VERBS if from_state == state)


def transition(state: str, verb: str) -> Transition | None:
    return PROVISION_VERBS.get((state, verb))


# Where a seat boots the labmetal ramdisk, and in which mode (its per-MAC iPXE script).
RAMDISK_MODE = {DEPLOYING: "deploy", DEPLOY_WAIT: "deploy",
                CLEANING: "clean", CLEAN_WAIT: "clean", DELETING: "clean",
                INSPECTING: "inspect", INSPECT_WAIT: "inspect",
                CAPTURING: "deploy", CAPTURE_WAIT: "deploy"}

# The deploy step a deploying node is in once its disk is written and verified: the
# conductor writes it before it reboots the seat, so the seat's next boot script is already
# its disk although the node becomes active only after the reboot was asked for (a PC that
# PXE-boots faster than that commit would otherwise boot the ramdisk again).
BOOT_WRITTEN_DISK = "boot the written disk"
