"""/v1/nodes: enroll, list, show, update (JSON patch) and delete nodes, as Ironic does."""
from __future__ import annotations

import re
from typing import Any

import jsonpatch
from flask import Blueprint
from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError

from labmetal import history, states
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import caller_name, isotime, links, page, select_fields
from labmetal.lookup import find_node
from labmetal.api.errors import ApiError, bad_request, conflict
from labmetal.api.validation import (DETAIL, PATCH, Field, body, fields_param, name_check, obj,
                                     paging, query, validate)
from labmetal.conductor import deploy_interfaces
from labmetal.conductor.power.base import InvalidDriverInfo
from labmetal.models import Node, new_uuid
from labmetal.secrets import masked

blueprint = Blueprint("nodes", __name__)

LIST_FIELDS = ("uuid", "name", "instance_uuid", "power_state", "provision_state", "maintenance")
SORT_KEYS = ("id", "uuid", "name", "created_at", "updated_at", "provision_state", "driver",
             "power_state", "provision_updated_at")
# What a client may set at creation or change with PATCH; everything else is the engine's.
WRITABLE = ("name", "driver", "driver_info", "properties", "extra", "instance_info",
            "instance_uuid", "description", "resource_class", "deploy_interface")
DEPLOY_INTERFACES = tuple(deploy_interfaces.DEPLOY_INTERFACES)  # the conductor's, by name
DICT_FIELDS = ("driver_info", "properties", "extra", "instance_info")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._~-]{1,255}$")


def node_view(node: Node, owner: str | None) -> dict[str, Any]:
    driver = services().drivers.get(node.driver)
    power_interface = driver.power.name if driver else None
    return {
        "uuid": node.uuid, "name": node.name, "driver": node.driver,
        "driver_info": masked(node.driver_info or {}),
        "driver_internal_info": node.driver_internal_info or {},
        "properties": node.properties or {}, "extra": node.extra or {},
        "instance_info": node.instance_info or {}, "instance_uuid": node.instance_uuid,
        "chassis_uuid": None, "description": node.description,
        "resource_class": node.resource_class,
        "power_state": node.power_state, "target_power_state": node.target_power_state,
        "provision_state": node.provision_state,
        "target_provision_state": node.target_provision_state,
        "provision_updated_at": isotime(node.provision_updated_at),
        "last_error": node.last_error, "maintenance": node.maintenance,
        "maintenance_reason": node.maintenance_reason, "fault": node.fault,
        "reservation": node.reservation, "conductor": owner, "conductor_group": "",
        "console_enabled": False, "clean_step": {}, "deploy_step": node.deploy_step or {},
        "automated_clean": None,
        "protected": False, "protected_reason": None, "retired": False, "retired_reason": None,
        "owner": None, "lessee": None, "traits": [], "network_data": {},
        "boot_mode": None, "secure_boot": None,
        "power_interface": power_interface, "management_interface": power_interface,
        "boot_interface": "ipxe", "deploy_interface": node.deploy_interface or "direct",
        "network_interface": "noop",
        "console_interface": "no-console", "inspect_interface": "no-inspect",
        "raid_interface": "no-raid", "rescue_interface": "no-rescue",
        "storage_interface": "noop", "vendor_interface": "no-vendor",
        "bios_interface": "no-bios",
        "created_at": isotime(node.created_at), "updated_at": isotime(node.updated_at),
        "links": links("nodes", node.uuid),
        "ports": links("nodes", f"{node.uuid}/ports"),
        "states": links("nodes", f"{node.uuid}/states"),
    }


# Every field of node_view, for ?fields= validation.
_FIELD_NAMES = (
    "uuid", "name", "driver", "driver_info", "driver_internal_info", "properties", "extra",
    "instance_info", "instance_uuid", "chassis_uuid", "description", "resource_class",
    "power_state", "target_power_state", "provision_state", "target_provision_state",
    "provision_updated_at", "last_error", "maintenance", "maintenance_reason", "fault",
    "reservation", "conductor", "conductor_group", "console_enabled", "clean_step",
    "deploy_step", "automated_clean", "protected", "protected_reason", "retired",
    "retired_reason", "owner", "lessee", "traits", "network_data", "boot_mode", "secure_boot",
    "power_interface", "management_interface", "boot_interface", "deploy_interface",
    "network_interface", "console_interface", "inspect_interface", "raid_interface",
    "rescue_interface", "storage_interface", "vendor_interface", "bios_interface",
    "created_at", "updated_at", "links", "ports", "states")


