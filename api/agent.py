"""The endpoints the deploy agent calls from the seat: lookup, heartbeat, discovery.

They are public (the seat has no user credentials), as Ironic's are; what protects them is
the one-time agent token: handed out by the first lookup after the node was booted into
the ramdisk, and required on every heartbeat.
"""
from __future__ import annotations

import hmac
import re
from typing import Any

from flask import Blueprint
from sqlalchemy import select, update

from labmetal import history, states
from labmetal.api.app import services
from labmetal.api.auth import public
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.ports import mac_field, normalize_mac
from labmetal.api.validation import Field, body, obj, query
from labmetal.conductor.deploy import (CONTINUE_ACTION, inventory_macs,
                                       inventory_properties)
from labmetal.conductor.rpcapi import NoConductor, NodeLocked, Unchanged
from labmetal.models import Node, Port, utcnow

blueprint = Blueprint("agent", __name__)
HEARTBEAT_TIMEOUT = 30  # seconds; the agent beats about every third of it
MASKED_TOKEN = "******"
_CALLBACK = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/.*)?$")
_INVENTORY = "the hardware inventory: interfaces (with MAC addresses), CPU, memory, disks"
# The agent may send more than labmetal reads (Ironic's agent does): extra=True.
HEARTBEAT = obj("a heartbeat",
                Field("callback_url", str, required=True, pattern=_CALLBACK.pattern,
                      description="the agent's own http(s) URL",
                      example="http://10.0.0.21:9999",
                      error="callback_url must be the agent's http(s) URL"),
                Field("agent_token", str | None, description="the token lookup handed out"),
                Field("agent_version", str | None),
                Field("inventory", dict | None, description=_INVENTORY + "; on the first beat",
                      error="inventory must be a JSON object"),
                extra=True)
DISCOVERY = obj("a discovery",
                Field("inventory", dict, required=True, description=_INVENTORY,
                      error="discovery needs an inventory object"),
                extra=True)


def _node_for_macs(session: Any, macs: list[str]) -> Node | None:
    port = session.scalar(select(Port).where(Port.address.in_(macs)).order_by(Port.id))
    return session.get(Node, port.node_id) if port is not None else None


@blueprint.get("/v1/lookup")
@public("the deploy agent; protected by the agent token")
@query(Field("addresses", list, required=True, min_items=1,
             description="the seat's MAC addresses, comma-separated",
             items=mac_field("address", error="Invalid MAC address {value!r} in addresses")))
def lookup(query: dict[str, Any]):
    macs = query["addresses"]
    svc = services()
    with svc.db.write() as session:
        node = _node_for_macs(session, macs)
        if node is None:
            raise not_found(f"No node has the MAC address(es) {', '.join(macs)}")
        if node.provision_state not in states.BOOTS_RAMDISK:
            raise not_found(f"Node {node.uuid} is in state '{node.provision_state}': no deploy "
                            "agent is expected")
        token = MASKED_TOKEN
        if node.agent_token and not node.agent_token_given:
            node.agent_token_given = True
            token = svc.box.open(node.agent_token)
            history.record(session, node.id, "agent", "deploy agent looked up; token handed out")
        view = {"uuid": node.uuid, "name": node.name, "provision_state": node.provision_state}
    return {"node": view, "config": {"heartbeat_timeout": HEARTBEAT_TIMEOUT,
                                     "agent_token": token, "agent_token_required": True}}


def _check_token(node: Node, given: Any) -> None:
    expected = services().box.open(node.agent_token) if node.agent_token else None
    if not (isinstance(given, str) and expected and hmac.compare_digest(given, expected)):
        raise ApiError(401, "Invalid or missing agent token received")


@blueprint.post("/v1/heartbeat/<node_uuid>")
@public("the deploy agent; protected by the agent token")
@body(HEARTBEAT)
def heartbeat(node_uuid: str, body: dict[str, Any]):
    callback_url, inventory = body["callback_url"], body.get("inventory")
    svc = services()
    with svc.db.write() as session:
        node = session.scalar(select(Node).where(Node.uuid == node_uuid))
        if node is None:
            raise not_found(f"Node {node_uuid} could not be found.")
        _check_token(node, body.get("agent_token"))
        if node.provision_state not in states.BOOTS_RAMDISK:
            raise conflict(f"Node {node.uuid} is in state '{node.provision_state}' and does "
                           "not expect its agent")
        values: dict[str, Any] = {"agent_url": callback_url.rstrip("/"),
                                  "agent_heartbeat_at": utcnow()}
        if inventory:
            values["inventory"] = inventory
        session.execute(update(Node).where(Node.id == node.id).values(**values))
        state, locked = node.provision_state, node.reservation
    action = CONTINUE_ACTION.get(state)
    if action and not locked:
        try:
            svc.conductors.request(node, action, {"provision_state": states.AGENT_WAIT[state]},
                                   (Node.provision_state == state,),
                                   ("provisioning", f"agent called back from {callback_url}; "
                                                    f"{state} -> {states.AGENT_WAIT[state]}"),
                                   None)
        except (NodeLocked, Unchanged):
            pass  # a conductor already carries on
        except NoConductor as error:
            raise ApiError(503, str(error)) from None
    return "", 202


@blueprint.post("/v1/discovery")
@public("self-registration of unknown PCs (off unless set)")
@body(DISCOVERY)
def discovery(body: dict[str, Any]):
    """Self-registration: an unknown PC that PXE-booted the ramdisk enrolls itself."""
    svc = services()
    if not svc.settings.self_registration:
        raise ApiError(403, "Self-registration is off on this labmetal "
                            "(LABMETAL_SELF_REGISTRATION=true turns it on)")
    inventory = body["inventory"]
    macs = inventory_macs(inventory)
    if not macs:
        raise bad_request("the inventory lists no network interface with a MAC address")
    try:
        macs = [normalize_mac(mac) for mac in macs]
    except ApiError:
        raise bad_request("the inventory holds an invalid MAC address") from None
    with svc.db.write() as session:
        known = _node_for_macs(session, macs)
        if known is not None:
            raise conflict(f"MAC address(es) {', '.join(macs)} already belong to node "
                           f"{known.uuid}")
        node = Node(driver=svc.settings.discovery_driver, name="seat-" + macs[0].replace(":", ""),
                    properties=inventory_properties(inventory), inventory=inventory,
                    provision_state=states.ENROLL)
        if session.scalar(select(Node.id).where(Node.name == node.name)):
            node.name = None
        session.add(node)
        session.flush()
        for mac in macs:
            session.add(Port(address=mac, node_id=node.id, pxe_enabled=True))
        history.record(session, node.id, "provisioning",
                       f"self-registered at PXE boot with MAC(s) {', '.join(macs)} and driver "
                       f"'{node.driver}'")
        view = {"uuid": node.uuid, "name": node.name, "provision_state": node.provision_state}
    return {"node": view}, 201
