"""The one door to a node's conductor: every caller that wants a node powered, booted or moved
through its lifecycle asks here (DESIGN §2, §10).

The API's views, the room jobs and the students' sessions used to build their own requests,
validate power their own way and each handle "node locked" or "no conductor" differently.
Ironic has one named unit of work every caller goes through (its task manager); this is
labmetal's: a request is checked once (the verb is allowed in the node's state, the power
credentials are usable, the images a ramdisk boot needs exist), then handed over with one
compare-and-set (``rpcapi.ConductorAPI.request``), or, for a verb without hardware work,
applied at once under the same lock rule. Refusals are the domain errors of
``labmetal/errors.py``, with messages written for the asker; the API maps them to HTTP in
one place, a room job turns them into a seat's error or a later retry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.sql.elements import ColumnElement

from labmetal import history, states
from labmetal.conductor.drivers import HardwareType
from labmetal.errors import Busy, InvalidRequest, NodeLocked, Unchanged
from labmetal.conductor.power.base import InvalidDriverInfo, PowerError, PowerInterface, PowerTarget
from labmetal.conductor.power.wol import IN_BAND_ONLY
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.config import DeploySettings
from labmetal.db import Database
from labmetal.lookup import ImageUnusable, usable_image
from labmetal.models import Node, Port, utcnow
from labmetal.secrets import SecretBox

# Actions that boot labmetal's deploy ramdisk: its kernel and ramdisk images must exist.
RAMDISK_ACTIONS = ("deploy", "undeploy", "inspect")


@dataclass(frozen=True)
class Asker:
    """Who asks, for the node's history: a user through the API, or a conductor (a room
    job); ``via`` is said in the event ("by a room job")."""
    user: str | None = None
    conductor: str | None = None
    via: str = ""

    def says(self, what: str) -> str:
        return f"{what} {self.via}" if self.via else what


class NodeDoor:
    def __init__(self, deploy: DeploySettings, db: Database, drivers: dict[str, HardwareType],
                 box: SecretBox, conductors: ConductorAPI):
        self.deploy = deploy
        self.db = db
        self.drivers = drivers
        self.box = box
        self.conductors = conductors

    # -- checks ----------------------------------------------------------------------------
    def power_target(self, node: Node) -> PowerTarget:
        with self.db.read() as session:
            macs = list(session.scalars(select(Port.address).where(Port.node_id == node.id)))
        return PowerTarget(node.uuid, self.box.open_all(node.driver_info), macs)

    def power_problem(self, node: Node) -> str | None:
        """Why the node's power credentials cannot be used, or None if they can."""
        try:
            self.drivers[node.driver].power.validate(self.power_target(node))
        except (InvalidDriverInfo, PowerError, ValueError) as error:
            return str(error)
        return None

    def check_power(self, node: Node, doing: str) -> PowerInterface:
        """The node's power interface, if its credentials can be used; ``doing`` completes
        "Cannot ... node X" in the refusal."""
        problem = self.power_problem(node)
        if problem is not None:
            raise InvalidRequest(f"Cannot {doing} node {node.uuid}: {problem}")
        return self.drivers[node.driver].power

    def check_ramdisk(self, node: Node) -> None:
        """The deploy kernel and ramdisk a node will boot must exist before it is powered."""
        for key, kind in (("deploy_kernel", "kernel"), ("deploy_ramdisk", "ramdisk")):
            ident = (node.driver_info or {}).get(key) or getattr(self.deploy, key)
            if not ident:
                raise InvalidRequest(f"Cannot boot node {node.uuid} into the deploy ramdisk: set "
                                     f"driver_info/{key} (or the {key} setting) to a {kind} image")
            self._usable(ident, (kind,), f"driver_info/{key}")

    def check_instance_image(self, node: Node, instance_info: dict[str, Any] | None) -> None:
        ident = (instance_info or {}).get("image_source")
        if not ident:
            raise InvalidRequest(f"Cannot deploy node {node.uuid}: set instance_info/image_source "
                                 "to a whole-disk or partition image (baremetal node set <node> "
                                 "--instance-info image_source=<image>)")
        self._usable(ident, ("whole-disk", "partition"), "instance_info/image_source")

    def _usable(self, ident: str, kinds: tuple[str, ...], field: str) -> None:
        with self.db.read() as session:
            try:
                usable_image(session, ident, kinds, field)
            except ImageUnusable as error:
                raise InvalidRequest(str(error)) from None

    # -- power -----------------------------------------------------------------------------
    def set_power(self, node: Node, target: str, by: Asker) -> None:
        """Power on, off or reboot (``states.POWER_TARGETS``)."""
        power = self.check_power(node, "change the power state of")
        if power.assumed_state and target != states.POWER_ON:
            raise InvalidRequest(f"Cannot '{target}' node {node.uuid}: {IN_BAND_ONLY}")
        self._power(node, target, by.says(f"'{target}' requested"), by)

    def boot(self, node: Node, reason: str, by: Asker) -> None:
        """Power the node on, or reboot it if it is on: it boots whatever its next boot
        script says (a session, a TP)."""
        action = states.REBOOTING if node.power_state == states.POWER_ON else states.POWER_ON
        power = self.check_power(node, "boot")
        if power.assumed_state and action != states.POWER_ON:
            raise InvalidRequest(f"Cannot reboot node {node.uuid}: its power driver cannot "
                                 "(Wake-on-LAN only powers on)")
        self._power(node, action, by.says(f"'{action}' requested {reason}"), by)

    def _power(self, node: Node, action: str, text: str, by: Asker) -> None:
        if node.provision_state == states.VERIFYING:
            raise Busy(f"Node {node.uuid} is being verified; retry once it is manageable")
        self.submit(node, action, {"target_power_state": states.POWER_TARGETS[action],
                                   "last_error": None}, (), ("power", text), by)

    # -- provisioning ----------------------------------------------------------------------
    def provision(self, node: Node, verb: str, by: Asker,
                  values: dict[str, Any] | None = None) -> states.Transition:
        """Move the node along its lifecycle by ``verb``; ``values`` are written with the
        new state (e.g. the instance_info a room job deploys)."""
        step = states.transition(node.provision_state, verb)
        if step is None:
            allowed = states.allowed_verbs(node.provision_state)
            raise InvalidRequest(
                f"The requested action \"{verb}\" can not be performed on node \"{node.uuid}\" "
                f"while it is in state \"{node.provision_state}\". Allowed verbs in this state: "
                f"{', '.join(allowed) if allowed else 'none'}.")
        extra = values or {}
        if step.action is not None:
            self.check_power(node, verb)
        if step.action in RAMDISK_ACTIONS or (step.action == "clean"
                                              and self.deploy.automated_clean):
            self.check_ramdisk(node)
        if step.action == "deploy":
            self.check_instance_image(node, extra.get("instance_info", node.instance_info))
        event = ("provisioning", by.says(f"'{verb}' requested") +
                 f": {node.provision_state} -> {step.state}")
        self.submit(node, step.action,
                    {"provision_state": step.state, "target_provision_state": step.target,
                     "provision_updated_at": utcnow(), "last_error": None, **extra},
                    (Node.provision_state == node.provision_state,), event, by)
        return step

    # -- the hand-over -----------------------------------------------------------------------
    def submit(self, node: Node, action: str | None, values: dict[str, Any],
               conditions: tuple[ColumnElement[bool], ...], event: tuple[str, str],
               by: Asker) -> None:
        """Hand ``action`` to the node's conductor with ``values``, or, without an action,
        apply ``values`` now; either only while the node is unlocked and ``conditions``
        hold."""
        if action is not None:
            self.conductors.request(node, action, values, conditions, event, by.user)
            return
        with self.db.write() as session:
            done = session.execute(update(Node).where(  # type: ignore[attr-defined]
                Node.id == node.id, Node.reservation.is_(None), *conditions)
                .values(**values)).rowcount
            if done:
                history.record(session, node.id, event[0], event[1], user=by.user,
                               conductor=by.conductor)
        if not done:
            with self.db.read() as session:
                holder = session.scalar(select(Node.reservation).where(Node.id == node.id))
            if holder:
                raise NodeLocked(node.uuid, holder)
            raise Unchanged(node.uuid)