_NAME_RULE = ("a node name uses letters, digits and '-._~' only (at most 255), is not '.' or "
              "'..' and must not look like a UUID")
_BAD_NAME = "Invalid name {value!r}: " + _NAME_RULE


# What a node's writable fields must be, at creation and after a patch.
_WRITABLE_FIELDS = (
    Field("driver", str, required=True, example="wol",
          description="the hardware type: one of GET /v1/drivers"),
    Field("name", str | None, pattern=NAME_PATTERN.pattern, description=_NAME_RULE,
          example="tpr2-a01",
          error=_BAD_NAME, check=name_check(_BAD_NAME)),
    *(Field(key, dict, description=f"the node's {key}, a JSON object") for key in DICT_FIELDS),
    Field("instance_uuid", str | None),
    Field("description", str | None),
    Field("resource_class", str | None),
    Field("deploy_interface", str, enum=DEPLOY_INTERFACES, default="direct",
          description="how the image is written: direct (the agent) or iscsi"))
NODE = obj("a node", *_WRITABLE_FIELDS)
# Ironic's client may send these; labmetal's interfaces follow from the driver.
_FIXED_INTERFACES = tuple(name for name in _FIELD_NAMES
                          if name.endswith("_interface") and name != "deploy_interface")
NEW_NODE = obj(
    "a new node", *_WRITABLE_FIELDS,
    Field("uuid", str | None, format="uuid", description="chosen by labmetal when not given"),
    *(Field(key, str | None, description="accepted for Ironic's client; set by the driver")
      for key in _FIXED_INTERFACES))
LIST_QUERY = (
    fields_param(_FIELD_NAMES),
    *(Field(key, str, description=f"only nodes with this {key}")
      for key in ("provision_state", "driver", "resource_class", "fault", "conductor")),
    Field("maintenance", bool, description="only nodes in (or out of) maintenance"),
    Field("associated", bool, description="only nodes with (or without) an instance_uuid"),
    *paging(SORT_KEYS))


def owner_of(node: Node) -> str | None:
    return services().registry.owner(node.uuid)


# -- validation --------------------------------------------------------------------------
def check_fields(values: dict[str, Any]) -> None:
    """A node's writable fields (after a patch, from a CSV row) as declared, and its driver."""
    validate(NODE, {key: value for key, value in values.items() if key in WRITABLE})
    check_driver(values)


def check_driver(values: dict[str, Any]) -> None:
    """What only the service knows: the driver exists and the driver_info values given are
    well-formed (missing ones are for manage to name)."""
    drivers = services().drivers
    driver = drivers.get(str(values.get("driver")))
    if driver is None:
        raise bad_request(f"Unknown driver {values.get('driver')!r}; available drivers: "
                          f"{', '.join(sorted(drivers))}")
    try:
        driver.power.parse(values.get("driver_info") or {}, require=False)
    except InvalidDriverInfo as error:
        raise bad_request(str(error)) from None


def _name_taken(name: str | None) -> ApiError:
    return conflict(f"A node with name {name} already exists (field: name).")


# -- endpoints ---------------------------------------------------------------------------
@blueprint.get("/v1/nodes")
@authorize("node:get")
@query(DETAIL, *LIST_QUERY)
def list_nodes(query: dict[str, Any]):
    return _list(query, detail=query["detail"])


@blueprint.get("/v1/nodes/detail")
@authorize("node:get")
@query(*LIST_QUERY)
def list_nodes_detail(query: dict[str, Any]):
    return _list(query, detail=True)


def _list(query: dict[str, Any], detail: bool):
    fields = query.get("fields")
    if fields is None and not detail:
        fields = list(LIST_FIELDS)
    statement = select(Node)
    for name in ("provision_state", "driver", "resource_class", "fault"):
        if name in query:
            statement = statement.where(getattr(Node, name) == query[name])
    if "maintenance" in query:
        statement = statement.where(Node.maintenance.is_(query["maintenance"]))
    if "associated" in query:
        statement = statement.where(Node.instance_uuid.is_not(None) if query["associated"]
                                    else Node.instance_uuid.is_(None))
    conductor = query.get("conductor")
    with services().db.read() as session:
        rows, extra = page(session, statement, Node, query)
    views = [node_view(node, owner_of(node)) for node in rows]
    if conductor:
        views = [view for view in views if view["conductor"] == conductor]
    return {"nodes": [select_fields(view, fields) for view in views], **extra}


