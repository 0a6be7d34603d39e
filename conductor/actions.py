"""What a conductor does for each pending action. Each function talks to the hardware and
returns the node's new column values and history events; the service commits them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from labmetal import states
from labmetal.conductor.drivers import HardwareType
from labmetal.conductor.power.base import InvalidDriverInfo, PowerError, PowerTarget
from labmetal.models import Node

if TYPE_CHECKING:
    from labmetal.conductor.deploy import DeployContext


@dataclass
class NodeWork:
    """A snapshot of the node taken under its lock, with secrets opened."""
    id: int
    uuid: str
    driver: HardwareType
    target: PowerTarget
    action: str
    power_state: str | None
    provision_state: str
    driver_internal_info: dict[str, Any]
    node: Node  # the whole row, detached, for the flows that need more
    ctx: DeployContext  # the conductor's: image store, database, settings for the flows


@dataclass
class Outcome:
    values: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, severity, text)


def _power_values(work: NodeWork, new_state: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {"power_state": new_state}
    assumed = work.driver.power.assumed_state
    if bool(work.driver_internal_info.get("power_state_assumed")) != assumed:
        values["driver_internal_info"] = {**work.driver_internal_info,
                                          "power_state_assumed": assumed}
    return values


def change_power(work: NodeWork) -> Outcome:
    target = work.action
    try:
        new_state = work.driver.power.set_power_state(work.target, target)
    except (PowerError, InvalidDriverInfo) as error:
        message = f"Failed to change power state to '{target}': {error}"
        return Outcome({"target_power_state": None, "last_error": message},
                       [("power", "ERROR", message)])
    outcome = Outcome({**_power_values(work, new_state), "target_power_state": None,
                       "last_error": None})
    assumed = (" (assumed: Wake-on-LAN cannot read it back)" if work.driver.power.assumed_state
               else "")
    outcome.events.append(("power", "INFO",
                           f"power state is now '{new_state}' after '{target}'{assumed}"))
    return outcome


def verify(work: NodeWork) -> Outcome:
    """enroll -> manageable: the power credentials must work against the real BMC."""
    try:
        work.driver.power.validate(work.target)
        power_state = work.driver.power.verify(work.target)
    except (PowerError, InvalidDriverInfo) as error:
        message = f"Failed to verify the node's power credentials: {error}"
        return Outcome({"provision_state": states.ENROLL, "target_provision_state": None,
                        "last_error": message},
                       [("provisioning", "ERROR", message),
                        ("provisioning", "INFO", "verifying -> enroll")])
    values = {"provision_state": states.MANAGEABLE, "target_provision_state": None,
              "last_error": None}
    if power_state is not None:
        values.update(_power_values(work, power_state))
    return Outcome(values, [("provisioning", "INFO", "verifying -> manageable (power credentials "
                                                     "checked)")])


ACTIONS: dict[str, Callable[[NodeWork], Outcome]] = {
    **{target: change_power for target in states.POWER_TARGETS},
    "verify": verify,
}
