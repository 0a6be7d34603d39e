"""The agent's side of the labmetal API: lookup by MAC, discovery, then heartbeats forever.

Lookup hands out a deploy's agent token once; later lookups show it masked, and the agent
keeps the one it has. When labmetal refuses that token (a new deploy made a new one), the
agent looks up again and takes the new token if it is offered. Heartbeats come every
heartbeat_timeout/3 with +-30 % jitter, so 40 seats that booted together do not call in
together; the first heartbeat labmetal accepts carries the inventory. Nothing here gives
up: the ramdisk has nothing better to do than reach labmetal.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests

from labmetal.agent.identity import Identity
from labmetal.agent.inventory import Inventory

LOG = logging.getLogger(__name__)

AGENT_VERSION = "labmetal-agent 0.1.0"
MASKED_TOKEN = "******"
TIMEOUT = 30
MAX_LOOKUP_WAIT = 30.0  # seconds between lookups at most, while labmetal has no work for us


@dataclass(frozen=True)
class Assignment:
    """What a successful lookup says."""
    node_uuid: str
    node_name: str | None
    provision_state: str | None
    heartbeat_timeout: float
    token: str | None  # None when labmetal showed it masked


class LabmetalClient:
    def __init__(self, api_url: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.session = requests.Session()

    def lookup(self, macs: list[str]) -> Assignment | None:
        """None when no node has these MACs (404)."""
        response = self.session.get(f"{self.api_url}/v1/lookup",
                                    params={"addresses": ",".join(macs)}, timeout=TIMEOUT)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        node, config = body["node"], body.get("config", {})
        token = config.get("agent_token")
        return Assignment(node_uuid=node["uuid"], node_name=node.get("name"),
                          provision_state=node.get("provision_state"),
                          heartbeat_timeout=float(config.get("heartbeat_timeout") or 300),
                          token=None if token in (None, MASKED_TOKEN) else token)

    def discover(self, inventory: Inventory) -> requests.Response:
        return self.session.post(f"{self.api_url}/v1/discovery",
                                 json={"inventory": inventory.to_dict()}, timeout=TIMEOUT)

    def heartbeat(self, node_uuid: str, body: dict[str, Any]) -> int:
        response = self.session.post(f"{self.api_url}/v1/heartbeat/{node_uuid}", json=body,
                                     timeout=TIMEOUT)
        return response.status_code


def run(client: LabmetalClient, mode: str, inventory: Inventory, identity: Identity,
        callback_url: Callable[[], str]) -> None:
    """Look up (and in discovery mode, enlist) this seat, then heartbeat; never returns."""
    assignment = _wait_for_assignment(client, mode, inventory, identity)
    LOG.info("this seat is node %s (%s, %s); heartbeat every %.0f s", assignment.node_uuid,
             assignment.node_name, assignment.provision_state, assignment.heartbeat_timeout / 3)
    with_inventory = True
    while True:
        try:
            body: dict[str, Any] = {"callback_url": callback_url(), "agent_token": identity.token,
                                    "agent_version": AGENT_VERSION}
            if with_inventory:
                body["inventory"] = inventory.to_dict()
            status = client.heartbeat(assignment.node_uuid, body)
            if status == 202:
                with_inventory = False
            elif status in (401, 403):
                LOG.error("heartbeat refused (%d): labmetal does not accept this agent token",
                          status)
                fresh = client.lookup(inventory.macs)
                if fresh is not None and fresh.token is not None:
                    LOG.info("lookup offers node %s a new agent token; taking it", fresh.node_uuid)
                    identity.set(fresh.node_uuid, fresh.token)
                    assignment, with_inventory = fresh, True
            elif status in (404, 409):
                LOG.info("heartbeat not taken (%d); trying again", status)
            else:
                LOG.warning("heartbeat answered %d", status)
        except (OSError, KeyError, ValueError) as error:  # requests' errors are OSErrors
            LOG.warning("heartbeat failed: %s", error)
        time.sleep(assignment.heartbeat_timeout / 3 * random.uniform(0.7, 1.3))


def _wait_for_assignment(client: LabmetalClient, mode: str, inventory: Inventory,
                         identity: Identity) -> Assignment:
    wait, enlisted = 1.0, False
    while True:
        try:
            assignment = client.lookup(inventory.macs)
            if assignment is None and mode == "discovery" and not enlisted:
                enlisted = _enlist(client, inventory)
            elif assignment is None and not enlisted:
                LOG.info("no node has MACs %s yet", ", ".join(inventory.macs))
            elif assignment is not None and assignment.token is not None:
                identity.set(assignment.node_uuid, assignment.token)
                return assignment
            elif assignment is not None:
                LOG.warning("node %s: its agent token was handed out before and this agent "
                            "does not have it; waiting for a new deploy", assignment.node_uuid)
        except (OSError, KeyError, ValueError) as error:  # requests' errors are OSErrors
            LOG.warning("labmetal at %s: %s", client.api_url, error)
        time.sleep(wait * random.uniform(0.7, 1.3))
        wait = min(wait * 2, MAX_LOOKUP_WAIT)


def _enlist(client: LabmetalClient, inventory: Inventory) -> bool:
    """Discovery: True once labmetal has a node for this seat."""
    response = client.discover(inventory)
    if response.status_code in (201, 202):
        LOG.info("enlisted by discovery as node %s; waiting for work",
                 response.json()["node"]["uuid"])
        return True
    if response.status_code == 409:
        LOG.info("discovery: labmetal already has a node with these MACs; waiting for work")
        return True
    LOG.warning("discovery refused (%d): %s", response.status_code, response.text[:300])
    return False
