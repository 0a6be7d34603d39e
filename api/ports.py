"""/v1/ports: a node's network interfaces, by MAC address (unique across all nodes)."""
from __future__ import annotations

import re
from typing import Any

import jsonpatch
from flask import Blueprint, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from labmetal import history
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import caller_name, isotime, links, page, select_fields
from labmetal.names import is_uuid
from labmetal.lookup import find_node
from labmetal.api.errors import bad_request, conflict, not_found
from labmetal.api.validation import  DETAIL, PATCH, Field, body, fields_param, obj, paging, query
from labmetal.models import Node, Port

blueprint = Blueprint("ports", __name__)

PORT_LIST_FIELDS = ("uuid", "address")
SORT_KEYS = ("id", "uuid", "address", "created_at", "updated_at")
# Six hex pairs, all separated by ':' or all by '-', or not at all; case and spaces around
# do not matter (normalize_mac writes aa:bb:cc:dd:ee:ff).
MAC_PATTERN = r"^\s*[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}\s*$"
_MAC = re.compile(MAC_PATTERN)
_FIELD_NAMES = ("uuid", "address", "node_uuid", "pxe_enabled", "extra", "local_link_connection",
                "internal_info", "physical_network", "portgroup_uuid", "is_smartnic", "name",
                "created_at", "updated_at", "links")


def normalize_mac(value: Any) -> str:
    """aa:bb:cc:dd:ee:ff in lower case; accepts '-' or no separators; refuses anything else."""
    if not isinstance(value, str) or not _MAC.match(value):
        raise bad_request(f"Expected a MAC address but received {value!r} (field: address).")
    digits = value.strip().lower().replace(":", "").replace("-", "")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def mac_field(name: str, **options: Any) -> Field:
    """A MAC address, checked and handed to the view as aa:bb:cc:dd:ee:ff."""
    options.setdefault("error", "Expected a MAC address but received {value!r} (field: "
                                "address).")
    return Field(name, str, pattern=MAC_PATTERN, check=normalize_mac, **options)


NEW_PORT = obj(
    "a new port",
    mac_field("address", required=True, description="the MAC address, unique across nodes",
              example="52:54:00:12:34:56"),
    Field("node_uuid", str, required=True, description="the node's UUID or name",
          example="tpr2-a01"),
    Field("pxe_enabled", bool, default=True),
    Field("extra", dict | None),
    Field("uuid", str | None, format="uuid", description="chosen by labmetal when not given"),
    *(Field(key, kind, description="accepted for Ironic's client; not used")
      for key, kind in (("local_link_connection", dict | None),
                        ("physical_network", str | None), ("is_smartnic", bool | None))))
LIST_QUERY = (fields_param(_FIELD_NAMES),
              Field("node", str, description="only the ports of this node (name or UUID)"),
              Field("node_uuid", str, description="the same as node"),
              mac_field("address", description="only the port with this MAC address"),
              *paging(SORT_KEYS))


def port_view(port: Port, node_uuid: str) -> dict[str, Any]:
    return {"uuid": port.uuid, "address": port.address, "node_uuid": node_uuid,
            "pxe_enabled": port.pxe_enabled, "extra": port.extra or {},
            "local_link_connection": {}, "internal_info": {}, "physical_network": None,
            "portgroup_uuid": None, "is_smartnic": False, "name": None,
            "created_at": isotime(port.created_at), "updated_at": isotime(port.updated_at),
            "links": links("ports", port.uuid)}


def _find_port(session: Any, ident: str) -> Port:
    port = (session.scalar(select(Port).where(Port.uuid == ident.lower())) if is_uuid(ident)
            else None)
    if port is None:
        raise not_found(f"Port {ident} could not be found.")
    return port


def _mac_taken(address: str):
    return conflict(f"A port with MAC address {address} already exists (field: address).")


