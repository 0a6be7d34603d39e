"""Acting on a node: power and provision state changes (asked through the one door to its
conductor, conductor/door.py), maintenance, validation, its ports and its history."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request
from sqlalchemy import delete, select, update

from labmetal import history, states
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import asker, caller_name, isotime, links, select_fields
from labmetal.names import is_uuid
from labmetal.lookup import find_node
from labmetal.api.errors import bad_request, conflict, not_found
from labmetal.api.ports import PORT_LIST_FIELDS, port_view
from labmetal.api.validation import DETAIL, Field, body, fields_param, obj, query
from labmetal.errors import Refused
from labmetal.lifecycles import IMAGE_QUEUED
from labmetal.models import Image, Node, NodeHistory, Port, utcnow

blueprint = Blueprint("node_states", __name__)
HISTORY_SINCE = (1, 78)
_IGNORED = "sent by Ironic's client for what labmetal does not do; ignored"
POWER = obj("a power state change",
            Field("target", str, required=True, enum=tuple(sorted(states.POWER_TARGETS))),
            Field("timeout", int | None, minimum=1, description=_IGNORED))
PROVISION = obj(
    "a provision state change",
    Field("target", str, required=True,
          enum=tuple(sorted({verb for (_, verb) in states.PROVISION_VERBS})),
          description="the verb; which ones apply depends on the node's provision state"),
    *(Field(key, Any, description=_IGNORED)
      for key in ("configdrive", "clean_steps", "deploy_steps", "service_steps", "runbook",
                  "rescue_password", "disable_ramdisk")))
MAINTENANCE = obj("maintenance", Field("reason", str | None, description="shown in the node"))
CAPTURE = obj("a capture",
              Field("image", str, required=True, description="the new image's name",
                    example="reference-pc"),
              Field("description", str | None, description="the new image's description"))
HISTORY_FIELDS = ("uuid", "created_at", "severity", "event", "event_type", "conductor", "user")


def _accepted(node: Node):
    return "", 202, {"Location": links("nodes", f"{node.uuid}/states")[0]["href"]}


@blueprint.get("/v1/nodes/<ident>/states")
@authorize("node:get")
def node_states(ident: str):
    with services().db.read() as session:
        node = find_node(session, ident)
    return {"power_state": node.power_state, "target_power_state": node.target_power_state,
            "provision_state": node.provision_state,
            "target_provision_state": node.target_provision_state,
            "provision_updated_at": isotime(node.provision_updated_at),
            "last_error": node.last_error, "console_enabled": False, "raid_config": {},
            "target_raid_config": {}}


@blueprint.put("/v1/nodes/<ident>/states/power")
@authorize("node:set_power_state")
@body(POWER)
def set_power_state(ident: str, body: dict[str, Any]):
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    svc.door.set_power(node, body["target"], asker())
    return _accepted(node)


@blueprint.put("/v1/nodes/<ident>/states/provision")
@authorize("node:set_provision_state")
@body(PROVISION)
def set_provision_state(ident: str, body: dict[str, Any]):
    verb = body["target"]
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    values: dict[str, Any] = {}
    if verb == "abort":
        values.update(last_error=f"{node.provision_state} aborted by "
                                 f"{caller_name() or 'a user'}",
                      agent_token=None, agent_token_given=False, agent_url=None,
                      agent_address=None, agent_alarm=None)
    svc.door.provision(node, verb, asker(), values)
    return _accepted(node)


@blueprint.put("/v1/nodes/<ident>/maintenance")
@authorize("node:set_maintenance")
@body(MAINTENANCE, optional=True)
def set_maintenance(ident: str, body: dict[str, Any]):
    _maintenance(ident, True, body.get("reason"))
    return "", 202


@blueprint.delete("/v1/nodes/<ident>/maintenance")
@authorize("node:set_maintenance")
def unset_maintenance(ident: str):
    _maintenance(ident, False, None)
    return "", 202


def _maintenance(ident: str, on: bool, reason: str | None) -> None:
    with services().db.write() as session:
        node = find_node(session, ident)
        values = {"maintenance": on, "maintenance_reason": reason if on else None}
        if not on:
            values["fault"] = None
        session.execute(update(Node).where(Node.id == node.id).values(**values))
        text = f"maintenance set: {reason}" if on and reason else (
            "maintenance set" if on else "maintenance unset")
        history.record(session, node.id, "maintenance", text, user=caller_name())


@blueprint.get("/v1/nodes/<ident>/validate")
@authorize("node:validate")
def validate_node(ident: str):
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    result: dict[str, dict] = {}
    problem = svc.door.power_problem(node)
    result["power"] = {"result": problem is None, "reason": problem}
    result["management"] = dict(result["power"])
    for interface in ("boot", "deploy", "console", "inspect", "network", "raid", "rescue",
                      "storage", "bios"):
        result[interface] = {"result": None, "reason": "not available yet in labmetal"}
    return result


@blueprint.get("/v1/nodes/<ident>/ports")
@blueprint.get("/v1/nodes/<ident>/ports/detail")
@authorize("port:get")
def node_ports(ident: str):
    detail = request.path.endswith("/detail")
    with services().db.read() as session:
        node = find_node(session, ident)
        rows = session.scalars(select(Port).where(Port.node_id == node.id).order_by(Port.id)).all()
    fields = None if detail else list(PORT_LIST_FIELDS)
    return {"ports": [select_fields(port_view(port, node.uuid), fields) for port in rows]}


def _history_view(row: NodeHistory, node_uuid: str, detail: bool) -> dict:
    view = {"uuid": row.uuid, "created_at": isotime(row.created_at), "severity": row.severity,
            "event": row.event, "links": links("nodes", f"{node_uuid}/history/{row.uuid}")}
    if detail:
        view.update(event_type=row.event_type, conductor=row.conductor, user=row.user)
    return view


@blueprint.get("/v1/nodes/<ident>/history")
@authorize("node:history:get")
@query(DETAIL, fields_param(HISTORY_FIELDS))
def node_history(ident: str, query: dict[str, Any]):
    if g.version < HISTORY_SINCE:
        raise not_found("Node history needs API version 1.78 or later")
    detail, fields = query["detail"], query.get("fields")
    with services().db.read() as session:
        node = find_node(session, ident)
        rows = session.scalars(select(NodeHistory).where(NodeHistory.node_id == node.id)
                               .order_by(NodeHistory.id)).all()
    views = [_history_view(row, node.uuid, detail or bool(fields)) for row in rows]
    return {"history": [select_fields(view, fields) for view in views]}


@blueprint.get("/v1/nodes/<ident>/history/<event>")
@authorize("node:history:get")
def node_history_event(ident: str, event: str):
    if g.version < HISTORY_SINCE:
        raise not_found("Node history needs API version 1.78 or later")
    with services().db.read() as session:
        node = find_node(session, ident)
        row = session.scalar(select(NodeHistory).where(NodeHistory.node_id == node.id,
                                                       NodeHistory.uuid == event))
    if row is None:
        raise not_found(f"Node history record {event} could not be found.")
    return _history_view(row, node.uuid, detail=True)


@blueprint.post("/v1/nodes/<ident>/capture")
@authorize("node:capture")
@body(CAPTURE)
def capture_disk(ident: str, body: dict[str, Any]):
    """labmetal's own: read a manageable node's disk (a teacher's reference PC) over iSCSI
    into a new whole-disk image. 202 with the image, which turns active when done."""
    name = body["image"]
    if not name.strip() or is_uuid(name):
        raise bad_request("capture needs {\"image\": \"<new image name>\"}")
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    if node.provision_state != states.MANAGEABLE:
        raise bad_request(f"Cannot capture node {node.uuid} in state "
                          f"'{node.provision_state}': capture works on manageable nodes")
    svc.door.check_power(node, "capture")
    svc.door.check_ramdisk(node)
    with svc.db.write() as session:
        if session.scalar(select(Image.id).where(Image.name == name)):
            raise conflict(f"An image named {name} already exists (field: image).")
        image = Image(name=name, kind="whole-disk", status=IMAGE_QUEUED, disk_format="raw",
                      description=(body.get("description")
                                   or f"captured from {node.name or node.uuid}"))
        session.add(image)
        session.flush()
        image_uuid = image.uuid
    info = {**(node.driver_internal_info or {}), "capture_image": image_uuid}
    try:
        svc.door.submit(node, "capture", {"provision_state": states.CAPTURING,
                                          "target_provision_state": states.MANAGEABLE,
                                          "provision_updated_at": utcnow(), "last_error": None,
                                          "driver_internal_info": info},
                        (Node.provision_state == states.MANAGEABLE,),
                        ("capture", f"capture into image {name} requested"), asker())
    except Refused:
        with svc.db.write() as session:
            session.execute(delete(Image).where(Image.uuid == image_uuid))
        raise
    return {"image": image_uuid, "node": node.uuid}, 202
