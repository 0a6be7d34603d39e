"""The endpoints the deploy agent calls from the seat: lookup, heartbeat, discovery.

They are public (the seat has no user credentials), as Ironic's are, and the seat network
is hostile (DESIGN §11): what protects them is the one-time agent token, handed out once per
deploy by the first lookup after the node was booted into the ramdisk, and bound to the
seat's address. Where labmetal runs the room's DHCP, only the address leased to the node's
MAC gets it; elsewhere the first address that asks does. A second lookup of a given token
fails the deploy (the token may be in two hands), heartbeats are taken from the bound
address only, and the conductor calls the agent back at that address, whatever URL the
heartbeat names.
"""
from __future__ import annotations

import hmac
import re
from typing import Any

import logging
from urllib.parse import urlsplit

from flask import Blueprint
from sqlalchemy import select, update

from labmetal import history, states
from labmetal.api.services import services
from labmetal.api.auth import public
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.ports import mac_field, normalize_mac
from labmetal.api.seat_address import caller_address, holds_lease, leases_known, url_host
from labmetal.api.validation import Field, body, obj, query
from labmetal.conductor.deploy import (CONTINUE_ACTION, inventory_macs,
                                       inventory_properties)
from labmetal.conductor.door import Asker
from labmetal.errors import Busy
from labmetal.models import Node, Port, utcnow