@blueprint.get("/v1/ports")
@blueprint.get("/v1/ports/detail")
@authorize("port:get")
@query(DETAIL, *LIST_QUERY)
def list_ports(query: dict[str, Any]):
    detail = request.path.endswith("/detail") or query["detail"]
    fields = query.get("fields")
    if fields is None and not detail:
        fields = list(PORT_LIST_FIELDS)
    statement = select(Port)
    with services().db.read() as session:
        node_ident = query.get("node") or query.get("node_uuid")
        if node_ident:
            statement = statement.where(Port.node_id == find_node(session, node_ident).id)
        if "address" in query:
            statement = statement.where(Port.address == query["address"])
        rows, extra = page(session, statement, Port, query)
        node_uuids = dict(session.execute(select(Node.id, Node.uuid).where(
            Node.id.in_({port.node_id for port in rows}))).all())
    return {"ports": [select_fields(port_view(port, node_uuids[port.node_id]), fields)
                      for port in rows], **extra}


@blueprint.get("/v1/ports/<ident>")
@authorize("port:get")
@query(fields_param(_FIELD_NAMES))
def show_port(ident: str, query: dict[str, Any]):
    fields = query.get("fields")
    with services().db.read() as session:
        port = _find_port(session, ident)
        node_uuid = session.execute(select(Node.uuid)
                                    .where(Node.id == port.node_id)).scalar_one()
    return select_fields(port_view(port, node_uuid), fields)


@blueprint.post("/v1/ports")
@authorize("port:create")
@body(NEW_PORT)
def create_port(body: dict[str, Any]):
    address, pxe_enabled, extra = body["address"], body["pxe_enabled"], body.get("extra") or {}
    try:
        with services().db.write() as session:
            node = find_node(session, body["node_uuid"])
            if session.scalar(select(Port.id).where(Port.address == address)):
                raise _mac_taken(address)
            port = Port(address=address, node_id=node.id, pxe_enabled=pxe_enabled, extra=extra)
            if body.get("uuid"):
                port.uuid = str(body["uuid"]).lower()
            session.add(port)
            session.flush()
            history.record(session, node.id, "update", f"port {address} added",
                           user=caller_name())
    except IntegrityError:
        raise _mac_taken(address) from None
    view = port_view(port, node.uuid)
    return view, 201, {"Location": view["links"][0]["href"]}


@blueprint.patch("/v1/ports/<ident>")
@authorize("port:update")
@body(PATCH)
def update_port(ident: str, body: list[dict[str, Any]]):
    """A JSON patch of address, pxe_enabled, extra and node_uuid."""
    try:
        with services().db.write() as session:
            port = _find_port(session, ident)
            node_uuid = session.execute(select(Node.uuid)
                                        .where(Node.id == port.node_id)).scalar_one()
            before = {"address": port.address, "pxe_enabled": port.pxe_enabled,
                      "extra": port.extra or {}, "node_uuid": node_uuid}
            try:
                after = jsonpatch.apply_patch(before, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
                raise bad_request(f"Invalid patch: {e}") from None
            if set(after) - set(before):
                raise bad_request("Only address, pxe_enabled, extra and node_uuid can be changed")
            port.address = normalize_mac(after["address"])
            if port.address != before["address"] and session.scalar(
                    select(Port.id).where(Port.address == port.address)):
                raise _mac_taken(port.address)
            if not isinstance(after.get("pxe_enabled"), bool):
                raise bad_request("Invalid pxe_enabled: expected true or false")
            port.pxe_enabled = after["pxe_enabled"]
            port.extra = after.get("extra") or {}
            if after.get("node_uuid") != node_uuid:
                node = find_node(session, str(after.get("node_uuid")))
                port.node_id, node_uuid = node.id, node.uuid
    except IntegrityError:
        raise _mac_taken(str(ident)) from None
    return port_view(port, node_uuid)


@blueprint.delete("/v1/ports/<ident>")
@authorize("port:delete")
def delete_port(ident: str):
    with services().db.write() as session:
        port = _find_port(session, ident)
        session.delete(port)
        history.record(session, port.node_id, "update", f"port {port.address} removed",
                       user=caller_name())
    return "", 204
