"""Acting on a node: power and provision state changes (handed to its conductor), maintenance,
validation, its ports and its history."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request
from sqlalchemy import delete, select, update

from labmetal import history, states
from labmetal.api.app import services
from labmetal.api.auth import authorize
from labmetal.api.common import caller_name, find_node, is_uuid, isotime, links, select_fields
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.ports import PORT_LIST_FIELDS, port_view
from labmetal.api.validation import DETAIL, Field, body, fields_param, obj, query
from labmetal.conductor.power.base import InvalidDriverInfo, PowerError, PowerTarget
from labmetal.conductor.power.wol import IN_BAND_ONLY
from labmetal.conductor.rpcapi import NoConductor, NodeLocked, Unchanged
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


def _locked(node: Node, holder: str) -> ApiError:
    return conflict(f"Node {node.uuid} is locked by host {holder}, please retry after the "
                    "current operation is completed.")


def _accepted(node: Node):
    return "", 202, {"Location": links("nodes", f"{node.uuid}/states")[0]["href"]}


def power_target(node: Node) -> PowerTarget:
    with services().db.read() as session:
        macs = list(session.scalars(select(Port.address).where(Port.node_id == node.id)))
    return PowerTarget(node.uuid, services().box.open_all(node.driver_info), macs)


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
    target = body["target"]
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    driver = svc.drivers[node.driver]
    try:
        driver.power.validate(power_target(node))
    except (InvalidDriverInfo, PowerError, ValueError) as error:
        raise bad_request(f"Cannot change the power state of node {node.uuid}: {error}") from None
    if driver.power.assumed_state and target != states.POWER_ON:
        raise bad_request(f"Cannot '{target}' node {node.uuid}: {IN_BAND_ONLY}")
    if node.provision_state == states.VERIFYING:
        raise conflict(f"Node {node.uuid} is being verified; retry once it is manageable")
    _hand_over(node, target, {"target_power_state": states.POWER_TARGETS[target],
                              "last_error": None}, (), ("power", f"'{target}' requested"))
    return _accepted(node)


@blueprint.put("/v1/nodes/<ident>/states/provision")
@authorize("node:set_provision_state")
@body(PROVISION)
def set_provision_state(ident: str, body: dict[str, Any]):
    verb = body["target"]
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, ident)
    step = states.transition(node.provision_state, verb)
    if step is None:
        allowed = states.allowed_verbs(node.provision_state)
        raise bad_request(
            f"The requested action \"{verb}\" can not be performed on node \"{node.uuid}\" while "
            f"it is in state \"{node.provision_state}\". Allowed verbs in this state: "
            f"{', '.join(allowed) if allowed else 'none'}.")
    if step.action is not None:
        try:
            svc.drivers[node.driver].power.validate(power_target(node))
        except (InvalidDriverInfo, PowerError, ValueError) as error:
            raise bad_request(f"Cannot {verb} node {node.uuid}: {error}") from None
    if step.action in RAMDISK_ACTIONS or (step.action == "clean" and svc.settings.automated_clean):
        _check_ramdisk(node)
    if step.action == "deploy":
        _check_instance_image(node)
    event = ("provisioning", f"'{verb}' requested: {node.provision_state} -> {step.state}")
    values = {"provision_state": step.state, "target_provision_state": step.target,
              "provision_updated_at": utcnow(), "last_error": None}
    if verb == "abort":
        values.update(last_error=f"{node.provision_state} aborted by "
                                 f"{caller_name() or 'a user'}",
                      agent_token=None, agent_token_given=False, agent_url=None,
                      agent_address=None, agent_alarm=None)
    condition = (Node.provision_state == node.provision_state,)
    if step.action is None:
        _change_now(node, values, condition, event)
    else:
        _hand_over(node, step.action, values, condition, event)
    return _accepted(node)


RAMDISK_ACTIONS = ("deploy", "undeploy", "inspect")


def _check_ramdisk(node: Node) -> None:
    """The deploy kernel and ramdisk a node will boot must exist before it is powered."""
    svc = services()
    for key, kind in (("deploy_kernel", "kernel"), ("deploy_ramdisk", "ramdisk")):
        ident = (node.driver_info or {}).get(key) or getattr(svc.settings, key)
        if not ident:
            raise bad_request(f"Cannot boot node {node.uuid} into the deploy ramdisk: set "
                              f"driver_info/{key} (or the {key} setting) to a {kind} image")
        _active_image(ident, (kind,), f"driver_info/{key}")


def _check_instance_image(node: Node) -> None:
    ident = (node.instance_info or {}).get("image_source")
    if not ident:
        raise bad_request(f"Cannot deploy node {node.uuid}: set instance_info/image_source to "
                          "a whole-disk or partition image (baremetal node set <node> "
                          "--instance-info image_source=<image>)")
    _active_image(ident, ("whole-disk", "partition"), "instance_info/image_source")


def _active_image(ident: str, kinds: tuple[str, ...], field: str) -> None:
    with services().db.read() as session:
        column = Image.uuid if is_uuid(ident) else Image.name
        image = session.scalar(select(Image).where(column == ident))
    if image is None:
        raise bad_request(f"{field}: no image {ident!r} in the image store")
    if image.status != "active" or image.kind not in kinds:
        raise bad_request(f"{field}: image {image.name} is a {image.status} {image.kind} image; "
                          f"expected an active {' or '.join(kinds)} image")


def _hand_over(node: Node, action: str, values: dict, conditions: tuple, event: tuple) -> None:
    try:
        services().conductors.request(node, action, values, conditions, event, caller_name())
    except NodeLocked as error:
        raise _locked(node, error.holder) from None
    except NoConductor as error:
        raise ApiError(503, f"Cannot act on node {node.uuid}: {error}") from None
    except Unchanged:
        raise conflict(f"Node {node.uuid} changed state while the request was made; "
                       "look at it again and retry") from None


def _change_now(node: Node, values: dict, conditions: tuple, event: tuple) -> None:
    """A transition without hardware work: one compare-and-set under the lock rule."""
    with services().db.write() as session:
        done = session.execute(update(Node).where(Node.id == node.id, Node.reservation.is_(None),
                                                  *conditions).values(**values)).rowcount
        if done:
            history.record(session, node.id, event[0], event[1], user=caller_name())
    if not done:
        with services().db.read() as session:
            holder = session.scalar(select(Node.reservation).where(Node.id == node.id))
        if holder:
            raise _locked(node, holder)
        raise conflict(f"Node {node.uuid} changed state while the request was made; retry")


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
    try:
        svc.drivers[node.driver].power.validate(power_target(node))
        result["power"] = {"result": True, "reason": None}
    except (InvalidDriverInfo, PowerError, ValueError) as error:
        result["power"] = {"result": False, "reason": str(error)}
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
    try:
        svc.drivers[node.driver].power.validate(power_target(node))
    except (InvalidDriverInfo, PowerError, ValueError) as error:
        raise bad_request(f"Cannot capture node {node.uuid}: {error}") from None
    _check_ramdisk(node)
    with svc.db.write() as session:
        if session.scalar(select(Image.id).where(Image.name == name)):
            raise conflict(f"An image named {name} already exists (field: image).")
        image = Image(name=name, kind="whole-disk", status="queued", disk_format="raw",
                      description=body.get("description") or f"captured from {node.name or node.uuid}")
        session.add(image)
        session.flush()
        image_uuid = image.uuid
    info = {**(node.driver_internal_info or {}), "capture_image": image_uuid}
    try:
        _hand_over(node, "capture", {"provision_state": states.CAPTURING,
                                     "target_provision_state": states.MANAGEABLE,
                                     "provision_updated_at": utcnow(), "last_error": None,
                                     "driver_internal_info": info},
                   (Node.provision_state == states.MANAGEABLE,),
                   ("capture", f"capture into image {name} requested"))
    except ApiError:
        with svc.db.write() as session:
            session.execute(delete(Image).where(Image.uuid == image_uuid))
        raise
    return {"image": image_uuid, "node": node.uuid}, 202