LOG = logging.getLogger(__name__)
blueprint = Blueprint("agent", __name__)
MAX_LOOKUP_MACS = 16  # a PC has a few NICs; more is someone enumerating the room
HEARTBEAT_TIMEOUT = 30  # seconds; the agent beats about every third of it
MASKED_TOKEN = "******"
_CALLBACK = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/.*)?$")
_INVENTORY = "the hardware inventory: interfaces (with MAC addresses), CPU, memory, disks"
# The agent may send more than labmetal reads (Ironic's agent does): extra=True.
HEARTBEAT = obj("a heartbeat",
                Field("callback_url", str, required=True, pattern=_CALLBACK.pattern,
                      max_length=255,
                      description="the agent's own http(s) URL; only its scheme and port "
                                  "are used: labmetal calls back the address the heartbeat "
                                  "came from",
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


def _few(macs: list[str]) -> list[str]:
    if len(macs) > MAX_LOOKUP_MACS:
        raise bad_request(f"at most {MAX_LOOKUP_MACS} addresses per lookup")
    return macs


@blueprint.get("/v1/lookup")
@public("the deploy agent; protected by the agent token, bound to the seat's address")
@query(Field("addresses", list, required=True, min_items=1, check=_few,
             description="the seat's MAC addresses, comma-separated (at most "
                         f"{MAX_LOOKUP_MACS})",
             items=mac_field("address", error="Invalid MAC address {value!r} in addresses")))
def lookup(query: dict[str, Any]):
    macs = query["addresses"]
    svc = services()
    address = caller_address()
    failed = False
    with svc.db.write() as session:
        node = _node_for_macs(session, macs)
        if node is None:
            raise not_found(f"No node has the MAC address(es) {', '.join(macs)}")
        if node.provision_state not in states.BOOTS_RAMDISK:
            raise not_found(f"Node {node.uuid} is in state '{node.provision_state}': no deploy "
                            "agent is expected")
        node_macs = [port.address for port in node.ports]
        if leases_known(svc.settings.boot) and not holds_lease(session, node_macs, address):
            # Not the seat: another PC asking with its MAC, or the seat before its lease
            # reached the database (its agent asks again). Nothing changes.
            LOG.warning("lookup of node %s from %s refused: not leased to its MAC(s)",
                        node.uuid, address)
            raise ApiError(403, f"{address} holds no DHCP lease of node {node.uuid}'s MAC "
                                "address(es): its agent token is given only there")
        if not node.agent_token:
            raise not_found(f"Node {node.uuid} has no agent token yet; ask again")
        if node.agent_token_given:
            failed = _second_lookup(session, node, address)
            if not failed:
                raise conflict(f"Node {node.uuid}'s agent token was given already")
        else:
            node.agent_token_given, node.agent_address = True, address
            token = svc.box.open(node.agent_token)
            history.record(session, node.id, "agent",
                           f"deploy agent looked up from {address}; token handed out")
            view = {"uuid": node.uuid, "name": node.name,
                    "provision_state": node.provision_state}
    if failed:
        raise conflict(f"Node {node.uuid}'s agent token was given already: this second "
                       "lookup failed its deploy")
    return {"node": view, "config": {"heartbeat_timeout": HEARTBEAT_TIMEOUT,
                                     "agent_token": token, "agent_token_required": True}}


def _second_lookup(session: Any, node: Node, address: str) -> bool:
    """The token went to one caller already, so two may now hold it (a seat that spoofed
    the first lookup, or an agent that lost it): the deploy cannot be trusted. Recorded,
    and the node's agent is no longer believed: a node waiting for it fails at once, one
    whose conductor is busy with it fails when that conductor next looks (agent_alarm).
    True when this lookup raised the alarm."""
    if node.agent_alarm:
        return False  # raised already: a flood of lookups writes one line
    alarm = (f"a second lookup of the agent token from {address} (given to "
             f"{node.agent_address} before): the deploy agent cannot be trusted")
    node.agent_alarm = alarm
    history.record(session, node.id, "agent", alarm, "ERROR")
    state = node.provision_state
    if state in states.FAILURE_STATE and state in CONTINUE_ACTION and node.reservation is None:
        failure = states.FAILURE_STATE[state]
        done = session.execute(
            update(Node).where(Node.id == node.id, Node.provision_state == state,
                               Node.reservation.is_(None))
            .values(provision_state=failure, target_provision_state=None,
                    last_error=alarm[0].upper() + alarm[1:], agent_url=None,
                    agent_token=None)).rowcount
        if done:
            history.record(session, node.id, "provisioning", f"{state} -> {failure}")
    return True


def _check_token(node: Node, given: Any) -> None:
    expected = services().box.open(node.agent_token) if node.agent_token else None
    # as bytes: compare_digest refuses str with non-ASCII characters (a seat sends anything)
    if not (isinstance(given, str) and expected and
            hmac.compare_digest(given.encode(), expected.encode())):
        raise ApiError(401, "Invalid or missing agent token received")


def _callback(callback_url: str, address: str) -> str:
    """The agent's URL at the address its heartbeat came from: the conductor talks to that
    seat only, never to a host a heartbeat names."""
    try:  # urlsplit itself refuses some hosts the pattern lets through ("http://[")
        parts = urlsplit(callback_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise bad_request("callback_url has no valid host or port") from None
    return f"{parts.scheme}://{url_host(address)}:{port}"


@blueprint.post("/v1/heartbeat/<node_uuid>")
@public("the deploy agent; protected by the agent token, bound to the seat's address")
@body(HEARTBEAT)
def heartbeat(node_uuid: str, body: dict[str, Any]):
    inventory = body.get("inventory")
    address = caller_address()
    callback_url = _callback(body["callback_url"], address)
    svc = services()
    with svc.db.write() as session:
        node = session.scalar(select(Node).where(Node.uuid == node_uuid))
        if node is None:
            raise not_found(f"Node {node_uuid} could not be found.")
        _check_token(node, body.get("agent_token"))
        if node.agent_address and node.agent_address != address:
            raise ApiError(403, f"Node {node.uuid}'s agent token is bound to another address "
                                f"than {address}")
        if node.agent_alarm:
            raise conflict(f"Node {node.uuid}'s deploy agent is no longer trusted")
        if node.provision_state not in states.BOOTS_RAMDISK:
            raise conflict(f"Node {node.uuid} is in state '{node.provision_state}' and does "
                           "not expect its agent")
        values: dict[str, Any] = {"agent_url": callback_url,
                                  "agent_heartbeat_at": utcnow()}
        if inventory:
            values["inventory"] = inventory
        session.execute(update(Node).where(Node.id == node.id).values(**values))
        state, locked = node.provision_state, node.reservation
    action = CONTINUE_ACTION.get(state)
    if action and not locked:
        try:
            svc.door.submit(node, action, {"provision_state": states.AGENT_WAIT[state]},
                            (Node.provision_state == state,),
                            ("provisioning", f"agent called back from {callback_url}; "
                                             f"{state} -> {states.AGENT_WAIT[state]}"),
                            Asker())
        except Busy:
            pass  # a conductor already carries on
    return "", 202


@blueprint.post("/v1/discovery")
@public("self-registration of unknown PCs (off unless set)")
@body(DISCOVERY)
def discovery(body: dict[str, Any]):
    """Self-registration: an unknown PC that PXE-booted the ramdisk enrolls itself."""
    svc = services()
    if not svc.settings.boot.self_registration:
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
        node = Node(driver=svc.settings.boot.discovery_driver,
                    name="seat-" + macs[0].replace(":", ""),
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