@blueprint.get("/v1/nodes/<ident>")
@authorize("node:get")
@query(fields_param(_FIELD_NAMES))
def show_node(ident: str, query: dict[str, Any]):
    with services().db.read() as session:
        node = find_node(session, ident)
    return select_fields(node_view(node, owner_of(node)), query.get("fields"))


@blueprint.post("/v1/nodes")
@authorize("node:create")
@body(NEW_NODE)
def create_node(body: dict[str, Any]):
    check_driver(body)
    svc = services()
    values = {key: body[key] for key in WRITABLE if key in body}
    values["driver_info"] = svc.box.seal_changed(values.get("driver_info") or {}, {})
    node = Node(**values, uuid=str(body.get("uuid") or new_uuid()).lower(),
                provision_state=states.ENROLL, power_state=None)
    try:
        with svc.db.write() as session:
            if node.name and session.scalar(select(Node.id).where(Node.name == node.name)):
                raise _name_taken(node.name)
            if session.scalar(select(Node.id).where(Node.uuid == node.uuid)):
                raise conflict(f"A node with UUID {node.uuid} already exists (field: uuid).")
            session.add(node)
            session.flush()
            history.record(session, node.id, "provisioning",
                           f"node enrolled with driver '{node.driver}'", user=caller_name())
    except IntegrityError:
        raise _name_taken(node.name) from None
    response = node_view(node, owner_of(node))
    return response, 201, {"Location": response["links"][0]["href"]}


@blueprint.patch("/v1/nodes/<ident>")
@authorize("node:update")
@body(PATCH)
def update_node(ident: str, body: list[dict[str, Any]]):
    """A JSON patch of the writable fields (WRITABLE); the result is checked as a whole."""
    patch = body
    svc = services()
    for operation in patch:
        path = operation["path"]
        root = path.lstrip("/").split("/", 1)[0]
        if root not in WRITABLE:
            raise bad_request(f"'{path}' cannot be changed: the writable fields are "
                              f"{', '.join(WRITABLE)}")
    try:
        with svc.db.write() as session:
            node = find_node(session, ident)
            session.refresh(node, with_for_update=True)
            if node.reservation:
                raise conflict(f"Node {node.uuid} is locked by host {node.reservation}, please "
                               "retry after the current operation is completed.")
            before = {key: getattr(node, key) for key in WRITABLE}
            try:
                after = jsonpatch.apply_patch(before, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
                raise bad_request(f"Invalid patch: {e}") from None
            for key in DICT_FIELDS:
                after[key] = after.get(key) or {}
            after["deploy_interface"] = after.get("deploy_interface") or "direct"
            check_fields(after)
            after["driver_info"] = svc.box.seal_changed(after["driver_info"],
                                                        before["driver_info"] or {})
            if after["name"] and after["name"] != before["name"] and session.scalar(
                    select(Node.id).where(Node.name == after["name"])):
                raise _name_taken(after["name"])
            changed = sorted(key for key in WRITABLE if after.get(key) != before[key])
            for key in changed:
                setattr(node, key, after.get(key))
            if changed:
                history.record(session, node.id, "update", f"updated: {', '.join(changed)}",
                               user=caller_name())
    except IntegrityError:
        raise _name_taken(ident) from None
    return node_view(node, owner_of(node))


@blueprint.delete("/v1/nodes/<ident>")
@authorize("node:delete")
def delete_node(ident: str):
    svc = services()
    with svc.db.write() as session:
        node = find_node(session, ident)
        result = session.execute(
            delete(Node).where(Node.id == node.id, Node.reservation.is_(None),
                               or_(Node.provision_state.in_(states.DELETABLE),
                                   Node.maintenance.is_(True)))
            .execution_options(synchronize_session=False))
        deleted = result.rowcount  # type: ignore[attr-defined]  # a CursorResult
    if deleted:
        return "", 204
    if node.reservation:
        raise conflict(f"Node {node.uuid} is locked by host {node.reservation}, please retry "
                       "after the current operation is completed.")
    raise bad_request(f"Node {node.uuid} cannot be deleted in provision state "
                      f"'{node.provision_state}'; put it in maintenance first")
